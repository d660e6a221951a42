"""unet: nnU-Net's plain convolutional U-Net (dynamic_network_architectures), the baseline of every comparison.

The plan section only names the base configurations it trains (their patch size, topology and batch
size are in plans["configurations"]) and records nnU-Net v2.8.1's training recipe as plain data.

Deep supervision: `build_network` returns the network with deep supervision ON (a list of logits, full
resolution first), which training needs. For inference `predict_logits` switches it off
(`set_deep_supervision(network, False)`, i.e. `network.decoder.deep_supervision = False`), so the network
returns only the full-resolution logits; the weights are the same either way.
"""
from __future__ import annotations

import pydoc
from typing import TYPE_CHECKING, Any

from samplan.dataset.dataset_json import ignore_label, uses_regions
from samplan.errors import SamplanError
from samplan.experiment_planning.plans import ComputeBudget
from samplan.methods.base import TrainableMethod

if TYPE_CHECKING:
    import torch
    from torch import nn

    from samplan.dataset.labels import LabelManager
    from samplan.training.recipe import TrainingRecipe

# the order in which configurations are preferred: 3D when the data is 3D, 2D otherwise
_CONFIGURATIONS = ("3d_fullres", "2d")
# plans.json comes from files users share: only classes from these packages may be named in it
_ALLOWED_IMPORT_PREFIXES = ("dynamic_network_architectures.", "torch.nn.")


def deep_supervision_weights(n_stages: int) -> list[float]:
    """Loss weights of the n_stages-1 decoder outputs (full resolution first): 1/2**i, the lowest one 0, sum 1."""
    w = [1.0 / 2**i for i in range(max(n_stages - 1, 1))]
    if len(w) > 1:
        w[-1] = 0.0
    total = sum(w)
    return [x / total for x in w]


def deep_supervision_scales(strides: list[list[int]]) -> list[list[float]]:
    """Relative size of each decoder output (full resolution first): 1 / cumulative product of the pool strides.

    One entry per output, n_stages - 1 in all (the bottleneck has no output), e.g. strides
    [[1,1,1],[2,2,2],[2,2,2]] -> [[1,1,1],[0.5,0.5,0.5]].
    """
    scales, size = [], [1.0] * len(strides[0])
    for s in strides[:-1]:
        size = [a / b for a, b in zip(size, s)]
        scales.append(list(size))
    return scales


def _locate(dotted: str, what: str) -> Any:
    """Import a class named in plans.json, only from the allowed packages."""
    if not dotted.startswith(_ALLOWED_IMPORT_PREFIXES):
        raise SamplanError(f"plans.json names {what} {dotted!r}; only classes from {', '.join(_ALLOWED_IMPORT_PREFIXES)} are allowed.")
    obj = pydoc.locate(dotted)
    if obj is None:
        raise SamplanError(f"plans.json names {what} {dotted!r}, which cannot be imported; check the plan or the installed packages.")
    return obj


def set_deep_supervision(network: "nn.Module", enabled: bool) -> None:
    """Switch the decoder between all outputs (training) and the full-resolution output only (inference)."""
    network.decoder.deep_supervision = enabled


