"""Fingerprint: nnU-Net's keys checked against independent computations, label statistics on known label maps."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image
from scipy.ndimage import binary_fill_holes

from conftest import copy_shared_subset
from samplan.errors import DatasetError
from samplan.experiment_planning.fingerprint import extract_fingerprint
from samplan.experiment_planning.label_statistics import (
    aggregate_label_stats,
    case_label_stats,
    label_keys,
    slice_axis_of,
)

NNUNET_KEYS = {"spacings", "shapes_after_crop", "foreground_intensity_properties_per_channel", "median_relative_size_after_cropping"}
STAT_KEYS = {"mean", "median", "std", "min", "max", "percentile_99_5", "percentile_00_5"}
LABEL_KEYS = {"cases_with_label", "components_per_case", "components_per_slice", "extent_voxels", "extent_mm",
              "inplane_extent_pixels", "slice_fraction"}


def _cases(ds: Path) -> list[str]:
    return sorted(p.name[: -len(".nii.gz")] for p in (ds / "labelsTr").glob("*.nii.gz"))


def _read(path: Path) -> tuple[np.ndarray, list[float]]:
    img = sitk.ReadImage(str(path))
    return sitk.GetArrayFromImage(img), list(img.GetSpacing())[::-1]


def _nonzero_crop(img: np.ndarray, seg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Independent crop: bounding box of the hole-filled nonzero mask; seg is -1 outside that mask."""
    mask = binary_fill_holes(img != 0)
    idx = np.argwhere(mask)
    box = tuple(slice(a, b + 1) for a, b in zip(idx.min(0), idx.max(0)))
    seg = seg[box].astype(np.int16)
    seg[(seg == 0) & ~mask[box]] = -1
    return img[box], seg


