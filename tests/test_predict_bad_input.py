"""samplan_predict on bad input: each bad case is refused with its file named (exit status 2, no output for it)
while the good cases of the run are still predicted; bad folders and damaged model folders are refused up front."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from samplan.cli.predict import main as predict_main
from samplan.errors import DatasetError, InputError
from samplan.experiment_planning.plans import PLANS_VERSION, PLANS_VERSION_KEY, Plans
from samplan.inference.input_checks import list_input_cases
from samplan.inference.model_selection import load_model_files
from samplan.models.checkpoint import save_checkpoint
from synthetic import make_dataset_3d
from test_predictor import PointwiseMethod, _plan, make_model, make_two_channel_model  # noqa: F401 - the pointnet test method and its models

EXIT = DatasetError.exit_code
assert InputError.exit_code == EXIT == 2


@pytest.fixture(autouse=True)
def pointnet(monkeypatch):
    from samplan.methods import METHODS

    monkeypatch.setitem(METHODS, "pointnet", PointwiseMethod())


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    """A synthetic 3D dataset (1 channel, 3 cases) and the plans the planner writes for it."""
    raw = make_dataset_3d(tmp_path_factory.mktemp("raw"), n_cases=3, shape=(10, 36, 32))
    plans, dj = _plan(raw)
    return raw, plans, dj


def _write(arr: np.ndarray, path: Path, spacing: tuple[float, ...] | None = None) -> None:
    img = sitk.GetImageFromArray(arr)
    if spacing is not None:
        img.SetSpacing(spacing)
    sitk.WriteImage(img, str(path))


def _model(results: Path, synth, **kwargs) -> Path:
    raw, plans, dj = synth
    return make_model(results, plans, dj, "3d_fullres", {0: (None, None)}, **kwargs)


def _run(inp: Path, out: Path, *extra: str) -> int:
    return predict_main(["-i", str(inp), "-o", str(out), "--disable-tta", "--device", "cpu", *extra])


def test_bad_cases_are_listed_and_the_good_ones_predicted(synth, samplan_env, tmp_path, capsys):
    raw, plans, dj = synth
    _model(samplan_env["SAMPLAN_RESULTS"], synth)
    images = sorted((raw / "imagesTr").iterdir())
    inp = tmp_path / "in"
    inp.mkdir()
    for name, src in (("good_a", images[0]), ("good_b", images[1]), ("extra", images[2])):
        shutil.copy(src, inp / f"{name}_0000.nii.gz")
    shutil.copy(images[2], inp / "extra_0001.nii.gz")  # a second channel for a one-channel model
    shutil.copy(images[0], inp / "gap_0001.nii.gz")  # _0000 missing
    (inp / "noise_0000.nii.gz").write_bytes(np.random.default_rng(0).bytes(3000))
    (inp / "cut_0000.nii.gz").write_bytes(images[0].read_bytes()[:100])  # cut inside the header
    (inp / "half_0000.nii.gz").write_bytes(images[1].read_bytes()[:4000])  # cut in the voxels: only a full read sees it
    nan = sitk.GetArrayFromImage(sitk.ReadImage(str(images[1])))
    nan[2, 5:8, 5:7] = np.nan
    nan[3, 0, 0] = np.inf
    _write(nan, inp / "nan_0000.nii.gz")
    _write(np.ones((36, 32), np.float32), inp / "flat_0000.nii.gz")  # one 2D slice for a 3D model
    (inp / "notes.txt").write_text("scanner protocol")
    shutil.copy(images[0], inp / "other_0000.nii")  # another ending: ignored, with a note
    (inp / ".DS_Store").write_bytes(b"\0")

    out = tmp_path / "out"
    assert _run(inp, out) == EXIT
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert sorted(p.name for p in out.iterdir()) == ["good_a.nii.gz", "good_b.nii.gz"]
    assert "7 of 9 case(s) were not predicted" in err and f"the other 2 are in {out}" in err
    problems = {line.split("'")[1]: line for line in err.splitlines() if line.startswith("  - case '")}
    assert sorted(problems) == ["cut", "extra", "flat", "gap", "half", "nan", "noise"]
    assert ("2 channel(s) in extra_0000.nii.gz, extra_0001.nii.gz, but the model expects 1 channel (one file, _0000). "
            "Remove the extra files") in problems["extra"]
    assert "without gaps; found gap_0001.nii.gz" in problems["gap"]
    for case in ("noise", "cut"):
        assert f"{inp / case}_0000.nii.gz cannot be read (Unable to determine ImageIO reader): it is damaged" in problems[case]
        assert problems[case].count(str(inp)) == 1 and "intact copy" in problems[case]
    # damage past the header is found when the case is read (samplan.dataset.image_io), in the preprocessing job
    assert f"{inp}/nan_0000.nii.gz" in problems["nan"] and "7 NaN/Inf voxel(s)" in problems["nan"]
    assert f"{inp}/half_0000.nii.gz" in problems["half"]
    assert "a 2D image of 32x36 pixels, but this model was trained on 3D volumes" in problems["flat"]
    note = next(line for line in err.splitlines() if line.startswith("note:"))
    assert "2 file(s)" in note and "notes.txt" in note and "other_0000.nii" in note and ".DS_Store" not in note

    # fixed inputs: --continue predicts only them and keeps the good outputs
    done = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    for case in ("extra_0001", "gap_0001", "noise_0000", "cut_0000", "half_0000", "nan_0000", "flat_0000"):
        (inp / f"{case}.nii.gz").unlink()
    shutil.copy(images[2], inp / "nan_0000.nii.gz")
    assert _run(inp, out, "--continue") == 0
    assert sorted(p.name for p in out.iterdir()) == ["extra.nii.gz", "good_a.nii.gz", "good_b.nii.gz", "nan.nii.gz"]
    assert all((out / n).stat().st_mtime_ns == t for n, t in done.items())


def test_channels_on_different_grids_and_a_missing_channel(synth, samplan_env, tmp_path, capsys):
    raw, plans, dj = synth
    make_two_channel_model(samplan_env["SAMPLAN_RESULTS"], plans, dj)  # every case needs _0000 and _0001 on one grid
    a = sorted((raw / "imagesTr").iterdir())[0]
    inp = tmp_path / "in"
    inp.mkdir()
    for c in ("0000", "0001"):
        shutil.copy(a, inp / f"good_{c}.nii.gz")
    shutil.copy(a, inp / "grid_0000.nii.gz")
    _write(np.zeros((10, 20, 20), np.float32), inp / "grid_0001.nii.gz", sitk.ReadImage(str(a)).GetSpacing())
    shutil.copy(a, inp / "spacing_0000.nii.gz")
    moved = sitk.ReadImage(str(a))
    moved.SetSpacing((1.0, 1.0, 1.0))
    sitk.WriteImage(moved, str(inp / "spacing_0001.nii.gz"))
    shutil.copy(a, inp / "single_0000.nii.gz")

    out = tmp_path / "out"
    assert _run(inp, out) == EXIT
    err = capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["good.nii.gz"]
    assert "3 of 4 case(s)" in err
    assert f"case 'grid': {inp}/grid_0001.nii.gz: shape" in err and "share one grid" in err
    assert f"case 'spacing': {inp}/spacing_0001.nii.gz: spacing/origin/direction differ" in err
    assert ("case 'single': 1 channel(s) in single_0000.nii.gz, but the model expects 2 channels, one file each: "
            "_0000 ... _0001. Add the missing channel files") in err


def test_a_3d_volume_given_to_a_2d_model(samplan_env, tmp_path, capsys):
    raw = samplan_env["SAMPLAN_RAW"] / "Dataset902_Flat"
    (raw / "imagesTr").mkdir(parents=True)
    (raw / "labelsTr").mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        lab = np.zeros((40, 36), np.uint8)
        lab[10 + i:25, 8:20] = 1
        _write((lab * 80 + rng.normal(100, 5, lab.shape)).astype(np.float32), raw / "imagesTr" / f"s_{i}_0000.nii.gz")
        _write(lab, raw / "labelsTr" / f"s_{i}.nii.gz")
    (raw / "dataset.json").write_text(json.dumps({"channel_names": {"0": "MR"}, "labels": {"background": 0, "x": 1},
                                                  "numTraining": 3, "file_ending": ".nii.gz"}))
    plans, dj = _plan(raw)
    assert list(plans["configurations"]) == ["2d"]
    make_model(samplan_env["SAMPLAN_RESULTS"], plans, dj, "2d", {0: (None, None)})
    inp = tmp_path / "in"
    inp.mkdir()
    shutil.copy(raw / "imagesTr" / "s_0_0000.nii.gz", inp / "slice_0000.nii.gz")
    _write(np.zeros((4, 40, 36), np.float32), inp / "volume_0000.nii.gz")
    out = tmp_path / "out"
    assert _run(inp, out) == EXIT
    err = capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["slice.nii.gz"]
    assert (f"case 'volume': {inp}/volume_0000.nii.gz: a 3D volume of 36x40x4 voxels, but this model was trained on "
            "2D images") in err


def test_output_folder_equal_to_the_input_folder_is_refused_first(samplan_env, tmp_path, capsys):
    inp = tmp_path / "in"
    inp.mkdir()
    (inp / "a_0000.nii.gz").write_bytes(b"x")
    before = sorted(inp.iterdir())
    # no model is trained: the folder check comes before the model is looked for
    assert predict_main(["-i", str(inp), "-o", str(inp / ".." / "in")]) == EXIT
    err = capsys.readouterr().err
    assert "is the input folder" in err and "Choose another -o" in err and "Traceback" not in err
    assert sorted(inp.iterdir()) == before
    (tmp_path / "taken").write_text("")
    assert predict_main(["-i", str(inp), "-o", str(tmp_path / "taken")]) == EXIT
    assert "is a file" in capsys.readouterr().err
    assert predict_main(["-i", str(tmp_path / "nowhere"), "-o", str(tmp_path / "o")]) == EXIT
    assert "input folder" in capsys.readouterr().err and not (tmp_path / "o").exists()
    (inp / "a_0000.nii.gz").rename(inp / "a_0000.nii")
    with pytest.raises(DatasetError, match=r"holds no images named \{case\}_\{XXXX\}\.nii\.gz .* 1 other file\(s\) "
                                           r"\(a_0000\.nii\): convert them to \.nii\.gz"):
        list_input_cases(inp, ".nii.gz")


@pytest.mark.parametrize("damage", ["truncated", "random", "not_samplan", "other_network"])
def test_a_damaged_checkpoint_is_named(damage, synth, samplan_env, tmp_path, capsys):
    raw, plans, dj = synth
    md = _model(samplan_env["SAMPLAN_RESULTS"], synth)
    ckpt = md / "fold_0" / "checkpoint_final.pth"
    if damage == "truncated":
        ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    elif damage == "random":
        ckpt.write_bytes(np.random.default_rng(1).bytes(4096))
    elif damage == "not_samplan":
        torch.save({"weight": torch.zeros(3)}, ckpt)
    else:  # a checkpoint of a network with other shapes (other plans, another samplan version)
        state = torch.load(ckpt, weights_only=True)
        state["network_weights"] = {"weight": torch.zeros(3, 1, 3, 3, 3), "bias": torch.zeros(3)}
        save_checkpoint(state, ckpt)
    out = tmp_path / "out"
    assert _run(raw / "imagesTr", out) == EXIT
    err = capsys.readouterr().err
    assert str(ckpt) in err and "Traceback" not in err and not out.exists()
    assert len(err.strip().splitlines()) == 1, err  # one message, not torch's page of advice
    expected = {"truncated": "is damaged or truncated", "random": "is damaged or truncated",
                "not_samplan": "is not a samplan checkpoint (it lacks network_weights, method",
                "other_network": "does not fit the network its plans.json describes"}[damage]
    assert expected in err and ("re-train the fold" in err)


def test_a_missing_fold_checkpoint_and_damaged_plans(synth, samplan_env, tmp_path, capsys):
    raw, plans, dj = synth
    md = _model(samplan_env["SAMPLAN_RESULTS"], synth)
    out = tmp_path / "out"
    assert _run(raw / "imagesTr", out, "-f", "0", "1") == EXIT
    err = capsys.readouterr().err
    assert "no checkpoint_final.pth for fold(s) 1; folds with it: 0" in err and not out.exists()

    (md / "plans.json").write_text('{"dataset_name": "Dataset900_Synth", ')  # a copy that stopped half-way
    assert _run(raw / "imagesTr", out) == EXIT
    err = capsys.readouterr().err
    assert f"{md}/plans.json is damaged (not valid JSON" in err and "Traceback" not in err and not out.exists()


def test_plans_carry_a_format_version_checked_on_load(synth, samplan_env, tmp_path, capsys):
    raw, plans, dj = synth
    assert plans[PLANS_VERSION_KEY] == PLANS_VERSION  # written by the planner
    md = _model(samplan_env["SAMPLAN_RESULTS"], synth)
    # plans written before the key existed are version 1
    old = {k: v for k, v in plans.items() if k != PLANS_VERSION_KEY}
    (md / "plans.json").write_text(json.dumps(old))
    assert load_model_files(md)[2] == old
    Plans.from_dict(old)

    newer = {**plans, PLANS_VERSION_KEY: PLANS_VERSION + 1}
    (md / "plans.json").write_text(json.dumps(newer))
    out = tmp_path / "out"
    assert _run(raw / "imagesTr", out) == EXIT
    err = capsys.readouterr().err
    assert f"{md}/plans.json has plans format version {PLANS_VERSION + 1}, but this samplan reads version" in err
    assert "samplan_plan_and_preprocess -d Dataset900_Synth" in err and "use the samplan version" in err
    assert not out.exists()
    with pytest.raises(InputError, match="plans format version '1'"):
        Plans.from_dict({**plans, PLANS_VERSION_KEY: "1"})
