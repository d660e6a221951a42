"""samunetr's plan section: backbone, input size, channel and intensity mapping, batch size and recipe.

A SAM ViT image encoder (fully fine-tuned) feeding a UNETR-style convolutional decoder, trained on 2D slices of
the transposed volume (slice axis 0, the base "2d" configuration). The paper uses ViT-H at a 128x128 input with
5 channels; samplan defaults to ViT-B and plans the input size from the data.

Input size rule (`plan_input_size`): each slice (at the 2d target spacing, median in-plane size L pixels) is
resized so that its longer side becomes S, so an object of e pixels covers e*S/L input pixels. With the object
size taken as the area-equivalent edge sqrt(a*b) of its in-plane bounding box (a, b from the fingerprint's
`inplane_extent_pixels`, scaled from the median raw spacing to the target spacing; the smallest label decides),
S is the smallest of {128, 192, 256, 384, 512, 768, 1024} for which the p05 object still covers one 16-px token
and the median object covers 3 tokens (48 px). S is then capped by (a) the slice size: the smallest candidate
>= L, i.e. no upsampling beyond the native grid; (b) the budget's `max_sam_input` (CPU 256, CUDA 1024 by
default); (c) memory: S steps down while fewer than 2 slices fit in `budget.memory_gb`. Without label
statistics only the caps apply.

Recipe: DiceFocal (softmax + one-hot; sigmoid for regions), AdamW lr 1e-3 weight decay 0.01 (the paper's Novograd
is not in torch: AdamW is the documented substitute, the paper's setting is kept as `paper_optimizer`), constant
learning rate, light augmentation (rotation +-15 deg and scaling 0.7-1.4 only), model selection on the validation
Dice after keeping each class's largest connected component.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

from samplan.dataset.dataset_json import channel_names, uses_regions
from samplan.errors import SamplanError
from samplan.experiment_planning.budget import ComputeBudget
from samplan.experiment_planning.recipe_sections import AdamW, Augmentation, ConstantSchedule, Schedule
from samplan.experiment_planning.sections import PlanSection, info
from samplan.methods.sam_common.plan import IntensityRule, channel_mode, intensity_rules, object_sizes_px
from samplan.models.specs import BackboneSpec, backbone_spec, backbones_of, channel_pixel_statistics

NAME = "samunetr"
INPUT_SIZES = (128, 192, 256, 384, 512, 768, 1024)
TOKEN_PX = 16
MEDIAN_OBJECT_TOKENS = 3
MAX_BATCH = 32
CPU_MAX_BATCH = 8
PAPER_BACKBONE = "vit_h"
DEFAULT_BACKBONE = "vit_b"
FEATURE_SIZE = 20
GRAD_CLIP = 12.0


@dataclass(frozen=True, kw_only=True)
class Channels(PlanSection):
    """How the C channels reach the encoder: "rgb" (R, G, B), "repeat" (one channel, the pretrained patch embedding
    unchanged) or "adapt_patch_embed" (a C-channel patch embedding interpolated along the channel axis)."""

    mode: Literal["rgb", "repeat", "adapt_patch_embed"]
    in_chans: int
    num_input_channels: int


@dataclass(frozen=True, kw_only=True)
class Intensity(PlanSection):
    """Cache values -> [0, 1] per channel (`per_channel`), then the planned backbone's pixel mean/std on 0..255."""

    per_channel: list[IntensityRule]
    output_range: list[float] = info()
    pixel_mean: list[float]
    pixel_std: list[float]


@dataclass(frozen=True, kw_only=True)
class Loss(PlanSection):
    """MONAI-style DiceFocal; softmax over labels (one-hot targets) or sigmoid over regions."""

    name: Literal["dice_focal"]
    activation: Literal["softmax", "sigmoid"]
    to_onehot_y: bool = info()


@dataclass(frozen=True, kw_only=True)
class ModelSelection(PlanSection):
    """Which validation score picks checkpoint_best: Dice, counted after keeping each class's largest component."""

    metric: Literal["dice"] = info()
    postprocess: Literal["keep_largest_component", "none"]


@dataclass(frozen=True, kw_only=True)
class Recipe(PlanSection):
    """The paper's recipe, with AdamW for Novograd."""

    loss: Loss
    optimizer: AdamW
    paper_optimizer: dict[str, Any] = info()
    lr_schedule: Schedule
    num_epochs: int
    num_iterations_per_epoch: int
    num_val_iterations_per_epoch: int
    oversample_foreground_percent: float
    augmentation: str = info()
    augmentation_params: Augmentation
    model_selection: ModelSelection
    grad_clip: float | None


