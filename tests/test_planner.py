"""Planner: spacing/transpose/normalisation rules, configurations, method sections, plans round trip."""
from __future__ import annotations

import json

import numpy as np
import pytest

from samplan.errors import SamplanError
from samplan.experiment_planning import spacing as sp
from samplan.pipeline.planning import plan_experiment
from samplan.experiment_planning.budget import ComputeBudget
from samplan.experiment_planning.plans import Plans, load_plans, save_plans
from samplan.methods import available_methods, get_method
from samplan.methods.samunetr.plan import INPUT_SIZES, TOKEN_PX

RNG = np.random.default_rng(0)


def _props(n_channels: int) -> dict:
    return {str(c): {"mean": 80.0 + c, "median": 75.0, "std": 20.0, "min": -40.0, "max": 300.0,
                     "percentile_99_5": 250.0, "percentile_00_5": -20.0} for c in range(n_channels)}


def _label_stats(p05: float, median: float, slice_axis: int = 0) -> dict:
    """Minimal label_statistics: one label with square in-plane boxes of the given edges (raw pixels)."""
    return {"slice_axis": slice_axis, "per_label": {"1": {
        "cases_with_label": 10,
        "inplane_extent_pixels": {"p05": [p05, p05], "median": [median, median], "p95": [2 * median] * 2},
        "extent_voxels": {"p05": [3, p05, p05], "median": [5, median, median], "p95": [9, 2 * median, 2 * median]},
    }}}


def fingerprint_3d(spacings, shapes, rel=1.0, n_channels=1, label_statistics=None) -> dict:
    fp = {"spacings": [list(map(float, s)) for s in spacings], "shapes_after_crop": [list(map(int, s)) for s in shapes],
          "median_relative_size_after_cropping": rel, "foreground_intensity_properties_per_channel": _props(n_channels),
          "case_identifiers": [f"c{i:03d}" for i in range(len(spacings))], "num_channels": n_channels}
    if label_statistics is not None:
        fp["label_statistics"] = label_statistics
    return fp


def dataset_json(channels, labels=None, n=10, ending=".nii.gz") -> dict:
    return {"channel_names": {str(i): c for i, c in enumerate(channels)},
            "labels": labels or {"background": 0, "a": 1, "b": 2}, "numTraining": n, "file_ending": ending}


def hippocampus_like(n=20, label_statistics=None):
    shapes = [[RNG.integers(30, 42), RNG.integers(45, 56), RNG.integers(30, 40)] for _ in range(n)]
    return fingerprint_3d([[1.0, 1.0, 1.0]] * n, shapes, label_statistics=label_statistics), dataset_json(["MRI"], n=n)


def png_like(n=12, label_statistics=None):
    shapes = [[1, RNG.integers(560, 640), RNG.integers(720, 800)] for _ in range(n)]
    fp = fingerprint_3d([[999.0, 1.0, 1.0]] * n, shapes, n_channels=3, label_statistics=label_statistics)
    return fp, dataset_json(["R", "G", "B"], {"background": 0, "polyp": 1}, n=n, ending=".png")


# --- target spacing and transpose -------------------------------------------------------------------

def test_isotropic_target_is_the_median():
    spacings = RNG.uniform(0.8, 1.2, (15, 3))
    shapes = RNG.integers(100, 140, (15, 3))
    assert np.allclose(sp.target_spacing(spacings, shapes), np.median(spacings, axis=0))


def test_anisotropic_few_slices_takes_the_10th_percentile():
    z = RNG.choice([2.5, 3.0, 4.0, 5.0, 6.0], 30)
    spacings = np.stack([z, np.full(30, 0.7), np.full(30, 0.7)], 1)
    shapes = np.stack([RNG.integers(15, 30, 30), RNG.integers(300, 400, 30), RNG.integers(300, 400, 30)], 1)
    target = sp.target_spacing(spacings, shapes)
    assert target[0] == pytest.approx(np.percentile(z, 10)) and target[0] < np.median(z)
    assert np.allclose(target[1:], 0.7)


