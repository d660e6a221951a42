"""Metrics of one case: hand-computed cubes, empty masks, anisotropic spacing, and an independent check
against medpy (Dice, HD95) and a brute-force KD-tree surface distance (NSD)."""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.ndimage import binary_erosion, gaussian_filter, generate_binary_structure
from scipy.spatial import cKDTree

from samplan.evaluation.metrics import (
    case_metrics,
    confusion_counts,
    hd95,
    image_diagonal_mm,
    key_to_label_or_region,
    label_key,
    mask_metrics,
    normalized_surface_dice,
    region_mask,
)


def _cube_pair(shift_axis: int, shift: int = 2, side: int = 10, size: int = 20) -> tuple[np.ndarray, np.ndarray]:
    ref = np.zeros((size,) * 3, bool)
    ref[5 : 5 + side, 5 : 5 + side, 5 : 5 + side] = True
    return ref, np.roll(ref, shift, axis=shift_axis)


def _blobs(shape: tuple[int, ...], seed: int, threshold: float = 0.6) -> np.ndarray:
    """Smooth random blobs (several components, irregular surfaces, some touching the image edge)."""
    rng = np.random.default_rng(seed)
    field = gaussian_filter(rng.random(shape), sigma=2.0)
    return field > np.quantile(field, threshold)


# --- hand-computed cases -------------------------------------------------------------------------

def test_cube_shift_by_two_voxels_isotropic():
    # 10^3 cube shifted 2 voxels along x; 488 border voxels each. Per direction, distances are
    # 0 for 252 side voxels + 36 face-ring voxels, 1 for 28 voxels next to the sides + 36 voxels of
    # the overhanging ring, 2 for the 36 inner face voxels + the 100 voxels of the overhanging face.
    ref, pred = _cube_pair(shift_axis=2)
    zeros, ones, twos = 2 * 288, 2 * 64, 2 * 136
    n = zeros + ones + twos
    assert twos / n > 0.05  # so the 95th percentile is 2 voxels
    m = mask_metrics(ref, pred, (1.0, 1.0, 1.0), nsd_tolerance_mm=1.0)
    assert m["HD95"] == pytest.approx(2.0)
    assert m["NSD"] == pytest.approx((zeros + ones) / n)
    assert normalized_surface_dice(ref, pred, (1.0, 1.0, 1.0), 2.0) == 1.0
    assert (m["TP"], m["FP"], m["FN"]) == (800, 200, 200)
    assert m["Dice"] == pytest.approx(0.8) and m["IoU"] == pytest.approx(800 / 1200)
    assert m["TN"] == ref.size - 1200 and m["n_pred"] == m["n_ref"] == 1000


def test_anisotropic_spacing_changes_the_answer():
    # same cubes, x spacing 3 mm: the overhanging face is now 6 mm away; the inner face voxels see the
    # sides at 1..4 mm (28 at 1, 20 at 2, 12 at 3, 4 at 4 mm), the overhanging ring is 3 mm away
    ref, pred = _cube_pair(shift_axis=2)
    aniso = (1.0, 1.0, 3.0)
    assert hd95(ref, pred, aniso) == pytest.approx(6.0)
    assert hd95(ref, pred, (1.0, 1.0, 1.0)) == pytest.approx(2.0)
    assert normalized_surface_dice(ref, pred, aniso, 1.0) == pytest.approx(2 * (288 + 28) / 976)
    assert normalized_surface_dice(ref, pred, aniso, 5.9) == pytest.approx(1 - 200 / 976)
    # the same spacing with the shift along a 1 mm axis gives the isotropic distance back
    ref_y, pred_y = _cube_pair(shift_axis=1)
    assert hd95(ref_y, pred_y, aniso) == pytest.approx(2.0)
    # Dice does not depend on spacing
    assert mask_metrics(ref, pred, aniso)["Dice"] == mask_metrics(ref, pred, (1, 1, 1))["Dice"]


def test_identical_masks():
    ref = _blobs((16, 30, 28), seed=3)
    m = mask_metrics(ref, ref.copy(), (2.5, 0.7, 0.9), nsd_tolerance_mm=0.1)
    assert m["Dice"] == 1.0 and m["IoU"] == 1.0 and m["HD95"] == 0.0 and m["NSD"] == 1.0
    assert m["FP"] == m["FN"] == 0


