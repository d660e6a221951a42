"""autosam2's registry entry: the hooks, each a thin call into .plan, .network, .train or .predict."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from samplan.experiment_planning.budget import ComputeBudget
from samplan.methods.autosam2 import plan
from samplan.methods.base import MethodPlan, PredictionContext, TrainableMethod
from samplan.methods.sam_common.plan import check_checkpoint_choice

if TYPE_CHECKING:
    import torch
    from torch import nn

    from samplan.dataset.labels import LabelManager
    from samplan.engine.recipe import TrainingRecipe


class AutoSAM2Method(TrainableMethod):
    """AutoSAM2: a 3D U-Net whose planned slices are refined by a SAM branch prompted from its own probabilities."""

    name = "autosam2"
    dimensionality = "3d"
    section_type = plan.AutoSAM2Section

    def not_applicable(self, base_plan: dict[str, Any]) -> str | None:
        """2D datasets have no 3D configuration for the U-Net."""
        if plan.CONFIGURATION not in base_plan["configurations"]:
            return f"{self.name} needs 3D data (the {plan.CONFIGURATION} configuration); this dataset is 2D"
        return None

    def plan_section(self, fingerprint: dict[str, Any], base_plan: dict[str, Any], budget: ComputeBudget,
                     dataset_json: dict[str, Any]) -> plan.AutoSAM2Section:
        """U-Net topology, SAM backbone, slice fraction, prompts, fusion and recipe (samplan.methods.autosam2.plan)."""
        return plan.plan_section(fingerprint, base_plan, budget, dataset_json)

    def resolve(self, section: plan.AutoSAM2Section) -> plan.AutoSAM2Section:
        """The backbone's canonical name and input size; another backbone (--backbone) gets its own prompt kinds."""
        spec, size = plan.resolve_spec(section.backbone, section.planned_backbone, section.input_size)
        section = section.replace(backbone=spec.name, input_size=size)
        if spec.name == plan.resolve_spec(section.planned_backbone, section.planned_backbone, size)[0].name:
            return section
        output, why = plan.prompt_output(spec)
        return section.replace(prompt=section.prompt.replace(output=output, output_reason=why))

    def check(self, mp: MethodPlan) -> None:
        """A --checkpoint file must exist; frozen parts, fraction and fusion weights must make sense."""
        check_checkpoint_choice(self.name, mp.section.checkpoint)
        plan.check_section(mp.section)

    def build_network(self, mp: MethodPlan, num_input_channels: int, num_outputs: int) -> "nn.Module":
        """U-Net + mapper + SAM (random weights until initialize_pretrained, frozen parts per plan) + bridge."""
        from samplan.methods.autosam2.network import build_autosam2

        return build_autosam2(mp.section, num_input_channels, num_outputs)

    def initialize_pretrained(self, network: "nn.Module", mp: MethodPlan) -> str:
        """The planned SAM weights into the branch; the log line gives the backbone and both parameter counts."""
        from samplan.methods.autosam2.network import initialize_autosam2

        return initialize_autosam2(network, mp.section)

    def training_recipe(self, mp: MethodPlan, label_manager: "LabelManager") -> "TrainingRecipe":
        """0.7 Dice + 0.3 CE/BCE, AdamW one-cycle, clipping 1.0, the base 3D patch and batch."""
        from samplan.methods.autosam2.train import autosam2_recipe

        return autosam2_recipe(mp.section, mp.config, label_manager)

    def train_step(self, network: "nn.Module", batch: dict[str, Any], recipe: "TrainingRecipe",
                   optimizer: "torch.optim.Optimizer", device: "torch.device", mp: MethodPlan) -> dict[str, float]:
        """One AdamW step of the U-Net and the SAM branch on the batch's planned, prompted slices."""
        from samplan.methods.autosam2.train import step

        return step(network, batch, recipe, device, mp.section, optimizer=optimizer)

    def validation_step(self, network: "nn.Module", batch: dict[str, Any], recipe: "TrainingRecipe",
                        device: "torch.device", label_manager: "LabelManager", mp: MethodPlan) -> dict[str, Any]:
        """Loss and tp/fp/fn of the fused probabilities (what prediction outputs)."""
        from samplan.methods.autosam2.train import step

        return step(network, batch, recipe, device, mp.section, label_manager=label_manager)

    def predict_logits(self, network: "nn.Module", data: "torch.Tensor", mp: MethodPlan,
                       context: PredictionContext) -> "torch.Tensor":
        """Sliding-window U-Net (mirroring per context) + the SAM branch on the volume's planned slices, fused."""
        from samplan.methods.autosam2.predict import predict_case

        return predict_case(network, data, mp.section, mp.config["patch_size"], mp.section.regions, context.device,
                            context.mirror_axes)
