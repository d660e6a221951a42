"""Full disks: a clear DiskFullError naming the folder and its free space, no temporary file left, and a re-run
that resumes. ENOSPC is simulated by making a writer fail mid-write (no root, no small filesystem needed)."""
from __future__ import annotations

import errno
import io
import json
import pickle
import shutil
from collections import namedtuple

import pytest

from conftest import plan_quickly

import samplan.disk_space as disk_space
import samplan.preprocessing.cache as cache
from samplan.errors import DiskFullError
from samplan.locks import LOCK_NAME
from samplan.utils import atomic_path, save_json

Usage = namedtuple("Usage", "total used free")


def _free(monkeypatch, free: int) -> None:
    """Make every folder report `free` bytes available."""
    monkeypatch.setattr(disk_space.shutil, "disk_usage", lambda p: Usage(10**12, 10**12 - free, free))


def _enospc_after(n_bytes: int):
    """An `open` stand-in whose files take `n_bytes` of what is written and then fail like a full disk."""
    class Filling(io.TextIOWrapper):
        def write(self, text):
            super().write(text[:n_bytes])
            self.flush()
            raise OSError(errno.ENOSPC, "No space left on device")

    def fake_open(path, mode="r", **kwargs):
        assert "w" in mode
        return Filling(io.FileIO(path, "w"), encoding="utf-8")
    return fake_open


def test_a_write_cut_by_a_full_disk_raises_a_clear_error_and_leaves_nothing(tmp_path, monkeypatch):
    target = tmp_path / "out" / "plans.json"
    save_json({"old": True}, target)
    monkeypatch.setattr("samplan.utils.open", _enospc_after(5), raising=False)
    with pytest.raises(DiskFullError) as e:
        save_json({"new": list(range(100))}, target)
    msg = str(e.value)
    free = shutil.disk_usage(tmp_path).free
    assert str(target.parent) in msg and "plans.json" in msg and "free" in msg
    assert f"{free / 1e9:.1f} GB" in msg or f"{free / 1e12:.1f} TB" in msg  # the real free space, after cleanup
    assert "free space and re-run the same command; it resumes" in msg.lower()
    assert e.value.exit_code == 74 and isinstance(e.value.__cause__, OSError)
    assert sorted(p.name for p in target.parent.iterdir()) == ["plans.json"]  # no temporary file
    assert json.loads(target.read_text()) == {"old": True}  # the previous file is intact


def test_a_quota_error_is_a_disk_full_error_too(tmp_path):
    with pytest.raises(DiskFullError):
        with atomic_path(tmp_path / "x.bin") as tmp:
            raise OSError(errno.EDQUOT, "Disk quota exceeded", str(tmp))
    assert list(tmp_path.iterdir()) == []


