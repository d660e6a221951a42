"""Builders of SAM-family backbones from their specs (samplan.models.specs), like segment-anything's build_sam.

Names: SAM ViT-B/L/H ("vit_b", "vit_l", "vit_h"), MedSAM ViT-B ("medsam_vit_b"), LiteMedSAM ("litemedsam",
TinyViT encoder at 256 input), SAM2.1 Hiera T/S/B+/L ("sam2_hiera_t" ...), and random tiny configurations
for CPU tests ("tiny_vit", "tiny_litemedsam", "tiny_sam2"; "tiny" is an alias of "tiny_vit").

Images reach an encoder as (B, in_chans, S, S) float32 with S the input size, already normalised:
x = (pixel_0_255 - pixel_mean) / pixel_std with the spec's mean/std (SAM: ImageNet statistics on 0..255;
MedSAM/LiteMedSAM: mean 0, std 255, i.e. [0, 1] inputs). Pretrained weights are loaded through
samplan.models.weights (hash-checked, weights_only) and adapted to the input size / channel count.
"""
from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from samplan.errors import SamplanError
from samplan.models.specs import BackboneSpec, backbone_spec, channel_pixel_statistics
from samplan.models.weights import load_backbone_state, load_strict


def _input_size(spec: BackboneSpec, input_size: int | None) -> int:
    """The requested input size, checked against what the family supports."""
    size = spec.native_input_size if input_size is None else int(input_size)
    if spec.fixed_input_size and size != spec.native_input_size:
        raise SamplanError(f"backbone '{spec.name}' only takes {spec.native_input_size}x{spec.native_input_size} inputs "
                           f"(TinyViT fixes its output grid), got {size}; resize the slices to {spec.native_input_size}")
    if size % spec.patch_size or size < 2 * spec.patch_size:
        raise SamplanError(f"input size {size} must be a multiple of {spec.patch_size} and >= {2 * spec.patch_size}")
    return size


def _vit_encoder(spec: BackboneSpec, size: int, in_chans: int) -> nn.Module:
    """segment-anything ImageEncoderViT at `size` with relative positions, as the official builders."""
    from segment_anything.modeling import ImageEncoderViT

    return ImageEncoderViT(
        depth=spec.depth, embed_dim=spec.embed_dim, img_size=size, mlp_ratio=4,
        norm_layer=partial(nn.LayerNorm, eps=1e-6), num_heads=spec.num_heads, patch_size=spec.patch_size,
        qkv_bias=True, use_rel_pos=True, global_attn_indexes=spec.global_attn_indexes,
        window_size=spec.window_size, out_chans=spec.prompt_embed_dim, in_chans=in_chans,
    )


def _prompt_and_decoder(spec: BackboneSpec, size: int, grid: int) -> tuple[nn.Module, nn.Module]:
    """segment-anything PromptEncoder and MaskDecoder sized for the spec and an input of `size` (grid tokens)."""
    from segment_anything.modeling import MaskDecoder, PromptEncoder, TwoWayTransformer

    d = spec.prompt_embed_dim
    prompt = PromptEncoder(embed_dim=d, image_embedding_size=(grid, grid), input_image_size=(size, size), mask_in_chans=16)
    decoder = MaskDecoder(
        num_multimask_outputs=3,
        transformer=TwoWayTransformer(depth=2, embedding_dim=d, mlp_dim=spec.decoder_mlp_dim, num_heads=spec.decoder_heads),
        transformer_dim=d, iou_head_depth=3, iou_head_hidden_dim=spec.iou_hidden_dim,
    )
    return prompt, decoder


def _random_encoder(spec: BackboneSpec, size: int, in_chans: int) -> nn.Module:
    if spec.family == "sam":
        return _vit_encoder(spec, size, in_chans)
    if spec.family == "litemedsam":
        from samplan.models.litemedsam import build_tinyvit

        return build_tinyvit(spec, in_chans)
    raise SamplanError(f"'{spec.name}' is a SAM2 backbone: build it with build_sam2")


