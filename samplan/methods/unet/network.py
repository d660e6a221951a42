"""unet's torch parts: the PlainConvUNet of a base configuration and nnU-Net's training recipe.

Deep supervision: `build_unet` returns the network with deep supervision ON (a list of logits, full resolution
first), which training needs; prediction switches it off (`set_deep_supervision(network, False)`), so the network
returns only the full-resolution logits; the weights are the same either way.
"""
from __future__ import annotations

import pydoc
from typing import Any, Mapping

from torch import nn

from samplan.dataset.labels import LabelManager
from samplan.errors import SamplanError
from samplan.methods.unet.plan import UNetSection, deep_supervision_scales, deep_supervision_weights
from samplan.engine.augmentation import augmentation_params
from samplan.engine.losses import build_segmentation_loss
from samplan.engine.optim import make_optimizer, make_schedule
from samplan.engine.recipe import TrainingRecipe

# plans.json comes from files users share: only classes from these packages may be named in it
_ALLOWED_IMPORT_PREFIXES = ("dynamic_network_architectures.", "torch.nn.")


def _locate(dotted: str, what: str) -> Any:
    """Import a class named in plans.json, only from the allowed packages."""
    if not dotted.startswith(_ALLOWED_IMPORT_PREFIXES):
        raise SamplanError(f"plans.json names {what} {dotted!r}; only classes from {', '.join(_ALLOWED_IMPORT_PREFIXES)} are allowed.")
    obj = pydoc.locate(dotted)
    if obj is None:
        raise SamplanError(f"plans.json names {what} {dotted!r}, which cannot be imported; check the plan or the installed packages.")
    return obj


def set_deep_supervision(network: nn.Module, enabled: bool) -> None:
    """Switch the decoder between all outputs (training) and the full-resolution output only (inference)."""
    network.decoder.deep_supervision = enabled


def build_unet(architecture: Mapping[str, Any], num_input_channels: int, num_outputs: int) -> nn.Module:
    """The planned network class with its planned kwargs, He-initialised, deep supervision on."""
    kwargs = dict(architecture["arch_kwargs"])
    for key in architecture.get("_kw_requires_import", []):
        if kwargs.get(key) is not None:
            kwargs[key] = _locate(kwargs[key], key)
    network_class = _locate(architecture["network_class_name"], "network class")
    network = network_class(input_channels=num_input_channels, num_classes=num_outputs, deep_supervision=True, **kwargs)
    if hasattr(network, "initialize"):
        network.apply(network.initialize)
    return network


def unet_recipe(section: UNetSection, cfg: Mapping[str, Any], configuration: str,
                label_manager: LabelManager) -> TrainingRecipe:
    """Dice+CE (Dice+BCE for regions) with deep supervision, SGD Nesterov 0.99 with poly lr, 33 % foreground
    oversampling, nnU-Net's augmentation and mirror axes, from the plan section and configuration `cfg`."""
    r = section.recipe
    strides = cfg["architecture"]["arch_kwargs"]["strides"]
    ds_on = bool(r.deep_supervision.enabled)
    scales = deep_supervision_scales(strides) if ds_on else None
    weights = None
    if ds_on:
        weights = list(r.deep_supervision.weights.get(configuration, []))
        if len(weights) != len(scales):  # the plan's topology was edited after planning: derive them again
            weights = deep_supervision_weights(len(strides))
    lo = r.loss
    loss = build_segmentation_loss(
        label_manager.has_regions, batch_dice=bool(lo.batch_dice.get(configuration, False)),
        ignore_label=label_manager.ignore_label, smooth=float(lo.dice_smooth), weight_ce=float(lo.weight_ce),
        weight_dice=float(lo.weight_dice), deep_supervision_weights=weights)
    aug = augmentation_params(cfg["patch_size"], cfg["spacing"])
    aug["use_mask_for_norm"] = list(cfg["use_mask_for_norm"])
    return TrainingRecipe(
        loss=loss,
        make_optimizer=make_optimizer(r.optimizer),
        make_scheduler=make_schedule(r.lr_schedule),
        num_epochs=int(r.num_epochs),
        iterations_per_epoch=int(r.num_iterations_per_epoch),
        val_iterations_per_epoch=int(r.num_val_iterations_per_epoch),
        batch_size=int(cfg["batch_size"]),
        patch_size=tuple(int(p) for p in cfg["patch_size"]),
        oversample_foreground=float(r.oversample_foreground_percent),
        deep_supervision_scales=scales,
        augmentation=aug,
        mirror_axes=tuple(aug["mirror_axes"]),
        grad_clip=r.grad_clip,
    )
