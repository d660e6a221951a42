"""Converters of public datasets in their published layouts: Prostate158, PI-CAI, COVID-19-CT-Seg, built in each test."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import SHARED_RAW
from samplan.cli import convert_covid19ct, convert_picai, convert_prostate158
from samplan.dataset.converters.covid19ct import GROUPS, convert_covid19ct as covid_convert
from samplan.dataset.converters.picai import convert_picai as picai_convert
from samplan.dataset.converters.prostate158 import convert_prostate158 as p158_convert
from samplan.errors import DatasetError, InputError

TILT = 0.13  # an oblique axial stack, as PI-CAI's T2W scans are (direction [1, 0, 0, 0, .992, .129, ...])
DIRECTION = np.array([[1, 0, 0], [0, np.cos(TILT), -np.sin(TILT)], [0, np.sin(TILT), np.cos(TILT)]]).flatten().tolist()
T2_GRID = {"size": (40, 36, 6), "spacing": (0.5, 0.5, 3.0), "origin": (-10.0, -8.0, 4.0)}
# the diffusion sequences: coarser in-plane, same slab (origin shifted by half the voxel difference: one field of view)
DWI_GRID = {"size": (10, 9, 6), "spacing": (2.0, 2.0, 3.0),
            "origin": tuple(np.array(T2_GRID["origin"]) + np.reshape(DIRECTION, (3, 3)) @ [0.75, 0.75, 0.0])}


def _image(arr: np.ndarray, grid: dict) -> sitk.Image:
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(grid["spacing"])
    img.SetOrigin(tuple(float(o) for o in grid["origin"]))
    img.SetDirection(grid.get("direction", DIRECTION))
    return img


def _physical(grid: dict) -> np.ndarray:
    """(Z, Y, X, 3) physical coordinates of a grid's voxel centres."""
    z, y, x = np.meshgrid(*[np.arange(n) for n in grid["size"][::-1]], indexing="ij")
    index = np.stack([x, y, z], -1) * np.array(grid["spacing"])
    return index @ np.array(grid.get("direction", DIRECTION)).reshape(3, 3).T + np.array(grid["origin"])


def _ramp(grid: dict, dtype=np.float32) -> np.ndarray:
    """Intensity rising linearly with physical x and y: linear (and B-spline) resampling must reproduce it inside."""
    p = _physical(grid)
    return (300 + 8 * p[..., 0] + 5 * p[..., 1]).astype(dtype)


def _zones(grid: dict, value_a: int = 1, value_b: int = 2) -> np.ndarray:
    """Two nested blobs around the grid centre (value_a inside value_b), as anatomy or lung masks are."""
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, n) for n in grid["size"][::-1]], indexing="ij")
    r = np.sqrt(x ** 2 + y ** 2 + (z / 2) ** 2)
    return np.where(r < 0.35, value_a, np.where(r < 0.7, value_b, 0)).astype(np.uint8)