def test_anisotropic_spacing_but_many_slices_keeps_the_median():
    z = RNG.choice([3.0, 4.0, 5.0, 6.0], 30)
    spacings = np.stack([z, np.ones(30), np.ones(30)], 1)
    # the coarse axis has MORE voxels than the others, so it is not a "few thick slices" dataset
    shapes = np.stack([RNG.integers(150, 200, 30), RNG.integers(90, 120, 30), RNG.integers(90, 120, 30)], 1)
    assert sp.target_spacing(spacings, shapes)[0] == pytest.approx(np.median(z))


def test_10th_percentile_never_goes_below_the_other_axes():
    z = np.array([0.5] * 4 + [5.0] * 26)
    spacings = np.stack([z, np.full(30, 1.0), np.full(30, 1.0)], 1)
    shapes = np.stack([np.full(30, 20), np.full(30, 300), np.full(30, 300)], 1)
    assert sp.target_spacing(spacings, shapes)[0] == pytest.approx(1.0 + 1e-5)


def test_transpose_puts_the_coarsest_axis_first_and_inverts():
    fwd, bwd = sp.transpose_axes([0.8, 0.8, 3.0])
    assert fwd == [2, 0, 1]
    arr = np.zeros((5, 6, 7))
    assert arr.transpose(fwd).shape == (7, 5, 6) and arr.transpose(fwd).transpose(bwd).shape == arr.shape
    assert sp.transpose_axes([1.0, 1.0, 1.0]) == ([0, 1, 2], [0, 1, 2])


# --- normalisation -------------------------------------------------------------------------------

def test_normalization_names_map_case_insensitively():
    names = ["CT", "noNorm", "ZSCORE", "rgb_to_0_1", "Rescale_To_0_1", "R", "T2"]
    assert [sp.normalization_scheme(n) for n in names] == [
        "CTNormalization", "NoNormalization", "ZScoreNormalization", "RGBTo01Normalization",
        "RescaleTo01Normalization", "ZScoreNormalization", "ZScoreNormalization"]


def test_mask_for_norm_only_for_zscore_after_substantial_cropping():
    schemes, masks = sp.normalization_schemes_and_masks(["CT", "T1", "noNorm"], 0.6)
    assert schemes == ["CTNormalization", "ZScoreNormalization", "NoNormalization"] and masks == [False, True, False]
    assert sp.normalization_schemes_and_masks(["T1"], 0.8)[1] == [False]


# --- whole plans ---------------------------------------------------------------------------------

def _assert_config_sane(cfg, n_voxels_dataset):
    ps, strides = cfg["patch_size"], np.array(cfg["architecture"]["arch_kwargs"]["strides"])
    assert len(ps) == len(cfg["spacing"]) == len(cfg["median_image_size_in_voxels"])
    assert all(p % d == 0 for p, d in zip(ps, np.prod(strides, axis=0)))
    assert cfg["batch_size"] >= 2
    # at most 5 % of the dataset's voxels per step (up to rounding), unless the minimum batch forces more
    assert cfg["batch_size"] == 2 or (cfg["batch_size"] - 0.5) * np.prod(ps) <= 0.05 * n_voxels_dataset


def test_3d_dataset_gets_3d_fullres_and_2d():
    fp, dj = hippocampus_like()
    plans = plan_experiment("Dataset900_X", dj, fp)
    assert list(plans["configurations"]) == ["3d_fullres", "2d"]
    c3, c2 = plans["configurations"]["3d_fullres"], plans["configurations"]["2d"]
    assert c2["spacing"] == c3["spacing"][1:] and c2["median_image_size_in_voxels"] == c3["median_image_size_in_voxels"][1:]
    for cfg in (c3, c2):
        _assert_config_sane(cfg, np.prod(c3["median_image_size_in_voxels"]) * dj["numTraining"])
    assert plans["image_reader_writer"] == "sitk" and plans["transpose_forward"] == [0, 1, 2]
    assert plans["methods"]["unet"]["configurations"] == ["3d_fullres", "2d"]
    assert set(plans["methods"]) == set(available_methods())


