"""promise's plan section (torch-free): ProMISe (Wang et al., arXiv 2403.04164) on a frozen SAM-family model.

A frozen SAM (image encoder, prompt encoder, mask decoder: no parameter trains) plus two new modules:
- the APM (auto-prompting module): intermediate encoder features (`apm.feature_blocks`: ViT blocks 6/9/12 of
  ViT-B, the same fractions of depth for other ViTs; TinyViT: its last three stages, all on the 64x64 grid),
  concatenated on the embedding grid, three 3x3 convolutions to `apm.conv_channels` (256), a ResNet34-style head
  (torchvision's ResNet with BasicBlocks `apm.resnet_layers` [3, 4, 6, 3]), global pooling and a linear layer that
  regresses, per foreground output, the planned prompt (`prompt.output`: 8 positive + 8 negative points, a box, or
  both; sigmoid x input size) and a presence logit (an addition: 3D volumes have slices without the structure,
  and a regressed prompt always asks SAM for a mask). Gradients reach the APM through the frozen prompt encoder
  and mask decoder. For box prompts (`apm.readout` "heatmap", an addition) the box is not regressed by the linear
  layer but read as the soft extent of a foreground heatmap (a 1x1 convolution after the three convolutions,
  supervised by the target on the embedding grid), which learns from few images far faster.
- IPS (incremental pattern shifting): the pooled image embedding through a two-layer MLP (256 -> 1024 -> 4 x 256,
  GELU), added to the mask decoder's four mask-token embeddings of that image.
Modes: "apm", "apm_ips" (default), "ips_oracle" (8 + 8 points sampled from the reference mask: an oracle).

Prompt type: SAM ViT was trained with points and boxes and gets the paper's points; box-trained backbones
(LiteMedSAM, MedSAM) answer points poorly, so they get a box (`prompt.output_reason` says why).

Training (the paper: Adam lr 1e-5, 200 epochs, batch 8, BCE + Dice on the logits, the first of the three multimask
outputs; on a CPU budget the APM learns at 1e-3 and the IPS at the paper's 1e-5, `recipe.ips_lr_scale`): whole slices of the "2d" cache; without image augmentation (`image_augmentation` false, the CPU default)
every slice is encoded once and its embedding and intermediate features are cached on disk
(`feature_cache`: float16), so an epoch costs only the APM, IPS and the decoder. With augmentation (the GPU default)
the planned 2D patches are augmented and encoded in every step. Post-processing: a morphological opening with a
`postprocessing.opening_kernel_px` square (5 x 5). The trainer keeps the checkpoint with the best pseudo Dice on
the fold's validation split (never test data).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from samplan.dataset.dataset_json import channel_names, foreground_labels, regions, uses_regions
from samplan.errors import SamplanError
from samplan.experiment_planning.budget import ComputeBudget
from samplan.experiment_planning.recipe_sections import Adam, Augmentation, ConstantSchedule, Optimizer, Schedule
from samplan.experiment_planning.sections import PlanSection, info
from samplan.methods.sam_common.plan import (SAM_MODEL_FAMILIES, channel_mode, intensity_rules,
                                             rgb_from_channels, with_ct_window)
from samplan.methods.sam_common.section import RGBChannels, SAMModelSection, UnitIntensity
from samplan.models.specs import BackboneSpec, backbone_spec, backbones_of

NAME = "promise"
DEFAULT_BACKBONE = "litemedsam"  # the only real weights here; the paper: SAM ViT-B at 1024 (--backbone/--checkpoint)
MODES = ("apm", "apm_ips", "ips_oracle")
PROMPT_OUTPUTS = ("points", "box", "points+box")
CT_WINDOW_HU = (40.0 - 200.0, 40.0 + 200.0)
WEIGHTS_BUFFER = "promise_sam_weights_id"


@dataclass(frozen=True, kw_only=True)
class Intensity(UnitIntensity):
    """Cache values -> [0, 1] per channel; the backbone's pixel mean/std follow (none for (Lite)MedSAM)."""

    then: str = info()


@dataclass(frozen=True, kw_only=True)
class APM(PlanSection):
    """The auto-prompting module: which encoder outputs it reads and how wide it is."""

    feature_blocks: list[int]
    feature_blocks_reason: str = info()
    conv_channels: int
    resnet_layers: list[int]
    readout: Literal["regression", "heatmap"]
    readout_reason: str = info()


@dataclass(frozen=True, kw_only=True)
class Prompt(PlanSection):
    """What the APM regresses per foreground output, and which label values form each output."""

    output: Literal["points", "box", "points+box"]
    output_reason: str = info()
    num_positive: int
    num_negative: int
    label_groups: list[list[int]]


