"""Box prompts: boxes from masks, jitter, per-object boxes, scaling, and the slice order of 3D box propagation.

Convention (segment-anything's): a box is `[x0, y0, x1, y1]` float pixel coordinates of a 2D image of
shape `(H, W)` (x = column, y = row), inclusive corners of the object's pixels, so a one-pixel object at
(row r, column c) has the box `[c, r, c, r]`. A missing box (empty mask) is None.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
from scipy import ndimage


def box_from_mask(mask: np.ndarray) -> np.ndarray | None:
    """Tight box `[x0, y0, x1, y1]` (float64) of the nonzero pixels of a 2D mask `(H, W)`; None when empty."""
    rows = np.flatnonzero(np.any(mask, axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(np.any(mask, axis=0))
    return np.array([cols[0], rows[0], cols[-1], rows[-1]], dtype=np.float64)


def box_area(box: np.ndarray | None) -> float:
    """Pixel area of an inclusive box (0 for None)."""
    if box is None:
        return 0.0
    return float((box[2] - box[0] + 1) * (box[3] - box[1] + 1))


def full_image_box(shape: tuple[int, int]) -> np.ndarray:
    """The box of the whole image `(H, W)`: `[0, 0, W-1, H-1]`."""
    return np.array([0.0, 0.0, shape[1] - 1.0, shape[0] - 1.0])


def clip_box(box: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """`box` clipped to an image `(H, W)`, with x0 <= x1 and y0 <= y1 kept."""
    b = np.asarray(box, dtype=np.float64).copy()
    b[[0, 2]] = np.clip(b[[0, 2]], 0, shape[1] - 1)
    b[[1, 3]] = np.clip(b[[1, 3]], 0, shape[0] - 1)
    b[2], b[3] = max(b[2], b[0]), max(b[3], b[1])
    return b


def pad_box(box: np.ndarray, pad: float, shape: tuple[int, int]) -> np.ndarray:
    """`box` grown by `pad` pixels on every side, clipped to the image `(H, W)`."""
    return clip_box(np.asarray(box, dtype=np.float64) + np.array([-pad, -pad, pad, pad]), shape)


def jitter_box(box: np.ndarray, max_shift: float, shape: tuple[int, int], rng: np.random.Generator,
               outward_only: bool = True) -> np.ndarray:
    """Each side of `box` moved by a random integer number of pixels, then clipped to the image `(H, W)`.

    outward_only (MedSAM's training rule): every side moves outward by 0..max_shift px, so the box still
    contains the object; otherwise each side moves by -max_shift..max_shift px (x1 >= x0 and y1 >= y0 kept).
    """
    m = int(max_shift)
    shift = rng.integers(0 if outward_only else -m, m + 1, size=4).astype(np.float64)
    return clip_box(np.asarray(box, dtype=np.float64) + shift * np.array([-1, -1, 1, 1]), shape)


def object_masks(mask: np.ndarray) -> list[np.ndarray]:
    """The 8-connected components of a 2D mask `(H, W)` as boolean masks, largest first."""
    labels, n = ndimage.label(np.asarray(mask) > 0, structure=np.ones((3, 3), dtype=bool))
    if n == 0:
        return []
    sizes = np.bincount(labels.ravel())[1:]
    return [labels == i + 1 for i in np.argsort(-sizes, kind="stable")]


def object_boxes(mask: np.ndarray) -> list[np.ndarray]:
    """One tight box per 8-connected component of a 2D mask, largest component first."""
    return [box_from_mask(m) for m in object_masks(mask)]


def scale_box(box: np.ndarray, scale: float) -> np.ndarray:
    """`box` in the coordinates of the image resized by `scale` (pixel centres: (p + 0.5) * s - 0.5)."""
    return (np.asarray(box, dtype=np.float64) + 0.5) * scale - 0.5


def union_box(a: np.ndarray | None, b: np.ndarray | None) -> np.ndarray | None:
    """Smallest box containing both (None counts as empty)."""
    if a is None:
        return None if b is None else np.asarray(b, dtype=np.float64).copy()
    if b is None:
        return np.asarray(a, dtype=np.float64).copy()
    return np.array([min(a[0], b[0]), min(a[1], b[1]), max(a[2], b[2]), max(a[3], b[3])], dtype=np.float64)


def key_slice(boxes: list[np.ndarray | None]) -> int | None:
    """Index of the slice whose box has the largest area (first on ties); None when every box is None."""
    areas = [box_area(b) for b in boxes]
    return int(np.argmax(areas)) if max(areas, default=0.0) > 0 else None


def propagation_order(n_slices: int, key: int) -> Iterator[tuple[int, int]]:
    """(slice, previous slice) pairs of box propagation from `key`: up key+1..n-1, then down key-1..0.

    Each slice is prompted with the box of the previous slice's prediction; the caller stops a direction
    when a prediction is empty (see `propagate`).
    """
    for z in range(key + 1, n_slices):
        yield z, z - 1
    for z in range(key - 1, -1, -1):
        yield z, z + 1


def propagate(n_slices: int, key: int, key_box: np.ndarray, predict_slice, margin: float = 0.0) -> dict[int, np.ndarray]:
    """Predict slice `key` with `key_box`, then walk up and down, each next box from the previous prediction.

    `predict_slice(z, box) -> mask (H, W) bool` (any per-slice predictor); a direction stops at the first
    empty prediction. `margin` pixels are added on every side of each propagated box (clipped to the
    slice): box-prompted models are trained on boxes somewhat larger than the object, and given the tight
    box of their own (slightly small) prediction they shrink slice after slice until nothing is left.
    Returns {slice: predicted mask} of every predicted slice (empty ones included).
    """
    out = {key: predict_slice(key, key_box)}
    stopped: set[int] = set()  # +1 (up) / -1 (down) once a prediction there was empty
    for z, prev in propagation_order(n_slices, key):
        direction = 1 if z > key else -1
        if direction in stopped:
            continue
        box = box_from_mask(out[prev])
        if box is None:
            stopped.add(direction)
            continue
        out[z] = predict_slice(z, pad_box(box, margin, out[prev].shape) if margin > 0 else box)
    return out