def test_anisotropic_x_axis_is_transposed_into_the_plan():
    n = 10
    spacings = [[0.8, 0.8, 3.0]] * n
    shapes = [[RNG.integers(90, 110), RNG.integers(90, 110), RNG.integers(20, 30)] for _ in range(n)]
    plans = plan_experiment("Dataset900_X", dataset_json(["T2"], n=n), fingerprint_3d(spacings, shapes), methods=["unet"])
    assert plans["transpose_forward"] == [2, 0, 1] and plans["transpose_backward"] == [1, 2, 0]
    assert plans["configurations"]["3d_fullres"]["spacing"][0] == pytest.approx(3.0)
    assert plans["configurations"]["2d"]["spacing"] == pytest.approx([0.8, 0.8])
    assert plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]["kernel_sizes"][0] == [1, 3, 3]


def test_overwrite_target_spacing_sets_the_fullres_grid():
    fp, dj = hippocampus_like()
    plans = plan_experiment("Dataset900_X", dj, fp, methods=["unet"], overwrite_target_spacing=[2.0, 1.0, 1.0])
    c3 = plans["configurations"]["3d_fullres"]
    assert c3["spacing"] == [2.0, 1.0, 1.0]
    assert c3["median_image_size_in_voxels"][0] == pytest.approx(np.median([s[0] for s in fp["shapes_after_crop"]]) / 2, abs=1)


def test_png_dataset_gets_only_2d():
    fp, dj = png_like()
    plans = plan_experiment("Dataset901_P", dj, fp)
    assert list(plans["configurations"]) == ["2d"] and plans["image_reader_writer"] == "natural"
    cfg = plans["configurations"]["2d"]
    assert cfg["spacing"] == [1.0, 1.0] and len(cfg["patch_size"]) == 2
    assert cfg["normalization_schemes"] == ["ZScoreNormalization"] * 3
    _assert_config_sane(cfg, np.prod(cfg["median_image_size_in_voxels"]) * dj["numTraining"])
    assert plans["methods"]["unet"]["configurations"] == ["2d"]
    assert plans["methods"]["samunetr"]["channels"]["mode"] == "rgb"


def test_regions_switch_unet_to_dice_bce():
    fp, dj = hippocampus_like()
    dj["labels"] = {"background": 0, "whole": [1, 2], "core": [2]}
    dj["regions_class_order"] = [1, 2]
    assert plan_experiment("D", dj, fp, methods=["unet"])["methods"]["unet"]["recipe"]["loss"]["name"] == "dice_bce"
    dj2 = hippocampus_like()[1]
    assert plan_experiment("D", dj2, fp, methods=["unet"])["methods"]["unet"]["recipe"]["loss"]["name"] == "dice_ce"


# --- samunetr section ----------------------------------------------------------------------------

def _samunetr(fp, dj, budget=None):
    return plan_experiment("D", dj, fp, methods=["samunetr"], budget=budget)["methods"]["samunetr"]


def test_samunetr_input_grows_for_small_objects_and_is_capped_by_budget():
    cuda = ComputeBudget.for_device("cuda", memory_gb=24)
    big = _samunetr(*png_like(label_statistics=_label_stats(200, 300)), budget=cuda)
    small = _samunetr(*png_like(label_statistics=_label_stats(20, 60)), budget=cuda)
    assert small["input_size"] > big["input_size"]
    assert small["input_size"] in INPUT_SIZES and small["input_size"] % 16 == 0
    # chosen by the objects: the p05 object covers a token and the median three, one size smaller would not
    for sec in (big, small):
        plan, size = sec["input_size_plan"], sec["input_size"]
        assert plan["limited_by"] == "objects" and sec["token_grid"] == size // 16
        assert plan["object_edge_at_input_px"]["p05"] >= TOKEN_PX
        assert plan["object_edge_at_input_px"]["median"] >= 3 * TOKEN_PX
        if size > INPUT_SIZES[0]:
            smaller = INPUT_SIZES[INPUT_SIZES.index(size) - 1]
            scale = smaller / plan["reference_slice_edge_px"]
            assert plan["object_edge_px"]["p05"] * scale < TOKEN_PX or plan["object_edge_px"]["median"] * scale < 3 * TOKEN_PX
    cpu = _samunetr(*png_like(label_statistics=_label_stats(20, 60)), budget=ComputeBudget())
    assert cpu["input_size"] <= ComputeBudget().max_sam_input < small["input_size"]
    assert cpu["input_size_plan"]["limited_by"] in ("budget", "memory")


