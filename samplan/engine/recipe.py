"""A method's training recipe: loss, optimiser, schedule, sampling and augmentation, as one typed object."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
from torch import nn


@dataclass
class TrainingRecipe:
    """Everything the generic trainer needs from a method for one configuration.

    `loss(output, target)`: output/target are tensors, or lists of tensors (full resolution first)
    when deep supervision is on. `make_scheduler(optimizer, num_epochs)` is stepped once at the end of every epoch.
    `patch_size` has 2 entries for slice-based (2D) training and 3 for 3D patches, in the
    transposed axis order of the plan. `augmentation` holds the keyword arguments of
    `samplan.engine.augmentation.build_train_transforms`. `mirror_axes` are the spatial axes
    (of the patch) that test-time augmentation may mirror.
    """

    loss: nn.Module
    make_optimizer: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
    make_scheduler: Callable[[torch.optim.Optimizer, int], torch.optim.lr_scheduler.LRScheduler]
    num_epochs: int
    iterations_per_epoch: int
    val_iterations_per_epoch: int
    batch_size: int
    patch_size: tuple[int, ...]
    oversample_foreground: float = 0.33
    deep_supervision_scales: list[list[float]] | None = None
    augmentation: dict[str, Any] = field(default_factory=dict)
    mirror_axes: tuple[int, ...] = ()
    grad_clip: float | None = 12.0
    # optional: the network's parameters as optimiser groups (e.g. a lower learning rate for pretrained parts); the
    # groups' "lr_scale" multiplies the optimiser's learning rate. None: one group of all parameters
    param_groups: Callable[[nn.Module], list[dict[str, Any]]] | None = None
    # set by the trainer, not the method: torch.amp.GradScaler when training with AMP on CUDA, else None
    grad_scaler: Any = None
    # set by the trainer from --precision: the autocast dtype of forward passes (None = float32)
    autocast_dtype: torch.dtype | None = None
