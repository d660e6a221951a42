"""Case preprocessing, foreground sampling, the blosc2 cache and the resumable dataset run."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import copy_shared_subset
from samplan.dataset.dataset_json import list_training_cases, load_dataset_json
from samplan.dataset.image_io import read_images, read_seg
from samplan.errors import SamplanError
from samplan.preprocessing.cache import blosc2_shapes, case_is_complete, case_paths, open_case, write_case
from samplan.preprocessing.foreground import classes_to_sample, sample_class_locations
from samplan.preprocessing.preprocessor import preprocess_case, preprocess_case_files
from samplan.preprocessing.resampling import compute_new_shape
from samplan.preprocessing.run import preprocess_dataset


def make_plans(n_channels: int, spacing3d, spacing2d, patch3d=(8, 32, 32), patch2d=(32, 32), transpose=(0, 1, 2),
               schemes=None, use_mask=True) -> dict:
    """A hand-written plans dict following SCHEMAS.md (independent of the planner)."""
    schemes = schemes or ["ZScoreNormalization"] * n_channels

    def config(identifier, spacing, patch):
        return {
            "data_identifier": identifier, "spacing": list(spacing), "patch_size": list(patch), "batch_size": 2,
            "median_image_size_in_voxels": [10] * len(spacing),
            "normalization_schemes": list(schemes), "use_mask_for_norm": [use_mask] * n_channels,
            "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
            "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
            "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0, "force_separate_z": None},
        }

    configs = {"2d": config("2d", spacing2d, patch2d)}
    if spacing3d is not None:
        configs["3d_fullres"] = config("3d_fullres", spacing3d, patch3d)
    back = [int(i) for i in np.argsort(transpose)]
    return {"dataset_name": "Dataset900_Synth", "plans_name": "samplanPlans", "image_reader_writer": "sitk",
            "transpose_forward": list(transpose), "transpose_backward": back,
            "foreground_intensity_properties_per_channel": {}, "configurations": configs}


def _first_case(raw: Path):
    dj = load_dataset_json(raw)
    case, files = next(iter(list_training_cases(raw, dj).items()))
    return dj, case, files


# ------------------------------------------------------------------------------------------------ preprocess_case


def test_preprocess_case_transposes_crops_normalises_and_resamples(synth3d):
    dj, case, files = _first_case(synth3d)
    images, props = read_images(files["images"])
    seg, _ = read_seg(files["label"])
    plans = make_plans(1, [1.6, 4.0, 1.0], [1.0, 1.0], transpose=(1, 0, 2))
    data, out_seg, p = preprocess_case(images, seg, props, plans, "3d_fullres")

    raw_shape = images.shape[1:]
    assert p["shape_before_cropping"] == [raw_shape[1], raw_shape[0], raw_shape[2]]
    bbox = p["bbox_used_for_cropping"]
    cropped = [b - a for a, b in bbox]
    assert p["shape_after_cropping_and_before_resampling"] == cropped and cropped < p["shape_before_cropping"]
    spacing_t = [props["spacing"][a] for a in (1, 0, 2)]
    assert p["spacing"] == props["spacing"] and p["spacing_after_resampling"] == [1.6, 4.0, 1.0]
    assert list(data.shape[1:]) == compute_new_shape(cropped, spacing_t, [1.6, 4.0, 1.0])
    assert data.dtype == np.float32 and out_seg.dtype == np.int8 and out_seg.shape == (1, *data.shape[1:])
    assert set(np.unique(out_seg)) == {-1, 0, 1, 2}
    assert p["geometry"] == props["geometry"]


def test_preprocess_case_without_resampling_is_exact(synth3d):
    dj, case, files = _first_case(synth3d)
    images, props = read_images(files["images"])
    seg, _ = read_seg(files["label"])
    plans = make_plans(1, props["spacing"], props["spacing"][1:])
    data, out_seg, p = preprocess_case(images, seg, props, plans, "3d_fullres")
    (z0, z1), (y0, y1), (x0, x1) = p["bbox_used_for_cropping"]
    np.testing.assert_array_equal(out_seg[0] > 0, seg[0, z0:z1, y0:y1, x0:x1] > 0)
    inside = out_seg[0] >= 0
    assert np.all(data[0][~inside] == 0)  # mask-normalisation leaves the outside at 0
    assert data[0][inside].mean() == pytest.approx(0, abs=1e-4) and data[0][inside].std() == pytest.approx(1, abs=1e-3)

    # inference path: same data, no label map, no training-only keys
    data_inf, seg_inf, p_inf = preprocess_case(images, None, props, plans, "3d_fullres")
    assert seg_inf is None and "class_locations" not in p_inf
    np.testing.assert_array_equal(data_inf, data)


def test_2d_configuration_keeps_the_out_of_plane_spacing(synth3d):
    dj, case, files = _first_case(synth3d)
    images, props = read_images(files["images"])
    plans = make_plans(1, None, [0.5, 1.6])
    data, _, p = preprocess_case(images, None, props, plans, "2d")
    cz, cy, cx = p["shape_after_cropping_and_before_resampling"]
    assert p["spacing_after_resampling"] == [props["spacing"][0], 0.5, 1.6]
    assert data.shape[1:] == (cz, round(cy * props["spacing"][1] / 0.5), round(cx * props["spacing"][2] / 1.6))


def test_preprocess_case_files_samples_foreground_locations(synth3d):
    dj, case, files = _first_case(synth3d)
    plans = make_plans(1, [3.0, 1.2, 1.2], [1.2, 1.2])
    data, seg, p = preprocess_case_files(files["images"], files["label"], plans, "3d_fullres", dj)
    locs = p["class_locations"]
    assert set(locs) == {"1", "2"}
    for key, coords in locs.items():
        coords = np.asarray(coords)
        assert coords.shape[1] == 4 and len(coords) == min((seg == int(key)).sum(), 10000)
        assert np.all(seg[tuple(coords.T)] == int(key))
    json.dumps(p)  # JSON-able as it is


# ------------------------------------------------------------------------------------------------ foreground


def test_foreground_sampling_counts_coverage_and_seed():
    seg = np.zeros((1, 120, 200, 100), np.int8)
    seg[0, :, :100] = 1  # 1,200,000 voxels -> 1 % = 12000 > 10000
    seg[0, :50, 100:] = 2  # 500,000 voxels -> 10000
    seg[0, 70, 150, 10:60] = 3  # 50 voxels -> all of them
    locs = sample_class_locations(seg, [(1,), (2,), (3,), (4,), (1, 3)])
    assert [len(locs[k]) for k in ("1", "2", "3", "4")] == [12000, 10000, 50, 0]
    assert len(locs["1,3"]) == 12001  # a region pools its labels: ceil(1 % of 1,200,050)
    assert len({tuple(c) for c in locs["1"]}) == 12000  # distinct voxels
    assert sample_class_locations(seg, [(2,)]) == {"2": locs["2"]}  # seeded, independent of other classes
    assert sample_class_locations(seg, [(2,)], seed=7)["2"] != locs["2"]


def test_classes_to_sample_labels_regions_and_ignore():
    assert classes_to_sample({"labels": {"background": 0, "a": 1, "b": 2}}) == [(1,), (2,)]
    brats = {"labels": {"background": 0, "whole": [1, 2, 3], "core": [2, 3], "enh": 3}, "regions_class_order": [1, 2, 3]}
    assert classes_to_sample(brats) == [(1, 2, 3), (2, 3), (3,)]
    ign = {"labels": {"background": 0, "a": 1, "ignore": 2}}
    assert classes_to_sample(ign) == [(1,), (-1, 0, 1)]


# ------------------------------------------------------------------------------------------------ cache


def test_blosc2_shapes_fit_patch_and_byte_caps():
    for shape, patch in [((2, 155, 240, 240), (128, 128, 128)), ((1, 40, 56, 40), (40, 56, 40)),
                         ((3, 1, 900, 1200), (512, 512)), ((1, 300, 512, 512), (64, 192, 160))]:
        blocks, chunks = blosc2_shapes(shape, patch, 4)
        assert blocks[0] == chunks[0] == 1
        assert np.prod(blocks) * 4 <= 128 * 1024 and np.prod(chunks) * 4 <= 6 * 1024**2
        full_patch = (1, *patch) if len(patch) == 2 else patch
        for b, c, s, p in zip(blocks[1:], chunks[1:], shape[1:], full_patch):
            assert b <= c <= max(s, 1) and c <= max(int(1.5 * p), 1)
        if len(patch) == 2:
            assert chunks[1] == 1  # 2D patches never span slices


def test_cache_round_trip_and_patch_reads(tmp_path):
    rng = np.random.default_rng(0)
    data = rng.normal(size=(2, 30, 70, 50)).astype(np.float32)
    seg = rng.integers(-1, 3, size=(1, 30, 70, 50)).astype(np.int8)
    props = {"spacing": [1.0, 2.0, 3.0], "class_locations": {"1": [[0, 1, 2, 3]]}, "n": np.int64(5)}
    write_case(tmp_path, "c1", data, seg, props, patch_size=(16, 32, 32))
    assert case_is_complete(tmp_path, "c1")
    d, s, p = open_case(tmp_path, "c1")
    assert d.shape == data.shape and s.shape == seg.shape and s.dtype == np.int8
    assert p["spacing"] == [1.0, 2.0, 3.0] and p["n"] == 5 and p["class_locations"] == {"1": [[0, 1, 2, 3]]}
    sl = (slice(None), slice(5, 21), slice(30, 62), slice(3, 35))
    np.testing.assert_array_equal(d[sl], data[sl])
    np.testing.assert_array_equal(s[sl], seg[sl])
    np.testing.assert_array_equal(d[:], data)
    assert d.chunks[0] == 1 and d.chunks[2] <= 48
    # no stray temporary files
    assert sorted(f.name for f in tmp_path.iterdir()) == ["c1.b2nd", "c1.json", "c1_seg.b2nd"]


def test_incomplete_cases_are_detected(tmp_path):
    data = np.ones((1, 10, 20, 20), np.float32)
    seg = np.zeros((1, 10, 20, 20), np.int8)
    for c in ("a", "b", "c"):
        write_case(tmp_path, c, data, seg, {"preprocessing_key": "k1"})
    case_paths(tmp_path, "a")["properties"].unlink()
    with open(case_paths(tmp_path, "b")["seg"], "r+b") as f:
        f.truncate(os.path.getsize(f.name) // 2)
    assert not case_is_complete(tmp_path, "a") and not case_is_complete(tmp_path, "b")
    assert case_is_complete(tmp_path, "c", "k1") and not case_is_complete(tmp_path, "c", "k2")


# ------------------------------------------------------------------------------------------------ dataset run


def _snapshot(folder: Path) -> dict[str, int]:
    """Modification time (ns) of every file in a cache folder."""
    return {f.name: f.stat().st_mtime_ns for f in sorted(folder.iterdir())}


def _contents(folder: Path, cases) -> dict[str, tuple]:
    """Decoded data, seg and properties (without file sizes) of each case."""
    res = {}
    for c in cases:
        d, s, p = open_case(folder, c)
        p = {k: v for k, v in p.items() if k != "cache_files"}
        res[c] = (d[:], s[:], json.dumps(p, sort_keys=True))
    return res


def test_preprocess_dataset_writes_configurations_and_gt(synth3d, samplan_env):
    out = samplan_env["SAMPLAN_PREPROCESSED"] / synth3d.name
    plans = make_plans(1, [3.0, 1.2, 1.2], [1.2, 1.2])
    preprocess_dataset(synth3d, out, plans, num_processes=1)
    cases = sorted(p.name[: -len(".nii.gz")] for p in (synth3d / "labelsTr").iterdir())
    for ident in ("2d", "3d_fullres"):
        assert all(case_is_complete(out / ident, c) for c in cases)
    for c in cases:
        assert (out / "gt_segmentations" / f"{c}.nii.gz").read_bytes() == (synth3d / "labelsTr" / f"{c}.nii.gz").read_bytes()
    d2, s2, p2 = open_case(out / "2d", cases[0])
    d3, s3, p3 = open_case(out / "3d_fullres", cases[0])
    assert d2.shape[1] == p2["shape_after_cropping_and_before_resampling"][0]  # 2d keeps the slices
    assert d3.shape[1] < d2.shape[1] or p3["spacing"][0] == 3.0
    assert set(p3["class_locations"]) == {"1", "2"} and p3["preprocessing_key"] != p2["preprocessing_key"]
    with pytest.raises(SamplanError, match="3d_lowres"):
        preprocess_dataset(synth3d, out, plans, configurations=["3d_lowres"])


def test_interrupted_run_redoes_only_broken_cases_and_ends_identical(synth3d, samplan_env):
    out = samplan_env["SAMPLAN_PREPROCESSED"] / synth3d.name
    plans = make_plans(1, [2.5, 1.0, 1.0], [1.0, 1.0])
    preprocess_dataset(synth3d, out, plans, configurations=["3d_fullres"], num_processes=1)
    folder = out / "3d_fullres"
    cases = sorted(p.name[: -len(".json")] for p in folder.glob("*.json"))
    before, first = _snapshot(folder), _contents(folder, cases)
    gt_before = {f.name: f.stat().st_mtime_ns for f in (out / "gt_segmentations").iterdir()}

    # a killed run: one case lost its properties, one array was cut short, a writer left a temporary file
    case_paths(folder, cases[1])["properties"].unlink()
    with open(case_paths(folder, cases[2])["data"], "r+b") as f:
        f.truncate(100)
    (folder / f".{cases[2]}.b2nd.abc123.tmp.b2nd").write_bytes(b"partial")
    preprocess_dataset(synth3d, out, plans, configurations=["3d_fullres"], num_processes=2)

    after = _snapshot(folder)
    assert set(after) == set(before)  # temporary file gone, nothing else added
    redone = {name for name in after if after[name] != before.get(name)}
    assert {n.split(".")[0].replace("_seg", "") for n in redone} == {cases[1], cases[2]}
    second = _contents(folder, cases)
    for c in cases:
        np.testing.assert_array_equal(second[c][0], first[c][0])
        np.testing.assert_array_equal(second[c][1], first[c][1])
        assert second[c][2] == first[c][2]
    assert {f.name: f.stat().st_mtime_ns for f in (out / "gt_segmentations").iterdir()} == gt_before

    # a changed plan invalidates every case
    plans["configurations"]["3d_fullres"]["spacing"] = [3.0, 1.0, 1.0]
    preprocess_dataset(synth3d, out, plans, configurations=["3d_fullres"], num_processes=1)
    assert all(case_paths(folder, c)["properties"].stat().st_mtime_ns != after[f"{c}.json"] for c in cases)


def test_real_data_smoke_hippocampus_and_kvasir(tmp_path):
    hip = copy_shared_subset("Dataset004_Hippocampus", tmp_path / "raw", n_cases=3)
    plans = make_plans(1, [1.0, 1.0, 1.0], [1.0, 1.0], patch3d=(40, 56, 40), patch2d=(56, 40))
    preprocess_dataset(hip, tmp_path / "pp" / hip.name, plans, num_processes=1)
    for c in sorted(p.name[:-7] for p in (hip / "labelsTr").iterdir()):
        d, s, p = open_case(tmp_path / "pp" / hip.name / "3d_fullres", c)
        raw = sitk.GetArrayFromImage(sitk.ReadImage(str(hip / "labelsTr" / f"{c}.nii.gz")))
        assert d.shape[1:] == tuple(p["shape_after_cropping_and_before_resampling"])  # 1 mm data: no resampling
        assert np.array_equal(np.unique(s[:]), np.unique(np.r_[raw.ravel(), s[:].min()]))
        assert len(p["class_locations"]["1"]) == min((raw == 1).sum(), 10000)

    kv = copy_shared_subset("Dataset510_KvasirSEG", tmp_path / "raw", n_cases=2)
    plans = make_plans(3, None, [1.0, 1.0], patch2d=(320, 320), schemes=["RGBTo01Normalization"] * 3, use_mask=False)
    preprocess_dataset(kv, tmp_path / "pp" / kv.name, plans, num_processes=1)
    for c in sorted(p.name[:-4] for p in (kv / "labelsTr").iterdir()):
        d, s, p = open_case(tmp_path / "pp" / kv.name / "2d", c)
        img, _ = read_images([kv / "imagesTr" / f"{c}_0000.png"])
        assert d.shape[0] == 3 and d.shape[1] == 1 and p["shape_before_cropping"] == list(img.shape[1:])
        assert 0.0 <= d[:].min() and d[:].max() <= 1.0
        assert len(p["class_locations"]["1"]) > 0
