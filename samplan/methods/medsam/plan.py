"""medsam's plan section: backbone, channels, intensity, box policy, trainable modules and recipe (torch-free).

Box-prompted SAM / MedSAM / LiteMedSAM (Ma et al., Nat. Commun. 2024), fine-tuned on slices of the "2d" cache. Each
slice becomes 3 channels (`channels.rgb_from_channels`), is mapped to [0, 1] per channel (MR: 0.5/99.5 percentile
clip; RGB: as stored; CT: window level 40 / width 400) and fed without pixel mean/std, as MedSAM does; the shared
pipeline (samplan.methods.sam_common.slice_input) resizes the longer side to the input size and pads.

Box policies: "reference_jitter" (box of the target, each side moved outward by 0..max_jitter_px input pixels; boxes
are needed at prediction), "fixed_full_image" (the whole slice: no box needed), "fixed_planned_region" (the union
box of each label over the cached cases, padded by region_pad_px; computed when a training starts and kept in the
network buffer `medsam_regions`, so it travels with the checkpoint).

Trainable parameters: `trainable_modules` (image encoder and mask decoder; `frozen_modules`: the prompt encoder),
or exactly the parameters under the `unfreeze` prefixes (samplan_train --unfreeze); only those reach AdamW.
Recipe: MedSAM's Dice (squared denominators) + BCE, AdamW 1e-4 / 0.01, constant rate, nnU-Net's intensity
transforms and scaling without rotation or mirroring; samples with foreground per box policy (reference boxes need
an object in the slice, fixed boxes also learn empty slices).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from samplan.dataset.dataset_json import channel_names, foreground_labels, regions, uses_regions
from samplan.errors import SamplanError
from samplan.experiment_planning.budget import ComputeBudget
from samplan.experiment_planning.recipe_sections import AdamW, Augmentation, ConstantSchedule, Schedule
from samplan.experiment_planning.sections import PlanSection, info
from samplan.methods.sam_common.plan import (SAM_MODEL_FAMILIES, channel_mode, intensity_rules,
                                             rgb_from_channels, with_ct_window)
from samplan.methods.sam_common.section import RGBChannels, SAMModelSection, UnitIntensity
from samplan.models.specs import backbone_spec, backbones_of

NAME = "medsam"
DEFAULT_BACKBONE = "litemedsam"
MAX_JITTER_PX = 20
REGION_PAD_PX = 10
# per-sample training memory on CPU (GB, measured order of magnitude incl. activations, fp32)
GB_PER_SAMPLE = {"litemedsam": 1.0, "medsam_vit_b": 9.0}
BOX_POLICIES = ("reference_jitter", "fixed_full_image", "fixed_planned_region")
CT_WINDOW_HU = (40.0 - 200.0, 40.0 + 200.0)  # level 40, width 400
TRAINABLE_MODULES = ["image_encoder", "mask_decoder"]
FROZEN_MODULES = ["prompt_encoder"]


@dataclass(frozen=True, kw_only=True)
class Intensity(UnitIntensity):
    """Cache values -> [0, 1] per channel; MedSAM takes [0, 1] images (no pixel mean/std)."""

    pixel_mean_std: None = info()


@dataclass(frozen=True, kw_only=True)
class BoxPolicy(PlanSection):
    """Which box each training sample (and a prediction without prompts) gets; module docstring."""

    name: Literal["reference_jitter", "fixed_full_image", "fixed_planned_region"]
    max_jitter_px: float
    outward_only: bool
    per: Literal["label", "object"]
    region_pad_px: float
    choices: list[str] = info()
    # input pixels around each propagated box (null: half the training jitter, or LiteMedSAM's rule for fixed boxes)
    propagation_margin_px: float | None


@dataclass(frozen=True, kw_only=True)
class Prompt(PlanSection):
    """Which label values share one box when boxes come from reference label maps (one group per output)."""

    label_groups: list[list[int]]


@dataclass(frozen=True, kw_only=True)
class Loss(PlanSection):
    """MedSAM's loss: weight_dice * soft Dice of sigmoid probabilities (squared denominators) + weight_bce * BCE."""

    name: Literal["dice_sigmoid_squared+bce"]
    weight_dice: float
    weight_bce: float