def test_synth3d_matches_independent_computation(synth3d):
    total = 4e5
    fp = extract_fingerprint(synth3d, num_processes=1, progress=False, total_intensity_samples=total)
    assert NNUNET_KEYS <= set(fp) and {"case_identifiers", "file_ending", "num_channels", "label_statistics"} <= set(fp)
    cases = _cases(synth3d)
    assert fp["case_identifiers"] == cases and fp["num_channels"] == 1 and fp["file_ending"] == ".nii.gz"

    samples, pooled, rel = [], [], []
    for i, case in enumerate(cases):
        img, spacing = _read(synth3d / "imagesTr" / f"{case}_0000.nii.gz")
        seg, _ = _read(synth3d / "labelsTr" / f"{case}.nii.gz")
        assert fp["spacings"][i] == spacing
        img_c, seg_c = _nonzero_crop(img.astype(np.float32), seg)
        assert fp["shapes_after_crop"][i] == list(img_c.shape)
        rel.append(img_c.size / img.size)
        fg = img_c[seg_c > 0]
        pooled.append(fg)
        # nnU-Net's rule written out: a fresh RandomState(1234) per case, sampling with replacement
        samples.append(np.random.RandomState(1234).choice(fg, int(total // len(cases)), replace=True))
    assert fp["median_relative_size_after_cropping"] == pytest.approx(np.median(rel))
    assert fp["median_relative_size_after_cropping"] < 0.9  # the synthetic body is zero-padded

    stats = fp["foreground_intensity_properties_per_channel"]["0"]
    assert set(stats) == STAT_KEYS
    s = np.concatenate(samples)
    p005, med, p995 = np.percentile(s, (0.5, 50, 99.5))
    expected = {"mean": s.mean(), "median": med, "std": s.std(), "min": s.min(), "max": s.max(),
                "percentile_99_5": p995, "percentile_00_5": p005}
    for k, v in expected.items():
        assert stats[k] == pytest.approx(float(v), rel=1e-6), k
    # the sample describes the full foreground closely (the synthetic cases have similar foreground sizes)
    full = np.concatenate(pooled)
    assert stats["mean"] == pytest.approx(full.mean(), rel=0.01)
    assert stats["std"] == pytest.approx(full.std(), rel=0.03)
    assert stats["median"] == pytest.approx(np.median(full), rel=0.01)
    assert stats["min"] >= full.min() and stats["max"] <= full.max()
    for k, q in (("percentile_00_5", 0.5), ("percentile_99_5", 99.5)):
        assert stats[k] == pytest.approx(np.percentile(full, q), rel=0.02), k

    ls = fp["label_statistics"]
    assert ls["slice_axis"] == 0  # spacing (3, 0.8, 0.8): z is the coarsest axis
    assert set(ls["per_label"]) == {"1", "2"}
    for entry in ls["per_label"].values():
        assert set(entry) == LABEL_KEYS and entry["cases_with_label"] == len(cases)
        assert np.allclose(entry["extent_mm"]["median"], np.array(entry["extent_voxels"]["median"]) * fp["spacings"][0])
    json.dumps(fp)  # JSON-ready as returned


def test_synth2d_png(synth2d):
    fp = extract_fingerprint(synth2d, num_processes=1, progress=False, total_intensity_samples=3e5)
    labels = sorted((synth2d / "labelsTr").glob("*.png"))
    assert fp["num_channels"] == 3 and set(fp["foreground_intensity_properties_per_channel"]) == {"0", "1", "2"}
    assert fp["spacings"] == [[999.0, 1.0, 1.0]] * len(labels)
    lab_arrays = [np.asarray(Image.open(p)) for p in labels]
    assert fp["shapes_after_crop"] == [[1, *a.shape] for a in lab_arrays]  # noisy background: nothing to crop
    for stats in fp["foreground_intensity_properties_per_channel"].values():
        assert 140 <= stats["min"] <= stats["percentile_00_5"] <= stats["median"] <= stats["percentile_99_5"] <= stats["max"] <= 179

    ls = fp["label_statistics"]
    assert ls["slice_axis"] == 0
    disc = ls["per_label"]["1"]
    extents = [np.ptp(np.argwhere(a > 0), axis=0) + 1 for a in lab_arrays]
    assert disc["cases_with_label"] == len(labels)
    assert disc["components_per_case"] == {"mean": 1.0, "median": 1.0, "min": 1.0, "max": 1.0}
    assert disc["slice_fraction"]["min"] == 1.0
    assert disc["inplane_extent_pixels"]["median"] == list(np.median(extents, axis=0))
    assert disc["extent_voxels"]["median"] == [1.0, *np.median(extents, axis=0)]


def _handmade() -> tuple[np.ndarray, dict]:
    """A (10, 20, 30) label map with known objects; returns it and the facts to expect."""
    seg = np.zeros((10, 20, 30), np.int8)
    seg[2:5, 1:6, 1:4] = 1        # A: extent (3, 5, 3) on slices 2-4
    seg[5, 6, 4] = 1              # touches A's corner (4, 5, 3) diagonally: same 3D object, own 2D object on slice 5
    seg[6:8, 10:14, 20:28] = 1    # B: extent (2, 4, 8) on slices 6-7
    seg[2:4, 15:18, 10:12] = 1    # C: extent (2, 3, 2) on slices 2-3, beside A
    seg[:, 0:2, 25:30] = 2        # one slab through every slice
    facts = {
        "1": {"components": 3, "extents": [(4, 6, 4), (2, 4, 8), (2, 3, 2)], "slice_components": [2, 2, 1, 1, 1, 1],
              "inplane": [(5, 3)] * 3 + [(3, 2)] * 2 + [(1, 1)] + [(4, 8)] * 2, "slice_fraction": 0.6},
        "2": {"components": 1, "extents": [(10, 2, 5)], "slice_components": [1] * 10, "inplane": [(2, 5)] * 10,
              "slice_fraction": 1.0},
    }
    return seg, facts


def _sorted_rows(a) -> list[tuple]:
    return sorted(tuple(int(x) for x in r) for r in a)


def test_case_label_stats_handmade():
    seg, facts = _handmade()
    out = case_label_stats(seg, 0, {"1": (1,), "2": (2,), "3": (3,), "both": (1, 2)})
    assert out["3"] is None
    for key, f in facts.items():
        assert out[key]["components"] == f["components"]
        assert _sorted_rows(out[key]["extents"]) == sorted(f["extents"])
        assert sorted(out[key]["slice_components"].tolist()) == sorted(f["slice_components"])
        assert _sorted_rows(out[key]["inplane_extents"]) == sorted(f["inplane"])
        assert out[key]["slice_fraction"] == pytest.approx(f["slice_fraction"])
    assert out["both"]["components"] == 4  # the slab touches none of the label-1 objects
    # slicing along x instead: the slab spans x 25-29, 5 of 30 slices, each cut (z, y) = (10, 2)
    along_x = case_label_stats(seg, 2, {"2": (2,)})["2"]
    assert along_x["slice_fraction"] == pytest.approx(5 / 30)
    assert _sorted_rows(along_x["inplane_extents"]) == [(10, 2)] * 5


def test_aggregate_label_stats_two_cases():
    seg, facts = _handmade()
    keys = {"1": (1,), "2": (2,), "3": (3,)}
    spacings = [[3.0, 1.0, 1.0], [2.0, 0.5, 0.5]]
    per_case = [case_label_stats(seg, 0, keys), case_label_stats(np.where(seg == 2, 0, seg), 0, keys)]
    agg = aggregate_label_stats(per_case, spacings, 0, keys)
    assert agg["slice_axis"] == 0
    one, two = agg["per_label"]["1"], agg["per_label"]["2"]
    assert one["cases_with_label"] == 2 and two["cases_with_label"] == 1
    assert agg["per_label"]["3"]["cases_with_label"] == 0 and agg["per_label"]["3"]["extent_mm"] is None
    ext = np.array(facts["1"]["extents"] * 2, float)
    ext_mm = np.concatenate([np.array(facts["1"]["extents"]) * s for s in spacings])
    assert one["extent_voxels"]["median"] == list(np.median(ext, 0))
    assert one["extent_mm"]["p95"] == pytest.approx(list(np.percentile(ext_mm, 95, axis=0)))
    assert one["components_per_slice"] == {"mean": pytest.approx(8 / 6), "median": 1.0, "max": 2.0}
    assert one["slice_fraction"]["mean"] == pytest.approx(0.6)
    assert two["extent_mm"]["median"] == [30.0, 2.0, 5.0]


def test_label_keys_and_slice_axis():
    plain = {"labels": {"background": 0, "a": 1, "b": 2, "ignore": 3}}
    assert label_keys(plain) == {"1": (1,), "2": (2,)}
    regions = {"labels": {"background": 0, "WT": [1, 2, 3], "TC": [2, 3], "ET": 3}, "regions_class_order": [1, 2, 3]}
    assert label_keys(regions) == {"1": (1,), "2": (2,), "3": (3,), "WT": (1, 2, 3), "TC": (2, 3), "ET": (3,)}
    assert slice_axis_of([[1.0, 1.0, 3.0], [1.0, 0.9, 3.5], [1.2, 1.0, 2.5]]) == 2
    assert slice_axis_of([[1.0, 1.0, 1.0]] * 3) == 0
    assert slice_axis_of([[999.0, 1.0, 1.0]], is_2d=True) == 0


def _write(arr: np.ndarray, path: Path, spacing_zyx) -> None:
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(tuple(float(s) for s in spacing_zyx[::-1]))
    sitk.WriteImage(img, str(path))


def test_handmade_dataset_with_regions(tmp_path):
    seg, facts = _handmade()
    ds = tmp_path / "Dataset950_Hand"
    (ds / "imagesTr").mkdir(parents=True)
    (ds / "labelsTr").mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        _write((50 + rng.normal(0, 5, seg.shape) + 30 * seg).astype(np.float32), ds / "imagesTr" / f"c{i}_0000.nii.gz", (3, 1, 1))
        _write(seg.astype(np.uint8), ds / "labelsTr" / f"c{i}.nii.gz", (3, 1, 1))
    meta = {"channel_names": {"0": "MR"}, "labels": {"background": 0, "whole": [1, 2], "slab": 2},
            "regions_class_order": [1, 2], "numTraining": 2, "file_ending": ".nii.gz"}
    (ds / "dataset.json").write_text(json.dumps(meta))
    fp = extract_fingerprint(ds, num_processes=1, progress=False, total_intensity_samples=1e4)
    per = fp["label_statistics"]["per_label"]
    assert set(per) == {"1", "2", "whole", "slab"}
    assert fp["shapes_after_crop"] == [list(seg.shape)] * 2
    assert per["1"]["components_per_case"]["max"] == facts["1"]["components"]
    assert per["1"]["slice_fraction"]["min"] == pytest.approx(0.6)
    assert per["1"]["extent_mm"]["median"] == list(np.median(np.array(facts["1"]["extents"]) * [3, 1, 1], 0))
    assert per["whole"]["components_per_case"]["mean"] == 4 and per["whole"]["slice_fraction"]["mean"] == 1.0
    assert per["slab"] == per["2"]


def test_missing_image_names_the_case(synth3d):
    next((synth3d / "imagesTr").glob("case_001_*")).unlink()
    with pytest.raises(DatasetError, match="case_001"):
        extract_fingerprint(synth3d, num_processes=1, progress=False, total_intensity_samples=1e4)


def test_hippocampus_subset(tmp_path):
    ds = copy_shared_subset("Dataset004_Hippocampus", tmp_path, 10)
    fp = extract_fingerprint(ds, num_processes=2, progress=False)  # nnU-Net's 1e8 samples, two workers
    cases = _cases(ds)
    assert fp["case_identifiers"] == cases
    case_means, fg_min, fg_max = [], np.inf, -np.inf
    for i, case in enumerate(cases):
        img, spacing = _read(ds / "imagesTr" / f"{case}_0000.nii.gz")
        seg, _ = _read(ds / "labelsTr" / f"{case}.nii.gz")
        img_c, seg_c = _nonzero_crop(img.astype(np.float32), seg)
        assert fp["spacings"][i] == spacing and fp["shapes_after_crop"][i] == list(img_c.shape)
        fg = img_c[seg_c > 0]
        case_means.append(fg.mean())
        fg_min, fg_max = min(fg_min, fg.min()), max(fg_max, fg.max())
    stats = fp["foreground_intensity_properties_per_channel"]["0"]
    # equal samples per case: the mean is the mean of the case means; 1e7 draws per case hit every voxel
    assert stats["mean"] == pytest.approx(np.mean(case_means), rel=0.01)
    assert stats["min"] == fg_min and stats["max"] == fg_max
    assert stats["percentile_00_5"] < stats["median"] < stats["percentile_99_5"] and stats["std"] > 0
    ls = fp["label_statistics"]
    assert ls["slice_axis"] == 0  # 1 mm isotropic: ties go to the first axis
    for key in ("1", "2"):  # anterior and posterior hippocampus are in every case
        entry = ls["per_label"][key]
        assert entry["cases_with_label"] == 10 and entry["components_per_case"]["min"] >= 1
        assert 0 < entry["slice_fraction"]["min"] <= entry["slice_fraction"]["max"] < 1
        assert all(0 < e <= s for e, s in zip(entry["extent_voxels"]["p95"], np.max(fp["shapes_after_crop"], 0)))
        assert entry["extent_mm"] == entry["extent_voxels"]  # 1 mm spacing


def test_kvasir_subset(tmp_path):
    ds = copy_shared_subset("Dataset510_KvasirSEG", tmp_path, 3)
    fp = extract_fingerprint(ds, num_processes=1, progress=False, total_intensity_samples=3e5)
    assert fp["num_channels"] == 3 and fp["file_ending"] == ".png"
    assert all(sp == [999.0, 1.0, 1.0] for sp in fp["spacings"])
    for i, case in enumerate(fp["case_identifiers"]):
        w, h = Image.open(ds / "imagesTr" / f"{case}_0000.png").size
        z, y, x = fp["shapes_after_crop"][i]
        assert z == 1 and 0 < y <= h and 0 < x <= w
    for stats in fp["foreground_intensity_properties_per_channel"].values():
        assert 0 <= stats["min"] <= stats["median"] <= stats["max"] <= 255
    polyp = fp["label_statistics"]["per_label"]["1"]
    assert fp["label_statistics"]["slice_axis"] == 0 and polyp["cases_with_label"] == 3
    assert polyp["slice_fraction"]["min"] == 1.0 and polyp["components_per_case"]["min"] >= 1
    assert polyp["components_per_slice"]["max"] == polyp["components_per_case"]["max"]  # one slice per case
    assert all(e >= 1 for e in polyp["inplane_extent_pixels"]["p05"])


@pytest.mark.parametrize("name,n_cases", [("Dataset004_Hippocampus", 6), ("Dataset502_PICAIToy_T2ADCHBV", 3)])
def test_verification_and_fingerprint_read_every_file_once(samplan_env, monkeypatch, name, n_cases):
    # plan_and_preprocess hands the fingerprint's per-case work to verification: one read per file, same result
    import samplan.dataset.image_io as image_io
    from samplan.pipeline.planning import plan_and_preprocess

    import samplan.experiment_planning.fingerprint as fingerprint

    ds = copy_shared_subset(name, samplan_env["SAMPLAN_RAW"], n_cases)
    monkeypatch.setattr(fingerprint, "NNUNET_INTENSITY_SAMPLES", 1e5)  # fewer samples, same code: fast
    separate = extract_fingerprint(ds, num_processes=1, progress=False, total_intensity_samples=1e5)
    reads: list[str] = []
    original = image_io._read_sitk
    monkeypatch.setattr(image_io, "_read_sitk", lambda path: reads.append(Path(path).name) or original(path))
    out = plan_and_preprocess(name, plan_only=True, num_processes=1)
    files = sorted(p.name for p in (ds / "imagesTr").iterdir()) + sorted(p.name for p in (ds / "labelsTr").iterdir())
    assert sorted(reads) == sorted(files)  # each image and label file exactly once
    assert json.loads((out / "fingerprint.json").read_text()) == json.loads(json.dumps(separate))


def test_counted_samples_equal_nnunets_choice_and_its_statistics():
    """The foreground sample kept as counts is nnU-Net's `choice` sample, and the weighted statistics equal numpy's
    over the expanded sample (percentiles exactly, mean/std to float32 precision)."""
    from samplan.experiment_planning.fingerprint import _foreground_samples, weighted_statistics

    rng = np.random.default_rng(0)
    data = np.stack([rng.normal(100, 30, (6, 20, 20)).round(1), rng.integers(0, 50, (6, 20, 20))]).astype(np.float32)
    seg = (rng.random((1, 6, 20, 20)) < 0.3).astype(np.uint8)
    n = 12345
    counted = _foreground_samples(data, seg, n, ["a", "b"])
    rs = np.random.RandomState(1234)
    for c, (values, counts) in enumerate(counted):
        expected = rs.choice(data[c][seg[0] > 0], n, replace=True)  # nnU-Net's draw, channels in order
        assert np.array_equal(np.repeat(values, counts), np.sort(expected))
        stats = weighted_statistics(values, counts)
        p005, med, p995 = np.percentile(expected, (0.5, 50, 99.5))
        assert (stats["percentile_00_5"], stats["median"], stats["percentile_99_5"]) == (p005, med, p995)
        assert (stats["min"], stats["max"]) == (expected.min(), expected.max())
        assert stats["mean"] == pytest.approx(float(expected.mean()), rel=1e-6)
        assert stats["std"] == pytest.approx(float(expected.std()), rel=1e-6)