def _write(arr: np.ndarray, grid: dict, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(_image(arr, grid), str(path), useCompression=True)
    return path


def _read(path: Path) -> tuple[np.ndarray, sitk.Image]:
    img = sitk.ReadImage(str(path))
    return sitk.GetArrayFromImage(img), img


def _same_grid(img: sitk.Image, grid: dict) -> bool:
    return (img.GetSize() == grid["size"] and np.allclose(img.GetSpacing(), grid["spacing"])
            and np.allclose(img.GetOrigin(), grid["origin"]) and np.allclose(img.GetDirection(), grid.get("direction", DIRECTION)))


def _interior(grid: dict, inside: dict, margin: float = 1.5) -> np.ndarray:
    """Voxels of `grid` at least `margin` in-plane voxels of `inside` away from its border (free of border effects)."""
    p = _physical(grid) - np.array(inside["origin"])
    index = p @ np.array(DIRECTION).reshape(3, 3) / np.array(inside["spacing"])
    lo, hi = np.array([margin, margin, -0.01]), np.array(inside["size"]) - np.array([1 + margin, 1 + margin, 0.99])
    return np.all((index >= lo) & (index <= hi), axis=-1)


def _listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


# ------------------------------------------------------------------ Prostate158


def _prostate158(root: Path) -> Path:
    """prostate158_train/ with train.csv (020 with a tumour, 021 without), valid.csv (022: ADC already on the T2 grid)."""
    src = root / "prostate158_train"
    header = "ID,t2,adc,dwi,t2_anatomy_reader1,t2_tumor_reader1,adc_tumor_reader1"
    rows = {"train.csv": [], "valid.csv": []}
    for i, case in enumerate(["020", "021", "022"]):
        d = src / "train" / case
        _write(_ramp(T2_GRID) + 50 * i, T2_GRID, d / "t2.nii.gz")
        adc_grid = T2_GRID if case == "022" else DWI_GRID
        _write(_ramp(adc_grid) * 2, adc_grid, d / "adc.nii.gz")
        _write(_ramp(DWI_GRID) / 2, DWI_GRID, d / "dwi.nii.gz")
        _write(_zones(T2_GRID), T2_GRID, d / "t2_anatomy_reader1.nii.gz")
        rel = f"train/{case}"
        if case == "021":
            _write(np.zeros(DWI_GRID["size"][::-1], np.uint8), DWI_GRID, d / "empty.nii.gz")
            tumour = f",,{rel}/empty.nii.gz"
        else:
            lesion = np.zeros(adc_grid["size"][::-1], np.uint8)
            lesion[2:4, 3:6, 4:7] = 1
            _write(_zones(T2_GRID, 1, 0), T2_GRID, d / "t2_tumor_reader1.nii.gz")
            _write(lesion, adc_grid, d / "adc_tumor_reader1.nii.gz")
            tumour = f",{rel}/t2_tumor_reader1.nii.gz,{rel}/adc_tumor_reader1.nii.gz"
        row = f"{int(case)},{rel}/t2.nii.gz,{rel}/adc.nii.gz,{rel}/dwi.nii.gz,{rel}/t2_anatomy_reader1.nii.gz{tumour}"
        rows["valid.csv" if case == "022" else "train.csv"].append(row)
    for name, lines in rows.items():
        (src / name).write_text("\n".join([header, *lines]) + "\n")
    return src


def test_prostate158_anatomy_and_tumour(samplan_env, tmp_path):
    src = _prostate158(tmp_path)
    ds = p158_convert(src, num_processes=1)
    assert ds == samplan_env["SAMPLAN_RAW"] / "Dataset158_Prostate158Anatomy"
    dj = json.loads((ds / "dataset.json").read_text())
    assert dj["channel_names"] == {"0": "T2"} and dj["numTraining"] == 3
    assert dj["labels"] == {"background": 0, "transition zone": 1, "peripheral zone": 2}
    assert dj["official_split"] == {"train": ["prostate158_020", "prostate158_021"], "valid": ["prostate158_022"]}
    assert _listing(ds / "imagesTr") == [f"prostate158_02{i}_0000.nii.gz" for i in range(3)]
    t2, t2_img = _read(ds / "imagesTr" / "prostate158_021_0000.nii.gz")
    np.testing.assert_array_equal(t2, _ramp(T2_GRID) + 50)
    label, label_img = _read(ds / "labelsTr" / "prostate158_021.nii.gz")
    np.testing.assert_array_equal(label, _zones(T2_GRID))
    assert _same_grid(t2_img, T2_GRID) and _same_grid(label_img, T2_GRID)

    # tumour, through the CLI: T2, ADC, DWI on the T2 grid; the ADC-drawn lesion comes from the ADC grid
    assert convert_prostate158.main(["-i", str(tmp_path), "--task", "tumor", "-np", "1"]) == 0
    ds = samplan_env["SAMPLAN_RAW"] / "Dataset159_Prostate158Tumor"
    dj = json.loads((ds / "dataset.json").read_text())
    assert dj["channel_names"] == {"0": "T2", "1": "ADC", "2": "DWI"} and dj["labels"] == {"background": 0, "tumor": 1}
    assert dj["resampled_to_t2_grid"]["channels"] == {"prostate158_020": ["adc", "dwi"], "prostate158_021": ["adc", "dwi"],
                                                       "prostate158_022": ["dwi"]}
    assert dj["resampled_to_t2_grid"]["labels"] == ["prostate158_020", "prostate158_021"]  # lesion and empty on ADC grid
    adc, adc_img = _read(ds / "imagesTr" / "prostate158_020_0001.nii.gz")
    inside = _interior(T2_GRID, DWI_GRID)
    assert _same_grid(adc_img, T2_GRID) and inside.sum() > 500
    # linear interpolation in physical space reproduces the ramp: the grids' positions were honoured, not just rescaled
    np.testing.assert_allclose(adc[inside], (_ramp(T2_GRID) * 2)[inside], rtol=1e-4)
    np.testing.assert_array_equal(_read(ds / "imagesTr" / "prostate158_022_0001.nii.gz")[0], _ramp(T2_GRID) * 2)
    lesion, _ = _read(ds / "labelsTr" / "prostate158_020.nii.gz")
    assert set(np.unique(lesion)) == {0, 1} and 0 < lesion.sum() < lesion.size // 10
    assert not _read(ds / "labelsTr" / "prostate158_021.nii.gz")[0].any()  # empty.nii.gz: no tumour


def test_prostate158_refusals_write_nothing(samplan_env, tmp_path, capsys):
    raw = samplan_env["SAMPLAN_RAW"]
    (tmp_path / "elsewhere").mkdir()
    with pytest.raises(InputError, match="holds no train.csv, valid.csv or test.csv.*expected the Prostate158 layout"):
        p158_convert(tmp_path / "elsewhere", num_processes=1)
    src = _prostate158(tmp_path)
    csv = (src / "train.csv").read_text()
    (src / "train.csv").write_text(csv.replace("train/020/dwi.nii.gz", "../../secret/dwi.nii.gz"))
    with pytest.raises(DatasetError, match="train.csv line 2: '../../secret/dwi.nii.gz' leads outside"):
        p158_convert(src, task="tumor", num_processes=1)
    (src / "train.csv").write_text(csv)
    shifted = dict(T2_GRID, origin=(-4.0, -8.0, 4.0))
    bad = _write(_zones(T2_GRID), shifted, src / "train" / "021" / "t2_anatomy_reader1.nii.gz")
    with pytest.raises(DatasetError, match=f"{bad} and {src / 'train' / '021' / 't2.nii.gz'} are on different voxel grids "
                                           r"\(origin \[-4, "):
        p158_convert(src, num_processes=1)
    assert list(raw.iterdir()) == []
    _write(_zones(T2_GRID), T2_GRID, bad)
    ds = p158_convert(src, num_processes=1)
    before = _listing(ds)
    stamp = (ds / "dataset.json").stat().st_mtime_ns
    assert convert_prostate158.main(["-i", str(src), "-np", "1"]) == 2
    assert "exists already" in capsys.readouterr().err
    assert _listing(ds) == before and (ds / "dataset.json").stat().st_mtime_ns == stamp
    assert sorted(p.name for p in raw.iterdir()) == [ds.name]


# ------------------------------------------------------------------ PI-CAI


def _picai(root: Path) -> tuple[Path, Path, dict]:
    """Two image folds (patient 10131 with two studies), human-expert labels for three studies, AI labels for all four."""
    images, labels, lesions = root / "images", root / "picai_labels", {}
    studies = {"picai_public_images_fold0": ["10005_1000005", "10019_1000019"],
               "picai_public_images_fold1": ["10131_1000132", "10131_1000133"]}
    for i, (fold, cases) in enumerate((f, c) for f, cs in studies.items() for c in cs):
        patient = cases.split("_")[0]
        d = images / fold / patient
        _write((_ramp(T2_GRID) + 10 * i).astype(np.uint16), T2_GRID, d / f"{cases}_t2w.mha")
        _write(_ramp(DWI_GRID) * 3, DWI_GRID, d / f"{cases}_adc.mha")
        _write(_ramp(DWI_GRID) / 4, DWI_GRID, d / f"{cases}_hbv.mha")
        _write(np.zeros((3, 8, 8), np.uint16), {**T2_GRID, "size": (8, 8, 3)}, d / f"{cases}_cor.mha")
        lesion = np.zeros(T2_GRID["size"][::-1], np.uint16)
        lesion[2:4, 10:15, 12:18] = 3  # ISUP 3
        lesion[3:5, 20:24, 25:30] = 2  # ISUP 2
        lesions[cases] = lesion
        if cases != "10019_1000019":
            _write(lesion, T2_GRID, labels / "csPCa_lesion_delineations/human_expert/resampled" / f"{cases}.nii.gz")
        _write((lesion > 2).astype(np.int8), T2_GRID, labels / "csPCa_lesion_delineations/AI/Bosma22a" / f"{cases}.nii.gz")
    return images, labels, lesions


def test_picai_as_the_baseline_converts(samplan_env, tmp_path, capsys):
    images, labels, lesions = _picai(tmp_path)
    ds = picai_convert(images, labels, num_processes=1)
    assert ds.name == "Dataset224_PICAI"
    assert "skipped 1 of 4 studies without a human-expert delineation" in capsys.readouterr().out
    dj = json.loads((ds / "dataset.json").read_text())
    reference = SHARED_RAW / "Dataset502_PICAIToy_T2ADCHBV" / "dataset.json"
    want = json.loads(reference.read_text()) if reference.is_file() else {
        "channel_names": {"0": "T2", "1": "ADC", "2": "HBV"}, "labels": {"background": 0, "csPCa_lesion": 1}}
    assert (dj["channel_names"], dj["labels"], dj["file_ending"]) == (want["channel_names"], want["labels"], ".nii.gz")
    assert dj["numTraining"] == 3 and dj["label_source"] == {"human_expert": 3, "ai_derived_cases": []}
    assert _listing(ds / "imagesTr") == [f"{c}_{k:04d}.nii.gz" for c in ("10005_1000005", "10131_1000132", "10131_1000133")
                                         for k in range(3)]
    t2, t2_img = _read(ds / "imagesTr" / "10131_1000133_0000.nii.gz")
    assert t2.dtype == np.uint16 and _same_grid(t2_img, T2_GRID)
    np.testing.assert_array_equal(t2, (_ramp(T2_GRID) + 30).astype(np.uint16))
    inside = _interior(T2_GRID, DWI_GRID, margin=3)  # the B-spline's mirrored border reaches about 3 voxels in
    for k, expected in ((1, _ramp(T2_GRID) * 3), (2, _ramp(T2_GRID) / 4)):
        arr, img = _read(ds / "imagesTr" / f"10005_1000005_{k:04d}.nii.gz")
        assert _same_grid(img, T2_GRID)
        np.testing.assert_allclose(arr[inside], expected[inside], rtol=2e-3)  # cubic B-spline, as picai_prep
    label, label_img = _read(ds / "labelsTr" / "10131_1000132.nii.gz")
    assert label.dtype == np.uint8 and _same_grid(label_img, T2_GRID)
    np.testing.assert_array_equal(label, (lesions["10131_1000132"] >= 1).astype(np.uint8))  # ISUP >= 2 -> 1

    # --labels ai adds the study without a human delineation, with its AI-derived one, and says so
    assert convert_picai.main(["-i", str(images), "-l", str(labels), "--labels", "ai", "-np", "1"]) == 0
    ds = samplan_env["SAMPLAN_RAW"] / "Dataset225_PICAIwithAIlabels"
    dj = json.loads((ds / "dataset.json").read_text())
    assert dj["numTraining"] == 4 and dj["label_source"] == {"human_expert": 3, "ai_derived_cases": ["10019_1000019"]}
    np.testing.assert_array_equal(_read(ds / "labelsTr" / "10019_1000019.nii.gz")[0], lesions["10019_1000019"] > 2)


def test_picai_refusals_write_nothing(samplan_env, tmp_path, capsys):
    raw = samplan_env["SAMPLAN_RAW"]
    images, labels, _ = _picai(tmp_path)
    with pytest.raises(InputError, match="holds no PI-CAI study; expected the PI-CAI image layout"):
        picai_convert(labels, labels, num_processes=1)
    with pytest.raises(InputError, match="must be the root of the picai_labels repository"):
        picai_convert(images, images, num_processes=1)
    bad = labels / "csPCa_lesion_delineations/human_expert/resampled/10131_1000132.nii.gz"
    _write(np.zeros((6, 18, 20), np.uint8), {**T2_GRID, "size": (20, 18, 6), "spacing": (1.0, 1.0, 3.0)}, bad)
    t2w = images / "picai_public_images_fold1/10131/10131_1000132_t2w.mha"
    with pytest.raises(DatasetError, match=f"{bad} and {t2w} are on different voxel grids \\(size 20x18x6 vs 40x36x6\\)"):
        picai_convert(images, labels, num_processes=1)
    assert list(raw.iterdir()) == []
    bad.unlink()
    ds = picai_convert(images, labels, num_processes=1)
    before = _listing(ds)
    assert convert_picai.main(["-i", str(images), "-l", str(labels), "-np", "1"]) == 2
    assert "exists already" in capsys.readouterr().err and _listing(ds) == before


# ------------------------------------------------------------------ COVID-19-CT-Seg

CT_GRID = {"size": (24, 20, 5), "spacing": (0.72, 0.72, 5.0), "origin": (-180.0, -170.0, -320.0), "direction": [1, 0, 0, 0, 1, 0, 0, 0, 1]}
CASES = {"coronacases_org_001": "coronacases_001", "coronacases_org_002": "coronacases_002",
         "radiopaedia_org_covid-19-pneumonia-4_85506_1-dcm": "radiopaedia_4_85506_1",
         "radiopaedia_org_covid-19-pneumonia-10_85902_1-dcm": "radiopaedia_10_85902_1",
         "radiopaedia_org_covid-19-pneumonia-10_85902_3-dcm": "radiopaedia_10_85902_3",
         "radiopaedia_org_covid-19-pneumonia-7_85703_0-dcm": "radiopaedia_7_85703_0"}


def _window(hu: np.ndarray) -> np.ndarray:
    """The authors' lung-window mapping, float64: [-1250, 250] HU -> [0, 255]."""
    return (np.clip(hu.astype(np.float64), -1250, 250) + 1250) * 255 / 1500


def _hu(seed: int) -> np.ndarray:
    """A chest-like CT in HU: air outside, two dark lungs, soft tissue and bone-bright spots."""
    rng = np.random.default_rng(seed)
    lungs = _zones(CT_GRID, 1, 2) > 0
    ct = np.where(lungs, -850, 40) + rng.normal(0, 30, lungs.shape)
    ct[:, :2], ct[:, :, -2:] = -1024, -1024
    ct[2, 5, 5] = 900
    return ct.astype(np.int16)


def _covid(root: Path) -> Path:
    """The four zenodo zips unpacked side by side: 2 coronacases scans in HU, 4 radiopaedia ones in the [0, 255] window."""
    for i, (image, mask) in enumerate(CASES.items()):
        hu = _hu(i)
        ct = hu if image.startswith("corona") else np.round(_window(hu)).astype(np.uint8)
        _write(ct, CT_GRID, root / "COVID-19-CT-Seg_20cases" / f"{image}.nii.gz")
        lungs = _zones(CT_GRID, 1, 2)
        infection = np.zeros_like(lungs)
        infection[1:3, 8:12, 6:10] = 1
        _write(lungs, CT_GRID, root / "Lung_Mask" / f"{mask}.nii.gz")
        _write(infection, CT_GRID, root / "Infection_Mask" / f"{mask}.nii.gz")
        _write(np.where(infection > 0, 3, lungs).astype(np.uint8), CT_GRID, root / "Lung_and_Infection_Mask" / f"{mask}.nii.gz")
    return root


def test_covid19ct_labels_and_intensity_scales(samplan_env, tmp_path):
    src = _covid(tmp_path / "covid")
    ds = covid_convert(src, num_processes=1)
    assert ds.name == "Dataset190_COVID19CTSegInfection"
    dj = json.loads((ds / "dataset.json").read_text())
    assert dj["labels"] == {"background": 0, "infection": 1} and dj["channel_names"] == {"0": "CT"}
    assert dj["numTraining"] == 6 and dj["case_groups"] == GROUPS  # radiopaedia case 10: two scans, one group
    scales = dj["intensities"]["cases"]
    assert scales["coronacases_001"].startswith("HU, mapped to [0, 255]")
    assert scales["radiopaedia_10_85902_3"] == "[0, 255] lung window, as published"
    ct, ct_img = _read(ds / "imagesTr" / "coronacases_002_0000.nii.gz")
    np.testing.assert_allclose(ct, _window(_hu(1)), atol=1e-3)
    assert _same_grid(ct_img, CT_GRID)
    assert ((ds / "imagesTr" / "radiopaedia_4_85506_1_0000.nii.gz").read_bytes()
            == (src / "COVID-19-CT-Seg_20cases" / "radiopaedia_org_covid-19-pneumonia-4_85506_1-dcm.nii.gz").read_bytes())
    infection, _ = _read(ds / "labelsTr" / "radiopaedia_7_85703_0.nii.gz")
    assert set(np.unique(infection)) == {0, 1}

    assert convert_covid19ct.main(["-i", str(src), "--labels", "lungs", "--merge-lungs", "-np", "1"]) == 0
    ds = samplan_env["SAMPLAN_RAW"] / "Dataset192_COVID19CTSegLung"
    assert json.loads((ds / "dataset.json").read_text())["labels"] == {"background": 0, "lung": 1}
    np.testing.assert_array_equal(_read(ds / "labelsTr" / "coronacases_001.nii.gz")[0], _zones(CT_GRID, 1, 2) > 0)

    ds = covid_convert(src, labels="lungs_and_infection", intensities="keep", num_processes=1)
    dj = json.loads((ds / "dataset.json").read_text())
    assert dj["labels"] == {"background": 0, "left lung": 1, "right lung": 2, "infection": 3}
    assert dj["intensities"]["cases"]["coronacases_001"] == "HU, as published"
    np.testing.assert_array_equal(_read(ds / "imagesTr" / "coronacases_001_0000.nii.gz")[0], _hu(0))
    assert set(np.unique(_read(ds / "labelsTr" / "coronacases_001.nii.gz")[0])) == {0, 1, 2, 3}


def test_covid19ct_refusals_write_nothing(samplan_env, tmp_path, capsys):
    raw = samplan_env["SAMPLAN_RAW"]
    with pytest.raises(InputError, match="is not in the COVID-19-CT-Seg layout: expected COVID-19-CT-Seg_20cases/"):
        covid_convert(tmp_path, num_processes=1)
    src = _covid(tmp_path / "covid")
    with pytest.raises(InputError, match="--merge-lungs .* needs --labels lungs"):
        covid_convert(src, merge_lungs=True, num_processes=1)
    bad = _write(np.zeros((5, 20, 24), np.uint8), {**CT_GRID, "spacing": (0.8, 0.8, 5.0)},
                 src / "Infection_Mask" / "radiopaedia_10_85902_1.nii.gz")
    image = src / "COVID-19-CT-Seg_20cases" / "radiopaedia_org_covid-19-pneumonia-10_85902_1-dcm.nii.gz"
    with pytest.raises(DatasetError, match=f"{bad} and {image} are on different voxel grids \\(spacing \\[0.8, 0.8, 5\\]"):
        covid_convert(src, num_processes=1)
    _write(np.zeros((5, 20, 24), np.uint8), CT_GRID, bad)
    _write(np.full((5, 20, 24), 400, np.int16), CT_GRID, image)  # neither HU nor the [0, 255] window
    with pytest.raises(DatasetError, match="values 400..400 are neither HU .* nor the published \\[0, 255\\] lung window"):
        covid_convert(src, num_processes=1)
    assert list(raw.iterdir()) == []
    ds = covid_convert(src, intensities="keep", num_processes=1)
    before = _listing(ds)
    assert convert_covid19ct.main(["-i", str(src), "--intensities", "keep"]) == 2
    err = capsys.readouterr().err
    assert "exists already" in err and "Traceback" not in err and _listing(ds) == before
