"""Blending the U-Net's and SAM's probabilities on processed slices, and the way back to logits.

Regions (sigmoid outputs): each prompted output becomes (1 - w_t) * U-Net + w_t * SAM. Labels (softmax): SAM's
foreground probabilities (the U-Net's own for outputs SAM was not prompted for) and their joint background
prod(1 - p_k) form SAM's class distribution q; the fused distribution is (1 - w_bg) * u_bg + w_bg * q_bg for the
background and (1 - w_t) * u_k + w_t * q_k for the labels, normalised. Slices where SAM answered no output keep the
U-Net's probabilities unchanged.
"""
from __future__ import annotations

import torch

EPS = 1e-6


def fuse(unet_probs: torch.Tensor, sam_probs: torch.Tensor, prompted: torch.Tensor, regions: bool,
         background_weight: float, tumour_weight: float) -> torch.Tensor:
    """Fused probabilities `(N, K, H, W)` of N slices.

    unet_probs `(N, K, H, W)` (softmax over K, or K sigmoid regions); sam_probs `(N, F, H, W)` for the F foreground
    outputs (F = K for regions, K - 1 for labels: outputs 1..K-1); prompted `(N, F)` bool, whether SAM answered.
    """
    wt, wb = float(tumour_weight), float(background_weight)
    mask = prompted[:, :, None, None].to(unet_probs.dtype)
    if regions:
        return unet_probs * (1 - wt * mask) + wt * mask * sam_probs
    u_bg, u_fg = unet_probs[:, :1], unet_probs[:, 1:]
    q_fg = mask * sam_probs + (1 - mask) * u_fg
    q_bg = torch.prod(1 - q_fg, dim=1, keepdim=True)
    q = torch.cat([q_bg, q_fg], 1)
    q = q / q.sum(1, keepdim=True).clamp_min(EPS)
    fused = torch.cat([(1 - wb) * u_bg + wb * q[:, :1], (1 - wt) * u_fg + wt * q[:, 1:]], 1)
    fused = fused / fused.sum(1, keepdim=True).clamp_min(EPS)
    any_prompted = prompted.any(1)[:, None, None, None]
    return torch.where(any_prompted, fused, unet_probs)


def probabilities_to_logits(probs: torch.Tensor, regions: bool) -> torch.Tensor:
    """Logits whose softmax (labels, over dim 1 of `(N, K, ...)` or dim 0 of `(K, ...)`) or sigmoid (regions) gives
    `probs` back (clamped away from 0 and 1)."""
    p = probs.clamp(EPS, 1 - EPS)
    return torch.logit(p) if regions else torch.log(p)
