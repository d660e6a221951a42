"""Per-label object statistics for SAM-based methods: connected components, object extents, slice coverage.

Computed per case inside the fingerprint worker (one read per case) by `case_label_stats`, then combined
over the dataset by `aggregate_label_stats` into `fingerprint["label_statistics"]` (schema: SCHEMAS.md).

Conventions
- Label maps are integer `(Z, Y, X)` arrays in raw numpy axis order; 2D images are `(1, Y, X)`, so their
  slice axis is 0 and each case is one slice.
- 3D objects are 26-connected components of a label's mask; their extent is the bounding-box size per
  axis (voxels; mm = voxels * the case's spacing).
- 2D objects are 8-connected components on each slice along `slice_axis`; their in-plane extent is the
  bounding-box size along the two remaining axes, in axis order.
- Per-case numbers (components per case, slice fraction) are taken over the cases that contain the
  label and per-slice numbers over the slices that contain it; `cases_with_label` says how often the
  label is present at all. Every statistic is null when no case contains the label.
- Keys are the label values as strings ("1", "2", ...); datasets that declare regions (label values
  given as lists, e.g. BraTS WT/TC/ET) also get one entry per region name.
"""
from __future__ import annotations

from typing import Any, Sequence

import cc3d
import numpy as np

from samplan.dataset.dataset_json import DatasetJson, foreground_labels, uses_regions

LabelKeys = dict[str, tuple[int, ...]]  # key in the fingerprint -> label values that make up the object mask
CaseLabelStats = dict[str, dict[str, Any] | None]  # key -> small per-case result, None when absent


def label_keys(dataset_json: DatasetJson) -> LabelKeys:
    """Keys to report: every foreground label value, plus every region name when regions are declared."""
    keys: LabelKeys = {str(v): (v,) for v in foreground_labels(dataset_json)}
    if uses_regions(dataset_json):
        for name, v in dataset_json["labels"].items():
            if name in ("background", "ignore"):
                continue
            keys[name] = tuple(int(i) for i in v) if isinstance(v, (list, tuple)) else (int(v),)
    return keys


def slice_axis_of(spacings: Sequence[Sequence[float]], is_2d: bool = False) -> int:
    """The coarsest axis of the median spacing (first one on ties); 0 for 2D images (one slice per case)."""
    if is_2d or not len(spacings):
        return 0
    return int(np.argmax(np.median(np.asarray(spacings, dtype=float), axis=0)))


def case_label_stats(seg: np.ndarray, slice_axis: int, keys: LabelKeys) -> CaseLabelStats:
    """Object statistics of one label map `(Z, Y, X)` (or `(1, Z, Y, X)`), integer, values >= 0.

    Returns, per key, None when the case does not contain it, else a dict with
    "components" (int, 3D), "extents" (int32 `(n, 3)` bbox sizes in voxels),
    "slice_components" (int32 `(s,)`, one count per slice containing the label),
    "inplane_extents" (int32 `(m, 2)`, bbox sizes of the 2D components) and
    "slice_fraction" (float in (0, 1], slices containing the label / slices of the case).
    """
    seg = np.asarray(seg)
    if seg.ndim == 4:
        seg = seg[0]
    boxes = _value_boxes(seg)
    n_slices = seg.shape[slice_axis]
    out: CaseLabelStats = {}
    for key, values in keys.items():
        present = [boxes[v] for v in values if v in boxes]
        if not present:
            out[key] = None
            continue
        # only the union box of the label's values is searched: cheap for small objects in large volumes
        lo = np.min([b[0] for b in present], axis=0)
        hi = np.max([b[1] for b in present], axis=0)
        sub = seg[tuple(slice(a, b) for a, b in zip(lo, hi))]
        mask = sub == values[0] if len(values) == 1 else np.isin(sub, values)
        n, extents = _components(mask, connectivity=26)
        counts, inplane = _slice_components(mask, slice_axis)
        out[key] = {
            "components": n,
            "extents": extents,
            "slice_components": counts,
            "inplane_extents": inplane,
            "slice_fraction": len(counts) / n_slices,
        }
    return out


