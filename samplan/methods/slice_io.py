"""Slice input/output for 2D SAM-family networks: intensity mapping, SAM-style resize + pad, and back.

Generic helpers (no method-specific state) for methods that feed slices of the preprocessed cache to a
network with a fixed square input S:

- `map_intensity`: cache values (B, C, H, W) -> 0..255 per channel, from a plan's list of per-channel
  rules ({"mode": "window" | "scale" | "percentile_clip", ...}; see samunetr.intensity_mapping).
  Percentiles are taken per sample (per slice), so training patches and inference slices see the same rule.
- `resize_longest_pad`: bilinear resize so that the longer side becomes S, then zero padding at the bottom
  and right (what segment-anything's ResizeLongestSide + preprocess do); returns the valid (h, w).
- `unpad_resize`: the inverse for network outputs: crop the valid (h, w) and resize bilinearly to (H, W).
- `SliceAdapter`: wraps a network (B, C', S, S) -> (B, K, S, S) so that it takes cache slices (B, C, H, W) of
  any size and returns logits (B, K, H, W); training steps, validation steps and the generic slice predictor
  can then use it like any 2D segmentation network.

All tensors are float32 (the adapter runs its pre/post-processing outside autocast).
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn


def longest_side_shape(h: int, w: int, size: int) -> tuple[int, int]:
    """(h', w') with the longer side == size and the aspect ratio kept (segment-anything's rounding)."""
    scale = size / max(h, w)
    return max(1, int(h * scale + 0.5)), max(1, int(w * scale + 0.5))


def resize_longest_pad(x: torch.Tensor, size: int, pad_value: float = 0.0) -> tuple[torch.Tensor, tuple[int, int]]:
    """x (B, C, H, W) -> ((B, C, size, size), valid (h', w')): bilinear resize of the longer side to `size`,
    then `pad_value` at the bottom/right."""
    h, w = longest_side_shape(x.shape[-2], x.shape[-1], size)
    if (h, w) != tuple(x.shape[-2:]):
        x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=False)
    return F.pad(x, (0, size - w, 0, size - h), value=pad_value), (h, w)


def unpad_resize(y: torch.Tensor, valid: tuple[int, int], out_hw: Sequence[int]) -> torch.Tensor:
    """y (B, K, S, S) -> (B, K, *out_hw): crop the valid top-left (h', w') and resize bilinearly."""
    y = y[..., : valid[0], : valid[1]]
    if tuple(y.shape[-2:]) != tuple(out_hw):
        y = F.interpolate(y, size=tuple(int(s) for s in out_hw), mode="bilinear", align_corners=False)
    return y


def _per_sample_quantiles(x: torch.Tensor, q: tuple[float, float], mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Low/high quantiles of each sample's (H, W) plane x (B, H, W) -> two (B, 1, 1) tensors; `mask` limits the pixels."""
    flat = x.reshape(x.shape[0], -1)
    qs = torch.tensor(q, dtype=flat.dtype, device=flat.device)
    if mask is None:
        vals = torch.quantile(flat, qs, dim=1)
    else:
        m = mask.reshape(mask.shape[0], -1)
        vals = torch.nanquantile(torch.where(m, flat, torch.full_like(flat, float("nan"))), qs, dim=1)
        vals = torch.nan_to_num(vals, nan=0.0)  # empty mask: the whole slice maps to 0
    return vals[0].view(-1, 1, 1), vals[1].view(-1, 1, 1)


def _to_range(x: torch.Tensor, lo: torch.Tensor | float, hi: torch.Tensor | float) -> torch.Tensor:
    """Clip x to [lo, hi] and map linearly to 0..255 (0 where hi <= lo)."""
    lo_t = torch.as_tensor(lo, dtype=x.dtype, device=x.device)
    hi_t = torch.as_tensor(hi, dtype=x.dtype, device=x.device)
    width = hi_t - lo_t
    out = (torch.minimum(torch.maximum(x, lo_t), hi_t) - lo_t) / torch.where(width > 0, width, torch.ones_like(width))
    return torch.where(width > 0, out, torch.zeros_like(out)) * 255.0


def map_intensity(x: torch.Tensor, rules: Sequence[dict[str, Any]]) -> torch.Tensor:
    """Cache values x (B, C, H, W) float32 -> 0..255 per channel c by rules[c].

    "window": clip to rule["window"] (cache units) and scale; "scale": x * rule["factor"] clipped to 0..255;
    "percentile_clip": clip each sample to its rule["lower_percentile"]/["upper_percentile"] (in %) and scale,
    the percentiles taken over nonzero pixels when rule["within_mask"] (the cache is 0 outside the mask).
    """
    if x.shape[1] != len(rules):
        raise ValueError(f"{x.shape[1]} channels but {len(rules)} intensity rules")
    out = []
    for c, rule in enumerate(rules):
        v = x[:, c]
        mode = rule["mode"]
        if mode == "window":
            lo, hi = rule["window"]
            out.append(_to_range(v, float(lo), float(hi)))
        elif mode == "scale":
            out.append((v * float(rule["factor"])).clamp(0.0, 255.0))
        elif mode == "percentile_clip":
            mask = (v != 0) if rule.get("within_mask") else None
            lo, hi = _per_sample_quantiles(v, (rule["lower_percentile"] / 100.0, rule["upper_percentile"] / 100.0), mask)
            mapped = _to_range(v, lo, hi)
            out.append(mapped if mask is None else mapped * mask)
        else:
            raise ValueError(f"unknown intensity mode {mode!r}")
    return torch.stack(out, dim=1)


class SliceAdapter(nn.Module):
    """Cache slices (B, C, H, W) -> logits (B, K, H, W) through a square-input network (B, C', S, S) -> (B, K, S, S).

    Steps: map_intensity (0..255) -> repeat channels to `in_chans` when C == 1 < in_chans -> normalise with
    pixel mean/std -> resize_longest_pad (zero padding = the mean pixel, as in segment-anything) -> network
    -> unpad_resize back to (H, W). Only `network` holds parameters; the adapter's constants are not saved.
    """

    def __init__(self, network: nn.Module, input_size: int, intensity_rules: Sequence[dict[str, Any]],
                 pixel_mean: Sequence[float], pixel_std: Sequence[float], in_chans: int):
        super().__init__()
        self.network = network
        self.input_size = int(input_size)
        self.intensity_rules = [dict(r) for r in intensity_rules]
        self.in_chans = int(in_chans)
        if len(pixel_mean) != self.in_chans or len(pixel_std) != self.in_chans:
            raise ValueError(f"pixel statistics need {self.in_chans} entries, got {len(pixel_mean)}/{len(pixel_std)}")
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def prepare(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Cache slices (B, C, H, W) -> (network input (B, in_chans, S, S) float32, valid (h', w'))."""
        x = map_intensity(x.float(), self.intensity_rules)
        if x.shape[1] == 1 and self.in_chans > 1:
            x = x.expand(-1, self.in_chans, -1, -1)
        if x.shape[1] != self.in_chans:
            raise ValueError(f"the network takes {self.in_chans} channels, the data has {x.shape[1]}")
        x = (x - self.pixel_mean) / self.pixel_std
        return resize_longest_pad(x, self.input_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) cache slices -> (B, K, H, W) logits."""
        with torch.autocast(x.device.type, enabled=False):
            inp, valid = self.prepare(x)
        out = self.network(inp)
        with torch.autocast(x.device.type, enabled=False):
            return unpad_resize(out.float(), valid, x.shape[-2:])
