"""verify_dataset: every kind of broken dataset is reported, all at once, naming the case and the file."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image

from conftest import copy_shared_subset
from synthetic import make_dataset_2d_png, make_dataset_3d
from samplan.dataset.verify import verify_dataset
from samplan.errors import DatasetProblems


def _problems(ds: Path, num_processes: int = 1) -> list[str]:
    """Run verify_dataset and return its problem list (it must fail with exit code 2)."""
    with pytest.raises(DatasetProblems) as e:
        verify_dataset(ds, num_processes=num_processes)
    assert e.value.exit_code == 2
    assert str(ds) in str(e.value) and all(p in str(e.value) for p in e.value.problems)
    return e.value.problems


def _one(problems: list[str], *needles: str) -> str:
    """The problem containing all `needles` (exactly one must)."""
    hits = [p for p in problems if all(n in p for n in needles)]
    assert len(hits) == 1, f"expected one problem with {needles}, got {hits} in {problems}"
    return hits[0]


def _edit_json(ds: Path, **changes) -> None:
    meta = json.loads((ds / "dataset.json").read_text())
    for k, v in changes.items():
        if v is None:
            meta.pop(k, None)
        else:
            meta[k] = v
    (ds / "dataset.json").write_text(json.dumps(meta))


def _rewrite(path: Path, arr: np.ndarray | None = None, **geometry) -> None:
    """Rewrite a SimpleITK file with a new array and/or spacing/origin/direction, keeping the rest."""
    img = sitk.ReadImage(str(path))
    new = sitk.GetImageFromArray(arr) if arr is not None else img
    if arr is not None:  # keep the geometry even when the array size changes
        new.SetSpacing(img.GetSpacing())
        new.SetOrigin(img.GetOrigin())
        new.SetDirection(img.GetDirection())
    for key, value in geometry.items():
        getattr(new, f"Set{key.capitalize()}")(value)
    sitk.WriteImage(new, str(path))


def _array(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


# ---------------------------------------------------------------- clean datasets


def test_synthetic_datasets_verify(synth3d, synth2d, capsys):
    verify_dataset(synth3d, num_processes=2)  # the spawned-worker path
    verify_dataset(synth2d, num_processes=1)
    assert "4 case(s), no problems" in capsys.readouterr().out


def test_region_labels_with_class_order_verify(synth3d):
    _edit_json(synth3d, labels={"background": 0, "whole": [1, 2], "small": [2]}, regions_class_order=[1, 2])
    verify_dataset(synth3d, num_processes=1)


def test_explicit_dataset_listing(synth3d):
    listing = {f"case_{i:03d}": {"images": [f"imagesTr/case_{i:03d}_0000.nii.gz"], "label": f"labelsTr/case_{i:03d}.nii.gz"} for i in range(4)}
    _edit_json(synth3d, dataset=listing)
    verify_dataset(synth3d, num_processes=1)
    listing["case_002"]["label"] = "labelsTr/case_two.nii.gz"
    listing["case_003"] = {"images": "imagesTr/case_003_0000.nii.gz", "label": "labelsTr/case_003.nii.gz"}
    _edit_json(synth3d, dataset=listing)
    problems = _problems(synth3d)
    _one(problems, "case 'case_002'", "labelsTr/case_two.nii.gz", "does not exist")
    _one(problems, "dataset['case_003'] must be")


@pytest.mark.parametrize("name,n", [("Dataset004_Hippocampus", 5), ("Dataset510_KvasirSEG", 5), ("Dataset501_BraTS2015DM", 1)])
def test_real_data_subsets_verify(tmp_path, name, n):
    ds = copy_shared_subset(name, tmp_path, n)
    verify_dataset(ds, num_processes=1)


# ---------------------------------------------------------------- dataset.json


def test_missing_or_invalid_dataset_json(synth3d):
    (synth3d / "dataset.json").write_text('{"channel_names": {"0": "MR"},, }')
    _one(_problems(synth3d), "dataset.json", "not valid JSON", "line 1")
    (synth3d / "dataset.json").unlink()
    _one(_problems(synth3d), "dataset.json", "does not exist")


def test_missing_keys_all_reported(synth3d):
    _edit_json(synth3d, labels=None, numTraining=None, channel_names=None, modality={"0": "MR"})
    problems = _problems(synth3d)
    _one(problems, "'labels' is missing")
    _one(problems, "'numTraining' is missing")
    _one(problems, "'channel_names' is missing", "rename it")


def test_bad_channel_names(synth3d):
    _edit_json(synth3d, channel_names={"1": "MR", "2": 7})
    problems = _problems(synth3d)
    _one(problems, "channel_names keys", "['0', '1']")
    _one(problems, "channel_names['2']", "must be a string")


def test_bad_labels(synth3d):
    _edit_json(synth3d, labels={"background": 1, "big": "1", "small": 2.0, "ignore": [4]})
    problems = _problems(synth3d)
    _one(problems, 'labels["background"]', "must be the integer 0")
    _one(problems, "labels['big']", "'1'")
    _one(problems, "labels['small']", "2.0")
    _one(problems, "labels['ignore']", "must be an integer")


def test_label_values_not_consecutive_and_ignore_not_last(synth3d):
    _edit_json(synth3d, labels={"background": 0, "big": 1, "small": 3})
    _one(_problems(synth3d), "consecutive", "[2] are not declared")
    _edit_json(synth3d, labels={"background": 0, "big": 1, "small": 3, "ignore": 2})
    _one(_problems(synth3d), "'ignore' label (2)", "highest")


def test_regions_without_class_order(synth3d):
    _edit_json(synth3d, labels={"background": 0, "whole": [1, 2], "small": [2]})
    _one(_problems(synth3d), "regions_class_order", "2 integers")
    _edit_json(synth3d, regions_class_order=[1])
    _one(_problems(synth3d), "regions_class_order", "found [1]")


def test_unsupported_file_ending(synth3d):
    _edit_json(synth3d, file_ending=".nii.bz2")
    assert _problems(synth3d) == [_one(_problems(synth3d), "file_ending '.nii.bz2'", ".nii.gz")]


def test_num_training_mismatch(synth3d):
    _edit_json(synth3d, numTraining=7)
    assert len(_one(_problems(synth3d), "numTraining is 7", "4 case(s)", "Set numTraining to 4")) > 0


# ---------------------------------------------------------------- files


def test_missing_folders(synth3d):
    shutil.rmtree(synth3d / "labelsTr")
    shutil.rmtree(synth3d / "imagesTr")
    problems = _problems(synth3d)
    _one(problems, "labelsTr/: folder is missing")
    _one(problems, "imagesTr/: folder is missing")


def test_image_without_label_and_label_without_image(synth3d):
    (synth3d / "labelsTr" / "case_001.nii.gz").unlink()
    (synth3d / "imagesTr" / "case_002_0000.nii.gz").unlink()
    _edit_json(synth3d, numTraining=3)
    problems = _problems(synth3d)
    assert len(problems) == 2
    _one(problems, "case 'case_001'", "imagesTr/case_001_0000.nii.gz", "labelsTr/case_001.nii.gz")
    _one(problems, "case 'case_002'", "labelsTr/case_002.nii.gz", "no image files")


def test_missing_and_extra_channel_files(samplan_env):
    ds = make_dataset_3d(samplan_env["SAMPLAN_RAW"], n_channels=2, n_cases=3)
    (ds / "imagesTr" / "case_001_0001.nii.gz").unlink()
    shutil.copy(ds / "imagesTr" / "case_002_0001.nii.gz", ds / "imagesTr" / "case_002_0002.nii.gz")
    problems = _problems(ds)
    assert len(problems) == 2  # no follow-up channel-count complaint for the same cases
    _one(problems, "case 'case_001'", "imagesTr/case_001_0001.nii.gz is missing", "'MR1'")
    _one(problems, "case 'case_002'", "imagesTr/case_002_0002.nii.gz", "unexpected channel file")


def test_misnamed_and_wrong_ending_files(synth3d):
    shutil.copy(synth3d / "imagesTr" / "case_000_0000.nii.gz", synth3d / "imagesTr" / "case_004.nii.gz")
    sitk.WriteImage(sitk.ReadImage(str(synth3d / "labelsTr" / "case_003.nii.gz")), str(synth3d / "labelsTr" / "case_005.nii"))
    (synth3d / "imagesTr" / ".DS_Store").write_bytes(b"\0")  # hidden files are not the user's data: ignored
    problems = _problems(synth3d)
    assert len(problems) == 2
    _one(problems, "imagesTr/case_004.nii.gz", "{case}_XXXX.nii.gz")
    _one(problems, "labelsTr/case_005.nii", "differs from file_ending '.nii.gz'")


def test_unreadable_and_empty_files(synth3d):
    (synth3d / "imagesTr" / "case_001_0000.nii.gz").write_bytes(b"not a nifti file" * 20)
    (synth3d / "labelsTr" / "case_002.nii.gz").write_bytes(b"")
    problems = _problems(synth3d)
    assert len(problems) == 2
    _one(problems, "case 'case_001'", "imagesTr/case_001_0000.nii.gz", "cannot be read")
    _one(problems, "case 'case_002'", "labelsTr/case_002.nii.gz", "empty (0 bytes)")


# ---------------------------------------------------------------- contents


def test_shape_mismatch(synth3d):
    lab = synth3d / "labelsTr" / "case_003.nii.gz"
    _rewrite(lab, np.ascontiguousarray(_array(lab)[:, :-3]))
    msg = _one(_problems(synth3d), "case 'case_003'", "labelsTr/case_003.nii.gz", "shape")
    assert "imagesTr/case_003_0000.nii.gz" in msg


def test_spacing_origin_direction_mismatch(synth3d):
    _rewrite(synth3d / "labelsTr" / "case_000.nii.gz", spacing=(0.8, 0.8, 2.0))
    _rewrite(synth3d / "labelsTr" / "case_001.nii.gz", origin=(10.0, -5.0, 7.5))
    _rewrite(synth3d / "labelsTr" / "case_002.nii.gz", direction=(-1.0, 0, 0, 0, -1.0, 0, 0, 0, 1.0))
    _rewrite(synth3d / "labelsTr" / "case_003.nii.gz", origin=(10.0 + 1e-6, -5.0, 2.5))  # within tolerance
    problems = _problems(synth3d)
    assert len(problems) == 3
    assert "spacing" in _one(problems, "case 'case_000'", "labelsTr/case_000.nii.gz", "geometry differs")
    assert "origin" in _one(problems, "case 'case_001'", "labelsTr/case_001.nii.gz", "geometry differs")
    assert "direction" in _one(problems, "case 'case_002'", "labelsTr/case_002.nii.gz", "geometry differs")


def test_channels_on_different_grids(samplan_env):
    ds = make_dataset_3d(samplan_env["SAMPLAN_RAW"], n_channels=2, n_cases=2)
    _rewrite(ds / "imagesTr" / "case_001_0001.nii.gz", spacing=(0.8, 0.8, 3.5))
    msg = _one(_problems(ds), "case 'case_001'", "imagesTr/case_001_0001.nii.gz", "geometry differs")
    assert "imagesTr/case_001_0000.nii.gz" in msg


def test_undeclared_label_value(synth3d):
    lab = synth3d / "labelsTr" / "case_002.nii.gz"
    arr = _array(lab)
    arr[0, 0, :3] = 5
    _rewrite(lab, arr)
    problems = _problems(synth3d)
    assert len(problems) == 1
    _one(problems, "case 'case_002'", "labelsTr/case_002.nii.gz", "[5]", "declared: [0, 1, 2]")


def test_nan_and_inf_in_image(samplan_env):
    # .mha: SimpleITK's NIfTI reader silently turns NaN/Inf into 0, so a NIfTI file never shows them
    ds = make_dataset_3d(samplan_env["SAMPLAN_RAW"], n_cases=2, file_ending=".mha")
    img = ds / "imagesTr" / "case_000_0000.mha"
    arr = _array(img)
    arr[3, 10, 10:14] = np.nan
    arr[4, 0, 0] = np.inf
    _rewrite(img, arr)
    problems = _problems(ds)
    assert len(problems) == 1
    _one(problems, "case 'case_000'", "imagesTr/case_000_0000.mha", "5 NaN/Inf voxel(s)")


def test_rgb_png_with_wrong_channel_count(synth2d, samplan_env):
    _edit_json(synth2d, channel_names={"0": "grey"})
    problems = _problems(synth2d)
    assert len(problems) == 4  # every case: one RGB file holds 3 channels
    _one(problems, "case 'img_001'", "imagesTr/img_001_0000.png", "3 channel(s)", "declares 1")
    grey = make_dataset_2d_png(samplan_env["SAMPLAN_RAW"], name="Dataset902_Grey", rgb=False, n_cases=2)
    _edit_json(grey, channel_names={"0": "R", "1": "G", "2": "B"})
    _one(_problems(grey), "case 'img_000'", "1 channel(s)", "declares 3")


def test_png_label_with_colours_and_shape(synth2d):
    lab = synth2d / "labelsTr" / "img_001.png"
    mask = np.asarray(Image.open(lab))
    Image.fromarray(np.stack([mask * 255, mask * 0, mask * 0], axis=-1).astype(np.uint8)).save(lab)
    Image.fromarray(np.asarray(Image.open(synth2d / "labelsTr" / "img_002.png")).T.copy()).save(synth2d / "labelsTr" / "img_002.png")
    problems = _problems(synth2d)
    assert len(problems) == 2
    _one(problems, "case 'img_001'", "labelsTr/img_001.png", "differing channels")
    _one(problems, "case 'img_002'", "labelsTr/img_002.png", "shape (1, 80, 68) differs from imagesTr/img_002_0000.png (1, 68, 80)")


def test_all_problems_reported_at_once_in_parallel(samplan_env):
    ds = make_dataset_3d(samplan_env["SAMPLAN_RAW"], n_cases=6)
    (ds / "labelsTr" / "case_000.nii.gz").write_bytes(b"")
    lab = ds / "labelsTr" / "case_003.nii.gz"
    arr = _array(lab)
    arr[0, 0, 0] = 9
    _rewrite(lab, arr, spacing=(1.0, 1.0, 1.0))
    (ds / "labelsTr" / "case_005.nii.gz").unlink()
    sequential = _problems(ds, num_processes=1)
    assert _problems(ds, num_processes=2) == sequential
    assert len(sequential) == 5  # numTraining, case_000 empty, case_003 geometry + value, case_005 no label
    for needle in ("numTraining is 6", "case 'case_000'", "case 'case_005'"):
        _one(sequential, needle)
    assert len([p for p in sequential if "case 'case_003'" in p]) == 2


# ---------------------------------------------------------------- CLI


def test_cli_reports_problems_and_writes_nothing(synth3d, samplan_env, capsys):
    # imports the whole planning pipeline: fails with ImportError until fingerprint/planner/preprocessing exist
    from samplan.cli.plan_and_preprocess import main

    (synth3d / "labelsTr" / "case_001.nii.gz").unlink()
    lab = synth3d / "labelsTr" / "case_002.nii.gz"
    arr = _array(lab)
    arr[0, 0, 0] = 7
    _rewrite(lab, arr)
    assert main(["-d", synth3d.name, "-np", "1"]) == 2
    err = capsys.readouterr().err
    assert "case 'case_001'" in err and "case 'case_002', labelsTr/case_002.nii.gz" in err and "[7]" in err
    assert "nothing was written" in err and "Traceback" not in err
    assert list(samplan_env["SAMPLAN_PREPROCESSED"].iterdir()) == []
    assert main(["-d", "900", "-np", "1"]) == 2  # the id form reaches the same check
    assert list(samplan_env["SAMPLAN_PREPROCESSED"].iterdir()) == []


def test_damaged_real_files_reported_with_their_case(tmp_path):
    # SimpleITK reads both files without complaint; verify must name each before anything is written
    from damage import DAMAGES

    ds = copy_shared_subset("Dataset004_Hippocampus", tmp_path, 3)
    img = sorted((ds / "imagesTr").iterdir())[1]
    lab = sorted((ds / "labelsTr").iterdir())[2]
    for f, damage in ((img, "truncate_middle"), (lab, "flip_middle_byte")):
        tmp = f.with_name("tmp_" + f.name)
        f.rename(tmp)
        DAMAGES[damage](tmp, f)
        tmp.unlink()
    problems = _problems(ds)
    assert len(problems) == 2
    _one(problems, f"case '{img.name[:-12]}'", f"imagesTr/{img.name}", "truncated")
    _one(problems, f"case '{lab.name[:-7]}'", f"labelsTr/{lab.name}", "gzip data is corrupt")