def _value_boxes(seg: np.ndarray) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Bounding box `(start, stop)` of every nonzero value of `seg`, in one pass when possible."""
    if seg.size and seg.min() >= 0 and int(seg.max()) < seg.size:
        bb = np.asarray(cc3d.statistics(seg, no_slice_conversion=True)["bounding_boxes"], dtype=np.int64)
        bb = bb.reshape(len(bb), seg.ndim, 2)
        return {v: (bb[v, :, 0], bb[v, :, 1] + 1) for v in range(1, len(bb)) if np.all(bb[v, :, 0] <= bb[v, :, 1])}
    out = {}  # unusual values (negative, or larger than the image): one pass per value
    for v in np.unique(seg):
        if v > 0:
            idx = np.argwhere(seg == v)
            out[int(v)] = (idx.min(0), idx.max(0) + 1)
    return out


def _components(mask: np.ndarray, connectivity: int) -> tuple[int, np.ndarray]:
    """Number of connected components of a boolean mask and their bbox sizes, int32 `(n, mask.ndim)`."""
    labels, n = cc3d.connected_components(mask, connectivity=connectivity, return_N=True)
    if n == 0:
        return 0, np.zeros((0, mask.ndim), np.int32)
    bb = np.asarray(cc3d.statistics(labels, no_slice_conversion=True)["bounding_boxes"], dtype=np.int64)
    bb = bb[1:].reshape(n, mask.ndim, 2)
    return int(n), (bb[:, :, 1] - bb[:, :, 0] + 1).astype(np.int32)


def _slice_components(mask: np.ndarray, slice_axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Per slice along `slice_axis` that contains the mask: 8-connected component count and their bboxes.

    All slices containing the mask are stacked into one 2D image with an empty row between them, so a
    single labelling call handles every slice and no component can cross from one slice to the next.
    """
    m = np.moveaxis(mask, slice_axis, 0)
    n_s, a, b = m.shape
    idx = np.flatnonzero(m.reshape(n_s, -1).any(axis=1))
    stacked = np.zeros((len(idx), a + 1, b), dtype=bool)
    stacked[:, :a] = m[idx]
    labels, n = cc3d.connected_components(stacked.reshape(-1, b), connectivity=8, return_N=True)
    bb = np.asarray(cc3d.statistics(labels, no_slice_conversion=True)["bounding_boxes"], dtype=np.int64)[1 : n + 1]
    counts = np.bincount(bb[:, 0] // (a + 1), minlength=len(idx)).astype(np.int32)
    inplane = np.stack([bb[:, 1] - bb[:, 0] + 1, bb[:, 3] - bb[:, 2] + 1], axis=1).astype(np.int32)
    return counts, inplane


def aggregate_label_stats(
    per_case: Sequence[CaseLabelStats], spacings: Sequence[Sequence[float]], slice_axis: int, keys: LabelKeys
) -> dict[str, Any]:
    """Combine per-case results (same order as `spacings`, `(Z, Y, X)` mm) into the fingerprint's label_statistics."""
    per_label = {}
    for key in keys:
        found = [(c[key], np.asarray(sp, float)) for c, sp in zip(per_case, spacings) if c.get(key) is not None]
        if not found:
            per_label[key] = _empty_entry()
            continue
        ext = np.concatenate([f["extents"] for f, _ in found]).astype(float)
        ext_mm = np.concatenate([f["extents"] * sp for f, sp in found])
        per_label[key] = {
            "cases_with_label": len(found),
            "components_per_case": _summary([f["components"] for f, _ in found]),
            "components_per_slice": _summary(
                np.concatenate([f["slice_components"] for f, _ in found]), ("mean", "median", "max")
            ),
            "extent_voxels": _percentiles(ext),
            "extent_mm": _percentiles(ext_mm),
            "inplane_extent_pixels": _percentiles(
                np.concatenate([f["inplane_extents"] for f, _ in found]).astype(float)
            ),
            "slice_fraction": _summary([f["slice_fraction"] for f, _ in found]),
        }
    return {"slice_axis": int(slice_axis), "per_label": per_label}


_SUMMARIES = {"mean": np.mean, "median": np.median, "min": np.min, "max": np.max}


def _summary(values: Sequence[float] | np.ndarray, which: Sequence[str] = tuple(_SUMMARIES)) -> dict[str, float]:
    """Plain-float summary statistics of a 1D sequence."""
    v = np.asarray(values, dtype=float)
    return {k: float(_SUMMARIES[k](v)) for k in which}


def _percentiles(rows: np.ndarray) -> dict[str, list[float]]:
    """Per-column median, 5th and 95th percentile of an `(n, d)` array."""
    return {k: [float(x) for x in np.percentile(rows, q, axis=0)] for k, q in (("median", 50), ("p05", 5), ("p95", 95))}


def _empty_entry() -> dict[str, Any]:
    """Entry for a label no case contains: the count is 0 and every statistic is null."""
    return {
        "cases_with_label": 0,
        **{k: None for k in ("components_per_case", "components_per_slice", "extent_voxels", "extent_mm",
                             "inplane_extent_pixels", "slice_fraction")},
    }
