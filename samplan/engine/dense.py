"""Dense prediction of one preprocessed case: Gaussian-weighted sliding windows (3D) or batched slices (2D).

The network sees exactly what it saw in training: 3D patches of the plan's patch size, or 2D slices
taken along axis 0 of the transposed volume (the planned slice axis). Windows overlap by half a patch;
their logits are blended with a Gaussian importance map. Mirroring test-time augmentation averages
the logits of every combination of flipped axes (2**n - 1 flips plus the original).
"""
from __future__ import annotations

import itertools
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from samplan.devices import resolve_device
from samplan.engine.sliding_window import DEFAULT_STEP_SIZE, gaussian_importance_map, pad_to_patch, window_starts
from samplan.preprocessing.preprocessor import configuration_plan

# upper bound of input voxels (channels x window voxels x batch) sent to the network at once
_MAX_BATCH_VOXELS = 2**23
# float32 logits of a whole case above this size are returned as float16 (14 classes on a 512x512x600 CT: 8.8 GB
# in float32); float16 keeps 11 significant bits, so only a near-tie of two logits can change a voxel's label
FLOAT32_LOGITS_MAX_BYTES = 2**31
_FLOAT16_MAX = 65504.0


def network_output(output: Any) -> torch.Tensor:
    """Full-resolution logits of a network output: deep-supervision networks return a list (highest resolution first)."""
    return output[0] if isinstance(output, (list, tuple)) else output


def flip_combinations(mirror_axes: Sequence[int], n_spatial: int) -> list[tuple[int, ...]]:
    """Every non-empty set of flipped tensor dims for `(B, C, *spatial)` input, from spatial `mirror_axes`."""
    axes = sorted({int(a) for a in mirror_axes})
    if axes and (axes[0] < 0 or axes[-1] >= n_spatial):
        raise ValueError(f"mirror axes {tuple(mirror_axes)} do not fit a network input with {n_spatial} spatial axes")
    dims = [a + 2 for a in axes]
    return [c for k in range(1, len(dims) + 1) for c in itertools.combinations(dims, k)]


def predict_with_mirroring(network: nn.Module, x: torch.Tensor, mirror_axes: Sequence[int] = ()) -> torch.Tensor:
    """Logits `(B, K, *spatial)` of `x` `(B, C, *spatial)`, averaged over the mirrored copies of `x`."""
    out = network_output(network(x)).float()
    combos = flip_combinations(mirror_axes, x.ndim - 2)
    for dims in combos:
        out += torch.flip(network_output(network(torch.flip(x, dims))).float(), dims)
    if combos:
        out /= len(combos) + 1
    return out


