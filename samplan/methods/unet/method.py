"""unet: nnU-Net's plain U-Net trained with nnU-Net's recipe (plan: samplan.methods.unet.plan; torch: .network)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from samplan.experiment_planning.budget import ComputeBudget
from samplan.methods.base import MethodPlan, PredictionContext, TrainableMethod
from samplan.methods.unet import plan

if TYPE_CHECKING:
    import torch
    from torch import nn

    from samplan.dataset.labels import LabelManager
    from samplan.engine.recipe import TrainingRecipe


class UNetMethod(TrainableMethod):
    """Plain U-Net trained with nnU-Net's default recipe."""

    name = "unet"
    dimensionality = "3d"
    section_type = plan.UNetSection

    def plan_section(self, fingerprint: dict[str, Any], base_plan: dict[str, Any], budget: ComputeBudget,
                     dataset_json: dict[str, Any]) -> plan.UNetSection:
        """Configurations to train and nnU-Net's recipe (samplan.methods.unet.plan)."""
        return plan.plan_section(fingerprint, base_plan, budget, dataset_json)

    def configurations(self, section: plan.UNetSection) -> list[str]:
        """The planned configurations, the default one first."""
        return [section.default_configuration] + [c for c in section.configurations if c != section.default_configuration]

    def build_network(self, mp: MethodPlan, num_input_channels: int, num_outputs: int) -> "nn.Module":
        """PlainConvUNet with the planned topology, He-initialised, deep supervision on (training needs it)."""
        from samplan.methods.unet.network import build_unet

        return build_unet(mp.config["architecture"], num_input_channels, num_outputs)

    def training_recipe(self, mp: MethodPlan, label_manager: "LabelManager") -> "TrainingRecipe":
        """nnU-Net's recipe from the plan section (samplan.methods.unet.network.unet_recipe)."""
        from samplan.methods.unet.network import unet_recipe

        return unet_recipe(mp.section, mp.config, mp.configuration, label_manager)

    def predict_logits(self, network: "nn.Module", data: "torch.Tensor", mp: MethodPlan,
                       context: PredictionContext) -> "torch.Tensor":
        """Dense logits with deep supervision off: the full-resolution output only, same weights."""
        from samplan.methods.unet.network import set_deep_supervision

        set_deep_supervision(network, False)
        return super().predict_logits(network, data, mp, context)
