"""samunetr's trainable parts: network, pretrained encoder weights, recipe and validation with largest-component.

Network: `SliceAdapter(SAMUNETR(encoder, UNETRDecoder))`. The adapter takes slices of the "2d" cache (B, C, H, W),
maps intensities to 0..255 by the plan, repeats a single channel to RGB (channel mode "repeat": the pretrained
patch embedding is used unchanged; "adapt_patch_embed" builds the encoder with C input channels instead), normalises
with SAM's pixel statistics, resizes the longer side to the planned input S and pads, and resizes the logits back
to (H, W). So the generic training/validation steps and the slice predictor (inference.dense) work unchanged, and
the loss and pseudo Dice are computed at the slice resolution of the cache.

Recipe: DiceFocal (softmax + one-hot; sigmoid for regions), AdamW lr 1e-3 weight decay 0.01 (the paper's Novograd
is not in torch and no Novograd package is installed: AdamW is the documented substitute), constant learning rate,
light augmentation (rotation +-15 deg and scaling 0.7-1.4 only, no mirroring, no intensity transforms), 2D patches
of the 2d configuration's patch size, batch size from the plan section (planned for the SAM input size). A frozen
encoder (`freeze_encoder` in the section) keeps its parameters out of the optimiser.

Model selection: the running validation Dice (which picks checkpoint_best) is counted after keeping, per slice and
class, the largest connected component of the prediction (`keep_largest_component`). The final validation and
samplan_predict export the raw argmax (no component filtering).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from scipy import ndimage
from torch import nn

from samplan.errors import SamplanError
from samplan.training.recipe import TrainingRecipe

NAME = "samunetr"


def section_of(plans: dict[str, Any]) -> dict[str, Any]:
    """The samunetr plan section (with the trainer's overrides merged in), or a SamplanError saying how to plan it."""
    section = plans.get("methods", {}).get(NAME)
    if section is None:
        raise SamplanError(f"plans.json has no '{NAME}' section; re-plan with samplan_plan_and_preprocess -m {NAME}.")
    return section


def _spec_and_channels(section: dict[str, Any]) -> tuple[Any, str, int]:
    """(backbone spec from samplan.models.backbones, registry name, encoder in_chans)."""
    from samplan.methods.samunetr import resolve_backbone_name
    from samplan.models.backbones import backbone_spec

    name = resolve_backbone_name(section["backbone"])
    spec = backbone_spec(name)
    if spec.family != "sam":
        raise SamplanError(f"samunetr needs a SAM ViT encoder, {name!r} is a {spec.family} backbone.")
    return spec, name, int(section["channels"]["in_chans"])


def check_section(plans: dict[str, Any]) -> None:
    """SamplanError unless the section names a SAM ViT backbone and any checkpoint file exists."""
    from pathlib import Path

    section = section_of(plans)
    spec, _, _ = _spec_and_channels(section)
    ckpt = encoder_checkpoint(section, spec)
    if ckpt not in (None, "auto") and not Path(ckpt).is_file():
        raise SamplanError(f"samunetr checkpoint {ckpt} does not exist; pass an existing file to --checkpoint "
                           "(or 'none' for random weights).")


def build_samunetr_network(plans: dict[str, Any], num_input_channels: int, num_outputs: int) -> nn.Module:
    """SliceAdapter(SAMUNETR) with random weights at the planned input size; encoder frozen when the plan says so."""
    from samplan.methods.slice_io import SliceAdapter
    from samplan.models.backbones import build_image_encoder
    from samplan.models.unetr_decoder import SAMUNETR, UNETRDecoder, feature_block_indexes

    section = section_of(plans)
    spec, name, in_chans = _spec_and_channels(section)
    expected = int(section["channels"]["num_input_channels"])
    if num_input_channels != expected:
        raise SamplanError(f"the samunetr plan expects {expected} input channel(s), the dataset has {num_input_channels}; re-plan.")
    size = int(section["input_size"])
    encoder = build_image_encoder(name, input_size=size, in_chans=in_chans)
    decoder = UNETRDecoder(in_chans, spec.embed_dim, num_outputs, int(section.get("feature_size", 20)))
    model = SAMUNETR(encoder, decoder, feature_block_indexes(spec.depth, spec.global_attn_indexes))
    if section.get("freeze_encoder"):
        for p in model.encoder.parameters():
            p.requires_grad_(False)
    from samplan.methods.samunetr import pixel_statistics

    # the backbone's own statistics (MedSAM's differ from SAM's), so that a --backbone override stays correct
    mean, std = pixel_statistics(in_chans, tuple(spec.pixel_mean), tuple(spec.pixel_std))
    return SliceAdapter(model, size, section["intensity"]["per_channel"], mean, std, in_chans)


def encoder_checkpoint(section: dict[str, Any], spec: Any) -> Any:
    """What to load into the encoder: a file (--checkpoint), "auto" (official weights of the backbone) or None."""
    ckpt = section.get("checkpoint")
    if ckpt not in (None, ""):
        return None if str(ckpt).lower() == "none" else ckpt
    choice = str(section.get("encoder_weights", "auto"))
    if choice == "none" or (choice == "auto" and getattr(spec, "weights", None) is None):
        return None  # tiny test encoders have no official weights
    return choice


def load_pretrained_encoder(network: nn.Module, plans: dict[str, Any]) -> str:
    """Load the planned encoder weights into a freshly built network; returns a line for the training log."""
    from pathlib import Path

    from samplan.models.backbones import load_strict
    from samplan.models.weights import load_backbone_state

    section = section_of(plans)
    spec, name, in_chans = _spec_and_channels(section)
    ckpt = encoder_checkpoint(section, spec)
    trainable = sum(p.numel() for p in network.parameters() if p.requires_grad)
    total = sum(p.numel() for p in network.parameters())
    counts = f"{trainable / 1e6:.2f} M of {total / 1e6:.2f} M parameters trainable"
    if ckpt is None:
        return f"samunetr: {name} encoder randomly initialised; {counts}"
    source = "auto" if ckpt == "auto" else Path(ckpt)
    # load the adapted state straight into the network's encoder: building a second encoder to copy from would
    # hold the backbone twice (2.5 GB for ViT-H)
    state = load_backbone_state(spec, source, input_size=int(section["input_size"]), in_chans=in_chans,
                                part="image_encoder")
    load_strict(network.network.encoder, state, name, ckpt)
    return f"samunetr: {name} encoder weights from {ckpt} (resized to {section['input_size']} px, {in_chans} channel(s)); {counts}"


def _trainable(params: Any) -> list[nn.Parameter]:
    return [p for p in params if p.requires_grad]


def samunetr_recipe(plans: dict[str, Any], configuration: str, label_manager: Any) -> TrainingRecipe:
    """The recipe of the module docstring from the plan section and the 2d configuration."""
    import math

    from samplan.training.dice_focal import DiceFocalLoss
    from samplan.training.optim import make_poly

    section = section_of(plans)
    r = section["recipe"]
    cfg = plans["configurations"][configuration]
    patch = tuple(int(p) for p in cfg["patch_size"])
    if len(patch) != 2:
        raise SamplanError(f"samunetr trains on 2D slices; configuration {configuration!r} has a {len(patch)}D patch.")
    opt = r["optimizer"]
    if opt["name"] != "AdamW":  # Novograd is unavailable (module docstring)
        opt = opt.get("substitute") or {"name": "AdamW", "lr": 1e-3, "weight_decay": 0.01}
    lr, wd = float(opt["lr"]), float(opt["weight_decay"])

    def make_optimizer(params: Any) -> torch.optim.Optimizer:
        return torch.optim.AdamW(_trainable(params), lr=lr, weight_decay=wd)

    aug = r.get("augmentation_params", {"rotation_deg": 15.0})
    rot = math.radians(float(aug.get("rotation_deg", 15.0)))
    softmax = not label_manager.has_regions
    return TrainingRecipe(
        loss=DiceFocalLoss(softmax=softmax, ignore_label=label_manager.ignore_label),
        make_optimizer=make_optimizer,
        make_scheduler=make_poly(0.0),  # exponent 0: a constant learning rate with the trainer's scheduler protocol
        num_epochs=int(r.get("num_epochs", 200)),
        iterations_per_epoch=int(r.get("num_iterations_per_epoch", 250)),
        val_iterations_per_epoch=int(r.get("num_val_iterations_per_epoch", 50)),
        batch_size=int(section["batch_size"]),
        patch_size=patch,
        oversample_foreground=float(r.get("oversample_foreground_percent", 0.33)),
        augmentation={"rotation_for_DA": (-rot, rot), "mirror_axes": (), "do_dummy_2d_data_aug": False,
                      "use_mask_for_norm": list(cfg["use_mask_for_norm"]), "intensity": bool(aug.get("intensity", False))},
        mirror_axes=(),
        grad_clip=12.0,
    )


def keep_largest_component(mask: np.ndarray) -> np.ndarray:
    """Boolean (H, W) or (Z, Y, X) mask -> the mask of its largest connected component (full connectivity)."""
    labels, n = ndimage.label(mask, structure=np.ones((3,) * mask.ndim, dtype=bool))
    if n <= 1:
        return mask.astype(bool)
    sizes = np.bincount(labels.ravel())[1:]
    return labels == (int(np.argmax(sizes)) + 1)


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
                                      device: torch.device, label_manager: Any) -> dict[str, Any]:
    """Loss and tp/fp/fn of a validation batch, the counts taken after keep-largest-component (model selection)."""
    from samplan.devices import autocast
    from samplan.training.steps import hard_tp_fp_fn

    data = batch["data"].to(device)
    target = batch["target"].to(device)
    with torch.no_grad(), autocast(device, recipe.autocast_dtype):
        output = network(data)
        loss = recipe.loss(output, target)
    filtered = largest_component_logits(output, label_manager.has_regions)
    tp, fp, fn = hard_tp_fp_fn(filtered, target.cpu(), label_manager)
    return {"loss": float(loss), "tp": tp, "fp": fp, "fn": fn}
