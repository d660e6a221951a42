"""Per-label segmentation metrics of one case: nnU-Net's overlap counts plus HD95 and surface Dice in mm.

Conventions (all arrays are label maps or boolean masks in numpy axis order, e.g. `(Z, Y, X)`, and
`spacing` is in mm in the same order):

- Overlap (as nnU-Net): TP, FP, FN, TN count voxels, ignoring voxels whose *reference* value is the
  ignore label; n_pred = TP + FP, n_ref = TP + FN; Dice = 2TP / (2TP + FP + FN), IoU = TP / (TP + FP + FN);
  both are NaN when TP + FP + FN = 0 (empty reference and empty prediction), so that averages skip them.
- A region (a tuple of label values) is the union of those labels' masks, as in nnU-Net.
- Surfaces and distances: see `samplan.evaluation.surfaces` (border voxels as MONAI's `get_mask_edges`, or
  area-weighted marching-cubes elements as DeepMind's `surface-distance`; exact Euclidean distances in mm).
  Axes of length 1 (2D images stored as `(1, Y, X)` with a dummy spacing) are dropped first, so 2D images get
  a 2D surface (as MONAI computes on a `(B, C, H, W)` input).
- HD95, `hd95_convention`:
  "monai" (default): the larger of the two directed 95th percentiles (linear interpolation) of the border-voxel
  distances, prediction -> reference and reference -> prediction; equal to MONAI's
  `compute_hausdorff_distance(..., percentile=95)` and what BraTS-style papers report.
  "pooled": the 95th percentile of both directed distance sets pooled together (medpy's `hd95`); smaller
  than "monai" whenever one direction has the far outliers.
- NSD (normalised surface Dice at tolerance tau mm), `nsd_convention`:
  "monai" (default): (prediction border voxels within tau of the reference border + reference border voxels
  within tau of the prediction border) / (all border voxels of both); equal to MONAI's `compute_surface_dice`.
  "area_weighted": the same fraction with every surface element weighted by its area, as Nikolov et al.'s
  `surface-distance` (MONAI's `compute_surface_dice(..., use_subvoxels=True)`).
  A distance equal to tau (up to 1e-6 mm of rounding) counts as within.
- Empty masks (samplan's convention, kept where MONAI's would hide errors):
  both empty: HD95 NaN (as MONAI; skipped by averages, like Dice); NSD 1.0 (MONAI: NaN).
  Exactly one empty: HD95 is the image diagonal in mm, sqrt(sum((shape_i * spacing_i)^2)), the worst possible
  distance -- the convention of the BraTS challenges (373.13 mm for 240x240x155 at 1 mm) -- so that a missed or
  hallucinated structure is penalised in the mean (MONAI returns NaN, which averages would silently skip);
  NSD 0.0 (as MONAI).
- Ignored voxels (reference == ignore label) are removed from both masks before the surface metrics (as
  MONAI's `ignore_index`).
"""
from __future__ import annotations

from typing import Sequence, Union

import numpy as np

from samplan.evaluation.conventions import check_conventions
# surface_distances stays importable from here (it lived in this module before surfaces.py)
from samplan.evaluation.surfaces import surface_distances, surface_element_distances  # noqa: F401

LabelOrRegion = Union[int, tuple[int, ...]]
# distances within a nanometre of the NSD tolerance count as inside it (float rounding of e.g. 5 * 0.6 mm)
_TIE_EPS_MM = 1e-6
METRIC_NAMES = ("Dice", "IoU", "FP", "TP", "FN", "TN", "n_pred", "n_ref", "HD95", "NSD")


def label_key(label_or_region: LabelOrRegion) -> str:
    """JSON key of a label (`"1"`) or region (`"(1, 2, 3)"`, `"(3,)"`), spelled as nnU-Net spells it."""
    if isinstance(label_or_region, (tuple, list)):
        return str(tuple(int(v) for v in label_or_region))
    return str(int(label_or_region))


def key_to_label_or_region(key: str) -> LabelOrRegion:
    """Inverse of `label_key`: `"1"` -> 1, `"(1, 2)"` -> (1, 2)."""
    key = key.strip()
    if key.startswith("("):
        return tuple(int(v) for v in key.strip("()").split(",") if v.strip())
    return int(key)


def region_mask(seg: np.ndarray, label_or_region: LabelOrRegion) -> np.ndarray:
    """Boolean mask of one label value, or of the union of a region's label values (same shape as `seg`)."""
    if isinstance(label_or_region, (tuple, list)):
        return np.isin(seg, [int(v) for v in label_or_region])
    return seg == label_or_region


def confusion_counts(mask_ref: np.ndarray, mask_pred: np.ndarray, ignore_mask: np.ndarray | None = None) -> tuple[int, int, int, int]:
    """(TP, FP, FN, TN) voxel counts of two boolean masks, not counting voxels where `ignore_mask` is True."""
    if ignore_mask is not None:
        valid = ~ignore_mask
        mask_ref, mask_pred = mask_ref & valid, mask_pred & valid
        n_valid = int(np.count_nonzero(valid))
    else:
        n_valid = int(mask_ref.size)
    tp = int(np.count_nonzero(mask_ref & mask_pred))
    fp = int(np.count_nonzero(mask_pred)) - tp
    fn = int(np.count_nonzero(mask_ref)) - tp
    return tp, fp, fn, n_valid - tp - fp - fn


