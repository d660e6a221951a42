"""AutoSAM2Net: the 3D U-Net plus the SAM branch (mapper, SAM model, bridge), and the branch's slice-level call.

`forward(x)` is the U-Net alone (logits); `unet(x)` also returns the bridge features; `refine(...)` runs the SAM
branch on a set of slices and prompt rows, differentiably: gradients from SAM's mask logits reach the mapper
(through the image encoder, frozen or not), the bridge and the U-Net's features.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from samplan.methods.autosam2.branch import Bridge, MRIToRGBMapper
from samplan.methods.autosam2.plan import AutoSAM2Section, check_section, resolve_spec
from samplan.methods.autosam2.sam_adapter import Geometry, SamAdapter, build_adapter, load_adapter_weights
from samplan.methods.autosam2.unet3d import UNet3D
from samplan.methods.sam_common.slice_input import to_unit_range
from samplan.prompts.points import Prompts


@dataclass(frozen=True)
class PromptRow:
    """One SAM call: slice `image` (index into the refined slices), foreground output `output`, its prompts."""

    image: int
    output: int
    prompts: Prompts


class AutoSAM2Net(nn.Module):
    """U-Net + MRI-to-RGB mapper + SAM (frozen parts per plan) + bridge."""

    def __init__(self, section: AutoSAM2Section, in_channels: int, num_outputs: int):
        super().__init__()
        check_section(section)
        spec, size = resolve_spec(section.backbone, section.planned_backbone, section.input_size)
        u = section.unet
        self.unet = UNet3D(in_channels, num_outputs, u.features, u.pool_strides, u.stem_kernel, u.dropout)
        self.sam: SamAdapter = build_adapter(spec, size)
        b = section.branch
        self.mapper = MRIToRGBMapper(in_channels, b.mapper_width)
        self.bridge = Bridge(self.unet.bridge_channels, self.sam.embed_dim, b.bridge_width, b.bridge_reduction,
                             b.bridge_initial_scale)
        self.rules = list(section.intensity.per_channel)
        self.start_channels = list(section.channels.start_rgb_from_channels)
        for name in ("image_encoder", "prompt_encoder", "mask_decoder"):
            trainable = name not in section.frozen_modules
            for p in self.sam.part(name).parameters():
                p.requires_grad_(trainable)

    def train(self, mode: bool = True) -> "AutoSAM2Net":
        """Frozen SAM parts stay in eval mode (no dropout or norm statistics change in them)."""
        super().train(mode)
        for module in self.sam.model.children():
            if not any(p.requires_grad for p in module.parameters()):
                module.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The U-Net's logits `(B, K, Z, Y, X)` (SAM refinement is `refine`, called by the method's steps)."""
        return self.unet(x)[0]

    def refine(self, slices: torch.Tensor, features: torch.Tensor, rows: list[PromptRow]) -> torch.Tensor:
        """SAM's mask logits `(R, 1, H, W)` for R prompt rows on `slices` `(N, C, H, W)` (cache values) with the
        U-Net's bridge features `(N, Cu, h, w)` of the same slices (any resolution)."""
        h, w = slices.shape[-2:]
        geometry = self.sam.geometry(h, w)
        with torch.no_grad():
            start = to_unit_range(slices.float(), self.rules)[:, self.start_channels]
        rgb = self.mapper(slices.float(), start)
        embeddings, extras = self.sam.encode(self.sam.prepare(rgb))
        embeddings = embeddings + self._bridged(features, geometry)
        index = torch.tensor([r.image for r in rows], device=slices.device)
        points, labels, boxes = prompt_tensors(rows, slices.device)
        logits = self.sam.decode(embeddings[index], [e[index] for e in extras], points, labels, boxes, geometry)
        return self.sam.logits_to_slice(logits, geometry, (h, w))

    def _bridged(self, features: torch.Tensor, geometry: Geometry) -> torch.Tensor:
        """Bridge output on SAM's embedding grid: the features resized to the slice's part of the grid, bridged, and
        zero where the encoder input is padding."""
        g, (gh, gw) = self.sam.grid, geometry.grid_valid
        x = F.interpolate(features.float(), size=(gh, gw), mode="bilinear", align_corners=False)
        x = F.pad(x, (0, g - gw, 0, g - gh))
        valid = torch.zeros((1, 1, g, g), device=x.device)
        valid[..., :gh, :gw] = 1.0
        return self.bridge(x) * valid


def prompt_tensors(rows: list[PromptRow], device: torch.device
                   ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Points `(R, P, 2)` with labels `(R, P)` (rows with fewer points padded with label -1, "not a point") and boxes
    `(R, 4)`, in slice pixels; None for a kind no row has."""
    n_points = max(len(r.prompts.points) for r in rows)
    points = labels = boxes = None
    if n_points:
        pts = np.zeros((len(rows), n_points, 2), np.float32)
        lab = np.full((len(rows), n_points), -1, np.int64)
        for i, r in enumerate(rows):
            k = len(r.prompts.points)
            pts[i, :k], lab[i, :k] = r.prompts.points, r.prompts.point_labels
        points, labels = torch.from_numpy(pts).to(device), torch.from_numpy(lab).to(device)
    if all(r.prompts.box is not None for r in rows):
        boxes = torch.from_numpy(np.stack([r.prompts.box for r in rows]).astype(np.float32)).to(device)
    return points, labels, boxes


def feature_slices(features: torch.Tensor, batch_index: torch.Tensor, z: torch.Tensor, depth: int) -> torch.Tensor:
    """Bridge features `(B, C, Z', h, w)` at slices `z` (of `depth` full-resolution slices) of items `batch_index`:
    `(N, C, h, w)`, linearly interpolated along the (possibly pooled) slice axis."""
    zf = features.shape[2]
    pos = ((z.float() + 0.5) * zf / depth - 0.5).clamp(0, zf - 1)
    lo = pos.floor().long()
    hi = (lo + 1).clamp_max(zf - 1)
    t = (pos - lo.float()).view(-1, 1, 1, 1).to(features.dtype)
    return features[batch_index, :, lo] * (1 - t) + features[batch_index, :, hi] * t


def build_autosam2(section: AutoSAM2Section, in_channels: int, num_outputs: int) -> AutoSAM2Net:
    """The network with random weights (SAM's until initialize_autosam2)."""
    return AutoSAM2Net(section, in_channels, num_outputs)


def parameter_counts(network: AutoSAM2Net) -> tuple[int, int]:
    """(trainable, frozen) parameter counts."""
    trainable = sum(p.numel() for p in network.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in network.parameters()) - trainable


def initialize_autosam2(network: AutoSAM2Net, section: AutoSAM2Section) -> str:
    """The planned SAM weights into the branch; a log line with the backbone, the weights and both counts."""
    spec, size = resolve_spec(section.backbone, section.planned_backbone, section.input_size)
    source = load_adapter_weights(network.sam, spec, section.checkpoint, size)
    trainable, frozen = parameter_counts(network)
    return (f"autosam2: SAM branch {spec.name} at {size} px, {source}, frozen {', '.join(section.frozen_modules) or 'none'}"
            f"; slice fraction {section.slice_fraction}; {trainable:,} trainable parameters (U-Net, mapper, bridge"
            f"{', SAM parts' if len(section.frozen_modules) < 3 else ''}), {frozen:,} frozen")
