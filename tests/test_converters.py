"""Dataset converters: MSD task folders and 2D image/mask folders, built here in each published layout."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image
from scipy import ndimage

from conftest import shared_dataset
from samplan.cli import convert_2d, convert_msd
from samplan.dataset.converters.image_pairs import convert_image_pairs
from samplan.dataset.converters.msd import convert_msd as msd_convert
from samplan.dataset.dataset_json import read_case_groups
from samplan.errors import DatasetError, DatasetProblems, InputError
from samplan.training.splits import grouped_splits

ROT = np.array([[1, 0, 0], [0, np.cos(0.4), -np.sin(0.4)], [0, np.sin(0.4), np.cos(0.4)]])
BRATS_MODALITY = {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"}
BRATS_MSD_LABELS = {"0": "background", "1": "edema", "2": "non-enhancing tumor", "3": "enhancing tumour"}


# ------------------------------------------------------------------ MSD layout


def _geometry(img: sitk.Image, n: int = 3) -> tuple:
    d = np.array(img.GetDirection()).reshape(img.GetDimension(), -1)[:n, :n]
    return np.array(img.GetSpacing()[:n]), np.array(img.GetOrigin()[:n]), d


def _volume(rng, shape=(9, 14, 12), dtype=np.float32) -> np.ndarray:
    return (rng.normal(100, 30, shape)).astype(dtype)


def _labels(rng, shape=(9, 14, 12), values=(1, 2)) -> np.ndarray:
    lab = np.zeros(shape, np.uint8)
    for i, v in enumerate(values):
        lab[2 + i:6 + i, 3 + 2 * i:9, 2:8 - i] = v
    return lab


def _image(arr: np.ndarray, spacing=(0.9, 1.1, 2.5), origin=(-5.0, 7.0, 30.0)) -> sitk.Image:
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    img.SetDirection(ROT.flatten().tolist())
    return img


def _image_4d(volumes: list[np.ndarray]) -> sitk.Image:
    img = sitk.JoinSeries([_image(v) for v in volumes])
    direction = np.eye(4)
    direction[:3, :3] = ROT
    img.SetDirection(direction.flatten().tolist())
    return img


def write_msd(root: Path, task: str, modality: dict, labels: dict, n_cases: int = 3, n_test: int = 1, seed: int = 0,
              label_values=(1, 2)) -> tuple[Path, dict]:
    """An MSD task folder (3D images for one modality, 4D otherwise) with macOS ._ files; returns it and the arrays."""
    rng = np.random.default_rng(seed)
    src = root / task
    for d in ("imagesTr", "labelsTr", "imagesTs"):
        (src / d).mkdir(parents=True)
    arrays = {}
    cases = [f"{task.split('_')[1].lower()}_{i:03d}" for i in range(n_cases + n_test)]
    for i, case in enumerate(cases):
        vols = [_volume(rng) for _ in modality]
        img = _image(vols[0]) if len(vols) == 1 else _image_4d(vols)
        folder = "imagesTr" if i < n_cases else "imagesTs"
        sitk.WriteImage(img, str(src / folder / f"{case}.nii.gz"))
        (src / folder / f"._{case}.nii.gz").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
        arrays[case] = vols
        if i < n_cases:
            arrays[case + "_label"] = _labels(rng, values=label_values)
            sitk.WriteImage(_image(arrays[case + "_label"]), str(src / "labelsTr" / f"{case}.nii.gz"))
            (src / "labelsTr" / f"._{case}.nii.gz").write_bytes(b"\x00\x05\x16\x07")
    msd = {"name": task.split("_")[1], "description": "synthetic", "licence": "CC-BY-SA 4.0", "tensorImageSize": "4D",
           "modality": modality, "labels": labels, "numTraining": n_cases, "numTest": n_test,
           "training": [{"image": f"./imagesTr/{c}.nii.gz", "label": f"./labelsTr/{c}.nii.gz"} for c in cases[:n_cases]],
           "test": [f"./imagesTs/{c}.nii.gz" for c in cases[n_cases:]]}
    (src / "dataset.json").write_text(json.dumps(msd, indent=2))
    return src, arrays


def _assert_same_geometry(a: sitk.Image, b: sitk.Image) -> None:
    for x, y in zip(_geometry(a), _geometry(b)):
        np.testing.assert_allclose(x, y, atol=1e-5)


def test_msd_3d_single_modality(samplan_env, tmp_path):
    src, arrays = write_msd(tmp_path, "Task04_Hippo", {"0": "MRI"}, {"0": "background", "1": "Anterior", "2": "Posterior"})
    assert convert_msd.main(["-i", str(src), "-np", "1"]) == 0
    ds = samplan_env["SAMPLAN_RAW"] / "Dataset004_Hippo"
    assert sorted(p.name for p in (ds / "imagesTr").iterdir()) == ["hippo_000_0000.nii.gz", "hippo_001_0000.nii.gz",
                                                                  "hippo_002_0000.nii.gz"]
    assert [p.name for p in (ds / "imagesTs").iterdir()] == ["hippo_003_0000.nii.gz"]
    for case in ("hippo_000", "hippo_002"):  # 3D images and labels are copied byte for byte
        assert (ds / "imagesTr" / f"{case}_0000.nii.gz").read_bytes() == (src / "imagesTr" / f"{case}.nii.gz").read_bytes()
        assert (ds / "labelsTr" / f"{case}.nii.gz").read_bytes() == (src / "labelsTr" / f"{case}.nii.gz").read_bytes()
    dj = json.loads((ds / "dataset.json").read_text())
    assert dj["channel_names"] == {"0": "MRI"}
    assert dj["labels"] == {"background": 0, "Anterior": 1, "Posterior": 2}
    assert (dj["numTraining"], dj["file_ending"], dj["licence"]) == (3, ".nii.gz", "CC-BY-SA 4.0")
    assert not {"modality", "training", "test", "tensorImageSize"} & set(dj)
    assert [p.name for p in samplan_env["SAMPLAN_RAW"].iterdir()] == ["Dataset004_Hippo"]  # no staging or lock left

    # the same task again: refused, then replaced with --overwrite; another id with -d
    assert convert_msd.main(["-i", str(src), "-np", "1"]) == 2
    assert convert_msd.main(["-i", str(src), "-np", "1", "--overwrite"]) == 0
    assert msd_convert(src, dataset_id=104, num_processes=1).name == "Dataset104_Hippo"


def test_msd_4d_images_are_split_with_their_geometry(samplan_env, tmp_path):
    src, arrays = write_msd(tmp_path, "Task05_Prostate", {"0": "T2", "1": "ADC"},
                            {"0": "background", "1": "PZ", "2": "TZ"}, n_cases=2)
    ds = msd_convert(src, num_processes=1)
    assert ds == samplan_env["SAMPLAN_RAW"] / "Dataset005_Prostate"
    source_4d = sitk.ReadImage(str(src / "imagesTr" / "prostate_001.nii.gz"))
    for case, folder in (("prostate_001", "imagesTr"), ("prostate_002", "imagesTs")):
        for c in range(2):
            out = sitk.ReadImage(str(ds / folder / f"{case}_{c:04d}.nii.gz"))
            assert out.GetDimension() == 3 and out.GetPixelID() == sitk.sitkFloat32
            np.testing.assert_array_equal(sitk.GetArrayFromImage(out), arrays[case][c])
            _assert_same_geometry(out, source_4d)
            np.testing.assert_allclose(_geometry(out)[2], ROT, atol=1e-6)
    assert json.loads((ds / "dataset.json").read_text())["channel_names"] == {"0": "T2", "1": "ADC"}


def test_msd_brats_becomes_regions_matched_by_name(samplan_env, tmp_path):
    src, _ = write_msd(tmp_path, "Task01_BrainTumour", BRATS_MODALITY, BRATS_MSD_LABELS, n_cases=2, n_test=0,
                       label_values=(1, 2, 3))
    ds = msd_convert(src, num_processes=1)
    dj = json.loads((ds / "dataset.json").read_text())
    assert dj["labels"] == {"background": 0, "whole tumor": [1, 2, 3], "tumor core": [2, 3], "enhancing tumor": 3}
    assert dj["regions_class_order"] == [1, 2, 3]
    assert dj["channel_names"] == BRATS_MODALITY
    assert len(list((ds / "imagesTr").iterdir())) == 8
    # MSD's numbering is nnU-Net's BraTS numbering already: the label files are copied unchanged
    assert (ds / "labelsTr" / "braintumour_000.nii.gz").read_bytes() == (src / "labelsTr" / "braintumour_000.nii.gz").read_bytes()

    # the same names numbered differently (and spelt differently) land on 1 edema, 2 non-enhancing, 3 enhancing
    relabelled = {"0": "background", "1": "Enhancing Tumor", "2": "oedema", "3": "non_enhancing_tumour"}
    src2, arrays = write_msd(tmp_path / "b", "Task01_BrainTumour", BRATS_MODALITY, relabelled, n_cases=2, n_test=0,
                             label_values=(1, 2, 3))
    shutil.rmtree(ds)
    ds = msd_convert(src2, num_processes=1)
    got = sitk.ReadImage(str(ds / "labelsTr" / "braintumour_001.nii.gz"))
    expected = np.array([0, 3, 1, 2], np.uint8)[arrays["braintumour_001_label"]]
    np.testing.assert_array_equal(sitk.GetArrayFromImage(got), expected)
    _assert_same_geometry(got, sitk.ReadImage(str(src2 / "labelsTr" / "braintumour_001.nii.gz")))

    # --no-regions keeps the disjoint labels as MSD numbers them
    assert convert_msd.main(["-i", str(src), "-np", "1", "--no-regions", "--overwrite"]) == 0
    assert json.loads((ds / "dataset.json").read_text())["labels"] == {
        "background": 0, "edema": 1, "non-enhancing tumor": 2, "enhancing tumour": 3}


def test_msd_bad_inputs_write_nothing(samplan_env, tmp_path, capsys):
    raw = samplan_env["SAMPLAN_RAW"]
    src, _ = write_msd(tmp_path, "Task05_Prostate", {"0": "T2", "1": "ADC", "2": "HBV"}, {"0": "background", "1": "PZ"},
                       n_cases=2, n_test=0)
    with pytest.raises(DatasetProblems, match=r"Dataset005_Prostate \(converted from .*Task05_Prostate\); nothing was written"
                       ) as e:  # samplan's verification of the result: label 2 is not declared
        msd_convert(src, num_processes=1)
    assert "labelsTr/prostate_000.nii.gz: label value(s) [2] are not declared" in e.value.problems[0]
    assert list(raw.iterdir()) == []
    meta = json.loads((src / "dataset.json").read_text())
    meta.update(modality={"0": "T2", "1": "ADC"}, labels={"0": "background", "1": "PZ", "2": "TZ"})
    (src / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(DatasetError, match=r"prostate_000.nii.gz: a 4D image .*declares 2 modalities \(T2, ADC\)"):
        msd_convert(src, num_processes=1)
    assert list(raw.iterdir()) == []

    (src / "labelsTr" / "prostate_001.nii.gz").unlink()
    assert convert_msd.main(["-i", str(src)]) == 2
    err = capsys.readouterr().err
    assert "imagesTr/prostate_001.nii.gz: no label labelsTr/prostate_001.nii.gz" in err and "Traceback" not in err

    (raw / "Dataset005_Other").mkdir()  # the id is taken by another dataset
    src2, _ = write_msd(tmp_path / "b", "Task05_Prostate", {"0": "T2"}, {"0": "background", "1": "PZ"}, n_test=0)
    with pytest.raises(InputError, match="dataset id 005 is taken by Dataset005_Other"):
        msd_convert(src2, num_processes=1)
    with pytest.raises(InputError, match="not of the MSD form TaskXX_Name"):
        msd_convert(src2.rename(tmp_path / "b" / "prostate"), num_processes=1)
    assert sorted(p.name for p in raw.iterdir()) == ["Dataset005_Other"]


def test_msd_copy_of_real_hippocampus_converts_back_to_it(samplan_env, tmp_path):
    orig = shared_dataset("Dataset004_Hippocampus")
    cases = sorted(p.name[:-7] for p in (orig / "labelsTr").glob("*.nii.gz"))[:5]
    src = tmp_path / "Task04_Hippocampus"
    for d in ("imagesTr", "labelsTr"):
        (src / d).mkdir(parents=True)
    for c in cases:
        shutil.copy(orig / "imagesTr" / f"{c}_0000.nii.gz", src / "imagesTr" / f"{c}.nii.gz")
        shutil.copy(orig / "labelsTr" / f"{c}.nii.gz", src / "labelsTr" / f"{c}.nii.gz")
    (src / "dataset.json").write_text(json.dumps({
        "name": "Hippocampus", "modality": {"0": "MRI"}, "labels": {"0": "background", "1": "Anterior", "2": "Posterior"},
        "numTraining": 5, "numTest": 0, "training": [], "test": []}))
    ds = msd_convert(src, num_processes=1)
    for c in cases:
        for rel in (f"imagesTr/{c}_0000.nii.gz", f"labelsTr/{c}.nii.gz"):
            a, b = sitk.ReadImage(str(ds / rel)), sitk.ReadImage(str(orig / rel))
            np.testing.assert_array_equal(sitk.GetArrayFromImage(a), sitk.GetArrayFromImage(b))
            assert (a.GetSpacing(), a.GetOrigin(), a.GetDirection()) == (b.GetSpacing(), b.GetOrigin(), b.GetDirection())
    got, want = json.loads((ds / "dataset.json").read_text()), json.loads((orig / "dataset.json").read_text())
    assert (got["channel_names"], got["labels"], got["numTraining"]) == (want["channel_names"], want["labels"], 5)


# ------------------------------------------------------------------ 2D image/mask folders


def _scene(rng, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """An RGB frame with a bright ellipse, and that ellipse as a boolean mask."""
    yy, xx = np.mgrid[:h, :w]
    cy, cx, ry, rx = h * rng.uniform(0.35, 0.65), w * rng.uniform(0.35, 0.65), h * 0.2, w * 0.25
    disc = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
    rgb = np.clip(rng.normal(70, 15, (h, w, 3)) + disc[..., None] * np.array([110, 40, 20]), 0, 255).astype(np.uint8)
    return rgb, disc


def _antialiased(disc: np.ndarray) -> np.ndarray:
    """A 0..255 mask with soft edges, like a resized or JPEG-compressed one."""
    return np.clip(ndimage.gaussian_filter(disc * 255.0, 1.2), 0, 255).astype(np.uint8)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


def test_kvasir_jpg_pairs_with_antialiased_masks(samplan_env, tmp_path):
    src, rng, discs = tmp_path / "Kvasir-SEG", np.random.default_rng(1), {}
    (src / "images").mkdir(parents=True)
    (src / "masks").mkdir()
    for i, case in enumerate(["cju0qkwl35piu0993l0dewei2", "cju0qoxqj9q6s0835b43399p4", "cju0roawvklrq0799vmjorwfv"]):
        rgb, disc = _scene(rng, 60 + 8 * i, 80)
        discs[case] = disc
        Image.fromarray(rgb).save(src / "images" / f"{case}.jpg", quality=90)
        Image.fromarray(np.repeat(_antialiased(disc)[..., None], 3, -1)).save(src / "masks" / f"{case}.jpg", quality=75)
    (src / "kavsir_bboxes.json").write_text("{}")
    assert convert_2d.main(["-i", str(src), "-o", "Dataset510_KvasirSEG", "-np", "1"]) == 0
    ds = samplan_env["SAMPLAN_RAW"] / "Dataset510_KvasirSEG"
    dj = json.loads((ds / "dataset.json").read_text())
    assert dj["channel_names"] == {"0": "R", "1": "G", "2": "B"} and dj["labels"] == {"background": 0, "polyp": 1}
    assert (dj["numTraining"], dj["file_ending"]) == (3, ".png") and "case_groups" not in dj
    for case, disc in discs.items():
        with Image.open(ds / "imagesTr" / f"{case}_0000.png") as im:
            assert im.mode == "RGB" and im.format == "PNG"
            np.testing.assert_array_equal(np.asarray(im), np.asarray(Image.open(src / "images" / f"{case}.jpg")))
        with Image.open(ds / "labelsTr" / f"{case}.png") as m:
            mask = np.asarray(m)
        assert m.mode == "L" and set(np.unique(mask)) == {0, 1}
        assert _dice(mask.astype(bool), disc) > 0.97


def test_cvc_tif_pairs_with_sequence_groups(samplan_env, tmp_path):
    src, rng = tmp_path / "CVC-ClinicDB", np.random.default_rng(2)
    (src / "Original").mkdir(parents=True)
    (src / "Ground Truth").mkdir()
    for seq in range(1, 7):
        for frame in (seq * 10, seq * 10 + 3):
            rgb, disc = _scene(rng, 36, 48)
            name = f"seq{seq:02d}_frame{frame:03d}.tif"
            Image.fromarray(rgb).save(src / "Original" / name)
            Image.fromarray((disc * 255).astype(np.uint8)).save(src / "Ground Truth" / name)
    out = tmp_path / "out" / "Dataset511_CVC"
    with pytest.raises(DatasetError, match="fewer than the 5 cross-validation folds"):
        convert_image_pairs(src, str(out), case_groups=r"(seq)", num_processes=1)  # one group only
    assert not out.parent.exists() or list(out.parent.iterdir()) == []
    ds = convert_image_pairs(src, str(out), case_groups=r"(seq\d+)_", num_processes=1)
    dj = json.loads((ds / "dataset.json").read_text())
    assert dj["case_groups"] == r"(seq\d+)_" and dj["numTraining"] == 12
    groups = read_case_groups(dj, sorted(p.name[:-4] for p in (ds / "labelsTr").iterdir()))
    assert groups["seq03_frame030"] == groups["seq03_frame033"] == "seq03"
    for fold in grouped_splits(list(groups), groups):
        assert {groups[c] for c in fold["val"]}.isdisjoint(groups[c] for c in fold["train"])
    np.testing.assert_array_equal(np.asarray(Image.open(ds / "labelsTr" / "seq02_frame023.png")),
                                  np.asarray(Image.open(src / "Ground Truth" / "seq02_frame023.tif")) // 255)


def test_isic_pairs_and_a_json_group_file(samplan_env, tmp_path):
    src, rng = tmp_path / "ISIC2018", np.random.default_rng(3)
    inp, gt = src / "ISIC2018_Task1-2_Training_Input", src / "ISIC2018_Task1_Training_GroundTruth"
    inp.mkdir(parents=True)
    gt.mkdir()
    for i in range(6):
        rgb, disc = _scene(rng, 40, 50)
        Image.fromarray(rgb).save(inp / f"ISIC_{i:07d}.jpg")
        Image.fromarray((disc * 255).astype(np.uint8)).save(gt / f"ISIC_{i:07d}_segmentation.png")
    for d in (inp, gt):
        (d / "LICENSE.txt").write_text("CC-0")
        (d / "ATTRIBUTION.txt").write_text("ISIC")
    groups_file = tmp_path / "groups.json"
    groups_file.write_text(json.dumps({"patient_a": ["ISIC_0000000", "ISIC_0000001"]}))
    ds = convert_image_pairs(src, "Dataset520_ISIC", case_groups=str(groups_file), num_processes=1)
    dj = json.loads((ds / "dataset.json").read_text())
    assert dj["labels"] == {"background": 0, "lesion": 1} and dj["numTraining"] == 6
    assert dj["case_groups"] == {"patient_a": ["ISIC_0000000", "ISIC_0000001"]}
    assert sorted(p.name for p in (ds / "labelsTr").iterdir()) == [f"ISIC_{i:07d}.png" for i in range(6)]

    # one flat folder holding images and *_segmentation masks converts the same
    flat = tmp_path / "flat"
    flat.mkdir()
    for f in list(inp.glob("*.jpg")) + list(gt.glob("*.png")):
        shutil.copy(f, flat)
    ds2 = convert_image_pairs(flat, str(tmp_path / "Dataset521_Flat"), num_processes=1)
    assert sorted(p.name for p in (ds2 / "imagesTr").iterdir()) == [f"ISIC_{i:07d}_0000.png" for i in range(6)]


def test_size_mismatch_and_unpaired_files_write_nothing(samplan_env, tmp_path, capsys):
    src, rng = tmp_path / "Kvasir-SEG", np.random.default_rng(4)
    (src / "images").mkdir(parents=True)
    (src / "masks").mkdir()
    for i in range(3):
        rgb, disc = _scene(rng, 30, 40)
        Image.fromarray(rgb).save(src / "images" / f"c{i}.jpg")
        Image.fromarray((disc * 255).astype(np.uint8)).save(src / "masks" / f"c{i}.png")
    Image.fromarray(np.zeros((30, 41), np.uint8)).save(src / "masks" / "c1.png")
    raw = samplan_env["SAMPLAN_RAW"]
    assert convert_2d.main(["-i", str(src), "-o", "Dataset510_Kvasir", "-np", "1"]) == 2
    err = capsys.readouterr().err
    assert f"{src / 'images' / 'c1.jpg'} is 40 x 30 pixels but its mask {src / 'masks' / 'c1.png'} is 41 x 30" in err
    assert "Traceback" not in err and list(raw.iterdir()) == []

    (src / "images" / "c1.jpg").unlink()
    Image.fromarray(rgb).save(src / "images" / "c9.jpg")
    with pytest.raises(DatasetProblems) as e:
        convert_image_pairs(src, "Dataset510_Kvasir", num_processes=1)
    assert any("c9.jpg: no mask" in p for p in e.value.problems)
    assert any("c1.png: no image of that name" in p for p in e.value.problems)
    assert list(raw.iterdir()) == []
