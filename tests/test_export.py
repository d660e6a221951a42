"""Export is the inverse of preprocessing: a preprocessed label map exported back matches the original, in its geometry."""
from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from PIL import Image

from samplan.dataset.image_io import read_images, read_seg
from samplan.dataset.labels import LabelManager
from samplan.inference.export import export_prediction, logits_to_label_map
from samplan.preprocessing.preprocessor import configuration_plan, preprocess_case, target_spacing
from samplan.preprocessing.resampling import compute_new_shape

LABELS = {"background": 0, "organ": 1, "lesion": 2}
# ITK directions are LPS; an image stored in RAS orientation has the first two axes flipped
RAS = np.diag([-1.0, -1.0, 1.0])
LPS_OBLIQUE = np.array([[0.9800666, -0.1986693, 0.0], [0.1986693, 0.9800666, 0.0], [0.0, 0.0, 1.0]])


def _plans(spacing3d, spacing2d, transpose=(0, 1, 2), n_channels=1, order_z=0):
    """Hand-written plans following SCHEMAS.md, independent of the planner."""
    def config(name, spacing):
        return {
            "data_identifier": name, "spacing": list(spacing), "patch_size": [16] * len(spacing), "batch_size": 2,
            "normalization_schemes": ["ZScoreNormalization"] * n_channels, "use_mask_for_norm": [False] * n_channels,
            "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
            "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
            "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": order_z, "force_separate_z": None},
        }

    configs = {"2d": config("2d", spacing2d)}
    if spacing3d is not None:
        configs["3d_fullres"] = config("3d_fullres", spacing3d)
    return {"transpose_forward": list(transpose), "transpose_backward": [int(i) for i in np.argsort(transpose)],
            "foreground_intensity_properties_per_channel": {}, "configurations": configs}


def _phantom(shape, rng):
    """(image, label) (Z, Y, X): a body with zero outside (so cropping removes a border) and two nested blobs."""
    grids = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    r2 = sum(g**2 for g in grids)
    body = sum((g / a) ** 2 for g, a in zip(grids, (0.8, 0.7, 0.75))) <= 1
    label = np.zeros(shape, np.uint8)
    label[(sum(((g - c) / a) ** 2 for g, c, a in zip(grids, (0.1, -0.05, 0.1), (0.6, 0.5, 0.55))) <= 1) & body] = 1
    label[(sum(((g - c) / a) ** 2 for g, c, a in zip(grids, (0.1, 0.0, 0.15), (0.3, 0.25, 0.25))) <= 1) & body] = 2
    image = (body * (100 + 30 * label - 10 * r2) + rng.normal(0, 3, shape)) * body
    return image.astype(np.float32), label


def _write(arr, path, spacing_xyz, direction, origin=(12.5, -40.0, 7.25)):
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing_xyz)
    img.SetDirection(tuple(np.asarray(direction).ravel()))
    img.SetOrigin(origin)
    sitk.WriteImage(img, str(path))


def _one_hot_logits(seg: np.ndarray, n: int) -> torch.Tensor:
    """Preprocessed label map (1, z, y, x) (-1 = outside the body, i.e. background) -> one-hot "logits" (n, z, y, x)."""
    s = np.where(seg[0] < 0, 0, seg[0])
    return torch.from_numpy(np.stack([(s == k) for k in range(n)]).astype(np.float32) * 10)


def _dice(a, b):
    return 2 * np.logical_and(a, b).sum() / max(a.sum() + b.sum(), 1)


def _round_trip(tmp_path, ending, spacing_xyz, direction, plans, configuration):
    rng = np.random.default_rng(0)
    image, label = _phantom((16, 56, 50), rng)
    _write(image, tmp_path / f"case_0000{ending}", spacing_xyz, direction)
    _write(label, tmp_path / f"case{ending}", spacing_xyz, direction)
    images, props = read_images([tmp_path / f"case_0000{ending}"])
    seg, _ = read_seg(tmp_path / f"case{ending}")
    data, pseg, p = preprocess_case(images, seg, props, plans, configuration)
    out = tmp_path / "out" / f"case{ending}"
    export_prediction(_one_hot_logits(pseg, 3), p, plans, configuration, LabelManager.from_dataset_json({"labels": LABELS}), out)
    return data, p, seg[0], out


