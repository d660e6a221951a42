"""samunetr: SAM-UNETR on 2D slices (plan: samplan.methods.samunetr.plan; torch parts: .network)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from samplan.experiment_planning.budget import ComputeBudget
from samplan.methods.base import MethodPlan, PredictionContext, TrainableMethod
from samplan.methods.sam_common.plan import check_checkpoint_choice
from samplan.methods.samunetr import plan
from samplan.models.specs import backbone_spec

if TYPE_CHECKING:
    import torch
    from torch import nn

    from samplan.dataset.labels import LabelManager
    from samplan.engine.recipe import TrainingRecipe


class SAMUNETRMethod(TrainableMethod):
    """SAM-UNETR: SAM ViT encoder + UNETR decoder on 2D slices."""

    name = "samunetr"
    dimensionality = "2d"
    section_type = plan.SAMUNETRSection

    def plan_section(self, fingerprint: dict[str, Any], base_plan: dict[str, Any], budget: ComputeBudget,
                     dataset_json: dict[str, Any]) -> plan.SAMUNETRSection:
        """Backbone, input size, channels, intensity, batch size and recipe (samplan.methods.samunetr.plan)."""
        return plan.plan_section(fingerprint, base_plan, budget, dataset_json)

    def resolve(self, section: plan.SAMUNETRSection) -> plan.SAMUNETRSection:
        """The backbone's canonical name; an override backbone (--backbone) normalises with its own pixel statistics."""
        spec = plan.resolve_backbone_name(section.backbone)
        if spec.name == backbone_spec(section.planned_backbone).name:
            return section.replace(backbone=spec.name)
        mean, std = plan.pixel_statistics(spec, section.channels.in_chans)
        return section.replace(backbone=spec.name, intensity=section.intensity.replace(pixel_mean=mean, pixel_std=std))

    def check(self, mp: MethodPlan) -> None:
        """A --checkpoint file must exist."""
        check_checkpoint_choice(self.name, mp.section.checkpoint)

    def build_network(self, mp: MethodPlan, num_input_channels: int, num_outputs: int) -> "nn.Module":
        """SliceAdapter(SAM encoder + UNETR decoder), random weights: cache slices (B, C, H, W) -> logits (B, K, H, W)."""
        from samplan.methods.samunetr.network import build_samunetr

        return build_samunetr(mp.section, num_input_channels, num_outputs)

    def initialize_pretrained(self, network: "nn.Module", mp: MethodPlan) -> str:
        """The planned (or --checkpoint) encoder weights, resized to the planned input (new trainings only)."""
        from samplan.methods.samunetr.network import load_pretrained_encoder

        return load_pretrained_encoder(network, mp.section)

    def training_recipe(self, mp: MethodPlan, label_manager: "LabelManager") -> "TrainingRecipe":
        """DiceFocal, AdamW 1e-3 / 0.01 (Novograd substitute), light augmentation (samplan.methods.samunetr.plan)."""
        from samplan.methods.samunetr.network import samunetr_recipe

        return samunetr_recipe(mp.section, mp.config, label_manager)

    def validation_step(self, network: "nn.Module", batch: dict[str, Any], recipe: "TrainingRecipe",
                        device: "torch.device", label_manager: "LabelManager", mp: MethodPlan) -> dict[str, Any]:
        """Loss and tp/fp/fn, counted after keeping each class's largest component when the plan selects so."""
        from samplan.methods.samunetr.network import validation_with_largest_component

        if mp.section.recipe.model_selection.postprocess == "keep_largest_component":
            return validation_with_largest_component(network, batch, recipe, device, label_manager)
        return super().validation_step(network, batch, recipe, device, label_manager, mp)

    def predict_logits(self, network: "nn.Module", data: "torch.Tensor", mp: MethodPlan,
                       context: PredictionContext) -> "torch.Tensor":
        """Logits (K, Z, Y, X) slice by slice (inference.dense), in batches of the plan section's batch size."""
        from samplan.engine.dense import predict_dense

        return predict_dense(network, data, mp.plans, mp.configuration, mirror_axes=context.mirror_axes,
                             device=context.device, batch_size=int(mp.section.batch_size))
