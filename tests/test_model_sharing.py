"""samplan_export_model / samplan_install_model: a model folder round-trips byte for byte and predicts the same;
damaged or tampered archives are refused with the member named and nothing written."""
from __future__ import annotations

import hashlib
import json
import shutil
import stat
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import plan_quickly, samplan_dirs
from method_plans import bind
from samplan.cli.export_model import main as export_main
from samplan.cli.install_model import main as install_main
from samplan.dataset.dataset_json import group_images_by_case
from samplan.dataset.image_io import read_seg
from samplan.dataset.labels import LabelManager
from samplan.errors import InputError, SamplanError
from samplan.experiment_planning.plans import PLANS_VERSION_KEY
from samplan.inference.model_selection import select_model
from samplan.inference.predictor import Predictor
from samplan.methods import get_method
from samplan.models.checkpoint import save_checkpoint
from samplan.models.weights import WEIGHTS
from samplan.paths import model_dir
from samplan.pipeline.model_archive import MANIFEST_NAME
from samplan.pipeline.model_sharing import export_model, install_model, pretrained_weights
from samplan.utils import load_json
from synthetic import make_dataset_3d

CONFIG = "3d_fullres"


def _fake_training(md: Path, plans: dict, dj: dict, fold: int, seed: int) -> None:
    """What samplan_train leaves in a fold folder: a checkpoint of a (here untrained, seeded) network, its logs, the
    validation summary, a progress plot and the fold's lock file."""
    torch.manual_seed(seed)
    method = get_method("unet")
    lm = LabelManager.from_dataset_json(dj)
    net = method.build_network(bind(method, plans, CONFIG), len(dj["channel_names"]), lm.num_outputs)
    fd = md / f"fold_{fold}"
    state = {"network_weights": net.state_dict(), "method": "unet", "configuration": CONFIG, "fold": fold,
             "plans_name": plans["plans_name"], "current_epoch": 1, "num_input_channels": 1,
             "num_outputs": lm.num_outputs}
    save_checkpoint(state, fd / "checkpoint_final.pth")
    if fold == 0:
        save_checkpoint({**state, "current_epoch": 0}, fd / "checkpoint_best.pth")
    (fd / "training_log.txt").write_text(f"fold {fold}: 1 epoch\n")
    (fd / "progress.json").write_text(json.dumps({"train_loss": [0.9]}))
    (fd / "progress.png").write_bytes(b"\x89PNG not exported")
    (fd / ".samplan.lock").write_text("{}")
    (fd / "validation").mkdir()
    (fd / "validation" / "summary.json").write_text(json.dumps({"foreground_mean": {"Dice": 0.5}}))
    (fd / "validation" / "case_0.nii.gz").write_bytes(b"validation predictions are not exported")


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """A synthetic dataset, its plans, a two-fold unet model folder in SAMPLAN_RESULTS, its archive (folds 0 1, final
    checkpoints) and the predictions of the original model."""
    root = tmp_path_factory.mktemp("sharing")
    with samplan_dirs(root):
        raw = make_dataset_3d(root / "SAMPLAN_RAW", n_cases=3, shape=(8, 32, 28))
        pre = plan_quickly(raw, ["unet", "medsam"], [CONFIG], plan_only=True)
        plans, dj = load_json(pre / "plans.json"), load_json(raw / "dataset.json")
        md = model_dir(raw.name, "unet", CONFIG)
        for f in ("plans.json", "dataset.json", "fingerprint.json"):
            md.mkdir(parents=True, exist_ok=True)
            shutil.copy(pre / f, md / f)
        for fold in (0, 1):
            _fake_training(md, plans, dj, fold, seed=fold)
        archive = root / "unet.zip"
        manifest = export_model(archive, raw.name, "unet")
        cases = dict(sorted(group_images_by_case(raw / "imagesTr", dj["file_ending"]).items())[:2])
        Predictor.from_model_dir(md, device="cpu", tta=False, progress=False).predict_cases(cases, root / "pred_a")
        yield {"root": root, "raw": raw, "plans": plans, "md": md, "archive": archive, "manifest": manifest,
               "cases": cases}