@pytest.mark.parametrize("ending,orientation", [(".nii.gz", "RAS"), (".nii.gz", "LPS_oblique"), (".mha", "RAS")])
def test_round_trip_with_transpose_crop_and_resampling_keeps_labels_and_geometry(tmp_path, ending, orientation):
    direction = RAS if orientation == "RAS" else LPS_OBLIQUE
    spacing_xyz = (0.7, 0.9, 3.5)  # anisotropic: Z is the coarse axis
    # the plan puts Y first, resamples every axis (z coarser -> separate z), like a planner with transpose would
    plans = _plans([1.2, 2.5, 1.0], [1.2, 1.0], transpose=(1, 0, 2))
    data, props, original, out = _round_trip(tmp_path, ending, spacing_xyz, direction, plans, "3d_fullres")
    assert props["shape_before_cropping"] != props["shape_after_cropping_and_before_resampling"]  # it did crop
    assert list(data.shape[1:]) != props["shape_after_cropping_and_before_resampling"]  # and resample

    back, _ = read_seg(out)
    ref = sitk.ReadImage(str(tmp_path / f"case{ending}"))
    written = sitk.ReadImage(str(out))
    assert written.GetSize() == ref.GetSize()
    np.testing.assert_allclose(written.GetSpacing(), ref.GetSpacing(), rtol=1e-6)
    np.testing.assert_allclose(written.GetOrigin(), ref.GetOrigin(), atol=1e-5)
    np.testing.assert_allclose(written.GetDirection(), ref.GetDirection(), atol=1e-6)
    assert back.shape[1:] == original.shape
    assert (back[0] == original).mean() > 0.97  # only resampling differences at the borders
    for lab in (1, 2):
        assert _dice(back[0] == lab, original == lab) > 0.9
    assert not np.any(back[0][original == 0] == 2)  # never far off: no lesion painted in the background


def test_round_trip_without_resampling_is_exact(tmp_path):
    spacing_xyz = (0.7, 0.9, 3.5)
    plans = _plans([0.9, 3.5, 0.7], [3.5, 0.7], transpose=(1, 0, 2))  # the native spacing in transposed order
    data, props, original, out = _round_trip(tmp_path, ".nii.gz", spacing_xyz, RAS, plans, "3d_fullres")
    assert list(data.shape[1:]) == props["shape_after_cropping_and_before_resampling"]
    back, _ = read_seg(out)
    np.testing.assert_array_equal(back[0], original)


def test_2d_configuration_on_a_volume(tmp_path):
    plans = _plans(None, [0.5, 1.4])  # in-plane resampling only, slices stay as they are
    data, props, original, out = _round_trip(tmp_path, ".nii.gz", (0.7, 0.9, 3.5), np.eye(3), plans, "2d")
    back, _ = read_seg(out)
    assert data.shape[1] == props["shape_after_cropping_and_before_resampling"][0]
    assert (back[0] == original).mean() > 0.97 and _dice(back[0] == 2, original == 2) > 0.9


def test_png_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[:70, :90]
    label = (((yy - 33) / 18.0) ** 2 + ((xx - 47) / 25.0) ** 2 <= 1).astype(np.uint8)
    rgb = np.clip(rng.integers(10, 50, (70, 90, 3)) + label[..., None] * 150, 0, 255).astype(np.uint8)
    Image.fromarray(rgb).save(tmp_path / "img_0000.png")
    Image.fromarray(label).save(tmp_path / "img.png")
    images, props = read_images([tmp_path / "img_0000.png"])
    seg, _ = read_seg(tmp_path / "img.png")
    plans = _plans(None, [1.6, 0.7], n_channels=3)
    data, pseg, p = preprocess_case(images, seg, props, plans, "2d")
    assert data.shape[2:] != images.shape[2:]
    lm = LabelManager.from_dataset_json({"labels": {"background": 0, "disc": 1}})
    export_prediction(_one_hot_logits(pseg, 2), p, plans, "2d", lm, tmp_path / "out" / "img.png")
    back = np.asarray(Image.open(tmp_path / "out" / "img.png"))
    assert back.shape == label.shape and back.dtype == np.uint8
    assert (back == label).mean() > 0.98 and _dice(back == 1, label == 1) > 0.95