@dataclass(frozen=True, kw_only=True)
class Recipe(PlanSection):
    """MedSAM's fine-tuning recipe."""

    loss: Loss
    optimizer: AdamW
    lr_schedule: Schedule
    num_epochs: int
    num_iterations_per_epoch: int
    num_val_iterations_per_epoch: int
    # per box policy: the share of samples drawn with foreground
    oversample_foreground_percent: dict[str, float]
    augmentation: str = info()
    augmentation_params: Augmentation


@dataclass(frozen=True, kw_only=True)
class MedSAMSection(SAMModelSection):
    """plans["methods"]["medsam"]."""

    channels: RGBChannels
    intensity: Intensity
    box_policy: BoxPolicy
    inference: dict[str, str] = info()
    prompt: Prompt
    trainable_modules: list[str]
    frozen_modules: list[str]
    unfreeze: list[str] | None
    batch_size: int
    recipe: Recipe
    regions: bool
    regions_values: list[list[int]] | None
    budget: dict[str, Any] = info()


def plan_section(fingerprint: dict[str, Any], base_plan: dict[str, Any], budget: ComputeBudget,
                 dataset_json: dict[str, Any]) -> MedSAMSection:
    """Backbone, input size, channels, intensity mapping, box policy, trainable modules and recipe."""
    if "2d" not in base_plan["configurations"]:
        raise SamplanError("medsam needs the 2d configuration in the plan; re-plan with it.")
    cfg = base_plan["configurations"]["2d"]
    spec = backbone_spec(DEFAULT_BACKBONE)
    names = channel_names(dataset_json)
    fg_props = base_plan["foreground_intensity_properties_per_channel"]
    rules = with_ct_window(intensity_rules(channel_mode(names), cfg, fg_props), fg_props, CT_WINDOW_HU)
    batch = int(max(1, min(16, (0.5 * budget.memory_gb) // GB_PER_SAMPLE[spec.name])))
    if budget.device == "cpu":
        batch = min(batch, 4)  # MedSAM-Lite's batch; a CPU step costs ~10 s per sample already
    use_regions = uses_regions(dataset_json)
    region_values = [list(r) for r in regions(dataset_json)] if use_regions else None
    recipe = Recipe(
        loss=Loss(name="dice_sigmoid_squared+bce", weight_dice=1.0, weight_bce=1.0),
        optimizer=AdamW(name="AdamW", lr=1e-4, weight_decay=0.01),
        lr_schedule=ConstantSchedule(name="constant"),
        num_epochs=100, num_iterations_per_epoch=50, num_val_iterations_per_epoch=10,
        oversample_foreground_percent={"reference_jitter": 1.0, "fixed_full_image": 0.5, "fixed_planned_region": 0.5},
        augmentation="intensity transforms and scaling 0.7-1.4 (nnU-Net's, p 0.2); no rotation, no mirroring",
        augmentation_params=Augmentation(rotation_deg=0.0, scaling=[0.7, 1.4], mirror=False, intensity=True),
    )
    return MedSAMSection(
        configurations=["2d"], backbone=spec.name, planned_backbone=spec.name,
        backbone_choices=backbones_of(SAM_MODEL_FAMILIES), checkpoint="auto", input_size=spec.native_input_size,
        channels=RGBChannels(names=names, rgb_from_channels=rgb_from_channels(len(names))),
        intensity=Intensity(per_channel=rules, output_range=[0.0, 1.0], pixel_mean_std=None),
        box_policy=BoxPolicy(name="reference_jitter", max_jitter_px=MAX_JITTER_PX, outward_only=True, per="label",
                             region_pad_px=REGION_PAD_PX, choices=list(BOX_POLICIES),
                             # propagated boxes grown by the mean outward jitter the model was trained with
                             propagation_margin_px=MAX_JITTER_PX / 2),
        inference={"reference_jitter": "boxes at prediction (samplan_predict --prompts, or --prompt-strategy "
                                       "box|propagate --reference-dir), propagated up and down from each boxed slice",
                   "fixed": "every slice with the fixed box, unless boxes are given"},
        prompt=Prompt(label_groups=region_values if use_regions else [[v] for v in foreground_labels(dataset_json)]),
        trainable_modules=list(TRAINABLE_MODULES), frozen_modules=list(FROZEN_MODULES), unfreeze=None,
        batch_size=batch, recipe=recipe, regions=use_regions, regions_values=region_values, budget=budget.to_dict())
