"""Sliding-window geometry: window start positions, the Gaussian importance map, padding small images.

All sizes are spatial and in the transposed axis order of the plan. A window covers `patch` voxels
starting at a position returned by `compute_steps`; overlapping windows are blended with the Gaussian
map so that voxels near a window's border (less context) count less than voxels near its centre.
"""
from __future__ import annotations

import math
from functools import lru_cache
from typing import Sequence

import numpy as np
import torch

# nnU-Net's defaults: windows overlap by half a patch, Gaussian sigma = patch / 8
DEFAULT_STEP_SIZE = 0.5
SIGMA_SCALE = 1.0 / 8


def compute_steps(image_size: Sequence[int], patch_size: Sequence[int], step_size: float = DEFAULT_STEP_SIZE) -> list[list[int]]:
    """Start positions of the windows along each axis so that `patch_size` windows cover `image_size`.

    nnU-Net's rule: the fewest windows whose spacing is at most `step_size * patch`, spread evenly from 0
    to `image - patch` (both ends included, positions rounded). The image must be at least as large as the
    patch on every axis (pad it first, see `pad_to_patch`).
    """
    if len(image_size) != len(patch_size):
        raise ValueError(f"image size {tuple(image_size)} and patch size {tuple(patch_size)} differ in length")
    if not 0 < step_size <= 1:
        raise ValueError(f"step_size must be in (0, 1], got {step_size}")
    steps = []
    for n, p in zip(image_size, patch_size):
        if n < p:
            raise ValueError(f"image size {tuple(image_size)} is smaller than the patch {tuple(patch_size)}; pad it first")
        last = n - p
        count = math.ceil(last / (p * step_size)) + 1
        stride = last / (count - 1) if count > 1 else 0.0
        # distinct positions only: with patch * step_size < 1 voxel, rounding would repeat windows
        steps.append(sorted({int(np.round(stride * i)) for i in range(count)}))
    return steps


@lru_cache(maxsize=4)
def _gaussian_numpy(patch_size: tuple[int, ...], sigma_scale: float) -> np.ndarray:
    """float32 Gaussian of `patch_size`, centred, peak 1 (cached; never modified in place)."""
    g = np.ones((), dtype=np.float64)
    for n in patch_size:
        # centred on the geometric middle ((n-1)/2, not n//2 as nnU-Net) so that the map is exactly mirror
        # symmetric: a mirrored window then gets the same weights, which keeps mirroring TTA consistent
        x = np.arange(n, dtype=np.float64) - (n - 1) / 2.0
        sigma = max(n * sigma_scale, 1e-6)
        g = np.multiply.outer(g, np.exp(-0.5 * (x / sigma) ** 2))
    g = (g / g.max()).astype(np.float32)
    # a zero weight would make voxels seen only at a window corner divide 0 by 0
    tiny = np.finfo(np.float32).tiny * 1e6
    g[g < tiny] = g[g >= tiny].min()
    g.setflags(write=False)
    return g


def gaussian_importance_map(patch_size: Sequence[int], sigma_scale: float = SIGMA_SCALE) -> torch.Tensor:
    """Gaussian weights of one window: float32 tensor of shape `patch_size`, 1 at the centre, > 0 everywhere."""
    return torch.from_numpy(_gaussian_numpy(tuple(int(p) for p in patch_size), float(sigma_scale)).copy())


def pad_to_patch(data: torch.Tensor, patch_size: Sequence[int]) -> tuple[torch.Tensor, tuple[slice, ...]]:
    """Zero-pad the trailing spatial axes of `(C, *spatial)` data to at least `patch_size`, centred.

    Returns the padded tensor (the input itself when no padding is needed) and the spatial slices that
    cut the original region back out of anything on the padded grid.
    """
    spatial = data.shape[1:]
    if len(spatial) != len(patch_size):
        raise ValueError(f"data of shape {tuple(data.shape)} does not match patch size {tuple(patch_size)}")
    before = [max(p - n, 0) // 2 for n, p in zip(spatial, patch_size)]
    after = [max(p - n, 0) - b for n, p, b in zip(spatial, patch_size, before)]
    keep = tuple(slice(b, b + n) for b, n in zip(before, spatial))
    if not any(before) and not any(after):
        return data, keep
    # torch.nn.functional.pad lists the pads from the last axis backwards
    pads = [v for b, a in zip(reversed(before), reversed(after)) for v in (b, a)]
    return torch.nn.functional.pad(data, pads, mode="constant", value=0.0), keep


def window_starts(
    image_size: Sequence[int], patch_size: Sequence[int], step_size: float = DEFAULT_STEP_SIZE, slice_axis_every_voxel: bool = False
) -> list[tuple[int, ...]]:
    """Every window start `(z, y, x)`; with `slice_axis_every_voxel`, axis 0 takes every position (2D slices)."""
    if slice_axis_every_voxel:
        steps = [list(range(image_size[0] - patch_size[0] + 1)), *compute_steps(image_size[1:], patch_size[1:], step_size)]
    else:
        steps = compute_steps(image_size, patch_size, step_size)
    grids = np.meshgrid(*[np.asarray(s) for s in steps], indexing="ij")
    return [tuple(int(v) for v in pos) for pos in zip(*(g.ravel() for g in grids))]
