"""samzeroshot's plan section (torch-free): SAM zero-shot with oracle point/box prompts (Gutierrez et al., SAM
zero-shot on lung CT, IEEE Access 2024), any SAM-family backbone.

No training: `samplan_train -m samzeroshot` only writes the model folder (the pretrained weights and a
`samzeroshot_weights_id` buffer, the sha256 of the weights file or of the random state, which keys the embedding
cache), so samplan_predict and samplan_evaluate serve it like any trained model.

Input: each slice of the "2d" cache becomes 3 channels (`channels.rgb_from_channels`). Intensity: CT channels are
clipped to the paper's window [-1400, 100] HU (in cache units) and min-max scaled per slice; MR/other: per-slice
0.5/99.5 percentile clip; RGB as stored; all to [0, 1]. Then the backbone's own normalisation (SAM's ImageNet
statistics, none for (Lite)MedSAM), longest side resized to the input size, zero-padded (sam_common.slice_input).

Prompts (given at prediction, samplan.inference.prompted): the paper's oracle (per labelled slice, one positive
point per label value at its centre of mass moved inside, one negative point at the centre of the union box,
optionally the box), boxes only, box propagation from the slice with the largest reference box, or a user's prompts
file. `prompt.strategy` is the default when samplan_predict names none; `prompt.label_groups` says which label
values share one SAM call (the paper's merged lungs are `[[1, 2]]`, painted with the group's first value). Output
"single" (one mask, logit > 0) or "multimask" (the mask with the best predicted IoU). Reference-derived prompts are
an oracle: prediction folders record it in prompts_used.json. Label-based datasets only (no regions).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from samplan.dataset.dataset_json import channel_names, uses_regions
from samplan.errors import SamplanError
from samplan.experiment_planning.budget import ComputeBudget
from samplan.experiment_planning.sections import PlanSection, info
from samplan.methods.sam_common.plan import (SAM_MODEL_FAMILIES, channel_mode, intensity_rules,
                                             rgb_from_channels, with_ct_window)
from samplan.methods.sam_common.section import RGBChannels, SAMModelSection, UnitIntensity
from samplan.models.specs import backbone_spec, backbones_of

NAME = "samzeroshot"
DEFAULT_BACKBONE = "litemedsam"  # the only real weights on the development machines (the paper: SAM ViT-L)
CT_WINDOW_HU = (-1400.0, 100.0)
STRATEGIES = ("oracle", "box", "propagate", "file", "model")
WEIGHTS_BUFFER = "samzeroshot_weights_id"


@dataclass(frozen=True, kw_only=True)
class Intensity(UnitIntensity):
    """Cache values -> [0, 1] per channel; the backbone's pixel mean/std follow."""

    then: str = info()


@dataclass(frozen=True, kw_only=True)
class Prompt(PlanSection):
    """Reference-derived prompts: the default strategy, the oracle's points / negative point / box, the label groups."""

    strategy: Literal["oracle", "box", "propagate"]
    points: bool
    negative_point: bool
    box: bool
    label_groups: list[list[int]]
    choices: list[str] = info()
    # prompts from a first-stage model's label maps (a cascade): per component a box, points, or both
    from_model: Literal["box", "points", "box+points"]
    from_model_reason: str = info()


@dataclass(frozen=True, kw_only=True)
class SAMZeroShotSection(SAMModelSection):
    """plans["methods"]["samzeroshot"]."""

    channels: RGBChannels
    intensity: Intensity
    prompt: Prompt
    output: Literal["single", "multimask"]
    threshold: float
    encoder_batch_size: int
    # input pixels around each propagated box; null: LiteMedSAM's 3 px at 256, scaled to the input size
    propagation_margin_px: float | None = None
    regions: bool
    oracle_protocol: str = info()
    budget: dict[str, Any] = info()


def prompt_from_model(backbone: str) -> tuple[str, str]:
    """What a cascade's first-stage label maps become for this backbone, and why."""
    if backbone_spec(backbone).family == "litemedsam" or backbone.startswith("medsam"):
        return "box", (f"{backbone} was trained with box prompts only and answers points poorly (LiteMedSAM on "
                       "Hippocampus: volume Dice 0.70 with boxes, 0.03 with points)")
    return "box+points", f"{backbone} (SAM) was trained with points and boxes: both, as SAM's interactive use"


def plan_section(fingerprint: dict[str, Any], base_plan: dict[str, Any], budget: ComputeBudget,
                 dataset_json: dict[str, Any]) -> SAMZeroShotSection:
    """Backbone, input size, channels, intensity mapping, prompt settings and output mode."""
    if "2d" not in base_plan["configurations"]:
        raise SamplanError("samzeroshot needs the 2d configuration in the plan; re-plan with it.")
    cfg = base_plan["configurations"]["2d"]
    names = channel_names(dataset_json)
    fg_props = base_plan["foreground_intensity_properties_per_channel"]
    rules = with_ct_window(intensity_rules(channel_mode(names), cfg, fg_props), fg_props, CT_WINDOW_HU, minmax=True)
    labels = sorted(int(v) for v in dataset_json["labels"].values() if not isinstance(v, list) and int(v) > 0)
    spec = backbone_spec(DEFAULT_BACKBONE)
    from_model, why = prompt_from_model(spec.name)
    return SAMZeroShotSection(
        configurations=["2d"], backbone=spec.name, planned_backbone=spec.name,
        backbone_choices=backbones_of(SAM_MODEL_FAMILIES), checkpoint="auto", input_size=spec.native_input_size,
        channels=RGBChannels(names=names, rgb_from_channels=rgb_from_channels(len(names))),
        intensity=Intensity(per_channel=rules, output_range=[0.0, 1.0], then="backbone pixel mean/std on 0..255"),
        prompt=Prompt(strategy="oracle", points=True, negative_point=True, box=False,
                      label_groups=[[v] for v in labels], choices=list(STRATEGIES), from_model=from_model,
                      from_model_reason=why),
        output="single", threshold=0.0,
        # CPU: larger batches are slower per slice (LiteMedSAM, 2 cores: 1.17 s at 2, 1.38 s at 4, channels-last)
        encoder_batch_size=2 if budget.device == "cpu" else 16,
        propagation_margin_px=None, regions=uses_regions(dataset_json),
        oracle_protocol="prompts from reference masks are an oracle; results are labelled as such",
        budget=budget.to_dict())
