"""Plan-section types that several methods' training recipes share: optimiser, learning-rate schedule, augmentation.

Torch-free: samplan.engine.optim turns the optimiser and schedule sections into torch objects, the methods turn
the augmentation section into samplan.engine.augmentation's keyword arguments.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from samplan.experiment_planning.sections import PlanSection


@dataclass(frozen=True, kw_only=True)
class Optimizer(PlanSection):
    """An optimiser, by "name"."""

    TAG_KEY: ClassVar[str] = "name"


@dataclass(frozen=True, kw_only=True)
class SGD(Optimizer):
    """SGD (nnU-Net: lr 1e-2, momentum 0.99, Nesterov, weight decay 3e-5)."""

    TAG: ClassVar[str] = "SGD"
    name: Literal["SGD"]
    lr: float
    momentum: float
    nesterov: bool
    weight_decay: float


@dataclass(frozen=True, kw_only=True)
class AdamW(Optimizer):
    """AdamW over the trainable parameters only."""

    TAG: ClassVar[str] = "AdamW"
    name: Literal["AdamW"]
    lr: float
    weight_decay: float


@dataclass(frozen=True, kw_only=True)
class Adam(Optimizer):
    """Adam (L2 weight decay added to the gradients, as torch.optim.Adam) over the trainable parameters only."""

    TAG: ClassVar[str] = "Adam"
    name: Literal["Adam"]
    lr: float
    weight_decay: float


@dataclass(frozen=True, kw_only=True)
class Schedule(PlanSection):
    """A learning-rate schedule, stepped once per epoch, by "name"."""

    TAG_KEY: ClassVar[str] = "name"


@dataclass(frozen=True, kw_only=True)
class ConstantSchedule(Schedule):
    """The optimiser's learning rate throughout."""

    TAG: ClassVar[str] = "constant"
    name: Literal["constant"]


@dataclass(frozen=True, kw_only=True)
class PolySchedule(Schedule):
    """lr0 * (1 - epoch / epochs) ** exponent (nnU-Net: 0.9)."""

    TAG: ClassVar[str] = "poly"
    name: Literal["poly"]
    exponent: float


@dataclass(frozen=True, kw_only=True)
class Augmentation(PlanSection):
    """2D training augmentation: rotation by up to +-rotation_deg, isotropic scaling in `scaling` (both with
    nnU-Net's probability 0.2), mirroring of both slice axes, and nnU-Net's intensity transforms (noise, blur,
    brightness, contrast, low resolution, gamma) when `intensity`."""

    rotation_deg: float
    scaling: list[float]
    mirror: bool
    intensity: bool


@dataclass(frozen=True, kw_only=True)
class OneCycleSchedule(Schedule):
    """One cycle (torch's OneCycleLR with cosine annealing, stepped once per epoch): from lr / div_factor up to the
    optimiser's lr over the first `pct_start` of the epochs, then down to lr / div_factor / final_div_factor."""

    TAG: ClassVar[str] = "one_cycle"
    name: Literal["one_cycle"]
    pct_start: float
    div_factor: float
    final_div_factor: float
