"""The SAM branch's trainable adapters: the MRI-to-RGB mapper and the bridge from U-Net features to SAM's embedding.

Both are AutoSAM2's (methods.md), with two changes so that they can learn from the first step: the mapper refines
a sensible start image (the planned channels' [0, 1] images) instead of producing a random one, and the bridge's
output is added to SAM's image embedding with a small learnable scale (in the reference it only fed the prompt
generator, and neither module ever received a gradient).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_EPS = 1e-3


def _conv_gn_relu(cin: int, cout: int, groups: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.GroupNorm(groups, cout), nn.ReLU(inplace=True))


class MRIToRGBMapper(nn.Module):
    """C channels `(N, C, H, W)` + a start image `(N, 3, H, W)` in [0, 1] -> an RGB image `(N, 3, H, W)` in (0, 1).

    Three 3x3 conv + GroupNorm + ReLU layers, a spatial attention gate (1x1 conv, sigmoid, multiplied in) and a 1x1
    conv to 3 channels whose output is added to the logit of the start image before the sigmoid. The last conv starts
    near zero, so the first images SAM sees are the start images."""

    def __init__(self, in_channels: int, width: int = 16):
        super().__init__()
        groups = max(1, width // 4)
        self.features = nn.Sequential(_conv_gn_relu(in_channels, width, groups), _conv_gn_relu(width, width, groups),
                                      _conv_gn_relu(width, width, groups))
        self.gate = nn.Conv2d(width, 1, 1)
        self.to_rgb = nn.Conv2d(width, 3, 1)
        nn.init.normal_(self.to_rgb.weight, 0.0, 1e-3)
        nn.init.zeros_(self.to_rgb.bias)

    def forward(self, x: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
        h = self.features(x)
        h = h * torch.sigmoid(self.gate(h))
        return torch.sigmoid(self.to_rgb(h) + torch.logit(start.clamp(_EPS, 1 - _EPS)))


class ChannelAttention(nn.Module):
    """Squeeze-and-excitation: pooled channels -> C/r -> C, sigmoid, multiplied in."""

    def __init__(self, channels: int, reduction: int):
        super().__init__()
        hidden = max(1, channels // reduction)
        self.mlp = nn.Sequential(nn.Conv2d(channels, hidden, 1), nn.ReLU(inplace=True), nn.Conv2d(hidden, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.mlp(x.mean(dim=(2, 3), keepdim=True)))


class SpatialAttention(nn.Module):
    """A 7x7 conv of the channel mean and max to one map, sigmoid, multiplied in."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 1, 7, padding=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = torch.cat([x.mean(1, keepdim=True), x.amax(1, keepdim=True)], 1)
        return x * torch.sigmoid(self.conv(pooled))


class Bridge(nn.Module):
    """U-Net features `(N, Cu, h, w)` (already on SAM's embedding grid) -> `(N, D, h, w)` in the embedding space.

    Channel attention, spatial attention, two 3x3 conv + GroupNorm layers with a 1x1 residual, then a 1x1 conv to D
    channels, GroupNorm and a learnable per-channel scale starting at `initial_scale`."""

    def __init__(self, in_channels: int, out_channels: int, width: int = 128, reduction: int = 4,
                 initial_scale: float = 0.01):
        super().__init__()
        groups = min(16, width)
        self.channel = ChannelAttention(in_channels, reduction)
        self.spatial = SpatialAttention()
        self.body = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1, bias=False), nn.GroupNorm(groups, width),
                                  nn.ReLU(inplace=True), nn.Conv2d(width, width, 3, padding=1, bias=False),
                                  nn.GroupNorm(groups, width))
        self.shortcut = nn.Conv2d(in_channels, width, 1, bias=False)
        self.out = nn.Sequential(nn.Conv2d(width, out_channels, 1), nn.GroupNorm(min(32, out_channels), out_channels))
        self.scale = nn.Parameter(torch.full((1, out_channels, 1, 1), float(initial_scale)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.spatial(self.channel(x))
        h = F.relu(self.body(h) + self.shortcut(h))
        return self.out(h) * self.scale