@dataclass(frozen=True, kw_only=True)
class IPS(PlanSection):
    """Incremental pattern shifting: the hidden width of the MLP from the pooled embedding to the mask tokens."""

    hidden: int


@dataclass(frozen=True, kw_only=True)
class Loss(PlanSection):
    """BCE + soft Dice on the mask logits (sigmoid once), plus BCE of the presence logits, plus L1 of a regressed box
    against the target's tight box (0: the paper, prompts learnt from the mask loss alone), plus BCE + Dice of the
    APM's heatmap against the target on its grid (readout "heatmap"; 0 otherwise)."""

    name: Literal["bce+dice"]
    weight_bce: float
    weight_dice: float
    weight_presence: float
    weight_box: float
    weight_box_reason: str = info()
    weight_heatmap: float


@dataclass(frozen=True, kw_only=True)
class Recipe(PlanSection):
    """ProMISe's training recipe."""

    loss: Loss
    optimizer: Optimizer
    lr_schedule: Schedule
    optimizer_reason: str = info()
    ips_lr_scale: float
    ips_lr_reason: str = info()
    num_epochs: int
    num_iterations_per_epoch: int
    num_val_iterations_per_epoch: int
    # share of training slices drawn among those with foreground (the rest: any slice)
    foreground_slice_fraction: float
    augmentation_params: Augmentation


@dataclass(frozen=True, kw_only=True)
class Postprocessing(PlanSection):
    """A morphological opening of each output's mask with a square of this side (slice pixels; 0 or 1: none)."""

    opening_kernel_px: int


@dataclass(frozen=True, kw_only=True)
class PromiseSection(SAMModelSection):
    """plans["methods"]["promise"]."""

    channels: RGBChannels
    intensity: Intensity
    mode: Literal["apm", "apm_ips", "ips_oracle"]
    modes: list[str] = info()
    apm: APM
    ips: IPS
    prompt: Prompt
    image_augmentation: bool
    image_augmentation_reason: str = info()
    feature_cache: Literal["float16", "float32"]
    encoder_batch_size: int
    batch_size: int
    recipe: Recipe
    postprocessing: Postprocessing
    model_selection: str = info()
    regions: bool
    budget: dict[str, Any] = info()


def feature_blocks(spec: BackboneSpec) -> tuple[list[int], str]:
    """The encoder outputs the APM reads, and why: ViT blocks at 1/2, 3/4 and all of the depth (ViT-B: 6, 9, 12);
    TinyViT's last three stages (all on the 64 x 64 embedding grid)."""
    if spec.family == "litemedsam":
        return [1, 2, 3], "TinyViT: the outputs of its last three stages, all on the 64 x 64 grid of the embedding"
    depth = int(spec.depth)
    blocks = sorted({max(0, round(depth * k / 4) - 1) for k in (2, 3, 4)})
    return blocks, (f"ViT of depth {depth}: blocks {[b + 1 for b in blocks]} (1-based), the paper's 6/9/12 of ViT-B "
                    "as fractions of the depth")


def prompt_output(spec: BackboneSpec) -> tuple[str, str]:
    """What the APM regresses for this backbone, and why."""
    if spec.family == "litemedsam" or spec.name.startswith("medsam"):
        return "box", (f"{spec.name} was trained with box prompts only and answers points poorly (LiteMedSAM on "
                       "Hippocampus with oracle points: Dice 0.05, with oracle boxes 0.70): the APM regresses a box")
    return "points", f"{spec.name} (SAM) was trained with points: the paper's 8 positive + 8 negative points"


def box_loss_weight(output: str) -> tuple[float, str]:
    """The weight of the direct box term, and why: a regressed box has a target (the tight box), points do not."""
    if "box" in output:
        return 1.0, ("an addition for box prompts: the target's tight box supervises the regressed box directly, "
                     "which the mask loss alone, reaching it through the frozen decoder, does slowly")
    return 0.0, "points have no unique target: as the paper, they learn from the mask loss alone"


def apm_readout(output: str) -> tuple[str, str]:
    """How the APM gives its prompt, and why: a box from a foreground heatmap, or the paper's regression."""
    if output == "box":
        return "heatmap", ("an addition for box prompts: a 1x1 convolution after the APM's three convolutions maps "
                           "foreground on the embedding grid (supervised by the target on that grid) and the box is "
                           "its soft extent, still differentiable for the mask loss; global pooling and a linear "
                           "layer (the paper) regress a box from few images slowly (CVC fold 0, 32 images, 120 "
                           "iterations: Dice 0.59 from the heatmap, 0.12 regressed)")
    return "regression", "the paper's: global pooling and a linear layer regress the points"


def heatmap_loss_weight(readout: str) -> float:
    """The weight of the heatmap term: 1 when the APM has a heatmap, else 0."""
    return 1.0 if readout == "heatmap" else 0.0


