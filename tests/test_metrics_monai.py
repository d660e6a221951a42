"""samplan's HD95 and NSD equal MONAI's (compute_hausdorff_distance(percentile=95), compute_surface_dice, with and
without use_subvoxels) on real reference label maps against deterministically perturbed "predictions", on edge
cases, and table by table; the empty-mask cases where samplan deliberately differs from MONAI are pinned too."""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from conftest import shared_dataset
from scipy.ndimage import binary_dilation, binary_erosion, label

from samplan.dataset.image_io import read_seg
from samplan.evaluation.metrics import case_metrics, hd95, image_diagonal_mm, mask_metrics, normalized_surface_dice
from samplan.evaluation.surfaces import element_measure_table, neighbour_codes

monai_metrics = pytest.importorskip(
    "monai.metrics", reason="MONAI is not installed (test-only dependency: pip install -e '.[test]' or pip install monai)"
)
torch = pytest.importorskip("torch")

# MONAI computes in float32; 1e-4 mm (and 1e-5 for the unitless NSD) is far above its rounding, far below any real change
TOL_MM, TOL_NSD = 1e-4, 1e-5


def _monai(ref: np.ndarray, pred: np.ndarray, spacing, tol: float) -> dict[str, float]:
    """MONAI's HD95, NSD and area-weighted NSD of one pair of boolean masks (batch 1, one channel)."""
    p = torch.from_numpy(pred[None, None].astype(np.float32))
    r = torch.from_numpy(ref[None, None].astype(np.float32))
    kw = {"include_background": True, "spacing": [float(s) for s in spacing]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MONAI warns about empty masks, which some cases here are on purpose
        return {
            "HD95": float(monai_metrics.compute_hausdorff_distance(p, r, percentile=95, **kw)[0, 0]),
            "NSD": float(monai_metrics.compute_surface_dice(p, r, [tol], **kw)[0, 0]),
            "NSD_area": float(monai_metrics.compute_surface_dice(p, r, [tol], use_subvoxels=True, **kw)[0, 0]),
        }


def _ours(ref: np.ndarray, pred: np.ndarray, spacing, tol: float) -> dict[str, float]:
    return {
        "HD95": hd95(ref, pred, spacing),
        "NSD": normalized_surface_dice(ref, pred, spacing, tol),
        "NSD_area": normalized_surface_dice(ref, pred, spacing, tol, convention="area_weighted"),
    }


def _assert_equal_to_monai(ref: np.ndarray, pred: np.ndarray, spacing, tol: float) -> dict[str, float]:
    ours, theirs = _ours(ref, pred, spacing, tol), _monai(ref, pred, spacing, tol)
    assert ours["HD95"] == pytest.approx(theirs["HD95"], abs=TOL_MM), (ours, theirs)
    assert ours["NSD"] == pytest.approx(theirs["NSD"], abs=TOL_NSD), (ours, theirs)
    assert ours["NSD_area"] == pytest.approx(theirs["NSD_area"], abs=TOL_NSD), (ours, theirs)
    return ours


# --- deterministic "predictions" ----------------------------------------------------------------------------------

def _shift(mask: np.ndarray, axis: int, by: int) -> np.ndarray:
    """Move the mask `by` voxels along `axis`, filling with background (no wrap-around)."""
    out = np.zeros_like(mask)
    src, dst = [slice(None)] * mask.ndim, [slice(None)] * mask.ndim
    src[axis], dst[axis] = (slice(0, -by), slice(by, None)) if by > 0 else (slice(-by, None), slice(0, by))
    out[tuple(dst)] = mask[tuple(src)]
    return out


def _drop_component(mask: np.ndarray) -> np.ndarray:
    """Without its largest connected component when it has several, else without its top third along axis 0."""
    comps, n = label(mask)
    if n > 1:
        sizes = np.bincount(comps.ravel())[1:]
        return mask & (comps != 1 + int(np.argmax(sizes)))
    out = mask.copy()
    z = np.flatnonzero(mask.any(axis=(1, 2)))
    out[z[0] : z[0] + max(1, len(z) // 3)] = False
    return out


def _add_far_blob(mask: np.ndarray) -> np.ndarray:
    """Plus a false-positive cube in the image corner farthest from the structure, with about 8% as many border
    voxels as the structure: above the 5% that moves the directed 95th percentile, below what moves the pooled one."""
    out = mask.copy()
    n_border = int(np.count_nonzero(mask & ~binary_erosion(mask)))
    side = next(k for k in range(2, 100) if 6 * k * k - 12 * k + 8 >= 0.08 * n_border)
    centre = np.argwhere(mask).mean(axis=0)
    corner = tuple(slice(0, side) if c > s / 2 else slice(s - side, s) for c, s in zip(centre, mask.shape))
    assert not mask[corner].any()
    out[corner] = True
    return out


PERTURBATIONS = {
    "erode": binary_erosion,
    "dilate": lambda m: binary_dilation(m, iterations=2),
    "shift": lambda m: _shift(m, axis=1, by=2),
    "drop_component": _drop_component,
    "far_blob": _add_far_blob,
}


def _labels(dataset: str, n: int) -> list[np.ndarray]:
    folder = shared_dataset(dataset) / "labelsTr"
    return [read_seg(f)[0][0] for f in sorted(folder.glob("*.nii.gz"))[:n]]


# --- real label maps ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def hippocampus() -> list[np.ndarray]:
    return _labels("Dataset004_Hippocampus", 3)


# native 1 mm (the 1 mm tolerance then ties with many distances), and a simulated anisotropic scan (thick slices
# along axis 0, non-square in-plane pixels; 0.6-0.8-1.0 mm triangles tie with the tolerance too)
@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (3.0, 0.8, 0.6)])
@pytest.mark.parametrize("perturbation", list(PERTURBATIONS))
def test_hippocampus_matches_monai(hippocampus, perturbation, spacing):
    differs_from_pooled = 0
    for seg in hippocampus:
        for lab in (1, 2):
            ref = seg == lab
            pred = PERTURBATIONS[perturbation](ref)
            assert pred.any() and (pred != ref).any()
            ours = _assert_equal_to_monai(ref, pred, spacing, 1.0)
            assert ours["HD95"] > 0 and 0 <= ours["NSD"] < 1
            differs_from_pooled += hd95(ref, pred, spacing, "pooled") < ours["HD95"] - TOL_MM
    if perturbation == "far_blob":  # one-sided outliers: the old pooled HD95 hid them, MONAI's does not
        assert differs_from_pooled == 2 * len(hippocampus)


@pytest.mark.parametrize("case,target,perturbation", [
    (0, 2, "shift"), (0, 4, "drop_component"), (0, (1, 2, 3, 4), "erode"),
    (1, 1, "dilate"), (1, 3, "far_blob"), (1, (1, 3, 4), "drop_component"),
])
def test_brats_matches_monai(case, target, perturbation):
    seg = _labels("Dataset501_BraTS2015DM", case + 1)[case]
    ref = np.isin(seg, target)
    pred = PERTURBATIONS[perturbation](ref)
    ours = _assert_equal_to_monai(ref, pred, (1.0, 1.0, 1.0), 1.0)
    assert ours["HD95"] > 0 and ours["NSD"] < 1


def test_case_metrics_on_a_label_map_match_monai_per_label(hippocampus):
    # the whole path from a label map: regions, singleton channel axis, per-label masks
    seg = hippocampus[1]
    pred = seg.copy()
    pred[binary_dilation(seg == 2) & (seg == 0)] = 2
    pred[_shift(seg == 1, axis=0, by=1) & (seg != 2)] = 1
    spacing = (2.0, 0.9, 0.7)
    res = case_metrics(seg[None], pred[None], [1, 2, (1, 2)], spacing, nsd_tolerance_mm=1.5)
    for key, target in (("1", 1), ("2", 2), ("(1, 2)", (1, 2))):
        theirs = _monai(np.isin(seg, target), np.isin(pred, target), spacing, 1.5)
        assert res[key]["HD95"] == pytest.approx(theirs["HD95"], abs=TOL_MM)
        assert res[key]["NSD"] == pytest.approx(theirs["NSD"], abs=TOL_NSD)


# --- synthetic edge cases -----------------------------------------------------------------------------------------

def test_single_voxels():
    spacing = (2.0, 0.5, 0.7)
    ref = np.zeros((6, 9, 8), bool)
    ref[3, 4, 4] = True
    same = _assert_equal_to_monai(ref, ref.copy(), spacing, 1.0)
    assert same == {"HD95": 0.0, "NSD": 1.0, "NSD_area": 1.0}
    moved = _assert_equal_to_monai(ref, _shift(ref, axis=0, by=1), spacing, 1.0)
    assert moved["HD95"] == pytest.approx(2.0) and moved["NSD"] == 0.0
    # a single voxel against a block: the block's far border voxels are far from it, not the other way round
    block = np.zeros_like(ref)
    block[1:5, 2:7, 2:7] = True
    _assert_equal_to_monai(block, ref, spacing, 1.0)
    _assert_equal_to_monai(ref, block, spacing, 1.0)


def test_masks_touching_the_image_border():
    # the image edge counts as background for the surface, in both implementations
    rng = np.random.default_rng(4)
    ref = np.zeros((8, 20, 18), bool)
    ref[:, :7, 3:12] = True  # touches three faces of the volume
    ref[rng.random(ref.shape) > 0.93] = True
    pred = ref.copy()
    pred[:, 7:9, 3:12] = True
    pred[-1] = False
    for spacing in ((1.0, 1.0, 1.0), (2.5, 0.6, 0.9)):
        ours = _assert_equal_to_monai(ref, pred, spacing, 1.0)
        assert ours["HD95"] > 0 and 0 < ours["NSD"] < 1
    full = np.ones((5, 6, 7), bool)
    _assert_equal_to_monai(full, full.copy(), (1.0, 1.0, 1.0), 1.0)
    _assert_equal_to_monai(full, _shift(full, axis=2, by=3), (1.0, 1.0, 1.0), 1.0)


def test_2d_images_match_monai_in_2d():
    rng = np.random.default_rng(2)
    ref = np.zeros((40, 50), bool)
    ref[8:30, 10:35] = True
    pred = _shift(ref, axis=1, by=3)
    pred[rng.random(pred.shape) > 0.98] = True
    theirs = _assert_equal_to_monai(ref, pred, (0.7, 1.2), 2.0)
    # a 2D image stored as (1, Y, X) with a dummy spacing is measured in 2D, i.e. as MONAI measures (H, W)
    m = mask_metrics(ref[None], pred[None], (999.0, 0.7, 1.2), nsd_tolerance_mm=2.0, nsd_convention="area_weighted")
    assert m["HD95"] == pytest.approx(theirs["HD95"]) and m["NSD"] == pytest.approx(theirs["NSD_area"])


def test_empty_masks_keep_samplans_convention_where_monai_returns_nan():
    spacing = (3.0, 0.5, 0.5)
    empty = np.zeros((8, 20, 30), bool)
    blob = empty.copy()
    blob[2:5, 5:10, 5:12] = True
    diag = image_diagonal_mm(empty.shape, spacing)
    for ref, pred in ((blob, empty), (empty, blob)):  # empty prediction, empty reference
        theirs = _monai(ref, pred, spacing, 1.0)
        assert math.isnan(theirs["HD95"]) and theirs["NSD"] == 0.0 and theirs["NSD_area"] == 0.0
        # samplan: the worst distance, so a missed or hallucinated structure counts in the mean instead of vanishing
        assert _ours(ref, pred, spacing, 1.0) == {"HD95": pytest.approx(diag), "NSD": 0.0, "NSD_area": 0.0}
    theirs = _monai(empty, empty, spacing, 1.0)
    assert all(math.isnan(v) for v in theirs.values())
    ours = _ours(empty, empty, spacing, 1.0)
    assert math.isnan(ours["HD95"]) and ours["NSD"] == 1.0 and ours["NSD_area"] == 1.0  # NSD 1: samplan's documented value


# --- the surface-element tables -----------------------------------------------------------------------------------

@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (3.0, 0.8, 0.6), (0.5, 2.0, 1.25), (1.0, 1.0), (0.7, 2.5)])
def test_surface_element_table_equals_monais(spacing):
    from monai.metrics.utils import get_code_to_measure_table

    table, kernel = get_code_to_measure_table(spacing)
    kernel = kernel.numpy()[0, 0]
    ours = element_measure_table(spacing)
    assert len(ours) == len(table)
    for code in range(len(table)):
        # the block whose MONAI code is `code`, re-coded the samplan way
        block = (np.bitwise_and(kernel.astype(np.int64), code) > 0)
        ours_code = int(neighbour_codes(block)[(0,) * len(spacing)])
        assert ours[ours_code] == pytest.approx(float(table[code]), abs=1e-5), code