def test_probabilities_are_written_in_the_input_grid_without_pickle(tmp_path):
    rng = np.random.default_rng(2)
    image, label = _phantom((10, 30, 26), rng)
    _write(image, tmp_path / "c_0000.nii.gz", (0.8, 0.8, 2.0), RAS)
    images, props = read_images([tmp_path / "c_0000.nii.gz"])
    plans = _plans([2.0, 1.1, 1.3], [1.1, 1.3], transpose=(0, 2, 1))
    data, _, p = preprocess_case(images, None, props, plans, "3d_fullres")
    logits = torch.randn(3, *data.shape[1:], generator=torch.Generator().manual_seed(0))
    lm = LabelManager.from_dataset_json({"labels": LABELS})
    out = export_prediction(logits, p, plans, "3d_fullres", lm, tmp_path / "o" / "c.nii.gz", save_probabilities=True)
    seg, _ = read_seg(out)
    with np.load(tmp_path / "o" / "c.npz", allow_pickle=False) as z:
        probs = z["probabilities"]
    assert probs.dtype == np.float16 and probs.shape == (3, *images.shape[1:])
    np.testing.assert_allclose(probs.astype(np.float32).sum(0), 1.0, atol=3e-3)
    box = tuple(slice(a, b) for a, b in p["bbox_used_for_cropping"])
    outside = np.ones(p["shape_before_cropping"], bool)
    outside[box] = False
    outside = outside.transpose(plans["transpose_backward"])
    assert np.all(probs[0][outside] == 1) and np.all(seg[0][outside] == 0)
    # the saved probabilities agree with the label map (up to float16 ties)
    assert (probs.astype(np.float32).argmax(0) == seg[0]).mean() > 0.99
    meta = json.loads((tmp_path / "o" / "c.json").read_text())
    assert meta["probability_channels"] == [0, 1, 2] and meta["geometry"] == props["geometry"]
    with zipfile.ZipFile(tmp_path / "o" / "c.npz") as z:
        assert z.namelist() == ["probabilities.npy"]
    assert sorted(f.name for f in (tmp_path / "o").iterdir()) == ["c.json", "c.nii.gz", "c.npz"]  # no temporary files


def test_regions_are_painted_in_regions_class_order(tmp_path):
    rng = np.random.default_rng(3)
    image, label = _phantom((12, 32, 30), rng)
    label[label == 2] = 3
    label[(label == 1) & (rng.random(label.shape) < 0.3)] = 2
    _write(image, tmp_path / "b_0000.nii.gz", (1.0, 1.0, 1.0), np.eye(3))
    _write(label, tmp_path / "b.nii.gz", (1.0, 1.0, 1.0), np.eye(3))
    images, props = read_images([tmp_path / "b_0000.nii.gz"])
    seg, _ = read_seg(tmp_path / "b.nii.gz")
    plans = _plans([1.0, 1.0, 1.0], [1.0, 1.0])
    _, pseg, p = preprocess_case(images, seg, props, plans, "3d_fullres")
    brats = {"labels": {"background": 0, "whole": [1, 2, 3], "core": [2, 3], "enhancing": 3}, "regions_class_order": [1, 2, 3]}
    lm = LabelManager.from_dataset_json(brats)
    target = lm.segmentation_to_target(torch.from_numpy(pseg[None].astype(np.int64)))[0]  # (R, z, y, x) in {0, 1}
    logits = (target * 2 - 1) * 8  # sigmoid: > 0.5 exactly inside each region
    back = logits_to_label_map(logits, p, plans, "3d_fullres", lm)
    np.testing.assert_array_equal(back, label)


@pytest.mark.parametrize("name,resample", [("Dataset004_Hippocampus", True), ("Dataset502_PICAIToy_T2ADCHBV", False),
                                           ("Dataset510_KvasirSEG", True)])