def build_sam_model(
    name: str,
    *,
    input_size: int | None = None,
    in_chans: int = 3,
    checkpoint: Path | str | None = None,
    sha256: str | None = None,
) -> nn.Module:
    """Build a segment_anything `Sam` (image_encoder, prompt_encoder, mask_decoder) for backbone `name`.

    input_size: square input S (default: native; LiteMedSAM only 256); the image embedding is S/16 (SAM)
    or 64 (TinyViT) per side. checkpoint: None = random weights, "auto" = the installed official weights
    (samplan_weights), or a file (a full-model state dict, optionally under "model"); its sha256 is
    checked against `sha256`, the weights table or a `<file>.sha256` note. Position embeddings and the
    patch embedding are adapted to S and `in_chans`. Returned in train mode on the CPU.
    """
    from segment_anything.modeling import Sam

    spec = backbone_spec(name)
    size = _input_size(spec, input_size)
    # weights first: a missing or corrupted file fails before seconds of random initialisation
    state = _checkpoint_state(spec, checkpoint, sha256, size, in_chans, "model")
    encoder = _random_encoder(spec, size, in_chans)
    grid = 64 if spec.family == "litemedsam" else size // spec.patch_size
    prompt, decoder = _prompt_and_decoder(spec, size, grid)
    model = Sam(image_encoder=encoder, prompt_encoder=prompt, mask_decoder=decoder,
                pixel_mean=channel_pixel_statistics(spec.pixel_mean, in_chans),
                pixel_std=channel_pixel_statistics(spec.pixel_std, in_chans))
    if state is not None:
        load_strict(model, state, spec.name, checkpoint)
    return model.train()


def _checkpoint_state(spec: BackboneSpec, checkpoint: Path | str | None, sha256: str | None, size: int,
                      in_chans: int, part: str) -> dict[str, torch.Tensor] | None:
    """The hash-checked, adapted state dict of `checkpoint`, or None for random weights."""
    if checkpoint is None:
        return None
    return load_backbone_state(spec, checkpoint, sha256=sha256, input_size=size, in_chans=in_chans, part=part)


def build_image_encoder(
    name: str,
    *,
    input_size: int | None = None,
    in_chans: int = 3,
    checkpoint: Path | str | None = None,
    sha256: str | None = None,
) -> nn.Module:
    """Build only the image encoder of `name`: (B, in_chans, S, S) -> (B, 256 or prompt dim, S/16, S/16).

    Same arguments as build_sam_model; a full-model checkpoint contributes its "image_encoder." weights.
    """
    spec = backbone_spec(name)
    size = _input_size(spec, input_size)
    state = _checkpoint_state(spec, checkpoint, sha256, size, in_chans, "image_encoder")
    encoder = _random_encoder(spec, size, in_chans)
    if state is not None:
        load_strict(encoder, state, spec.name, checkpoint)
    return encoder.train()


def encoder_features(
    encoder: nn.Module, x: torch.Tensor, block_indexes: Sequence[int]
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Run `encoder` on x (B, C, S, S) and also return intermediate block outputs.

    Returns (neck output (B, D, H, W), [block output (B, H', W', E') for each index in block_indexes]).
    SAM ViT: blocks are the transformer blocks (H' = W' = S/16, E' = embed dim). TinyViT: blocks are the
    four stages, each output taken after the stage's patch merging, so at 256 input stage i gives
    (B, 128, 128, d1), (B, 64, 64, d2), (B, 64, 64, d3), (B, 64, 64, d3) with d = the spec's embed_dims.
    """
    wanted = list(block_indexes)
    if hasattr(encoder, "blocks") and hasattr(encoder, "pos_embed"):
        blocks = list(encoder.blocks)
        _check_indexes(wanted, len(blocks))
        h = encoder.patch_embed(x)
        if encoder.pos_embed is not None:
            h = h + encoder.pos_embed
        outs: dict[int, torch.Tensor] = {}
        for i, blk in enumerate(blocks):
            h = blk(h)
            if i in wanted:
                outs[i] = h
        neck = encoder.neck(h.permute(0, 3, 1, 2))
        return neck, [outs[i] for i in wanted]
    if hasattr(encoder, "layers") and hasattr(encoder, "neck"):
        from samplan.models.litemedsam import tinyvit_features

        return tinyvit_features(encoder, x, wanted)
    raise SamplanError(f"encoder_features does not know encoders of type {type(encoder).__name__}")


def _check_indexes(wanted: list[int], n: int) -> None:
    bad = [i for i in wanted if not 0 <= i < n]
    if bad:
        raise SamplanError(f"block indexes {bad} out of range: the encoder has {n} blocks (0..{n - 1})")


def build_sam2(name: str, input_size: int | None = None, checkpoint: Path | str | None = None, sha256: str | None = None) -> nn.Module:
    """Build a SAM2 model (sam2.modeling.sam2_base.SAM2Base) for a "sam2_*"/"tiny_sam2" backbone (see models/sam2_builder.py)."""
    from samplan.models.sam2_builder import build_sam2_model

    return build_sam2_model(backbone_spec(name), input_size=input_size, checkpoint=checkpoint, sha256=sha256)
