"""The UNETR decoder of SAM-UNETR (Alzate-Grisales et al. 2023, the paper's second version), 2D.

Inputs: the raw network input `x` (B, C, S, S) and four ViT block outputs (B, g, g, E) with g = S / 16
(token grid, channels last as segment-anything's blocks return them). With F = `feature_size`:

    enc1 = residual conv block on x                                   (F,  S)
    enc2 = transposed-conv up-block on block output 1, 3 x2 upsamplings (2F, 8g)
    enc3 = ... on block output 2, 2 upsamplings                        (4F, 4g)
    enc4 = ... on block output 3, 1 upsampling                         (8F, 2g)
    bottleneck = block output 4 reshaped to (E, g, g)
    dec4 = up(bottleneck, skip enc4) -> 8F at 2g; dec3 = up(dec4, enc3) -> 4F at 4g;
    dec2 = up(dec3, enc2) -> 2F at 8g;  dec1 = up(dec2, enc1) -> F at S;  logits = 1x1 conv(dec1)

The building blocks follow MONAI's UNETR blocks (UnetResBlock: two 3x3 conv + instance norm + leaky ReLU
with a 1x1 projected residual; UnetrPrUpBlock: a 2x2 stride-2 transposed conv then (transposed conv +
residual block) per further upsampling; UnetrUpBlock: transposed conv, concatenation with the skip,
residual block), written here because MONAI is not a dependency. SAM's 256-channel neck is not used.

Feature size and embedding width: every layer that reads ViT tokens is a (transposed) convolution from E
channels to a multiple of F, so no divisibility between E and F is needed (the paper's remark that E must
be divisible by F does not hold for this architecture: ViT-B's 768 is not divisible by the default 20
and builds fine). F only has to be >= 1.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

NUM_FEATURE_BLOCKS = 4


def feature_block_indexes(depth: int, global_attn_indexes: Sequence[int]) -> list[int]:
    """The four encoder blocks whose outputs feed the decoder.

    SAM's four global-attention blocks when there are four (ViT-B 2/5/8/11, ViT-L 5/11/17/23, ViT-H
    7/15/23/31); otherwise the last block of each quarter of the depth (which is the same rule for
    SAM's encoders, and gives 0/1/2/3 for a depth-4 test encoder with fewer global blocks).
    """
    glob = sorted(int(i) for i in global_attn_indexes)
    if len(glob) == NUM_FEATURE_BLOCKS:
        return glob
    if depth < NUM_FEATURE_BLOCKS:
        raise ValueError(f"a UNETR decoder needs an encoder with at least 4 blocks, got depth {depth}")
    return [round(depth * (q + 1) / NUM_FEATURE_BLOCKS) - 1 for q in range(NUM_FEATURE_BLOCKS)]


class ResBlock(nn.Module):
    """3x3 conv - instance norm - leaky ReLU - 3x3 conv - instance norm, plus the (1x1-projected) input; leaky ReLU."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False)
        self.norm1 = nn.InstanceNorm2d(out_ch, affine=True)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False)
        self.norm2 = nn.InstanceNorm2d(out_ch, affine=True)
        self.act = nn.LeakyReLU(0.01, inplace=True)
        self.project = None
        if in_ch != out_ch:
            self.project = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, bias=False), nn.InstanceNorm2d(out_ch, affine=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_ch, H, W) -> (B, out_ch, H, W)."""
        residual = x if self.project is None else self.project(x)
        y = self.act(self.norm1(self.conv1(x)))
        y = self.norm2(self.conv2(y))
        return self.act(y + residual)


def _up(in_ch: int, out_ch: int) -> nn.ConvTranspose2d:
    """x2 upsampling by a 2x2 stride-2 transposed convolution (no bias: a norm follows)."""
    return nn.ConvTranspose2d(in_ch, out_ch, kernel_size=2, stride=2, bias=False)


class ProjectionUpBlock(nn.Module):
    """ViT tokens (B, E, g, g) -> (B, out_ch, g * 2**n_up): one transposed conv, then n_up - 1 x (transposed conv + ResBlock)."""

    def __init__(self, in_ch: int, out_ch: int, n_up: int):
        super().__init__()
        if n_up < 1:
            raise ValueError("a projection up-block upsamples at least once")
        self.first = _up(in_ch, out_ch)
        self.stages = nn.ModuleList(nn.Sequential(_up(out_ch, out_ch), ResBlock(out_ch, out_ch)) for _ in range(n_up - 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_ch, g, g) -> (B, out_ch, g * 2**n_up, g * 2**n_up)."""
        x = self.first(x)
        for stage in self.stages:
            x = stage(x)
        return x


