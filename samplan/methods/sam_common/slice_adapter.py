"""SliceAdapter: a square-input SAM-family network used like any 2D segmentation network on cached slices.

Training steps, validation steps and the generic slice predictor (samplan.engine.dense) then work unchanged, and
losses and pseudo Dice are computed at the slice resolution of the cache.
"""
from __future__ import annotations

import torch
from torch import nn

from samplan.methods.sam_common.slice_input import SamInput, encoder_input, logits_to_slice


class SliceAdapter(nn.Module):
    """Cache slices `(B, C, H, W)` -> logits `(B, K, H, W)` through a network `(B, C', S, S)` -> `(B, K, S, S)`.

    The input goes through samplan.methods.sam_common.slice_input (intensity rules, channel selection, SAM-style
    resize, normalisation, padding) and the logits back to `(H, W)`; both outside autocast, in float32. Only
    `network` holds parameters: the adapter saves nothing of its own.
    """

    def __init__(self, network: nn.Module, spec: SamInput):
        super().__init__()
        self.network = network
        self.spec = spec

    def prepare(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Cache slices `(B, C, H, W)` -> (network input `(B, C', S, S)` float32, valid `(h', w')`)."""
        return encoder_input(x.float(), self.spec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`(B, C, H, W)` cache slices -> `(B, K, H, W)` logits."""
        with torch.autocast(x.device.type, enabled=False):
            inp, valid = self.prepare(x)
        out = self.network(inp)
        with torch.autocast(x.device.type, enabled=False):
            return logits_to_slice(out.float(), self.spec.input_size, valid, x.shape[-2:])
