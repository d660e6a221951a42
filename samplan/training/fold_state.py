"""What a training works on: the resolved fold (`FoldSetup`) and the training in progress (`Run`)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from samplan.dataset.labels import LabelManager
from samplan.engine.recipe import TrainingRecipe
from samplan.experiment_planning.plans import PLANS_NAME
from samplan.methods.base import Method, MethodPlan
from samplan.training.distributed import DistributedContext
from samplan.training.logger import TrainingLogger


@dataclass
class FoldSetup:
    """Everything resolved for training one fold: files read, the method and its checked plan, cases and folders."""

    dataset_name: str
    preprocessed_dir: Path
    plans: dict[str, Any]
    dataset_json: dict[str, Any]
    method: Method
    mp: MethodPlan
    fold: int | str
    label_manager: LabelManager
    train_ids: list[str]
    val_ids: list[str]
    cache_dir: Path
    model_dir: Path
    fold_dir: Path
    num_input_channels: int

    @property
    def configuration(self) -> str:
        """The configuration being trained."""
        return self.mp.configuration


def identity(s: FoldSetup) -> dict[str, Any]:
    """The checkpoint keys that say what was trained."""
    return {"method": s.method.name, "configuration": s.configuration, "fold": s.fold,
            "plans_name": s.plans.get("plans_name", PLANS_NAME), "dataset_name": s.dataset_name,
            "num_input_channels": s.num_input_channels, "num_outputs": s.label_manager.num_outputs}


@dataclass
class Run:
    """A training in progress: the network, its optimiser and schedule, the recipe, the log and the position."""

    network: torch.nn.Module
    optimizer: Any
    scheduler: Any
    recipe: TrainingRecipe
    logger: TrainingLogger
    seed: int
    start_epoch: int = 0
    best_ema: float | None = None
    dist: DistributedContext | None = None  # set in a data-parallel run

    def checkpoint(self, s: FoldSetup, epoch: int) -> dict[str, Any]:
        """Plain-data checkpoint after `epoch` completed epochs (loadable with weights_only=True)."""
        r = self.recipe
        return {
            "network_weights": self.network.state_dict(), "optimizer_state": self.optimizer.state_dict(),
            "scheduler_state": self.scheduler.state_dict(),
            "grad_scaler_state": r.grad_scaler.state_dict() if r.grad_scaler is not None else None,
            "logging": self.logger.state_dict(), "best_ema": self.best_ema, "seed": self.seed,
            "num_epochs": r.num_epochs, "iterations_per_epoch": r.iterations_per_epoch,
            "val_iterations_per_epoch": r.val_iterations_per_epoch, "current_epoch": epoch, **identity(s),
            "mirror_axes": list(r.mirror_axes),
        }
