"""unet: nnU-Net's plain convolutional U-Net (dynamic_network_architectures), the baseline of every comparison.

The plan section only names the base configurations it trains (their patch size, topology and batch
size are in plans["configurations"]) and records nnU-Net v2.8.1's training recipe as plain data.
"""
from __future__ import annotations

from typing import Any

from samplan.dataset.dataset_json import ignore_label, uses_regions
from samplan.experiment_planning.plans import ComputeBudget
from samplan.methods.base import Method

# the order in which configurations are preferred: 3D when the data is 3D, 2D otherwise
_CONFIGURATIONS = ("3d_fullres", "2d")


def deep_supervision_weights(n_stages: int) -> list[float]:
    """Loss weights of the n_stages-1 decoder outputs (full resolution first): 1/2**i, the lowest one 0, sum 1."""
    w = [1.0 / 2**i for i in range(max(n_stages - 1, 1))]
    if len(w) > 1:
        w[-1] = 0.0
    total = sum(w)
    return [x / total for x in w]


class UNetMethod(Method):
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