@pytest.fixture
def receiver(tmp_path, monkeypatch):
    """An empty SAMPLAN_RESULTS to install into."""
    results = tmp_path / "results_b"
    results.mkdir()
    monkeypatch.setenv("SAMPLAN_RESULTS", str(results))
    return results


def test_export_lists_every_file_with_its_hash_and_nothing_else(shared):
    m, md = shared["manifest"], shared["md"]
    assert (m["format"], m["method"], m["configuration"], m["folds"], m["checkpoints"]) == \
        ("samplan-model", "unet", CONFIG, ["0", "1"], ["final"])
    assert m["dataset_name"] == shared["raw"].name and m["samplan_version"] and m["pretrained_weights"] is None
    expected = {"plans.json", "dataset.json", "fingerprint.json"} | {
        f"fold_{f}/{n}" for f in (0, 1)
        for n in ("checkpoint_final.pth", "training_log.txt", "progress.json", "validation/summary.json")}
    assert set(m["files"]) == expected  # no best checkpoint, lock, plot or validation predictions
    for name, entry in m["files"].items():
        data = (md / name).read_bytes()
        assert entry == {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    with zipfile.ZipFile(shared["archive"]) as zf:
        assert set(zf.namelist()) == expected | {MANIFEST_NAME}
        assert json.loads(zf.read(MANIFEST_NAME)) == m


def test_install_is_byte_identical_and_predicts_the_same(shared, receiver, tmp_path):
    manifest, target = install_model(shared["archive"])
    assert target == receiver / shared["raw"].name / shared["md"].name
    for name in manifest["files"]:
        assert (target / name).read_bytes() == (shared["md"] / name).read_bytes(), name
    assert json.loads((target / MANIFEST_NAME).read_text()) == manifest  # provenance and licence stay with the model
    assert not list(receiver.rglob(".*"))  # no temporary folder or lock left
    assert select_model(shared["raw"].name, "unet").path == target  # samplan_predict finds it
    Predictor.from_model_dir(target, device="cpu", tta=False, progress=False).predict_cases(shared["cases"], tmp_path / "b")
    for case in shared["cases"]:
        a, props_a = read_seg(shared["root"] / "pred_a" / f"{case}.nii.gz")
        b, props_b = read_seg(tmp_path / "b" / f"{case}.nii.gz")
        np.testing.assert_array_equal(a, b)
        assert props_a["spacing"] == props_b["spacing"]
    assert len(np.unique(a)) > 1  # the seeded networks predict more than background: a real comparison


def test_fold_and_checkpoint_choice(shared, receiver, tmp_path, monkeypatch):
    monkeypatch.setenv("SAMPLAN_RESULTS", str(shared["md"].parents[1]))
    m = export_model(tmp_path / "best.zip", shared["raw"].name, "unet", CONFIG, folds=[0], checkpoint="both")
    assert m["folds"] == ["0"] and {"fold_0/checkpoint_final.pth", "fold_0/checkpoint_best.pth"} <= set(m["files"])
    with pytest.raises(SamplanError, match=r"fold\(s\) 1 lack checkpoint_final.pth and checkpoint_best.pth"):
        export_model(tmp_path / "x.zip", shared["raw"].name, "unet", folds=[0, 1], checkpoint="both")
    assert not list(tmp_path.glob("*x.zip*"))
    monkeypatch.setenv("SAMPLAN_RESULTS", str(receiver))
    _, target = install_model(tmp_path / "best.zip")
    assert sorted(p.name for p in (target / "fold_0").iterdir()) == [
        "checkpoint_best.pth", "checkpoint_final.pth", "progress.json", "training_log.txt", "validation"]


def test_cli_round_trip_and_overwrite(shared, receiver, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SAMPLAN_RESULTS", str(shared["md"].parents[1]))
    assert export_main(["-d", shared["raw"].name, "-m", "unet", "-f", "1", "-o", str(tmp_path / "f1.zip")]) == 0
    assert "folds 1," in capsys.readouterr().out
    monkeypatch.setenv("SAMPLAN_RESULTS", str(receiver))
    assert install_main([str(tmp_path / "f1.zip")]) == 0
    assert f"-m unet -c {CONFIG}" in capsys.readouterr().out
    target = receiver / shared["raw"].name / shared["md"].name
    assert install_main([str(tmp_path / "f1.zip")]) == 2  # an existing model folder is kept ...
    assert "exists already; pass --overwrite" in capsys.readouterr().err
    assert install_main([str(shared["archive"]), "--overwrite"]) == 0  # ... unless replaced on request
    assert sorted(p.name for p in target.glob("fold_*")) == ["fold_0", "fold_1"]
    assert not list(target.parent.glob(".*"))


def test_licence_of_the_pretrained_weights_comes_from_the_weights_table(shared):
    plans = shared["plans"]
    litemedsam = pretrained_weights(plans, "medsam")  # the planner's CPU default for medsam: real LiteMedSAM weights
    assert (litemedsam["backbone"], litemedsam["file"], litemedsam["licence"]) == ("litemedsam", "lite_medsam.pth", "Apache-2.0")
    assert pretrained_weights(plans, "unet") is None
    medsam = plans["methods"]["medsam"]
    for overrides, licence in (({"checkpoint": "none"}, None), ({"backbone": "tiny_vit"}, None),
                               ({"backbone": "vit_b", "checkpoint": "/x/sam_vit_b_01ec64.pth"}, "Apache-2.0"),
                               ({"checkpoint": "/x/my_sam.pth"}, "unknown")):
        w = pretrained_weights({"methods": {"medsam": {**medsam, **overrides}}}, "medsam")
        assert (w and w["licence"].split(":")[0]) == licence, overrides
    for entry in WEIGHTS.values():  # every official checkpoint's licence is readable from the table
        w = pretrained_weights({"methods": {"m": {"backbone": entry.name, "checkpoint": "auto"}}}, "m")
        assert w["licence"] == "Apache-2.0", entry.name


# ---------------------------------------------------------------------------------------------- tampering


def _members(archive: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(archive) as zf:
        return {i.filename: zf.read(i) for i in zf.infolist()}


def _rehash(members: dict[str, bytes], names: list[str]) -> None:
    """Make the manifest describe `names` as they are now (a tamperer who also edits the manifest)."""
    m = json.loads(members[MANIFEST_NAME])
    for n in names:
        m["files"][n] = {"sha256": hashlib.sha256(members[n]).hexdigest(), "size": len(members[n])}
    members[MANIFEST_NAME] = json.dumps(m).encode()


def _write(path: Path, members: dict[str, bytes] | list[tuple[str, bytes]], deflate: bool = False) -> Path:
    with warnings.catch_warnings(), zipfile.ZipFile(path, "w") as zf:
        warnings.simplefilter("ignore")  # zipfile warns about the duplicate name that one case needs
        for name, data in (members.items() if isinstance(members, dict) else members):
            zf.writestr(name, data, compress_type=zipfile.ZIP_DEFLATED if deflate else zipfile.ZIP_STORED)
    return path


def _flipped_byte(good: Path, out: Path) -> Path:
    data = bytearray(good.read_bytes())
    with zipfile.ZipFile(good) as zf:
        info = zf.getinfo("fold_0/checkpoint_final.pth")
    data[info.header_offset + 30 + len(info.filename) + 1000] ^= 0xFF  # inside the member's stored bytes
    out.write_bytes(bytes(data))
    return out


def _changed_weights(good: Path, out: Path) -> Path:
    members = _members(good)  # a checkpoint rewritten with a valid CRC, the manifest left as it was
    members["fold_0/checkpoint_final.pth"] = members["fold_1/checkpoint_final.pth"]
    return _write(out, members)


def _edited(fn, rehash=()):
    def make(good: Path, out: Path) -> Path:
        members = _members(good)
        fn(members)
        if rehash:
            _rehash(members, list(rehash))
        return _write(out, members)
    return make


def _manifest_edit(fn):
    def edit(members):
        m = json.loads(members[MANIFEST_NAME])
        fn(m)
        members[MANIFEST_NAME] = json.dumps(m).encode()
    return edit


def _symlink(good: Path, out: Path) -> Path:
    members = _members(good)
    _write(out, members)
    with zipfile.ZipFile(out, "a") as zf:
        info = zipfile.ZipInfo("fold_0/link.txt")
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(info, "/etc/passwd")
    return out


def _with_old_plans(members):
    plans = json.loads(members["plans.json"])
    plans[PLANS_VERSION_KEY] = 999
    members["plans.json"] = json.dumps(plans).encode()


def _bomb(good: Path, out: Path) -> Path:
    members = _members(good)
    members["fold_0/notes.txt"] = bytes(8 * 2**20)  # 8 MiB of zeros deflate to ~8 kB
    _rehash(members, ["fold_0/notes.txt"])
    return _write(out, members, deflate=True)


TAMPERED = {
    "flipped byte": (_flipped_byte, r"member 'fold_0/checkpoint_final.pth' is damaged"),
    "changed checkpoint": (_changed_weights, r"member 'fold_0/checkpoint_final.pth' has sha256 .* changed or damaged"),
    "extra member": (_edited(lambda m: m.update({"fold_0/extra.txt": b"hi"})), r"'fold_0/extra.txt' is not listed"),
    "missing member": (_edited(lambda m: m.pop("fold_1/training_log.txt")), r"'fold_1/training_log.txt' listed .* missing"),
    "parent path": (_edited(lambda m: m.update({"../evil": b"x"}), ["../evil"]), r"'\.\./evil' has a '\.\.'"),
    "absolute path": (_edited(lambda m: m.update({"/tmp/evil": b"x"}), ["/tmp/evil"]), r"'/tmp/evil' has an absolute"),
    "unexpected file": (_edited(lambda m: m.update({"fold_0/run.sh.txt/x.pth": b"x"}), ["fold_0/run.sh.txt/x.pth"]),
                        r"is not a file a model archive holds"),
    "duplicate": (lambda g, o: _write(o, [*_members(g).items(), ("plans.json", b"{}")]), r"'plans.json' appears more"),
    "symlink": (_symlink, r"'fold_0/link.txt' is a directory, symlink"),
    "size lie": (_edited(_manifest_edit(lambda m: m["files"]["dataset.json"].update(size=5))),
                 r"'dataset.json' holds \d+ bytes but manifest.json gives 5"),
    "bad manifest": (_edited(lambda m: m.update({MANIFEST_NAME: b"{not json"})), r"manifest.json is not valid JSON"),
    "no manifest": (_edited(lambda m: m.pop(MANIFEST_NAME)), r"has no manifest.json"),
    "manifest schema": (_edited(_manifest_edit(lambda m: m.update(folds="0"))), r"no usable 'folds' list"),
    "traversing name": (_edited(_manifest_edit(lambda m: m.update(method="../../x"))), r"no usable 'method'"),
    "newer format": (_edited(_manifest_edit(lambda m: m.update(format_version=2))), r"format version 2"),
    "old plans": (_edited(_with_old_plans, ["plans.json"]), r"plans format version 999"),
    "zip bomb": (_bomb, r"'fold_0/notes.txt' expands \d+-fold"),
    "not a zip": (lambda g, o: (o.write_bytes(g.read_bytes()[:5000]), o)[1], r"is not a zip archive"),
}


@pytest.mark.parametrize("case", list(TAMPERED))
def test_tampered_archive_is_refused_and_nothing_written(shared, receiver, tmp_path, case, capsys):
    make, message = TAMPERED[case]
    bad = make(shared["archive"], tmp_path / "bad.zip")
    with pytest.raises(InputError, match=message):
        install_model(bad)
    assert list(receiver.iterdir()) == []
    assert install_main([str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err and err.count("\n") == 1
    assert list(receiver.iterdir()) == []


def test_a_refused_archive_leaves_an_installed_model_alone(shared, receiver, tmp_path):
    _, target = install_model(shared["archive"])
    before = {p: p.read_bytes() for p in target.rglob("*") if p.is_file()}
    with pytest.raises(InputError, match="is damaged"):
        install_model(_flipped_byte(shared["archive"], tmp_path / "bad.zip"), overwrite=True)
    assert {p: p.read_bytes() for p in target.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in target.parent.iterdir()) == [target.name]