@dataclass(frozen=True, kw_only=True)
class SAMUNETRSection(PlanSection):
    """plans["methods"]["samunetr"]."""

    backbone: str
    planned_backbone: str
    backbone_choices: list[str] = info()
    paper_backbone: str = info()
    backbone_spec: dict[str, Any] = info()
    input_size: int
    token_grid: int = info()
    input_size_plan: dict[str, Any] = info()
    configurations: list[str]
    configuration: str = info()
    slice_axis: int = info()
    channels: Channels
    intensity: Intensity
    feature_size: int
    freeze_encoder: bool
    # "auto": the backbone's official weights (samplan_weights), "none": random, or a checkpoint file (--checkpoint)
    checkpoint: str
    batch_size: int
    recipe: Recipe
    budget: dict[str, Any] = info()
    memory_warning: str | None = info()


def resolve_backbone_name(name: str) -> BackboneSpec:
    """The spec of a samunetr backbone (a SAM ViT; aliases accepted); SamplanError listing the choices otherwise."""
    try:
        spec = backbone_spec(str(name))
    except SamplanError:
        spec = None
    if spec is None or spec.family != "sam":
        raise SamplanError(f"samunetr backbone {name!r} is not known; choose one of {', '.join(backbones_of(['sam']))} "
                           "(SAM ViT image encoders only).")
    return spec


def training_bytes(spec: BackboneSpec, size: int, batch: int, feature_size: int = FEATURE_SIZE) -> float:
    """Rough fp32 training memory (bytes) of SAM-UNETR at input `size` and `batch`.

    Weights + gradients + two optimiser moments (16 bytes/parameter), per block ~68 bytes per token
    and channel of saved activations, attention maps (scores and softmax) of global and windowed
    blocks, and ~40 maps of F x size**2 floats for the convolutional decoder.
    """
    grid = size // TOKEN_PX
    tokens = grid * grid
    e, h, w = spec.embed_dim, spec.num_heads, spec.window_size
    n_global = len(spec.global_attn_indexes)
    n_windows = math.ceil(grid / w) ** 2
    per_block = 68.0 * tokens * e
    attn = n_global * 8.0 * h * tokens**2 + (spec.depth - n_global) * 8.0 * h * n_windows * (w * w) ** 2
    decoder = 40.0 * 4 * feature_size * size * size
    per_sample = spec.depth * per_block + attn + decoder
    return spec.encoder_params_m * 1e6 * 16 + batch * per_sample