def test_real_data_round_trip(tmp_path, name, resample):
    from conftest import shared_dataset
    from samplan.dataset.dataset_json import list_training_cases, load_dataset_json

    raw = shared_dataset(name)
    dj = load_dataset_json(raw)
    case, files = next(iter(list_training_cases(raw, dj).items()))
    images, props = read_images(files["images"])
    seg, _ = read_seg(files["label"])
    is_2d = images.shape[1] == 1
    spacing = np.asarray(props["spacing"], float)
    transpose = (0, 1, 2) if is_2d else (2, 0, 1)
    target = spacing[list(transpose)] * (np.array([1.0, 1.3, 0.8]) if resample else 1.0)
    plans = _plans(None if is_2d else target.tolist(), target[1:].tolist(), transpose, n_channels=images.shape[0])
    cfg = "2d" if is_2d else "3d_fullres"
    data, pseg, p = preprocess_case(images, seg, props, plans, cfg)
    lm = LabelManager.from_dataset_json(dj)
    out = export_prediction(_one_hot_logits(pseg, lm.num_outputs), p, plans, cfg, lm, tmp_path / f"{case}{dj['file_ending']}")
    back, back_props = read_seg(out)
    assert back.shape == seg.shape and back_props["geometry"]["kind"] == props["geometry"]["kind"]
    if props["geometry"]["kind"] == "sitk":
        for key in ("spacing", "origin", "direction"):
            np.testing.assert_allclose(back_props["geometry"][key], props["geometry"][key], atol=1e-5)
    if resample:
        assert (back == seg).mean() > 0.97
        for lab in lm.foreground_keys:
            assert _dice(back == int(lab), seg == int(lab)) > 0.85
    else:
        np.testing.assert_array_equal(back, seg)



# ----------------------------------------------------------------------------------- bounded-memory export