def test_empty_reference_and_or_prediction():
    spacing = (3.0, 0.5, 0.5)
    empty = np.zeros((8, 20, 30), bool)
    blob = empty.copy()
    blob[2:5, 5:10, 5:12] = True
    diag = math.sqrt((8 * 3.0) ** 2 + (20 * 0.5) ** 2 + (30 * 0.5) ** 2)
    assert image_diagonal_mm(empty.shape, spacing) == pytest.approx(diag)

    both = mask_metrics(empty, empty, spacing)
    assert math.isnan(both["Dice"]) and math.isnan(both["IoU"]) and math.isnan(both["HD95"])
    assert both["NSD"] == 1.0 and both["TN"] == empty.size and both["n_ref"] == both["n_pred"] == 0

    missed = mask_metrics(blob, empty, spacing)  # empty prediction
    assert missed["Dice"] == 0.0 and missed["IoU"] == 0.0 and missed["FN"] == blob.sum()
    assert missed["HD95"] == pytest.approx(diag) and missed["NSD"] == 0.0

    hallucinated = mask_metrics(empty, blob, spacing)  # empty reference
    assert hallucinated["Dice"] == 0.0 and hallucinated["FP"] == blob.sum()
    assert hallucinated["HD95"] == pytest.approx(diag) and hallucinated["NSD"] == 0.0


def test_2d_image_stored_with_a_singleton_axis_uses_a_2d_surface():
    ref2 = _blobs((1, 40, 50), seed=5)
    pred2 = _blobs((1, 40, 50), seed=6)
    # the dummy 999 spacing of 2D images must not matter, and every pixel must not become "surface"
    m = mask_metrics(ref2, pred2, (999.0, 0.5, 1.0))
    m_flat = mask_metrics(ref2[0], pred2[0], (0.5, 1.0))
    assert m["HD95"] == pytest.approx(m_flat["HD95"]) and m["NSD"] == pytest.approx(m_flat["NSD"])
    assert mask_metrics(ref2, ref2, (999.0, 1.0, 1.0), nsd_tolerance_mm=0.0)["NSD"] == 1.0


# --- independent implementations ----------------------------------------------------------------

CASES = [((18, 36, 30), (3.0, 0.8, 0.6)), ((24, 24, 24), (1.0, 2.0, 0.5)), ((40, 48), (0.7, 1.3))]


@pytest.mark.parametrize("shape,spacing", CASES)
@pytest.mark.parametrize("seed", [0, 1])
def test_dice_and_hd95_match_medpy(shape, spacing, seed):
    binary = pytest.importorskip(
        "medpy.metric.binary", reason="medpy is not installed (test-only dependency: pip install medpy)"
    )
    ref = _blobs(shape, seed)
    pred = _blobs(shape, seed + 100, threshold=0.55)
    m = mask_metrics(ref, pred, spacing, hd95_convention="pooled")  # medpy pools both directions
    assert m["Dice"] == pytest.approx(binary.dc(pred, ref), rel=1e-12)
    assert m["HD95"] == pytest.approx(binary.hd95(pred, ref, voxelspacing=spacing), rel=1e-9)
    assert 0 < m["Dice"] < 1 and m["HD95"] > 0


def _brute_force_nsd(ref: np.ndarray, pred: np.ndarray, spacing, tol: float) -> float:
    """NSD from full-image border voxels and KD-tree nearest neighbours (no cropping, no EDT)."""
    struct = generate_binary_structure(ref.ndim, 1)
    pts = []
    for m in (ref, pred):
        border = m & ~binary_erosion(m, structure=struct, border_value=0)
        pts.append(np.argwhere(border) * np.asarray(spacing))
    d_ref = cKDTree(pts[1]).query(pts[0])[0]
    d_pred = cKDTree(pts[0]).query(pts[1])[0]
    tol += 1e-6  # distances equal to the tolerance count as within it (ties are frequent with 0.6 mm spacing)
    return (np.sum(d_ref <= tol) + np.sum(d_pred <= tol)) / (len(d_ref) + len(d_pred))