def test_samunetr_input_is_capped_by_the_slice_size():
    # Hippocampus-sized slices (~50 px): even tiny objects do not justify upsampling past 128
    sec = _samunetr(*hippocampus_like(label_statistics=_label_stats(3, 8)), budget=ComputeBudget.for_device("cuda", 24))
    assert sec["input_size"] == INPUT_SIZES[0] and sec["input_size_plan"]["limited_by"] == "slice size"


def test_samunetr_channels_intensity_and_recipe():
    n = 8
    shapes = [[20, 200, 200]] * n
    fp = fingerprint_3d([[3.0, 0.5, 0.5]] * n, shapes, n_channels=5)
    dj = dataset_json(["T2", "ADC", "DWI", "zone1", "zone2"], {"background": 0, "lesion": 1}, n=n)
    sec = _samunetr(fp, dj)
    assert sec["channels"] == {"mode": "adapt_patch_embed", "in_chans": 5, "num_input_channels": 5}
    assert len(sec["intensity"]["pixel_mean"]) == 5 and len(sec["intensity"]["per_channel"]) == 5
    assert sec["intensity"]["per_channel"][0]["mode"] == "percentile_clip"
    assert sec["paper_backbone"] == "vit_h" and sec["backbone"] == "vit_b" and sec["feature_size"] == 20
    assert sec["backbone_spec"]["global_attn_indexes"] == [2, 5, 8, 11]
    assert sec["slice_axis"] == 0 and sec["configuration"] == "2d" and sec["batch_size"] >= 1
    assert sec["recipe"]["loss"]["name"] == "dice_focal"
    assert sec["recipe"]["model_selection"]["postprocess"] == "keep_largest_component"

    ct = _samunetr(fingerprint_3d([[1.0, 0.8, 0.8]] * n, shapes), dataset_json(["CT"], n=n))
    win = ct["intensity"]["per_channel"][0]
    p = _props(1)["0"]
    assert ct["channels"]["mode"] == "repeat" and win["mode"] == "window"
    assert win["raw_window"] == [p["percentile_00_5"], p["percentile_99_5"]]
    assert win["window"] == pytest.approx([(p["percentile_00_5"] - p["mean"]) / p["std"], (p["percentile_99_5"] - p["mean"]) / p["std"]])


# --- registry and plans file ---------------------------------------------------------------------

def test_unknown_method_lists_the_choices():
    with pytest.raises(SamplanError) as e:
        get_method("samuentr")
    assert all(m in str(e.value) for m in available_methods()) and "samunetr" in str(e.value)
    fp, dj = hippocampus_like()
    with pytest.raises(SamplanError, match="unet"):
        plan_experiment("D", dj, fp, methods=["nnunet"])


def test_plans_round_trip_through_dataclasses_and_json(tmp_path):
    fp, dj = hippocampus_like(label_statistics=_label_stats(6, 15))
    plans = plan_experiment("Dataset900_X", dj, fp)
    assert json.loads(json.dumps(plans)) == plans  # plain JSON types only
    typed = Plans.from_dict(plans)
    assert typed.to_dict() == plans
    assert typed.configuration("3d_fullres").dim == 3 and typed.configuration("2d").architecture.arch_kwargs["n_stages"] >= 2
    save_plans(typed, tmp_path / "plans.json")
    assert load_plans(tmp_path / "plans.json").to_dict() == plans
    with pytest.raises(SamplanError, match="3d_lowres"):
        typed.configuration("3d_lowres")
    broken = dict(plans)
    del broken["transpose_forward"]
    with pytest.raises(SamplanError, match="transpose_forward"):
        Plans.from_dict(broken)
