"""unet's plan section: the base configurations it trains and nnU-Net v2.8.1's training recipe, as plain data.

The network of each configuration is the base plan's architecture (plans["configurations"][c]["architecture"]);
the section records the recipe: Dice + CE (Dice + BCE for regions), SGD Nesterov 0.99 with a poly schedule,
33 % foreground oversampling, deep supervision and nnU-Net's gradient clipping at 12.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from samplan.dataset.dataset_json import ignore_label, uses_regions
from samplan.experiment_planning.budget import ComputeBudget
from samplan.experiment_planning.recipe_sections import SGD, PolySchedule
from samplan.experiment_planning.sections import PlanSection, info

# the order in which configurations are preferred: 3D when the data is 3D, 2D otherwise
CONFIGURATIONS = ("3d_fullres", "2d")
GRAD_CLIP = 12.0  # nnU-Net's gradient-norm clipping


@dataclass(frozen=True, kw_only=True)
class Loss(PlanSection):
    """Dice + CE (labels) or Dice + BCE (regions); the kind follows the dataset's labels (the trainer's label
    manager), so `name`, `dice_do_bg` and `ignore_label` record what that means for this dataset."""

    name: Literal["dice_ce", "dice_bce"] = info()
    dice_do_bg: bool = info()
    weight_dice: float
    weight_ce: float
    dice_smooth: float
    batch_dice: dict[str, bool]
    ignore_label: int | None = info()


@dataclass(frozen=True, kw_only=True)
class DeepSupervision(PlanSection):
    """Losses on the decoder's lower-resolution outputs too, weighted per configuration (full resolution first)."""

    enabled: bool
    weights: dict[str, list[float]]


@dataclass(frozen=True, kw_only=True)
class Recipe(PlanSection):
    """nnU-Net's training recipe."""

    loss: Loss
    optimizer: SGD
    lr_schedule: PolySchedule
    num_epochs: int
    num_iterations_per_epoch: int
    num_val_iterations_per_epoch: int
    oversample_foreground_percent: float
    deep_supervision: DeepSupervision
    grad_clip: float | None


@dataclass(frozen=True, kw_only=True)
class UNetSection(PlanSection):
    """plans["methods"]["unet"]."""

    configurations: list[str]
    default_configuration: str
    network: str = info()
    recipe: Recipe


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


def plan_section(fingerprint: dict[str, Any], base_plan: dict[str, Any], budget: ComputeBudget,
                 dataset_json: dict[str, Any]) -> UNetSection:
    """Configurations to train (3d_fullres and 2d, or 2d only) and the recipe defaults."""
    configs = [c for c in CONFIGURATIONS if c in base_plan["configurations"]]
    regions = uses_regions(dataset_json)
    # nnU-Net uses batch Dice in 3d_fullres only when a 3d_lowres cascade exists; samplan plans none
    loss = Loss(name="dice_bce" if regions else "dice_ce", dice_do_bg=regions, weight_dice=1.0, weight_ce=1.0,
                dice_smooth=1e-5, batch_dice={c: c == "2d" for c in configs}, ignore_label=ignore_label(dataset_json))
    stages = {c: base_plan["configurations"][c]["architecture"]["arch_kwargs"]["n_stages"] for c in configs}
    recipe = Recipe(
        loss=loss,
        optimizer=SGD(name="SGD", lr=1e-2, momentum=0.99, nesterov=True, weight_decay=3e-5),
        lr_schedule=PolySchedule(name="poly", exponent=0.9),
        num_epochs=1000, num_iterations_per_epoch=250, num_val_iterations_per_epoch=50,
        oversample_foreground_percent=0.33,
        deep_supervision=DeepSupervision(enabled=True, weights={c: deep_supervision_weights(n) for c, n in stages.items()}),
        grad_clip=GRAD_CLIP,
    )
    return UNetSection(configurations=configs, default_configuration=configs[0],
                       network="architecture of each base configuration (plans['configurations'][c]['architecture'])",
                       recipe=recipe)