# no_grad rather than inference_mode: callers may update the returned logits in place (fold averaging)
@torch.no_grad()
def predict_dense(
    network: nn.Module,
    data: torch.Tensor | np.ndarray,
    plans: dict[str, Any],
    configuration: str,
    *,
    mirror_axes: Sequence[int] = (),
    device: str | torch.device = "cpu",
    step_size: float = DEFAULT_STEP_SIZE,
    batch_size: int | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Logits `(K, Z, Y, X)` on the CPU for one preprocessed case `(C, Z, Y, X)` (transposed order).

    A 3-entry patch size means 3D windows; a 2-entry one means slices along axis 0, `batch_size` of them
    (default: the plan's batch size, capped so that a batch stays under ~32 MB of input) per forward pass.
    Images smaller than the patch are zero-padded (centred) and the padding is cut off again. `mirror_axes`
    are spatial axes of the network input (3D: 0..2 = Z, Y, X; 2D: 0..1 = Y, X); empty disables TTA.
    For networks that return a list (deep supervision), only the first, full-resolution output is used.
    Windows are summed in float32 over a band of one window's depth (see _BandAccumulator); the result is
    float32, or float16 when a float32 one would exceed FLOAT32_LOGITS_MAX_BYTES (`out_dtype` forces one). Known
    large cases (and `out_dtype=torch.float16`) add each window's normalised share straight into float16 logits
    (_Float16Accumulator): no band, one window per forward pass.
    """
    plan = configuration_plan(plans, configuration)
    patch = tuple(int(p) for p in plan["patch_size"])
    device = resolve_device(device)
    data = torch.as_tensor(data, dtype=torch.float32)
    if data.ndim != 4:
        raise ValueError(f"predict_dense expects one case (C, Z, Y, X), got shape {tuple(data.shape)}")
    slices_2d = len(patch) == 2
    window = (1, *patch) if slices_2d else patch
    padded, keep = pad_to_patch(data, window)
    starts = window_starts(padded.shape[1:], window, step_size, slice_axis_every_voxel=slices_2d)
    gaussian = gaussian_importance_map(patch).reshape(window)
    if batch_size is None:
        batch_size = int(plan.get("batch_size", 1))
    batch_size = max(1, min(batch_size, _MAX_BATCH_VOXELS // max(1, data.shape[0] * int(np.prod(window)))))
    if out_dtype is None and not slices_2d and _large_case(network, data, window, padded.shape[1:]):
        # a case too large for float32 logits: one window at a time halves the network's activations (~2 GB for
        # two 128^3 windows of a U-Net), which would otherwise come on top of the logits and the band
        batch_size, out_dtype = 1, torch.float16

    network = network.to(device).eval()
    gaussian_dev = gaussian.to(device)
    accumulator: _BandAccumulator | _Float16Accumulator | None = None
    # precision (autocast) is the caller's choice, e.g. Predictor(precision=...)
    for b0 in range(0, len(starts), batch_size):
        batch_starts = starts[b0 : b0 + batch_size]
        boxes = [tuple(slice(s, s + w) for s, w in zip(st, window)) for st in batch_starts]
        x = torch.stack([padded[(slice(None), *box)] for box in boxes]).to(device)
        if slices_2d:
            x = x[:, :, 0]  # (B, C, 1, y, x) -> (B, C, y, x)
        out = predict_with_mirroring(network, x, mirror_axes)
        if slices_2d:
            out = out[:, :, None]
        out = (out * gaussian_dev).cpu()
        if accumulator is None and out_dtype == torch.float16:
            accumulator = _Float16Accumulator(out.shape[1], padded.shape[1:], keep, window, starts)
        elif accumulator is None:
            accumulator = _BandAccumulator(out.shape[1], padded.shape[1:], keep, window[0], out_dtype)
        for box, o in zip(boxes, out):
            accumulator.add(box, o, gaussian)
    return accumulator.finish()


def row_slabs(array: torch.Tensor | np.ndarray, max_voxels: int = 1 << 24) -> list[slice]:
    """Slices along axis 1 of a `(K, Z, ...)` array, each holding at most about `max_voxels` values of all K."""
    per_row = max(1, int(np.prod(array.shape)) // max(int(array.shape[1]), 1))
    rows = max(1, max_voxels // per_row)
    return [slice(z, z + rows) for z in range(0, int(array.shape[1]), rows)]


def _large_case(network: nn.Module, data: torch.Tensor, window: Sequence[int], padded: Sequence[int]) -> bool:
    """True when the case's float32 logits would exceed FLOAT32_LOGITS_MAX_BYTES (the output count from one window)."""
    probe = getattr(network, "num_classes", None) or getattr(getattr(network, "decoder", None), "num_classes", None)
    if probe is None:
        return False  # unknown until the first window: logits_dtype decides the output dtype then
    return logits_dtype(int(probe), [int(p) for p in padded]) == torch.float16


def logits_dtype(num_outputs: int, spatial_shape: Sequence[int]) -> torch.dtype:
    """float32, or float16 when float32 logits of the whole case would exceed FLOAT32_LOGITS_MAX_BYTES."""
    nbytes = 4 * int(num_outputs) * int(np.prod([int(s) for s in spatial_shape]))
    return torch.float32 if nbytes <= FLOAT32_LOGITS_MAX_BYTES else torch.float16


def _ring_pieces(z0: int, z1: int, depth: int) -> list[tuple[slice, slice]]:
    """(ring slice, offset slice) pairs that cover slices [z0, z1) of a ring buffer of `depth` slices."""
    pieces, z = [], z0
    while z < z1:
        r = z % depth
        n = min(z1 - z, depth - r)
        pieces.append((slice(r, r + n), slice(z - z0, z - z0 + n)))
        z += n
    return pieces


class _BandAccumulator:
    """Gaussian-weighted window sums over a band of `depth` slices (a ring buffer along axis 0).

    Windows arrive sorted by their first slice (window_starts is z-major), so every slice in front of the
    newest window's first slice is final: it is divided by its weight sum, written to the output and its ring
    slots are reused. Each voxel sees the same float32 additions in the same order as a whole-volume
    accumulator, so float32 output is bit-identical to one; memory is K x depth slices instead of K x Z.
    """

    def __init__(self, channels: int, padded_shape: Sequence[int], keep: tuple[slice, ...], depth: int,
                 out_dtype: torch.dtype | None) -> None:
        self.depth, self.keep, self.next_final = int(depth), keep, 0
        self.total = int(padded_shape[0])
        kept_shape = [k.stop - k.start for k in keep]
        self.out_dtype = out_dtype or logits_dtype(channels, kept_shape)
        self.out = torch.empty((channels, *kept_shape), dtype=self.out_dtype)
        self.sums = torch.zeros((channels, self.depth, *padded_shape[1:]), dtype=torch.float32)
        self.weights = torch.zeros((self.depth, *padded_shape[1:]), dtype=torch.float32)

    def add(self, box: tuple[slice, ...], values: torch.Tensor, gaussian: torch.Tensor) -> None:
        """Add one window's weighted logits `(K, *window)` (already multiplied by `gaussian`) at `box`."""
        self._finalise(box[0].start)
        rest = box[1:]
        for ring, offset in _ring_pieces(box[0].start, box[0].stop, self.depth):
            self.sums[(slice(None), ring, *rest)] += values[:, offset]
            self.weights[(ring, *rest)] += gaussian[offset]

    def finish(self) -> torch.Tensor:
        """The logits `(K, *kept shape)` once every window was added."""
        self._finalise(self.total)
        return self.out

    def _finalise(self, z_end: int) -> None:
        """Write slices [next_final, z_end) to the output, one at a time (small temporaries), and clear their slots."""
        kz = self.keep[0]
        for z in range(self.next_final, z_end):
            r = z % self.depth
            if kz.start <= z < kz.stop:
                piece = self.sums[(slice(None), r, *self.keep[1:])] / self.weights[(r, *self.keep[1:])]
                if self.out_dtype == torch.float16:  # beyond float16's range a logit would become +-inf
                    piece = piece.clamp_(-_FLOAT16_MAX, _FLOAT16_MAX)
                self.out[:, z - kz.start] = piece
            self.sums[:, r] = 0
            self.weights[r] = 0
        self.next_final = max(self.next_final, z_end)


class _Float16Accumulator:
    """Each window's share of the Gaussian-weighted mean, added straight into float16 logits `(K, *kept shape)`.

    The weight sum of a voxel depends only on the window layout: window starts form a grid and the Gaussian is a
    product of 1D profiles, so the sum is the product of three 1D sums. A window's logits (already multiplied by the
    Gaussian) divided by that sum are its final share; adding the shares in float16 needs neither a float32 band
    (K x one window depth of slices: 1.9 GB for 14 classes on a 512x512 grid) nor a weight volume. A voxel sums at
    most 2 shares per axis, each rounded to float16 (11 significant bits): the logits agree with float32 sums to
    about 1e-3 relative, so labels can differ only where two logits nearly tie.
    """

    def __init__(self, channels: int, padded_shape: Sequence[int], keep: tuple[slice, ...], window: Sequence[int],
                 starts: Sequence[Sequence[int]]) -> None:
        self.keep = keep
        self.out = torch.zeros((channels, *(k.stop - k.start for k in keep)), dtype=torch.float16)
        self.sums = []  # per axis: the 1D weight sum over the window starts of that axis
        for axis, (n, w) in enumerate(zip(padded_shape, window)):
            profile = gaussian_importance_map((int(w),)) if w > 1 else torch.ones(1)
            total = torch.zeros(int(n))
            for s in sorted({int(st[axis]) for st in starts}):
                total[s : s + int(w)] += profile
            self.sums.append(total)

    def add(self, box: tuple[slice, ...], values: torch.Tensor, gaussian: torch.Tensor) -> None:
        """Add one window's weighted logits `(K, *window)` at `box` (padded coordinates)."""
        wz, wy, wx = (t[b] for t, b in zip(self.sums, box))
        share = values / (wz[:, None, None] * wy[None, :, None] * wx[None, None, :])
        inner, target = [], []
        for b, k in zip(box, self.keep):  # the part of the window inside the kept (unpadded) region
            lo, hi = max(b.start, k.start), min(b.stop, k.stop)
            if hi <= lo:
                return
            inner.append(slice(lo - b.start, hi - b.start))
            target.append(slice(lo - k.start, hi - k.start))
        piece = share[(slice(None), *inner)].clamp_(-_FLOAT16_MAX, _FLOAT16_MAX)
        self.out[(slice(None), *target)] += piece.half()

    def finish(self) -> torch.Tensor:
        """The logits once every window was added."""
        return self.out.clamp_(-_FLOAT16_MAX, _FLOAT16_MAX)
