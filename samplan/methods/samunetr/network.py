"""samunetr's torch parts: the network, pretrained encoder weights, the recipe and validation with largest component.

Network: `SliceAdapter(SAMUNETR(encoder, UNETRDecoder))`. The adapter (samplan.methods.sam_common) takes slices of the
"2d" cache (B, C, H, W) through the shared SAM input pipeline: intensity rules, one channel repeated to RGB (channel
mode "repeat": the pretrained patch embedding is used unchanged; "adapt_patch_embed" builds the encoder with C input
channels instead), the planned backbone's pixel statistics, longest side resized to the planned input S and padded;
the logits come back at (H, W). So the generic training/validation steps and the slice predictor work unchanged.

Model selection: the running validation Dice (which picks checkpoint_best) is counted after keeping, per slice and
class, the largest connected component of the prediction (`keep_largest_component`). The final validation and
samplan_predict export the raw argmax (no component filtering). A frozen encoder (`freeze_encoder`) keeps its
parameters out of the optimiser.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

from samplan.dataset.labels import LabelManager
from samplan.devices import autocast
from samplan.errors import SamplanError
from samplan.methods.sam_common.plan import encoder_channels
from samplan.methods.sam_common.slice_adapter import SliceAdapter
from samplan.methods.sam_common.slice_input import SamInput
from samplan.methods.samunetr.plan import SAMUNETRSection
from samplan.models.backbones import build_image_encoder
from samplan.models.specs import backbone_spec
from samplan.models.unetr_decoder import SAMUNETR, UNETRDecoder, feature_block_indexes
from samplan.models.weights import load_backbone_state, load_strict
from samplan.engine.augmentation import slice_augmentation
from samplan.engine.components import keep_largest_component
from samplan.engine.dice_focal import DiceFocalLoss
from samplan.engine.optim import make_optimizer, make_schedule
from samplan.engine.recipe import TrainingRecipe
from samplan.engine.steps import hard_tp_fp_fn


LOSSES = {"dice_focal": DiceFocalLoss}  # the plan's recipe.loss.name


def slice_input(section: SAMUNETRSection) -> SamInput:
    """How cache slices become the encoder's input under this section."""
    ch = section.channels
    return SamInput(section.input_size, section.intensity.per_channel, encoder_channels(ch.mode, ch.num_input_channels),
                    section.intensity.pixel_mean, section.intensity.pixel_std)


def build_samunetr(section: SAMUNETRSection, num_input_channels: int, num_outputs: int) -> SliceAdapter:
    """SliceAdapter(SAMUNETR) with random weights at the planned input size; encoder frozen when the plan says so."""
    spec = backbone_spec(section.backbone)
    expected = section.channels.num_input_channels
    if num_input_channels != expected:
        raise SamplanError(f"the samunetr plan expects {expected} input channel(s), the dataset has "
                           f"{num_input_channels}; re-plan.")
    in_chans = section.channels.in_chans
    encoder = build_image_encoder(spec.name, input_size=section.input_size, in_chans=in_chans)
    decoder = UNETRDecoder(in_chans, spec.embed_dim, num_outputs, section.feature_size)
    model = SAMUNETR(encoder, decoder, feature_block_indexes(spec.depth, spec.global_attn_indexes))
    if section.freeze_encoder:
        for p in model.encoder.parameters():
            p.requires_grad_(False)
    return SliceAdapter(model, slice_input(section))