def batch_size_for(spec: BackboneSpec, size: int, budget: ComputeBudget) -> int:
    """Largest batch (<= 32) whose estimated training memory fits in 75 % of the budget; 0 if none."""
    usable = 0.75 * budget.memory_gb * 1e9
    fixed = training_bytes(spec, size, 0)
    per_sample = training_bytes(spec, size, 1) - fixed
    return int(max(0, min(MAX_BATCH, (usable - fixed) // per_sample)))


def plan_input_size(slice_size: float, objects: dict[str, float] | None, budget: ComputeBudget,
                    spec: BackboneSpec) -> dict[str, Any]:
    """Input edge S and why (rule in the module docstring); `slice_size` = longer median slice side in pixels."""

    def _enough(s: int) -> bool:
        scale = s / slice_size
        return objects["p05"] * scale >= TOKEN_PX and objects["median"] * scale >= MEDIAN_OBJECT_TOKENS * TOKEN_PX

    by_objects = None if objects is None else next((s for s in INPUT_SIZES if _enough(s)), INPUT_SIZES[-1])
    slice_cap = next((s for s in INPUT_SIZES if s >= slice_size), INPUT_SIZES[-1])
    budget_cap = max([s for s in INPUT_SIZES if s <= budget.max_sam_input] or [INPUT_SIZES[0]])
    limits = {"objects": by_objects or INPUT_SIZES[-1], "slice size": slice_cap, "budget": budget_cap}
    size = min(limits.values())
    # the first binding limit in this order names the reason (objects win ties: they were satisfied exactly)
    limited_by = next(k for k, v in limits.items() if v == size and (k != "objects" or objects is not None))
    while batch_size_for(spec, size, budget) < 2 and size > INPUT_SIZES[0]:
        size = INPUT_SIZES[INPUT_SIZES.index(size) - 1]
        limited_by = "memory"
    out: dict[str, Any] = {
        "input_size": size, "limited_by": limited_by, "candidates": list(INPUT_SIZES),
        "by_objects": by_objects, "slice_cap": slice_cap, "budget_cap": budget_cap,
        "reference_slice_edge_px": float(slice_size),
    }
    if objects is not None:
        out["object_edge_px"] = {k: round(v, 3) for k, v in objects.items()}
        out["object_edge_at_input_px"] = {k: round(v * size / slice_size, 3) for k, v in objects.items()}
    return out


def pixel_statistics(spec: BackboneSpec, in_chans: int) -> tuple[list[float], list[float]]:
    """The backbone's pixel mean/std (0..255) for `in_chans` encoder channels (interpolated like the patch embedding)."""
    return channel_pixel_statistics(spec.pixel_mean, in_chans), channel_pixel_statistics(spec.pixel_std, in_chans)


def plan_section(fingerprint: dict[str, Any], base_plan: dict[str, Any], budget: ComputeBudget,
                 dataset_json: dict[str, Any], backbone: str = DEFAULT_BACKBONE) -> SAMUNETRSection:
    """Backbone, input size, channel and intensity mapping, batch size and recipe for this dataset."""
    spec = resolve_backbone_name(backbone)
    cfg = base_plan["configurations"]["2d"]
    size_plan = plan_input_size(max(cfg["median_image_size_in_voxels"]), object_sizes_px(fingerprint, base_plan),
                                budget, spec)
    size = size_plan["input_size"]
    names = channel_names(dataset_json)
    mode = channel_mode(names)
    in_chans = len(names) if mode == "adapt_patch_embed" else 3
    mean, std = pixel_statistics(spec, in_chans)
    regions = uses_regions(dataset_json)
    batch = batch_size_for(spec, size, budget)
    if budget.device == "cpu" and batch > 0:
        # memory would allow more, but the full-resolution decoder makes a CPU step of 32 slices ~15 s
        batch = min(batch, CPU_MAX_BATCH)
    warning = None
    if batch == 0:
        warning = (f"{spec.name} at {size}x{size} needs about {training_bytes(spec, size, 1) / 1e9:.1f} GB to train with "
                   f"batch 1, more than 75 % of the {budget.memory_gb:g} GB budget; use a smaller backbone or a larger "
                   "budget.")
    numbers = {"embed_dim": spec.embed_dim, "depth": spec.depth, "num_heads": spec.num_heads,
               "global_attn_indexes": list(spec.global_attn_indexes), "window_size": spec.window_size,
               "patch_size": spec.patch_size, "native_input_size": spec.native_input_size}
    recipe = Recipe(
        loss=Loss(name="dice_focal", activation="sigmoid" if regions else "softmax", to_onehot_y=not regions),
        optimizer=AdamW(name="AdamW", lr=1e-3, weight_decay=0.01),
        paper_optimizer={"name": "Novograd", "lr": 1e-3, "weight_decay": 0.01,
                         "note": "Novograd is not in torch; AdamW with the same settings is the substitute"},
        lr_schedule=ConstantSchedule(name="constant"),
        num_epochs=200, num_iterations_per_epoch=250, num_val_iterations_per_epoch=50,
        oversample_foreground_percent=0.33,
        augmentation="light: rotation and scaling only, no mirroring, no intensity transforms",
        augmentation_params=Augmentation(rotation_deg=15.0, scaling=[0.7, 1.4], mirror=False, intensity=False),
        model_selection=ModelSelection(metric="dice", postprocess="keep_largest_component"),
        grad_clip=GRAD_CLIP,
    )
    return SAMUNETRSection(
        backbone=spec.name, planned_backbone=spec.name, backbone_choices=backbones_of(["sam"]),
        paper_backbone=PAPER_BACKBONE, backbone_spec=numbers, input_size=size, token_grid=size // TOKEN_PX,
        input_size_plan=size_plan, configurations=["2d"], configuration="2d", slice_axis=0,
        channels=Channels(mode=mode, in_chans=in_chans, num_input_channels=len(names)),
        intensity=Intensity(per_channel=intensity_rules(mode, cfg, base_plan["foreground_intensity_properties_per_channel"]),
                            output_range=[0.0, 1.0], pixel_mean=mean, pixel_std=std),
        feature_size=FEATURE_SIZE, freeze_encoder=False, checkpoint="auto", batch_size=max(1, batch), recipe=recipe,
        budget=budget.to_dict(), memory_warning=warning)
