"""samzeroshot's network: a frozen segment_anything Sam with a weights-identity buffer, and its pretrained weights."""
from __future__ import annotations

import torch
from torch import nn

from samplan.methods.sam_common.slice_input import SamInput
from samplan.methods.sam_common.weights import load_sam_weights, record_weights_identity
from samplan.methods.samzeroshot.plan import WEIGHTS_BUFFER, SAMZeroShotSection
from samplan.models.backbones import build_sam_model
from samplan.models.specs import backbone_spec


def slice_input(section: SAMZeroShotSection) -> SamInput:
    """How cache slices become the encoder's input: [0, 1], then the backbone's pixel mean/std on 0..255."""
    spec = backbone_spec(section.backbone)
    return SamInput(section.input_size, section.intensity.per_channel, section.channels.rgb_from_channels,
                    spec.pixel_mean, spec.pixel_std)


def build_samzeroshot(section: SAMZeroShotSection, num_outputs: int) -> nn.Module:
    """The Sam model with random weights, frozen, with an empty weights-identity buffer (see initialize)."""
    model = build_sam_model(section.backbone, input_size=section.input_size).eval()
    model.register_buffer(WEIGHTS_BUFFER, torch.zeros(32, dtype=torch.uint8))
    for p in model.parameters():
        p.requires_grad_(False)
    model.samzeroshot_num_outputs = int(num_outputs)
    return model


def initialize_samzeroshot(network: nn.Module, section: SAMZeroShotSection) -> str:
    """Load the planned weights ('auto' = official, a file, or 'none' = random) and record their identity; a log line."""
    spec = backbone_spec(section.backbone)
    source, identity = load_sam_weights(network, spec, section.checkpoint, section.input_size, (WEIGHTS_BUFFER,),
                                        "samzeroshot", identify=True)
    record_weights_identity(network, WEIGHTS_BUFFER, identity)
    return f"samzeroshot: {spec.name} at {section.input_size} px, {source} (sha256 {identity[:12]}), no training"
