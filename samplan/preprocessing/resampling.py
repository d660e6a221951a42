"""Resample images, label maps and class probabilities to a new voxel grid (nnU-Net's rules, faster).

Arrays are channel-first `(C, Z, Y, X)`; spacings are in the same axis order. The rules are nnU-Net's
default resampling: spline order 3 for images, per-label order 1 for label maps (each label's indicator
is interpolated and the highest score wins; exact ties go to the nearest-neighbour label), values clipped
to the input range, and, when one axis is much coarser than the others (spacing ratio > 3), in-plane
interpolation slice by slice followed by order `order_z` (0: nearest) along that coarse axis.

Why it is fast: a spline resize along one axis is a linear map, i.e. a small `(n_out, n_in)` matrix. We
build that matrix once with scipy's own zoom (so the weights and borders are scipy's, which is what
skimage.transform.resize calls), and apply the three axes one after another as banded matrix products
(float32 for images, float64 for label scores). On a BraTS case (2 x 155x240x240 to 1.5 mm) that is
~25x faster than skimage's resize for the images and ~3x for the label map, with the same values up to
float32 rounding and the same labels. Work is channel by channel and label by label (each label only
inside its bounding box), so peak memory stays a few output-sized arrays.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property, lru_cache
from typing import Iterator, Sequence

import numpy as np
from scipy import ndimage
from threadpoolctl import threadpool_limits


# an axis counts as "out of plane" when its spacing is more than this many times the finest one (nnU-Net's value)
ANISO_THRESHOLD = 3.0

Spacing = Sequence[float]


def compute_new_shape(old_shape: Sequence[int], old_spacing: Spacing, new_spacing: Spacing) -> list[int]:
    """Voxel counts after resampling from `old_spacing` to `new_spacing`: round(old_shape * old / new) per axis."""
    if not len(old_shape) == len(old_spacing) == len(new_spacing):
        raise ValueError(f"shape {old_shape}, old spacing {old_spacing} and new spacing {new_spacing} differ in length")
    return [int(round(s * o / n)) for s, o, n in zip(old_shape, old_spacing, new_spacing)]


def _coarse_axes(spacing: Spacing) -> list[int]:
    """Axes whose spacing equals the largest one."""
    sp = np.asarray(spacing, dtype=float)
    return [int(a) for a in np.flatnonzero(sp == sp.max())]


def _is_anisotropic(spacing: Spacing, threshold: float) -> bool:
    sp = np.asarray(spacing, dtype=float)
    return bool(sp.max() / sp.min() > threshold)


def separate_z_axis(
    current_spacing: Spacing, new_spacing: Spacing, force_separate_z: bool | None = None, threshold: float = ANISO_THRESHOLD
) -> int | None:
    """The axis to resample on its own (with `order_z`), or None for plain 3D resampling.

    With `force_separate_z` None the current spacing decides first, then the target spacing; an axis is
    only separated when exactly one axis is the coarsest.
    """
    if force_separate_z is not None:
        axes = _coarse_axes(current_spacing) if force_separate_z else []
    elif _is_anisotropic(current_spacing, threshold):
        axes = _coarse_axes(current_spacing)
    elif _is_anisotropic(new_spacing, threshold):
        axes = _coarse_axes(new_spacing)
    else:
        axes = []
    return axes[0] if len(axes) == 1 else None


def resample(
    data: np.ndarray,
    new_shape: Sequence[int],
    current_spacing: Spacing,
    new_spacing: Spacing,
    is_seg: bool = False,
    order: int = 3,
    order_z: int = 0,
    force_separate_z: bool | None = None,
) -> np.ndarray:
    """Resample `(C, Z, Y, X)` data (or an integer label map when `is_seg`) to `(C, *new_shape)`.

    The spacings only decide whether one axis is resampled separately. Images come back float32 (float64
    input stays float64), label maps keep their integer dtype and only contain values of the input. When
    the shape does not change the input array itself is returned.
    """
    data = np.asarray(data)
    if data.ndim != 4:
        raise ValueError(f"resample expects channel-first (C, Z, Y, X) data, got shape {data.shape}")
    new_shape = tuple(int(s) for s in new_shape)
    if len(new_shape) != 3:
        raise ValueError(f"new_shape must have 3 entries (Z, Y, X), got {new_shape}")
    if tuple(data.shape[1:]) == new_shape:
        return data
    axis = separate_z_axis(current_spacing, new_spacing, force_separate_z)
    out_dtype = data.dtype if (is_seg or data.dtype == np.float64) else np.float32
    out = np.empty((data.shape[0], *new_shape), dtype=out_dtype)
    # one BLAS thread: the products are many and small, and threads made them ~7x slower (measured on 2 cores);
    # parallelism comes from processing several cases at once
    with threadpool_limits(limits=1, user_api="blas"):
        for c in range(data.shape[0]):
            if is_seg:
                out[c] = _resample_labels(data[c], new_shape, order, axis, order_z)
            else:
                out[c] = _resample_image(data[c], new_shape, order, axis, order_z)
    return out


def resample_to_spacing(
    data: np.ndarray, current_spacing: Spacing, new_spacing: Spacing, **kwargs
) -> np.ndarray:
    """`resample` to the shape that `new_spacing` implies (see compute_new_shape)."""
    new_shape = compute_new_shape(data.shape[1:], current_spacing, new_spacing)
    return resample(data, new_shape, current_spacing, new_spacing, **kwargs)


def resample_probabilities(
    probabilities,
    new_shape: Sequence[int],
    current_spacing: Spacing,
    new_spacing: Spacing,
    is_seg: bool = False,
    order: int = 1,
    order_z: int = 0,
    force_separate_z: bool | None = None,
) -> np.ndarray:
    """Resample per-class probabilities or logits `(K, Z, Y, X)` (numpy or torch, float) for export -> float32 numpy.

    Same API and rules as `resample`, with order 1 by default (the plan's resampling_fn_probabilities_kwargs).
    """
    if hasattr(probabilities, "detach"):  # a torch tensor; torch stays an optional import here
        probabilities = probabilities.detach().float().cpu().numpy()
    probabilities = np.asarray(probabilities)
    if probabilities.dtype != np.float32:
        probabilities = probabilities.astype(np.float32)
    return resample(probabilities, new_shape, current_spacing, new_spacing, is_seg, order, order_z, force_separate_z)


def resample_channels(
    probabilities,
    new_shape: Sequence[int],
    current_spacing: Spacing,
    new_spacing: Spacing,
    order: int = 1,
    order_z: int = 0,
    force_separate_z: bool | None = None,
) -> Iterator[np.ndarray]:
    """Resample float `(K, Z, Y, X)` data (numpy or torch) one channel at a time: yields K float32 `new_shape` arrays
    (a float16 channel whose shape does not change stays float16).

    The values are exactly those of `resample_probabilities` (the same per-channel code), but only one
    output channel exists at a time: export's memory then grows with one class, not with K. A channel
    whose shape does not change is yielded as it is (possibly a view of the input: do not write to it).
    """
    if probabilities.ndim != 4:
        raise ValueError(f"resample_channels expects channel-first (K, Z, Y, X) data, got shape {tuple(probabilities.shape)}")
    new_shape = tuple(int(s) for s in new_shape)
    axis = separate_z_axis(current_spacing, new_spacing, force_separate_z)
    for c in range(probabilities.shape[0]):
        channel = probabilities[c]
        if hasattr(channel, "detach"):  # torch, converted channel by channel so that no float32 copy of all K exists
            channel = channel.detach().cpu().numpy()
        if channel.shape == new_shape and channel.dtype in (np.float16, np.float32):
            yield channel  # float16 stays float16: converting it would add nothing but a float32 copy
            continue
        channel = np.asarray(channel, dtype=np.float32)
        if channel.shape == new_shape:
            yield channel
            continue
        with threadpool_limits(limits=1, user_api="blas"):  # see resample
            out = _resample_image(channel, new_shape, order, axis, order_z)
        yield out



@lru_cache(maxsize=64)
def _zoom_operator(n_in: int, n_out: int, order: int) -> AxisOperator:
    """The 1D resize n_in -> n_out as scipy's grid-mode zoom with edge extension does it (what skimage's resize uses)."""
    if order == 0:
        idx = ndimage.zoom(np.arange(n_in, dtype=float), n_out / n_in, order=0, mode="nearest", grid_mode=True)
        return AxisOperator(index=idx.astype(np.intp))
    # resizing the identity along its rows gives the matrix whose columns are the resized unit impulses
    return AxisOperator(matrix=ndimage.zoom(np.eye(n_in), (n_out / n_in, 1.0), order=order, mode="nearest", grid_mode=True))


@lru_cache(maxsize=64)
def _coordinate_operator(n_in: int, n_out: int, order: int) -> AxisOperator:
    """The 1D resize n_in -> n_out along the separated axis: sample at pixel-centre coordinates (nnU-Net's z step)."""
    coords = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
    if order == 0:
        idx = ndimage.map_coordinates(np.arange(n_in, dtype=float), [coords], order=0, mode="nearest")
        return AxisOperator(index=np.rint(idx).astype(np.intp))
    rows, cols = np.meshgrid(coords, np.arange(n_in, dtype=float), indexing="ij")
    w = ndimage.map_coordinates(np.eye(n_in), [rows, cols], order=order, mode="nearest")
    return AxisOperator(matrix=w)


def _plan_axes(shape: tuple[int, ...], new_shape: tuple[int, ...], order: int, axis: int | None) -> dict[int, AxisOperator]:
    """Operators of the first pass: every changing axis, or only the in-plane ones when `axis` is separated."""
    return {a: _zoom_operator(shape[a], new_shape[a], order) for a in range(3) if a != axis and shape[a] != new_shape[a]}


def _resample_image(x: np.ndarray, new_shape: tuple[int, ...], order: int, axis: int | None, order_z: int) -> np.ndarray:
    """One image channel `(Z, Y, X)` -> float32 `new_shape` (float64 stays float64)."""
    dtype = np.float64 if x.dtype == np.float64 else np.float32
    x = x.astype(dtype, copy=False)
    first = _plan_axes(x.shape, new_shape, order, axis)
    y = apply_axes(x, first, dtype)
    if first:
        if axis is None:
            # skimage's resize clips to the range of what it was given: the whole channel
            np.clip(y, x.min(), x.max(), out=y)
        else:
            # ... or, slice by slice along the separated axis, the range of each slice
            inplane = tuple(a for a in range(3) if a != axis)
            np.clip(y, x.min(axis=inplane, keepdims=True), x.max(axis=inplane, keepdims=True), out=y)
    if axis is not None and x.shape[axis] != new_shape[axis]:
        y = apply_axes(y, {axis: _coordinate_operator(x.shape[axis], new_shape[axis], order_z)}, dtype)
    return y


def _resample_labels(seg: np.ndarray, new_shape: tuple[int, ...], order: int, axis: int | None, order_z: int) -> np.ndarray:
    """One label map `(Z, Y, X)` -> `new_shape`, same dtype, only values present in the input."""
    labels = present_labels(seg)
    if len(labels) == 1:
        return np.full(new_shape, labels[0], dtype=seg.dtype)
    first = _plan_axes(seg.shape, new_shape, order, axis)
    if order == 0 or not first:
        y = apply_axes(seg, first, seg.dtype)
    else:
        nearest = {a: _zoom_operator(seg.shape[a], new_shape[a], 0) for a in first}
        y = argmax_labels(seg, labels, first, nearest, clip=order > 1)
    if axis is not None and seg.shape[axis] != new_shape[axis]:
        op = _coordinate_operator(seg.shape[axis], new_shape[axis], order_z)
        if op.index is not None:
            y = apply_axes(y, {axis: op}, seg.dtype)
        else:
            y = threshold_labels(y, present_labels(y), axis, op)
    return y


# matrix weights below this are treated as zero (the cubic-spline weights decay geometrically; 1e-10 is far
# below float32 resolution) so that each output row only multiplies the input rows it really depends on
_TOL = 1e-10
# label scores in float64: which label wins a near-tie then matches nnU-Net (float64 scores) voxel for voxel;
# float32 flipped up to 7 voxels per Hippocampus case, at a cost of ~2x on the (cheap) label pass
_SCORE = np.float64
# output rows per matrix product: small blocks keep the multiplied column range (the band) narrow
_ROW_BLOCK = 32


@dataclass(frozen=True)
class AxisOperator:
    """A 1D resize: `index` (order 0, output i takes input index[i]) or `matrix` (n_out, n_in) float64 weights."""

    index: np.ndarray | None = None
    matrix: np.ndarray | None = None

    @property
    def n_out(self) -> int:
        return len(self.index) if self.index is not None else self.matrix.shape[0]

    @cached_property
    def blocks(self) -> list[tuple[int, int, int, int]]:
        """Row blocks `(r0, r1, c0, c1)`: output rows r0:r1 depend only on input rows c0:c1."""
        nonzero = np.abs(self.matrix) > _TOL
        out = []
        for r0 in range(0, self.n_out, _ROW_BLOCK):
            r1 = min(r0 + _ROW_BLOCK, self.n_out)
            cols = np.flatnonzero(nonzero[r0:r1].any(axis=0))
            out.append((r0, r1, int(cols[0]), int(cols[-1]) + 1))
        return out

    def restricted(self, lo: int, hi: int) -> tuple[int, int, "AxisOperator"] | None:
        """`(r0, r1, op)`: for input that is zero outside [lo, hi), output rows r0:r1 are op applied to input[lo:hi].

        None when no output row depends on input[lo:hi] (e.g. slices that a downsampling skips).
        """
        if self.index is not None:
            r0, r1 = (int(r) for r in np.searchsorted(self.index, [lo, hi]))
            return (r0, r1, AxisOperator(index=self.index[r0:r1] - lo)) if r1 > r0 else None
        rows = np.flatnonzero((np.abs(self.matrix[:, lo:hi]) > _TOL).any(axis=1))
        if rows.size == 0:
            return None
        r0, r1 = int(rows[0]), int(rows[-1]) + 1
        return r0, r1, AxisOperator(matrix=self.matrix[r0:r1, lo:hi])


def _apply_matrix(y: np.ndarray, op: AxisOperator, axis: int) -> np.ndarray:
    """Banded product of `op.matrix` with `y` along `axis` (3D, C-contiguous) -> new array of y's dtype."""
    shape = list(y.shape)
    shape[axis] = op.n_out
    out = np.empty(shape, dtype=y.dtype)
    w = op.matrix.astype(y.dtype, copy=False)
    if axis == 0:
        flat, flat_out = y.reshape(y.shape[0], -1), out.reshape(op.n_out, -1)
        for r0, r1, c0, c1 in op.blocks:
            np.matmul(w[r0:r1, c0:c1], flat[c0:c1], out=flat_out[r0:r1])
    elif axis == y.ndim - 1:
        flat, flat_out = y.reshape(-1, y.shape[-1]), out.reshape(-1, op.n_out)
        for r0, r1, c0, c1 in op.blocks:
            flat_out[:, r0:r1] = flat[:, c0:c1] @ w[r0:r1, c0:c1].T
    else:
        for r0, r1, c0, c1 in op.blocks:
            out[:, r0:r1] = np.matmul(w[r0:r1, c0:c1], y[:, c0:c1])
    return out


def apply_axes(x: np.ndarray, operators: dict[int, AxisOperator], dtype) -> np.ndarray:
    """Apply one 1D operator per axis of a 3D array (matrices computed in `dtype`), shrinking axes first."""
    y = np.ascontiguousarray(x)
    for axis in sorted(operators, key=lambda a: operators[a].n_out / x.shape[a]):
        op = operators[axis]
        if op.index is not None:
            y = np.take(y, op.index, axis=axis)
        else:
            y = _apply_matrix(np.ascontiguousarray(y, dtype=dtype), op, axis)
    return y


def present_labels(seg: np.ndarray) -> np.ndarray:
    """Sorted label values that occur in an integer label map."""
    return np.unique(seg)


def _label_boxes(seg: np.ndarray, labels: np.ndarray) -> list[tuple[slice, ...]]:
    """Bounding box (tuple of slices) of every label, in one pass over the map."""
    shifted = seg.astype(np.int32) - (int(labels[0]) - 1)  # find_objects wants labels 1..n
    objects = ndimage.find_objects(shifted)
    return [objects[int(lab) - int(labels[0])] for lab in labels]


def argmax_labels(
    seg: np.ndarray,
    labels: np.ndarray,
    operators: dict[int, AxisOperator],
    nearest: dict[int, AxisOperator],
    clip: bool,
) -> np.ndarray:
    """Interpolate each label's indicator; the highest score wins, exact ties go to the nearest-neighbour label."""
    out_shape = tuple(operators[a].n_out if a in operators else seg.shape[a] for a in range(3))
    nn = apply_axes(seg, nearest, seg.dtype)
    best = np.zeros(out_shape, dtype=_SCORE)
    nn_score = np.zeros(out_shape, dtype=_SCORE)
    winner = np.zeros(out_shape, dtype=np.int8 if len(labels) < 128 else np.int16)
    for i, (lab, box) in enumerate(zip(labels, _label_boxes(seg, labels))):
        # the indicator is zero outside the label's box, so only the output rows that see the box can change
        sub_ops, out_box = {}, []
        for a in range(3):
            lo, hi = box[a].start, box[a].stop
            part = operators[a].restricted(lo, hi) if a in operators else (lo, hi, None)
            if part is None:
                break  # the label only occupies input voxels that no output voxel samples
            out_box.append(slice(part[0], part[1]))
            if part[2] is not None:
                sub_ops[a] = part[2]
        if len(out_box) < 3:
            continue
        out_box = tuple(out_box)
        score = apply_axes((seg[box] == lab).astype(_SCORE), sub_ops, _SCORE)
        if clip:  # spline orders > 1 overshoot; skimage clips the indicator to its range [0, 1]
            np.clip(score, 0.0, 1.0, out=score)
        best_box = best[out_box]
        winner[out_box][score > best_box] = i
        np.maximum(best_box, score, out=best_box)
        is_nn = nn[out_box] == lab
        nn_score[out_box][is_nn] = score[is_nn]
    result = labels.astype(seg.dtype)[winner]
    # exact ties (every boundary voxel of an even-factor resize): prefer the nearest neighbour when it is among them
    tie = (nn_score == best) & (best > 0)
    result[tie] = nn[tie]
    return result


def threshold_labels(y: np.ndarray, labels: np.ndarray, axis: int, op: AxisOperator) -> np.ndarray:
    """Separated-axis step for label maps with order_z > 0: labels in ascending order claim voxels scoring > 0.5."""
    out = np.zeros(tuple(op.n_out if a == axis else y.shape[a] for a in range(3)), dtype=y.dtype)
    for lab in labels:
        score = apply_axes((y == lab).astype(_SCORE), {axis: op}, _SCORE)
        out[score > 0.5] = lab
    return out