class UNetMethod(TrainableMethod):
    """Plain U-Net trained with nnU-Net's default recipe."""

    name = "unet"
    dimensionality = "3d"
    needs_training = True

    def plan_section(
        self, fingerprint: dict[str, Any], base_plan: dict[str, Any], budget: ComputeBudget, dataset_json: dict[str, Any]
    ) -> dict[str, Any]:
        """Configurations to train (3d_fullres and 2d, or 2d only) and the recipe defaults."""
        configs = [c for c in _CONFIGURATIONS if c in base_plan["configurations"]]
        regions = uses_regions(dataset_json)
        # nnU-Net uses batch Dice in 3d_fullres only when a 3d_lowres cascade exists; samplan plans none
        batch_dice = {c: c == "2d" for c in configs}
        if regions:
            loss = {"name": "dice_bce", "dice_do_bg": True}
        else:
            loss = {"name": "dice_ce", "dice_do_bg": False}
        loss.update({"weight_dice": 1.0, "weight_ce": 1.0, "dice_smooth": 1e-5, "batch_dice": batch_dice,
                     "ignore_label": ignore_label(dataset_json)})
        return {
            "configurations": configs,
            "default_configuration": configs[0],
            "network": "architecture of each base configuration (plans['configurations'][c]['architecture'])",
            "recipe": {
                "loss": loss,
                "optimizer": {"name": "SGD", "lr": 1e-2, "momentum": 0.99, "nesterov": True, "weight_decay": 3e-5},
                "lr_schedule": {"name": "poly", "exponent": 0.9},
                "num_epochs": 1000,
                "num_iterations_per_epoch": 250,
                "num_val_iterations_per_epoch": 50,
                "oversample_foreground_percent": 0.33,
                "deep_supervision": {
                    "enabled": True,
                    "weights": {
                        c: deep_supervision_weights(base_plan["configurations"][c]["architecture"]["arch_kwargs"]["n_stages"])
                        for c in configs
                    },
                },
            },
        }

    def _section(self, plans: dict[str, Any], configuration: str) -> tuple[dict[str, Any], dict[str, Any]]:
        """(method section, configuration plan), with errors that say how to fix a missing piece."""
        section = plans.get("methods", {}).get(self.name)
        if section is None:
            raise SamplanError(f"plans.json has no '{self.name}' section; re-plan with samplan_plan_and_preprocess -m {self.name}.")
        if configuration not in section["configurations"] or configuration not in plans["configurations"]:
            raise SamplanError(f"configuration {configuration!r} is not planned for {self.name}; planned: "
                               f"{', '.join(section['configurations'])}.")
        return section, plans["configurations"][configuration]

    def build_network(self, plans: dict[str, Any], configuration: str, num_input_channels: int, num_outputs: int) -> "nn.Module":
        """PlainConvUNet with the planned topology, He-initialised, deep supervision on (see the module docstring)."""
        _, cfg = self._section(plans, configuration)
        arch = cfg["architecture"]
        kwargs = dict(arch["arch_kwargs"])
        for key in arch.get("_kw_requires_import", []):
            if kwargs.get(key) is not None:
                kwargs[key] = _locate(kwargs[key], key)
        network_class = _locate(arch["network_class_name"], "network class")
        network = network_class(input_channels=num_input_channels, num_classes=num_outputs, deep_supervision=True, **kwargs)
        if hasattr(network, "initialize"):
            network.apply(network.initialize)
        return network

    def training_recipe(self, plans: dict[str, Any], configuration: str, label_manager: "LabelManager") -> "TrainingRecipe":
        """nnU-Net's recipe from the plan section: Dice+CE (Dice+BCE for regions) with deep supervision, SGD
        Nesterov 0.99 with poly lr, 33 % foreground oversampling, nnU-Net's augmentation and mirror axes."""
        from samplan.training.augmentation import augmentation_params
        from samplan.training.losses import build_segmentation_loss
        from samplan.training.optim import make_poly, make_sgd
        from samplan.training.recipe import TrainingRecipe

        section, cfg = self._section(plans, configuration)
        r = section["recipe"]
        strides = cfg["architecture"]["arch_kwargs"]["strides"]
        ds_on = bool(r["deep_supervision"]["enabled"])
        scales = deep_supervision_scales(strides) if ds_on else None
        weights = None
        if ds_on:
            weights = list(r["deep_supervision"]["weights"].get(configuration, []))
            if len(weights) != len(scales):  # the plan's topology was edited after planning: derive them again
                weights = deep_supervision_weights(len(strides))
        lo = r["loss"]
        loss = build_segmentation_loss(
            label_manager.has_regions, batch_dice=bool(lo["batch_dice"].get(configuration, False)),
            ignore_label=label_manager.ignore_label, smooth=float(lo["dice_smooth"]), weight_ce=float(lo["weight_ce"]),
            weight_dice=float(lo["weight_dice"]), deep_supervision_weights=weights)
        opt, sched = r["optimizer"], r["lr_schedule"]
        if opt["name"] != "SGD" or sched["name"] != "poly":
            raise SamplanError(f"the unet recipe supports SGD with a poly schedule, the plan asks for {opt['name']}/{sched['name']}.")
        aug = augmentation_params(cfg["patch_size"], cfg["spacing"])
        aug["use_mask_for_norm"] = list(cfg["use_mask_for_norm"])
        return TrainingRecipe(
            loss=loss,
            make_optimizer=make_sgd(float(opt["lr"]), float(opt["momentum"]), bool(opt["nesterov"]), float(opt["weight_decay"])),
            make_scheduler=make_poly(float(sched["exponent"])),
            num_epochs=int(r["num_epochs"]),
            iterations_per_epoch=int(r["num_iterations_per_epoch"]),
            val_iterations_per_epoch=int(r["num_val_iterations_per_epoch"]),
            batch_size=int(cfg["batch_size"]),
            patch_size=tuple(int(p) for p in cfg["patch_size"]),
            oversample_foreground=float(r["oversample_foreground_percent"]),
            deep_supervision_scales=scales,
            augmentation=aug,
            mirror_axes=tuple(aug["mirror_axes"]),
            grad_clip=12.0,
        )

    def predict_logits(self, network: "nn.Module", data: "torch.Tensor", plans: dict[str, Any], configuration: str,
                       *, mirror_axes: tuple[int, ...], device: "torch.device") -> "torch.Tensor":
        """Dense logits with deep supervision off (the full-resolution output only); see TrainableMethod."""
        set_deep_supervision(network, False)
        return super().predict_logits(network, data, plans, configuration, mirror_axes=mirror_axes, device=device)
