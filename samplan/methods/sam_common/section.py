"""The plan keys every SAM model section shares (medsam, samzeroshot, promise, autosam2): which backbone, at which
input size, with which weights."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from samplan.experiment_planning.sections import PlanSection, info
from samplan.methods.sam_common.plan import SAM_MODEL_FAMILIES, IntensityRule, resolve_backbone
from samplan.models.specs import BackboneSpec


@dataclass(frozen=True, kw_only=True)
class SAMModelSection(PlanSection):
    """Backbone (an alias or a --backbone override allowed), the planned one and its input size, and the weights:
    "auto" (the backbone's official weights, samplan_weights), "none" (random) or a checkpoint file (--checkpoint)."""

    configurations: list[str]
    backbone: str
    planned_backbone: str
    backbone_choices: list[str] = info()
    checkpoint: str
    input_size: int


@dataclass(frozen=True, kw_only=True)
class RGBChannels(PlanSection):
    """The dataset's channel names and the cache channel feeding each of the 3 encoder channels."""

    names: list[str] = info()
    rgb_from_channels: list[int]


@dataclass(frozen=True, kw_only=True)
class UnitIntensity(PlanSection):
    """Cache values -> [0, 1] per channel (samplan.methods.sam_common.plan's rules)."""

    per_channel: list[IntensityRule]
    output_range: list[float] = info()


def resolved_model_section(section: Any, method: str) -> tuple[Any, BackboneSpec]:
    """The section with its backbone's canonical name and effective input size (the planned size for the planned
    backbone, the native one for another or a fixed-size encoder), and the backbone's spec."""
    spec, size = resolve_backbone(section.backbone, section.planned_backbone, section.input_size, method,
                                  SAM_MODEL_FAMILIES)
    return section.replace(backbone=spec.name, input_size=size), spec
