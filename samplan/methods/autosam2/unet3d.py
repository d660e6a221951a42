"""AutoSAM2's 3D U-Net: residual blocks with GroupNorm, four poolings, trilinear upsampling with skips, dropout.

Input `(B, C, Z, Y, X)` (the plan's transposed patch), output logits `(B, K, Z, Y, X)` and the decoder's
32-channel features at the third level (a quarter of the resolution along axes pooled twice), which the bridge of
the SAM branch reads. Sizes that do not divide by the pooling are fine: each upsampling goes to its skip's size.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with min(8, C) groups (the reference's choice)."""
    return nn.GroupNorm(min(8, channels), channels)


class ResidualBlock(nn.Module):
    """conv3 -> GN -> ReLU -> conv3 -> GN, plus the input (a 1x1x1 convolution when the width changes), then ReLU."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.body = nn.Sequential(nn.Conv3d(cin, cout, 3, padding=1, bias=False), group_norm(cout), nn.ReLU(inplace=True),
                                  nn.Conv3d(cout, cout, 3, padding=1, bias=False), group_norm(cout))
        self.skip = nn.Identity() if cin == cout else nn.Conv3d(cin, cout, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.body(x) + self.skip(x))


class UNet3D(nn.Module):
    """Stem (5x5x5 conv, GN, ReLU, residual block), four max-pool + residual stages, and a decoder of trilinear
    upsampling, skip concatenation and residual blocks (dropout after the first three), then a 1x1x1 head."""

    def __init__(self, in_channels: int, num_outputs: int, features: Sequence[int], pool_strides: Sequence[Sequence[int]],
                 stem_kernel: int = 5, dropout: float = 0.15):
        super().__init__()
        f = [int(c) for c in features]
        self.pool_strides = [tuple(int(s) for s in st) for st in pool_strides]
        self.stem = nn.Sequential(nn.Conv3d(in_channels, f[0], stem_kernel, padding=stem_kernel // 2, bias=False),
                                  group_norm(f[0]), nn.ReLU(inplace=True), ResidualBlock(f[0], f[0]))
        self.down = nn.ModuleList(ResidualBlock(f[i], f[i + 1]) for i in range(4))
        # decoder i joins the upsampled level 4-i with the skip of level 3-i
        widths = [f[4], f[2], f[1], f[0], f[0]]
        self.up = nn.ModuleList(ResidualBlock(widths[i] + f[3 - i], widths[i + 1]) for i in range(4))
        self.dropout = nn.Dropout3d(dropout)
        self.head = nn.Conv3d(f[0], num_outputs, 1)
        self.bridge_channels = widths[2]  # the second decoder output's width, handed to the bridge

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`(B, C, Z, Y, X)` -> (logits `(B, K, Z, Y, X)`, bridge features `(B, 32, Z', Y', X')`)."""
        skips = [self.stem(x)]
        for stride, block in zip(self.pool_strides, self.down):
            h = skips[-1]
            if any(s > 1 for s in stride) and all(n >= s for n, s in zip(h.shape[2:], stride)):
                h = F.max_pool3d(h, stride, stride)
            skips.append(block(h))
        h, bridge = skips.pop(), None
        for i, block in enumerate(self.up):
            skip = skips.pop()  # each level is released once used: lower peak memory on large windows
            h = F.interpolate(h, size=skip.shape[2:], mode="trilinear", align_corners=False)
            h = block(torch.cat([skip, h], 1))
            if i < 3:
                h = self.dropout(h)
            if i == 1:
                bridge = h
        return self.head(h), bridge