def _load_benchmark():
    """benchmarks/export_memory.py, which keeps the former whole-array export to measure it against."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "export_memory.py"
    spec = importlib.util.spec_from_file_location("export_memory", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_whole_array_export = _load_benchmark().whole_array_label_map


BRATS = {"labels": {"background": 0, "whole": [1, 2, 3], "core": [2, 3], "enhancing": 3}, "regions_class_order": [1, 2, 3]}
LABEL_SETS = {"labels": {"labels": LABELS}, "int16_values": {"labels": {"background": 0, "a": 1, "b": 4, "c": 7, "big": 300}},
              "regions": BRATS}
# spacing (reader's order), cropped and uncropped shape and box offset (plan's order), plan spacing, transpose,
# configuration, order_z: awkward sizes, up- and downsampling, separate z and not, 2D, no resampling
CASES = {
    "aniso_separate_z": ((3.5, 0.9, 0.7), (13, 47, 38), (15, 52, 40), (1, 3, 0), [1.1, 2.5, 1.3], (1, 0, 2), "3d_fullres", 0),
    "iso_mixed_zoom": ((1.0, 1.0, 1.0), (29, 17, 33), (31, 20, 33), (2, 0, 0), [0.7, 1.6, 1.0], (0, 1, 2), "3d_fullres", 0),
    "separate_z_order_1": ((4.0, 0.8, 0.8), (9, 41, 27), (11, 41, 30), (0, 0, 2), [1.5, 1.2, 1.1], (0, 2, 1), "3d_fullres", 1),
    "2d_config": ((3.5, 0.9, 0.7), (7, 45, 31), (7, 45, 35), (0, 0, 4), [0.5, 1.4], (0, 1, 2), "2d", 0),
    "no_resampling": ((2.0, 1.0, 1.0), (6, 23, 19), (8, 25, 19), (1, 1, 0), [2.0, 1.0, 1.0], (0, 1, 2), "3d_fullres", 0),
}


def _case(name, label_set, seed=0):
    """(logits on the plan grid, properties, plans, configuration, label manager) of one CASES entry."""
    spacing, cropped, before, offset, plan_spacing, transpose, cfg, order_z = CASES[name]
    props = {"spacing": list(spacing), "shape_before_cropping": list(before),
             "shape_after_cropping_and_before_resampling": list(cropped),
             "bbox_used_for_cropping": [[o, o + n] for o, n in zip(offset, cropped)]}
    plans = _plans(plan_spacing if cfg == "3d_fullres" else None, plan_spacing[-2:], transpose, order_z=order_z)
    original = [spacing[a] for a in transpose]
    grid = compute_new_shape(cropped, original, target_spacing(configuration_plan(plans, cfg), original))
    lm = LabelManager.from_dataset_json(LABEL_SETS[label_set])
    # smooth-ish logits plus noise: large flat regions, many near-ties after interpolation
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(lm.num_outputs, *grid, generator=g) * 3
    logits[:, ::2] += torch.randn(lm.num_outputs, 1, *grid[1:], generator=g)
    return logits, props, plans, cfg, lm


@pytest.mark.parametrize("label_set", list(LABEL_SETS))
@pytest.mark.parametrize("name", list(CASES))
def test_chunked_export_equals_the_whole_array_export(name, label_set):
    logits, props, plans, cfg, lm = _case(name, label_set)
    expected = _whole_array_export(logits, props, plans, cfg, lm)
    got = logits_to_label_map(logits, props, plans, cfg, lm)
    assert got.dtype == expected.dtype and got.shape == expected.shape
    np.testing.assert_array_equal(got, expected)
    assert len(np.unique(got)) > 1
    # numpy logits (float64 here) take the same path
    np.testing.assert_array_equal(logits_to_label_map(logits.double().numpy(), props, plans, cfg, lm), expected)

    seg, probs = logits_to_label_map(logits, props, plans, cfg, lm, return_probabilities=True)
    ref_seg, ref_probs = _whole_array_export(logits, props, plans, cfg, lm, return_probabilities=True)
    np.testing.assert_array_equal(seg, ref_seg)
    assert probs.dtype == np.float16 and probs.shape == ref_probs.shape
    # torch's softmax/sigmoid kernels treat the last few elements of an array (and of each thread's share)
    # with scalar code, so a slab can differ from the whole array by one float32 ulp at a handful of voxels
    differ = probs != ref_probs
    assert differ.mean() < 1e-4
    np.testing.assert_array_max_ulp(probs, ref_probs, maxulp=1)


def test_argmax_ties_and_nan_follow_torch():
    """The running argmax keeps the first maximum on ties and takes the first NaN, like torch.argmax."""
    logits, props, plans, cfg, lm = _case("no_resampling", "labels")
    logits[:, 0] = 1.0  # z = 0: exact three-way ties everywhere -> the first class
    logits[:, 1] = 1.0
    logits[1, 1, :5] = 2.0
    logits[2, 1, :3] = 2.0  # z = 1, y < 3: classes 1 and 2 tie -> 1
    logits[:, 2] = 0.0
    logits[2, 2, :4] = float("nan")
    logits[0, 2, 2:6] = float("nan")  # z = 2: y < 2 only class 2 is NaN -> 2; from y = 2 on class 0's NaN is first
    expected = _whole_array_export(logits, props, plans, cfg, lm)
    np.testing.assert_array_equal(logits_to_label_map(logits, props, plans, cfg, lm), expected)
    inside = expected[tuple(slice(a, b) for a, b in props["bbox_used_for_cropping"])]
    assert np.all(inside[0] == 0) and np.all(inside[1, :5] == 1) and np.all(inside[1, 5:] == 0)
    assert np.all(inside[2, :2] == 2) and np.all(inside[2, 2:] == 0)


def test_label_map_memory_does_not_grow_with_the_class_count():
    """Without probabilities export holds a few single-class arrays, not K of them (numpy memory, tracemalloc)."""
    import tracemalloc

    def peak(fn, logits, props, plans, cfg, lm):
        tracemalloc.start()
        fn(logits, props, plans, cfg, lm)
        top = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return top

    labels = {"labels": {"background": 0, **{f"c{i}": i for i in range(1, 16)}}}
    lm = LabelManager.from_dataset_json(labels)
    props = {"spacing": [1.0, 1.0, 1.0], "shape_before_cropping": [40, 64, 64],
             "shape_after_cropping_and_before_resampling": [40, 64, 64], "bbox_used_for_cropping": [[0, 40], [0, 64], [0, 64]]}
    plans = _plans([1.25, 1.25, 1.25], [1.25, 1.25])
    logits = torch.randn(16, 32, 51, 51, generator=torch.Generator().manual_seed(0))
    one_class = 40 * 64 * 64 * 4
    chunked = peak(logits_to_label_map, logits, props, plans, "3d_fullres", lm)
    whole = peak(_whole_array_export, logits, props, plans, "3d_fullres", lm)
    assert whole > 16 * one_class  # the old way: all K classes resampled at once
    assert chunked < 5 * one_class, f"chunked export peaked at {chunked / one_class:.1f} single-class arrays"


def test_saved_probabilities_equal_the_returned_ones(tmp_path):
    """The .npz written class by class holds exactly what logits_to_label_map returns, and loads without pickle."""
    logits, props, plans, cfg, lm = _case("aniso_separate_z", "regions", seed=4)
    props["geometry"] = {"kind": "sitk", "spacing": props["spacing"][::-1], "origin": [0.0] * 3,
                         "direction": list(np.eye(3).ravel()), "ndim": 3}
    seg, probs = logits_to_label_map(logits, props, plans, cfg, lm, return_probabilities=True)
    out = export_prediction(logits, props, plans, cfg, lm, tmp_path / "c.nii.gz", save_probabilities=True)
    with np.load(tmp_path / "c.npz", allow_pickle=False) as z:
        saved = z["probabilities"]
    np.testing.assert_array_equal(saved, probs)
    assert saved.shape == (3, *seg.shape) and np.all(saved[:, 0, 0, 0] == 0)  # outside the box: no region
    np.testing.assert_array_equal(read_seg(out)[0][0], seg)


@pytest.mark.parametrize("logits_dtype", [torch.float32, torch.float16])
def test_streamed_probabilities_equal_softmax_of_all_classes_at_once(tmp_path, logits_dtype):
    # the .npz is written class by class from a running maximum and sum: compare with softmax over all K at once
    from samplan.inference.export import resampled_logits

    rng = np.random.default_rng(7)
    image, _ = _phantom((10, 30, 26), rng)
    _write(image, tmp_path / "c_0000.nii.gz", (0.8, 0.8, 2.0), RAS)
    images, props = read_images([tmp_path / "c_0000.nii.gz"])
    plans = _plans([2.0, 1.1, 1.3], [1.1, 1.3], transpose=(0, 2, 1))
    data, _, p = preprocess_case(images, None, props, plans, "3d_fullres")
    labels = {"background": 0, **{f"organ{k}": k for k in range(1, 9)}}
    lm = LabelManager.from_dataset_json({"labels": labels})
    logits = (4 * torch.randn(9, *data.shape[1:], generator=torch.Generator().manual_seed(1))).to(logits_dtype)
    seg, probs = logits_to_label_map(logits, p, plans, "3d_fullres", lm, return_probabilities=True)
    assert probs.dtype == np.float16 and probs.shape == (9, *images.shape[1:])
    every = torch.from_numpy(np.stack(list(resampled_logits(logits, p, plans, "3d_fullres"))))
    expected = torch.softmax(every, 0).numpy().astype(np.float16)
    box = tuple(slice(a, b) for a, b in p["bbox_used_for_cropping"])
    inside = probs.transpose(0, *(a + 1 for a in plans["transpose_forward"]))[(slice(None), *box)]
    np.testing.assert_allclose(inside.astype(np.float32), expected.astype(np.float32), rtol=2e-3, atol=1e-6)
    # the label map is the same with and without probabilities (both are the running argmax of the logits)
    np.testing.assert_array_equal(seg, logits_to_label_map(logits, p, plans, "3d_fullres", lm))


def test_float16_logits_on_the_plan_grid_give_the_labels_of_their_float32_values(tmp_path):
    # no resampling: the float16 channels are compared as float16 (no float32 copy), with the same answers
    rng = np.random.default_rng(9)
    image, _ = _phantom((12, 32, 30), rng)
    _write(image, tmp_path / "b_0000.nii.gz", (1.0, 1.0, 1.0), np.eye(3))
    images, props = read_images([tmp_path / "b_0000.nii.gz"])
    plans = _plans([1.0, 1.0, 1.0], [1.0, 1.0])
    data, _, p = preprocess_case(images, None, props, plans, "3d_fullres")
    lm = LabelManager.from_dataset_json({"labels": {"background": 0, **{f"o{k}": k for k in range(1, 6)}}})
    half = (3 * torch.randn(6, *data.shape[1:], generator=torch.Generator().manual_seed(2))).half()
    half[2, :2] = half[4, :2]  # exact ties: the first maximum wins in both
    np.testing.assert_array_equal(logits_to_label_map(half, p, plans, "3d_fullres", lm),
                                  logits_to_label_map(half.float(), p, plans, "3d_fullres", lm))
