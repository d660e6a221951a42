"""Cached slices -> SAM encoder input, and masks and logits between the slice grid and the input grid.

One pipeline for every SAM method (samunetr, medsam, samzeroshot; promise and autosam2 next), in the order
segment-anything's own ResizeLongestSide + Sam.preprocess use:
1. intensity rules (samplan.methods.sam_common.plan): cache values `(B, C, H, W)` -> [0, 1] per channel and slice;
2. channel selection: the cache channel feeding each encoder channel (repeat one, take R/G/B, or keep C);
3. resize so the longer side is S: SAM's rounding `int(side * S / max(H, W) + 0.5)`, bilinear, antialiased when
   shrinking (as `ResizeLongestSide.apply_image_torch`);
4. normalisation `(x * 255 - pixel_mean) / pixel_std`, skipped for encoders that take [0, 1] (MedSAM, LiteMedSAM);
5. zero padding at the bottom and right to S x S (after normalisation: the mean pixel for SAM, black for MedSAM).
All tensors are float32; boxes and points are `(x, y)` slice pixels, scaled with `scale_box` (pixel centres).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from samplan.methods.sam_common.plan import (IntensityRule, PercentileClipRule, ScaleRule, WindowMinMaxRule,
                                             WindowRule)

_QUANTILE_MAX = 1_000_000  # torch.quantile refuses inputs above 2**24 values; a strided subsample is plenty


@dataclass(frozen=True)
class SamInput:
    """How cached slices become an encoder's input: square size S, intensity rules (one per cache channel), the
    cache channel of each encoder channel, and pixel mean/std on 0..255 (None: the encoder takes [0, 1])."""

    input_size: int
    rules: Sequence[IntensityRule]
    channels: Sequence[int]
    pixel_mean: Sequence[float] | None = None
    pixel_std: Sequence[float] | None = None


def longest_side_shape(h: int, w: int, size: int) -> tuple[int, int]:
    """(h', w') with the longer side == size and the aspect ratio kept (segment-anything's rounding)."""
    scale = size / max(h, w)
    return max(1, int(h * scale + 0.5)), max(1, int(w * scale + 0.5))


def box_scale(h: int, w: int, size: int) -> float:
    """The factor from slice pixels to input pixels: S / max(H, W)."""
    return size / max(h, w)


def _percentile_clip(v: torch.Tensor, lower: float, upper: float, within_mask: bool) -> torch.Tensor:
    """Each slice of v `(B, H, W)` clipped to its percentiles and scaled to [0, 1]; outside the mask stays 0."""
    b = v.shape[0]
    flat = v.reshape(b, -1)
    mask = flat != 0 if within_mask else torch.ones_like(flat, dtype=torch.bool)
    mask = mask | ~mask.any(1, keepdim=True)  # an all-zero slice uses all its pixels
    vals = torch.where(mask, flat, torch.full_like(flat, float("nan")))
    vals = vals[:, :: max(1, vals.shape[1] // _QUANTILE_MAX)]
    q = torch.nanquantile(vals, torch.tensor([lower, upper], device=v.device) / 100.0, dim=1)  # (2, B)
    lo, hi = q[0].view(b, 1), q[1].view(b, 1)
    img = ((flat - lo) / (hi - lo).clamp_min(1e-8)).clamp(0, 1)
    return torch.where(mask, img, torch.zeros_like(img)).view_as(v)


def to_unit_range(x: torch.Tensor, rules: Sequence[IntensityRule]) -> torch.Tensor:
    """Cache values `(B, C, H, W)` -> float32 in [0, 1] per channel and slice, following the intensity rules."""
    if x.shape[1] != len(rules):
        raise ValueError(f"{x.shape[1]} channels but {len(rules)} intensity rules")
    out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    for c, rule in enumerate(rules):
        v = x[:, c].float()
        if isinstance(rule, WindowRule):
            lo, hi = rule.window
            out[:, c] = ((v - lo) / max(hi - lo, 1e-8)).clamp(0, 1)
        elif isinstance(rule, WindowMinMaxRule):
            lo, hi = rule.window
            out[:, c] = _percentile_clip(v.clamp(lo, hi), 0.0, 100.0, False)
        elif isinstance(rule, ScaleRule):
            out[:, c] = (v * float(rule.factor) / 255.0).clamp(0, 1)
        elif isinstance(rule, PercentileClipRule):
            out[:, c] = _percentile_clip(v, rule.lower_percentile, rule.upper_percentile, rule.within_mask)
        else:
            raise ValueError(f"unknown intensity rule {rule!r}")
    return out


def resize_longest_side(x: torch.Tensor, size: int) -> torch.Tensor:
    """x `(B, C, H, W)` -> `(B, C, h', w')` with the longer side `size`: bilinear, antialiased when shrinking."""
    h, w = longest_side_shape(x.shape[-2], x.shape[-1], size)
    if (h, w) == tuple(x.shape[-2:]):
        return x
    shrink = h < x.shape[-2] or w < x.shape[-1]
    return F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=shrink)


def encoder_input(slices: torch.Tensor, spec: SamInput) -> tuple[torch.Tensor, tuple[int, int]]:
    """Cache slices `(B, C, H, W)` -> (encoder input `(B, len(spec.channels), S, S)` float32, valid `(h', w')`)."""
    size = int(spec.input_size)
    x = to_unit_range(slices, spec.rules)[:, list(spec.channels)]
    x = resize_longest_side(x, size)
    h, w = x.shape[-2:]
    if spec.pixel_mean is not None:
        mean = torch.tensor(spec.pixel_mean, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(spec.pixel_std, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
        x = (x * 255.0 - mean) / std
    return F.pad(x, (0, size - w, 0, size - h)), (h, w)


def masks_to_input(masks: np.ndarray, size: int) -> torch.Tensor:
    """Binary masks `(B, H, W)` -> `(B, 1, S, S)` float32 on the encoder input grid (nearest, zero padding)."""
    m = torch.from_numpy(masks.astype(np.float32))[:, None]
    h, w = longest_side_shape(*masks.shape[-2:], size)
    if (h, w) != tuple(masks.shape[-2:]):
        m = F.interpolate(m, size=(h, w), mode="nearest")
    return F.pad(m, (0, size - w, 0, size - h))


def logits_at_input(logits: torch.Tensor, size: int) -> torch.Tensor:
    """Mask logits `(B, K, h, w)` (SAM's low resolution, or already S) -> `(B, K, S, S)` float32 (bilinear)."""
    logits = logits.float()
    if tuple(logits.shape[-2:]) == (size, size):
        return logits
    return F.interpolate(logits, (size, size), mode="bilinear", align_corners=False)


def logits_to_slice(logits: torch.Tensor, size: int, valid: tuple[int, int], out_hw: Sequence[int]) -> torch.Tensor:
    """Mask logits `(B, K, h, w)` -> `(B, K, H, W)` on the slice: to the input grid, crop the valid part, resize back
    (segment-anything's postprocess_masks)."""
    y = logits_at_input(logits, size)[..., : valid[0], : valid[1]]
    if tuple(y.shape[-2:]) != tuple(out_hw):
        y = F.interpolate(y, size=tuple(int(s) for s in out_hw), mode="bilinear", align_corners=False)
    return y