def learning_rates(cpu: bool) -> tuple[tuple[float, str], tuple[float, str]]:
    """Adam's learning rate (the APM's) and the IPS's share of it, each with why: the paper's 1e-5 for both on a
    GPU; on a CPU budget (a few hundred iterations) the APM at 1e-3 and the IPS kept at the paper's 1e-5."""
    if not cpu:
        return (1e-5, "the paper's Adam at lr 1e-5"), (1.0, "the paper's: APM and IPS at one learning rate")
    return ((1e-3, "CPU budget: at the paper's 1e-5 the APM barely moves in a few hundred iterations (CVC, 600 "
                   "iterations: Dice 0.28); at 1e-3 its boxes are usable within 100"),
            (0.01, "the IPS at the paper's 1e-5 (1e-3 x 0.01): at 1e-3 its mask-token shift grew within 100 "
                   "iterations until SAM's masks collapsed (CVC fold 0: Dice 0.06 with IPS, 0.58 without)"))


def plan_section(fingerprint: dict[str, Any], base_plan: dict[str, Any], budget: ComputeBudget,
                 dataset_json: dict[str, Any]) -> PromiseSection:
    """Backbone, channels, intensity, APM/IPS sizes, prompt type, feature cache and recipe."""
    if "2d" not in base_plan["configurations"]:
        raise SamplanError("promise needs the 2d configuration in the plan; re-plan with it.")
    cfg = base_plan["configurations"]["2d"]
    spec = backbone_spec(DEFAULT_BACKBONE)
    names = channel_names(dataset_json)
    fg_props = base_plan["foreground_intensity_properties_per_channel"]
    rules = with_ct_window(intensity_rules(channel_mode(names), cfg, fg_props), fg_props, CT_WINDOW_HU)
    blocks, blocks_reason = feature_blocks(spec)
    output, output_reason = prompt_output(spec)
    use_regions = uses_regions(dataset_json)
    region_values = [list(r) for r in regions(dataset_json)] if use_regions else None
    cpu = budget.device == "cpu"
    box_weight, box_reason = box_loss_weight(output)
    readout, readout_reason = apm_readout(output)
    (lr, lr_reason), (ips_scale, ips_reason) = learning_rates(cpu)
    recipe = Recipe(
        loss=Loss(name="bce+dice", weight_bce=1.0, weight_dice=1.0, weight_presence=1.0, weight_box=box_weight,
                  weight_box_reason=box_reason, weight_heatmap=heatmap_loss_weight(readout)),
        optimizer=Adam(name="Adam", lr=lr, weight_decay=0.0), lr_schedule=ConstantSchedule(name="constant"),
        optimizer_reason=lr_reason, ips_lr_scale=ips_scale, ips_lr_reason=ips_reason,
        num_epochs=200, num_iterations_per_epoch=50, num_val_iterations_per_epoch=5, foreground_slice_fraction=0.67,
        augmentation_params=Augmentation(rotation_deg=0.0, scaling=[0.7, 1.4], mirror=True, intensity=True))
    return PromiseSection(
        configurations=["2d"], backbone=spec.name, planned_backbone=spec.name,
        backbone_choices=backbones_of(SAM_MODEL_FAMILIES), checkpoint="auto", input_size=spec.native_input_size,
        channels=RGBChannels(names=names, rgb_from_channels=rgb_from_channels(len(names))),
        intensity=Intensity(per_channel=rules, output_range=[0.0, 1.0], then="backbone pixel mean/std on 0..255"),
        mode="apm_ips", modes=list(MODES),
        apm=APM(feature_blocks=blocks, feature_blocks_reason=blocks_reason, conv_channels=256,
                resnet_layers=[3, 4, 6, 3], readout=readout, readout_reason=readout_reason),
        ips=IPS(hidden=1024),
        prompt=Prompt(output=output, output_reason=output_reason, num_positive=8, num_negative=8,
                      label_groups=region_values if use_regions else [[v] for v in foreground_labels(dataset_json)]),
        image_augmentation=not cpu,
        image_augmentation_reason=("CPU: no image augmentation, so every slice is encoded once and its features are "
                                   "cached (an epoch then costs the APM, IPS and decoder only)" if cpu else
                                   "GPU: augmented slices, encoded in every step (the frozen encoder runs without "
                                   "gradients)"),
        feature_cache="float16", encoder_batch_size=2 if cpu else 16, batch_size=8, recipe=recipe,
        postprocessing=Postprocessing(opening_kernel_px=5),
        model_selection="checkpoint_best: the best EMA pseudo Dice on the fold's validation split, never test data",
        regions=use_regions, budget=budget.to_dict())