def test_no_room_even_for_the_temporary_file(tmp_path, monkeypatch):
    def no_inode(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("samplan.utils.tempfile.mkstemp", no_inode)
    with pytest.raises(DiskFullError, match=rf"disk space in {tmp_path / 'new'} .*while creating x\.json"):
        save_json({}, tmp_path / "new" / "x.json")


def test_writers_without_errno_are_judged_by_the_free_space(tmp_path, monkeypatch):
    # blosc2 says "Error while creating the NDArray", torch "unexpected pos": with space left, that is another error
    with pytest.raises(RuntimeError, match="creating the NDArray"):
        with atomic_path(tmp_path / "a.b2nd"):
            raise RuntimeError("Error while creating the NDArray")
    _free(monkeypatch, 4096)
    with pytest.raises(DiskFullError, match=r"4\.1 kB free"):
        with atomic_path(tmp_path / "a.b2nd") as tmp:
            tmp.write_bytes(b"\0" * 100)
            raise RuntimeError("Error while creating the NDArray")
    assert list(tmp_path.iterdir()) == []


def test_a_write_that_returns_normally_on_a_full_disk_is_not_kept(tmp_path, monkeypatch):
    # SimpleITK prints "NWAD: wrote only 0 of N bytes" and returns: the short file must not replace the target
    _free(monkeypatch, 0)
    with pytest.raises(DiskFullError, match=r"its unfinished 3 bytes were removed; less than 1 MiB was left"):
        with atomic_path(tmp_path / "img.nii.gz") as tmp:
            tmp.write_bytes(b"abc")
    assert list(tmp_path.iterdir()) == []


def test_other_errors_and_success_are_unchanged(tmp_path):
    with pytest.raises(OSError) as e:
        with atomic_path(tmp_path / "x"):
            raise OSError(errno.EACCES, "Permission denied")
    assert not isinstance(e.value, DiskFullError)
    with atomic_path(tmp_path / "x") as tmp:
        tmp.write_text("ok")
    assert (tmp_path / "x").read_text() == "ok"


def test_the_error_survives_the_trip_back_from_a_worker_process():
    err = pickle.loads(pickle.dumps(DiskFullError("/data/pre", 1234, needed=10**6, detail=" while writing a.b2nd")))
    assert isinstance(err, DiskFullError) and "/data/pre" in str(err) and "1.2 kB free" in str(err)
    assert "about 1.0 MB more are needed" in str(err)


def test_the_training_log_append_reports_a_full_disk(tmp_path, monkeypatch):
    from samplan.training.logger import TrainingLogger

    def full_open(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    logger = TrainingLogger(tmp_path / "fold_0", echo=False)
    monkeypatch.setattr("builtins.open", full_open)
    with pytest.raises(DiskFullError, match=r"fold_0 .*while appending to training_log\.txt"):
        logger.print("epoch 3")


def test_preprocessing_on_a_full_disk_stops_clearly_and_a_rerun_resumes(synth3d, samplan_env, monkeypatch, capsys):
    from samplan.cli.plan_and_preprocess import main

    real_write, calls = cache._write_array, []

    def write_until_full(arr, path, patch_size):
        calls.append(path.name)
        if len(calls) == 5:  # the third case's image: two cases are complete by then
            with atomic_path(path) as tmp:
                tmp.write_bytes(b"\0" * 64)
                raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(arr, path, patch_size)

    plan_quickly(synth3d, ["unet"], ["3d_fullres"], plan_only=True)  # a fast fingerprint; the CLI reuses it
    monkeypatch.setattr(cache, "_write_array", write_until_full)
    argv = ["-d", synth3d.name, "-m", "unet", "-c", "3d_fullres", "-np", "1"]
    assert main(argv) == 74
    err = capsys.readouterr().err
    out = samplan_env["SAMPLAN_PREPROCESSED"] / synth3d.name
    folder = next(p for p in out.iterdir() if p.is_dir() and p.name != "gt_segmentations")
    assert f"not enough disk space in {folder}" in err and "re-run the same command" in err
    assert "Traceback" not in err and err.count("error:") == 1
    assert not list(out.rglob(".*tmp*")) and not (out / LOCK_NAME).exists()
    done = {p.name: p.stat().st_mtime_ns for p in folder.glob("*.json")}
    assert len(done) == 2

    monkeypatch.setattr(cache, "_write_array", real_write)  # space was freed
    assert main(argv) == 0
    assert len(list(folder.glob("*.json"))) == 4 and all(cache.case_is_complete(folder, p.stem)
                                                        for p in folder.glob("*.json"))
    assert {n: (folder / n).stat().st_mtime_ns for n in done} == done  # the finished cases were not redone


def test_preprocessing_refuses_up_front_when_the_cache_cannot_fit(synth3d, samplan_env, monkeypatch):
    plan_quickly(synth3d, ["unet"], ["3d_fullres"], plan_only=True)
    _free(monkeypatch, 10_000)
    monkeypatch.setattr(disk_space, "NEARLY_FULL_BYTES", 1000)  # let the small JSON files through
    with pytest.raises(DiskFullError, match=r"10\.0 kB free; about .* more are needed\) for preprocessing 4 case"):
        plan_quickly(synth3d, ["unet"], ["3d_fullres"])
    out = samplan_env["SAMPLAN_PREPROCESSED"] / synth3d.name
    assert not any((d / f"case_{i:03d}.json").exists() for d in out.iterdir() if d.is_dir() for i in range(4))
