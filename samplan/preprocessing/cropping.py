"""Crop a case to the bounding box of its nonzero region, as nnU-Net does before fingerprinting."""
from __future__ import annotations

import numpy as np
from scipy.ndimage import binary_fill_holes

# value written into the label map outside the nonzero mask (nnU-Net's convention); used by mask-normalisation
OUTSIDE_NONZERO_LABEL = -1

BBox = list[list[int]]  # per axis [start, stop)


def nonzero_mask(data: np.ndarray) -> np.ndarray:
    """Voxels nonzero in any channel of `(C, Z, Y, X)` data, holes filled -> bool `(Z, Y, X)`."""
    mask = np.any(data != 0, axis=0)
    return binary_fill_holes(mask)


def bbox_of_mask(mask: np.ndarray) -> BBox:
    """Bounding box `[[start, stop), ...]` of a boolean mask; the full extent if the mask is empty."""
    out = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        hits = np.flatnonzero(np.any(mask, axis=other))
        out.append([int(hits[0]), int(hits[-1]) + 1] if hits.size else [0, mask.shape[axis]])
    return out


def crop(array: np.ndarray, bbox: BBox) -> np.ndarray:
    """Crop the trailing spatial axes of `array` to `bbox` (leading channel axes kept)."""
    lead = (slice(None),) * (array.ndim - len(bbox))
    return array[lead + tuple(slice(a, b) for a, b in bbox)]


def crop_to_nonzero(data: np.ndarray, seg: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, BBox]:
    """Crop `(C, Z, Y, X)` data (and `(1, Z, Y, X)` seg) to the nonzero box; outside-mask background becomes -1.

    Returns the cropped data, the cropped label map (int8/int16; a zero map with the -1 marks when `seg`
    is None, so normalisation can still use the mask) and the bounding box.
    """
    mask = nonzero_mask(data)
    bbox = bbox_of_mask(mask)
    data = crop(data, bbox)
    mask = crop(mask, bbox)[None]
    if seg is None:
        seg = np.zeros(mask.shape, dtype=np.int8)
    else:
        seg = crop(seg, bbox).copy()
    seg[(seg == 0) & ~mask] = OUTSIDE_NONZERO_LABEL
    return data, seg, bbox
