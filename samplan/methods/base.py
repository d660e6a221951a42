"""The Method interface: what every segmentation method in samplan provides to the generic stages.

Every method contributes its plan section; trainable ones (`TrainableMethod`) also build their network
and training recipe, and may override the generic train/validation steps and dense prediction. A
method is a stateless object registered by name in `samplan.methods`.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any

from samplan.experiment_planning.plans import ComputeBudget

if TYPE_CHECKING:  # only for annotations: importing torch here would slow down planning
    import torch
    from torch import nn

    from samplan.dataset.labels import LabelManager
    from samplan.training.recipe import TrainingRecipe


class Method(ABC):
    """One segmentation method; subclasses set the three class attributes and implement `plan_section`."""

    name: str = ""
    # "2d": works on slices of the transposed volume; "3d": works on 3D patches
    dimensionality: str = ""
    needs_training: bool = True

    @abstractmethod
    def plan_section(
        self, fingerprint: dict[str, Any], base_plan: dict[str, Any], budget: ComputeBudget, dataset_json: dict[str, Any]
    ) -> dict[str, Any]:
        """This method's section of plans.json (plain JSON data), from the fingerprint and the base plan.

        `base_plan` is the plans dict without "methods" (configurations already planned; a copy, so
        changing it has no effect): a section references its configurations by name. `dataset_json`
        gives what the fingerprint does not: channel names, labels and regions.
        """

    def __repr__(self) -> str:
        return f"<method {self.name} ({self.dimensionality}, {'trained' if self.needs_training else 'no training'})>"


class TrainableMethod(Method):
    """A method that `samplan_train` can train and `samplan_predict` can run.

    Subclasses build the network and the training recipe; the generic steps (one optimiser step on a
    batch, a validation batch, and dense prediction of a preprocessed case) are shared defaults that a
    method overrides only where its paper does something else.
    """

    def configurations(self, plans: dict[str, Any]) -> list[str]:
        """Configurations this method trains, from its plan section (the first is the default)."""
        return list(plans["methods"][self.name]["configurations"])

    def check_plan(self, plans: dict[str, Any]) -> None:
        """Raise SamplanError when this method's plan section (with the CLI's overrides) cannot be used.

        Called by the trainer before anything is written, so a typo in --backbone leaves no model folder.
        """

    def missing_prompts_error(self, plans: dict[str, Any]) -> str | None:
        """The error to stop a prediction run with when it has no prompts but this method's model needs them."""
        return None

    def validation_prompt_strategy(self, plans: dict[str, Any]) -> str | None:
        """For box- or point-prompted methods: the reference-derived prompt strategy (samplan.inference.prompted)
        that the final validation predicts with, marked as an oracle in its summary; None = no prompts."""
        return None

    @abstractmethod
    def build_network(self, plans: dict[str, Any], configuration: str, num_input_channels: int, num_outputs: int) -> "nn.Module":
        """The network for `configuration`, randomly initialised (weights are loaded by the caller)."""

    @abstractmethod
    def training_recipe(self, plans: dict[str, Any], configuration: str, label_manager: "LabelManager") -> "TrainingRecipe":
        """Loss, optimiser, schedule, sampling and augmentation for `configuration`, from the plan section."""

    def train_step(self, network: "nn.Module", batch: dict[str, Any], recipe: "TrainingRecipe",
                   optimizer: "torch.optim.Optimizer", device: "torch.device") -> dict[str, float]:
        """One optimiser step on `batch`; returns {"loss": float}."""
        from samplan.training.steps import default_train_step

        return default_train_step(network, batch, recipe, optimizer, device)

    def validation_step(self, network: "nn.Module", batch: dict[str, Any], recipe: "TrainingRecipe",
                        device: "torch.device", label_manager: "LabelManager") -> dict[str, Any]:
        """Loss and per-class tp/fp/fn on a validation batch (for the running pseudo-Dice)."""
        from samplan.training.steps import default_validation_step

        return default_validation_step(network, batch, recipe, device, label_manager)

    def predict_logits(self, network: "nn.Module", data: "torch.Tensor", plans: dict[str, Any], configuration: str,
                       *, mirror_axes: tuple[int, ...], device: "torch.device") -> "torch.Tensor":
        """Logits `(K, Z, Y, X)` (float32, CPU) for one preprocessed case `(C, Z, Y, X)`.

        3D configurations use Gaussian-weighted sliding windows; 2D ones run slice by slice along axis 0.
        `mirror_axes` are the spatial axes used for mirroring test-time augmentation (empty: none).
        """
        from samplan.inference.dense import predict_dense

        return predict_dense(network, data, plans, configuration, mirror_axes=mirror_axes, device=device)