def load_pretrained_encoder(network: SliceAdapter, section: SAMUNETRSection) -> str:
    """Load the planned encoder weights into a freshly built network; returns a line for the training log."""
    spec = backbone_spec(section.backbone)
    ckpt = section.checkpoint
    trainable = sum(p.numel() for p in network.parameters() if p.requires_grad)
    total = sum(p.numel() for p in network.parameters())
    counts = f"{trainable / 1e6:.2f} M of {total / 1e6:.2f} M parameters trainable"
    if ckpt.lower() == "none" or (ckpt == "auto" and spec.weights is None):  # tiny test encoders have no official weights
        return f"samunetr: {spec.name} encoder randomly initialised; {counts}"
    in_chans = section.channels.in_chans
    # load the adapted state straight into the network's encoder: building a second encoder to copy from would
    # hold the backbone twice (2.5 GB for ViT-H)
    state = load_backbone_state(spec, ckpt, input_size=section.input_size, in_chans=in_chans, part="image_encoder")
    load_strict(network.network.encoder, state, spec.name, ckpt)
    return (f"samunetr: {spec.name} encoder weights from {ckpt} (resized to {section.input_size} px, {in_chans} "
            f"channel(s)); {counts}")


def samunetr_recipe(section: SAMUNETRSection, cfg: Mapping[str, Any], label_manager: LabelManager) -> TrainingRecipe:
    """The recipe of samplan.methods.samunetr.plan from the section and the 2d configuration `cfg`."""
    r = section.recipe
    patch = tuple(int(p) for p in cfg["patch_size"])
    if len(patch) != 2:
        raise SamplanError(f"samunetr trains on 2D slices; the configuration has a {len(patch)}D patch.")
    softmax = r.loss.activation == "softmax"
    if softmax == label_manager.has_regions:
        raise SamplanError(f"the samunetr plan's loss uses {r.loss.activation}, which cannot train this dataset's "
                           f"{'regions' if label_manager.has_regions else 'labels'}; re-plan.")
    aug = {**slice_augmentation(r.augmentation_params), "use_mask_for_norm": list(cfg["use_mask_for_norm"])}
    return TrainingRecipe(
        loss=LOSSES[r.loss.name](softmax=softmax, ignore_label=label_manager.ignore_label),
        make_optimizer=make_optimizer(r.optimizer),
        make_scheduler=make_schedule(r.lr_schedule),
        num_epochs=int(r.num_epochs),
        iterations_per_epoch=int(r.num_iterations_per_epoch),
        val_iterations_per_epoch=int(r.num_val_iterations_per_epoch),
        batch_size=int(section.batch_size),
        patch_size=patch,
        oversample_foreground=float(r.oversample_foreground_percent),
        augmentation=aug,
        mirror_axes=tuple(aug["mirror_axes"]),
        grad_clip=r.grad_clip,
    )


def largest_component_logits(output: torch.Tensor, has_regions: bool) -> torch.Tensor:
    """Logits (B, K, H, W) -> stand-in logits whose hard prediction keeps each class's (region's) largest
    component per sample (removed softmax pixels become background)."""
    out = output.detach().float().cpu()
    if has_regions:
        masks = (torch.sigmoid(out) > 0.5).numpy()
        kept = np.stack([[keep_largest_component(m) for m in sample] for sample in masks])
        return torch.from_numpy(kept.astype(np.float32) * 2 - 1)
    seg = out.argmax(1).numpy()
    new = np.zeros_like(seg)
    for b in range(seg.shape[0]):
        for k in range(1, out.shape[1]):
            new[b][keep_largest_component(seg[b] == k)] = k
    return torch.zeros_like(out).scatter_(1, torch.from_numpy(new)[:, None].long(), 1.0)


def validation_with_largest_component(network: nn.Module, batch: dict[str, Any], recipe: TrainingRecipe,
                                      device: torch.device, label_manager: LabelManager) -> dict[str, Any]:
    """Loss and tp/fp/fn of a validation batch, the counts taken after keep-largest-component (model selection)."""
    data = batch["data"].to(device)
    target = batch["target"].to(device)
    with torch.no_grad(), autocast(device, recipe.autocast_dtype):
        output = network(data)
        loss = recipe.loss(output, target)
    filtered = largest_component_logits(output, label_manager.has_regions)
    tp, fp, fn = hard_tp_fp_fn(filtered, target.cpu(), label_manager)
    return {"loss": float(loss), "tp": tp, "fp": fp, "fn": fn}