@pytest.mark.parametrize("shape,spacing", CASES)
def test_hd95_conventions_match_brute_force(shape, spacing):
    # "monai": the larger directed 95th percentile; "pooled": one percentile of both directions together
    ref = _blobs(shape, 9)
    pred = _blobs(shape, 10, threshold=0.7)
    struct = generate_binary_structure(ref.ndim, 1)
    pts = [np.argwhere(m & ~binary_erosion(m, structure=struct, border_value=0)) * np.asarray(spacing) for m in (ref, pred)]
    d_pred = cKDTree(pts[0]).query(pts[1])[0]
    d_ref = cKDTree(pts[1]).query(pts[0])[0]
    monai = max(np.percentile(d_pred, 95), np.percentile(d_ref, 95))
    pooled = np.percentile(np.concatenate([d_pred, d_ref]), 95)
    assert hd95(ref, pred, spacing) == pytest.approx(monai, rel=1e-12)  # the default
    assert hd95(ref, pred, spacing, "monai") == pytest.approx(monai, rel=1e-12)
    assert hd95(ref, pred, spacing, "pooled") == pytest.approx(pooled, rel=1e-12)
    assert monai > pooled  # the predicted blobs stray further than the reference's: pooling dilutes that
    with pytest.raises(ValueError, match="pooled"):
        hd95(ref, pred, spacing, "medpy")


@pytest.mark.parametrize("shape,spacing", CASES)
@pytest.mark.parametrize("tol", [0.5, 1.0, 3.0])
def test_nsd_matches_brute_force(shape, spacing, tol):
    ref = _blobs(shape, 7)
    pred = _blobs(shape, 8, threshold=0.65)
    got = normalized_surface_dice(ref, pred, spacing, tol)
    assert got == pytest.approx(_brute_force_nsd(ref, pred, spacing, tol), rel=1e-12)
    assert 0 < got < 1


def test_small_structures_in_a_large_volume_are_cropped_exactly():
    # a structure far from the image edges: the cropped computation must equal medpy's full-image one
    binary = pytest.importorskip("medpy.metric.binary", reason="medpy is not installed (test-only dependency)")
    ref = np.zeros((60, 120, 110), bool)
    pred = ref.copy()
    ref[30:36, 50:70, 40:52] = _blobs((6, 20, 12), 11, threshold=0.3)
    pred[31:37, 52:72, 40:52] = _blobs((6, 20, 12), 12, threshold=0.3)
    spacing = (2.0, 0.6, 0.6)
    assert hd95(ref, pred, spacing, "pooled") == pytest.approx(binary.hd95(pred, ref, voxelspacing=spacing), rel=1e-9)


# --- labels, regions, ignore label ----------------------------------------------------------------

def test_regions_are_unions_and_keys_match_nnunet():
    rng = np.random.default_rng(0)
    ref = rng.integers(0, 4, (6, 10, 12)).astype(np.int8)
    pred = rng.integers(0, 4, (6, 10, 12)).astype(np.int8)
    res = case_metrics(ref[None], pred[None], [1, (1, 2, 3), (2, 3), (3,)], (1.0, 1.0, 1.0))
    assert list(res) == ["1", "(1, 2, 3)", "(2, 3)", "(3,)"]
    for key in res:
        r = key_to_label_or_region(key)
        assert label_key(r) == key
        values = r if isinstance(r, tuple) else (r,)
        tp, fp, fn, _ = confusion_counts(np.isin(ref, values), np.isin(pred, values))
        assert res[key]["Dice"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    assert np.array_equal(region_mask(ref, (2, 3)), ref >= 2)


def test_ignore_label_voxels_are_not_counted():
    ref = np.zeros((4, 10, 10), np.int16)
    ref[:, 2:6, 2:6] = 1
    ref[:, 8:, :] = 255  # ignore
    pred = (ref == 1).astype(np.int16)
    pred[:, 8:, :] = 1  # predicted foreground inside the ignored area: no FP, no surface change
    with_ignore = case_metrics(ref, pred, [1], (1.0, 1.0, 1.0), ignore_label=255)["1"]
    without = case_metrics(ref, pred, [1], (1.0, 1.0, 1.0))["1"]
    assert with_ignore["FP"] == 0 and with_ignore["Dice"] == 1.0 and with_ignore["HD95"] == 0.0
    assert with_ignore["TN"] == ref.size - (ref == 255).sum() - (ref == 1).sum()
    assert without["FP"] == (ref == 255).sum() and without["Dice"] < 1.0