def image_diagonal_mm(shape: Sequence[int], spacing: Sequence[float]) -> float:
    """Length in mm of the image diagonal over the axes longer than one voxel (HD95 when one mask is empty)."""
    shape_arr = np.asarray(shape)
    keep = shape_arr > 1 if np.any(shape_arr > 1) else np.ones(len(shape_arr), bool)
    extent = shape_arr[keep] * np.asarray(spacing, dtype=np.float64)[keep]
    return float(np.sqrt(np.sum(extent**2)))


def hd95(mask_ref: np.ndarray, mask_pred: np.ndarray, spacing: Sequence[float], convention: str = "monai") -> float:
    """95th percentile Hausdorff distance in mm (NaN if both empty, the image diagonal if exactly one is).

    `convention`: "monai" (max of the two directed 95th percentiles) or "pooled" (medpy's, both directions pooled).
    """
    check_conventions(convention, "monai")
    has_ref, has_pred = bool(np.any(mask_ref)), bool(np.any(mask_pred))
    if not has_ref and not has_pred:
        return float("nan")
    if has_ref != has_pred:
        return image_diagonal_mm(np.shape(mask_ref), spacing)
    d1, d2 = surface_distances(mask_ref, mask_pred, spacing)
    if convention == "pooled":
        return float(np.percentile(np.concatenate([d1, d2]), 95))
    return float(max(np.percentile(d1, 95), np.percentile(d2, 95)))


def normalized_surface_dice(
    mask_ref: np.ndarray, mask_pred: np.ndarray, spacing: Sequence[float], tolerance_mm: float, convention: str = "monai"
) -> float:
    """Fraction of both surfaces within `tolerance_mm` of the other surface, in [0, 1].

    1.0 when both masks are empty, 0.0 when exactly one is. `convention`: "monai" (border voxels counted) or
    "area_weighted" (surface elements weighted by area, as DeepMind's surface-distance).
    """
    check_conventions("monai", convention)
    has_ref, has_pred = bool(np.any(mask_ref)), bool(np.any(mask_pred))
    if not has_ref and not has_pred:
        return 1.0
    if has_ref != has_pred:
        return 0.0
    # distances equal to the tolerance are common (tol 3 mm, spacing 0.6 mm) and must not flip on rounding
    tol = tolerance_mm + _TIE_EPS_MM
    if convention == "area_weighted":
        d1, d2, a1, a2 = surface_element_distances(mask_ref, mask_pred, spacing)
        return float((a1[d1 <= tol].sum() + a2[d2 <= tol].sum()) / (a1.sum() + a2.sum()))
    d1, d2 = surface_distances(mask_ref, mask_pred, spacing)
    return float((np.count_nonzero(d1 <= tol) + np.count_nonzero(d2 <= tol)) / (d1.size + d2.size))


def mask_metrics(
    mask_ref: np.ndarray,
    mask_pred: np.ndarray,
    spacing: Sequence[float],
    ignore_mask: np.ndarray | None = None,
    nsd_tolerance_mm: float = 1.0,
    hd95_convention: str = "monai",
    nsd_convention: str = "monai",
) -> dict[str, float | int]:
    """All metrics of one pair of boolean masks: Dice, IoU, FP, TP, FN, TN, n_pred, n_ref, HD95, NSD."""
    mask_ref, mask_pred = np.asarray(mask_ref, bool), np.asarray(mask_pred, bool)
    if mask_ref.shape != mask_pred.shape:
        raise ValueError(f"reference shape {mask_ref.shape} != prediction shape {mask_pred.shape}")
    tp, fp, fn, tn = confusion_counts(mask_ref, mask_pred, ignore_mask)
    denom = tp + fp + fn
    if ignore_mask is not None:
        mask_ref, mask_pred = mask_ref & ~ignore_mask, mask_pred & ~ignore_mask
    return {
        "Dice": 2 * tp / (2 * tp + fp + fn) if denom else float("nan"),
        "IoU": tp / denom if denom else float("nan"),
        "FP": fp,
        "TP": tp,
        "FN": fn,
        "TN": tn,
        "n_pred": tp + fp,
        "n_ref": tp + fn,
        "HD95": hd95(mask_ref, mask_pred, spacing, hd95_convention),
        "NSD": normalized_surface_dice(mask_ref, mask_pred, spacing, nsd_tolerance_mm, nsd_convention),
    }


def case_metrics(
    seg_ref: np.ndarray,
    seg_pred: np.ndarray,
    labels_or_regions: Sequence[LabelOrRegion],
    spacing: Sequence[float],
    ignore_label: int | None = None,
    nsd_tolerance_mm: float = 1.0,
    hd95_convention: str = "monai",
    nsd_convention: str = "monai",
) -> dict[str, dict[str, float | int]]:
    """Metrics of every label/region of one case, keyed by `label_key`.

    `seg_ref`, `seg_pred`: integer label maps of one shape, `(Z, Y, X)` or `(1, Z, Y, X)`;
    `spacing`: mm per voxel for the spatial axes, in the same order.
    """
    check_conventions(hd95_convention, nsd_convention)
    seg_ref, seg_pred = np.asarray(seg_ref), np.asarray(seg_pred)
    if seg_ref.shape != seg_pred.shape:
        raise ValueError(f"reference shape {seg_ref.shape} != prediction shape {seg_pred.shape}")
    if seg_ref.ndim == len(spacing) + 1 and seg_ref.shape[0] == 1:
        seg_ref, seg_pred = seg_ref[0], seg_pred[0]
    ignore_mask = seg_ref == ignore_label if ignore_label is not None else None
    return {
        label_key(r): mask_metrics(region_mask(seg_ref, r), region_mask(seg_pred, r), spacing, ignore_mask,
                                   nsd_tolerance_mm, hd95_convention, nsd_convention)
        for r in labels_or_regions
    }