class SkipUpBlock(nn.Module):
    """Decoder step: x2 transposed conv to out_ch, concatenate the skip (out_ch), ResBlock(2 out_ch -> out_ch)."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.up = _up(in_ch, out_ch)
        self.block = ResBlock(2 * out_ch, out_ch)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        """(B, in_ch, h, w), skip (B, out_ch, 2h, 2w) -> (B, out_ch, 2h, 2w)."""
        return self.block(torch.cat([self.up(x), skip], dim=1))


class UNETRDecoder(nn.Module):
    """SAM-UNETR's decoder (module docstring); forward(x, features) -> logits (B, num_outputs, S, S)."""

    def __init__(self, in_chans: int, embed_dim: int, num_outputs: int, feature_size: int = 20):
        super().__init__()
        f = int(feature_size)
        if f < 1:
            raise ValueError(f"feature size must be >= 1, got {feature_size}")
        self.feature_size = f
        self.enc1 = ResBlock(in_chans, f)
        self.enc2 = ProjectionUpBlock(embed_dim, 2 * f, 3)
        self.enc3 = ProjectionUpBlock(embed_dim, 4 * f, 2)
        self.enc4 = ProjectionUpBlock(embed_dim, 8 * f, 1)
        self.dec4 = SkipUpBlock(embed_dim, 8 * f)
        self.dec3 = SkipUpBlock(8 * f, 4 * f)
        self.dec2 = SkipUpBlock(4 * f, 2 * f)
        self.dec1 = SkipUpBlock(2 * f, f)
        self.out = nn.Conv2d(f, num_outputs, kernel_size=1)

    def forward(self, x: torch.Tensor, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """x (B, C, S, S) raw encoder input; features: four (B, g, g, E) block outputs, g = S / 16."""
        if len(features) != NUM_FEATURE_BLOCKS:
            raise ValueError(f"the UNETR decoder takes {NUM_FEATURE_BLOCKS} block outputs, got {len(features)}")
        h1, h2, h3, h4 = (t.permute(0, 3, 1, 2) for t in features)  # channels last -> (B, E, g, g)
        d = self.dec4(h4, self.enc4(h3))
        d = self.dec3(d, self.enc3(h2))
        d = self.dec2(d, self.enc2(h1))
        d = self.dec1(d, self.enc1(x))
        return self.out(d)


class SAMUNETR(nn.Module):
    """SAM ViT image encoder + UNETR decoder: (B, in_chans, S, S) normalised input -> logits (B, K, S, S).

    `block_indexes`: the four encoder blocks read by the decoder (`feature_block_indexes`). The encoder's
    neck is skipped: only patch embedding, position embedding and blocks run.
    """

    def __init__(self, encoder: nn.Module, decoder: UNETRDecoder, block_indexes: Sequence[int]):
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.block_indexes = [int(i) for i in block_indexes]

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The four block outputs (B, g, g, E) of the encoder for `x`."""
        enc = self.encoder
        h = enc.patch_embed(x)
        if getattr(enc, "pos_embed", None) is not None:
            h = h + enc.pos_embed
        out = []
        for i, blk in enumerate(enc.blocks[: self.block_indexes[-1] + 1]):  # later blocks are not needed
            h = blk(h)
            if i in self.block_indexes:
                out.append(h)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_chans, S, S) -> (B, K, S, S)."""
        return self.decoder(x, self.encode(x))
