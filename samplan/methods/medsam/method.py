"""medsam's registry entry: the hooks, each a thin call into .plan, .network, .train or .predict."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from samplan.experiment_planning.budget import ComputeBudget
from samplan.methods.base import MethodPlan, PredictionContext, TrainableMethod
from samplan.methods.medsam import plan
from samplan.methods.sam_common.plan import check_checkpoint_choice
from samplan.methods.sam_common.section import resolved_model_section

if TYPE_CHECKING:
    import torch
    from torch import nn

    from samplan.dataset.labels import LabelManager
    from samplan.prompts.case_prompts import ReferencePromptSettings
    from samplan.engine.recipe import TrainingRecipe


class MedSAMMethod(TrainableMethod):
    """Box-prompted (Lite)MedSAM fine-tuned on slices: image encoder + mask decoder trainable."""

    name = "medsam"
    dimensionality = "2d"
    section_type = plan.MedSAMSection

    def plan_section(self, fingerprint: dict[str, Any], base_plan: dict[str, Any], budget: ComputeBudget,
                     dataset_json: dict[str, Any]) -> plan.MedSAMSection:
        """Backbone, input size, channels, intensity mapping, box policy, trainable modules and recipe."""
        return plan.plan_section(fingerprint, base_plan, budget, dataset_json)

    def resolve(self, section: plan.MedSAMSection) -> plan.MedSAMSection:
        """The backbone's canonical name and effective input size."""
        return resolved_model_section(section, self.name)[0]

    def check(self, mp: MethodPlan) -> None:
        """A --checkpoint file must exist, modules must partition, --unfreeze prefixes must name parameters."""
        from samplan.methods.medsam.network import check_modules

        check_checkpoint_choice(self.name, mp.section.checkpoint)
        check_modules(mp.section)

    def build_network(self, mp: MethodPlan, num_input_channels: int, num_outputs: int) -> "nn.Module":
        """The Sam model with random weights (see initialize_pretrained), trainable parameters set per plan."""
        from samplan.methods.medsam.network import build_medsam

        return build_medsam(mp.section, num_outputs)

    def initialize_pretrained(self, network: "nn.Module", mp: MethodPlan) -> str:
        """The planned pretrained weights and the planned regions from the cache (new trainings only)."""
        from samplan.methods.medsam.network import initialize_medsam

        return initialize_medsam(network, mp.section, mp.cache_dir)

    def training_recipe(self, mp: MethodPlan, label_manager: "LabelManager") -> "TrainingRecipe":
        """AdamW over the trainable parameters only, the planned schedule and augmentation, Dice(squared)+BCE."""
        from samplan.methods.medsam.train import medsam_recipe

        return medsam_recipe(mp.section, mp.config)

    def train_step(self, network: "nn.Module", batch: dict[str, Any], recipe: "TrainingRecipe",
                   optimizer: "torch.optim.Optimizer", device: "torch.device", mp: MethodPlan) -> dict[str, float]:
        """One AdamW step on B slices, one box (and one binary target) each, decoded in one batched call."""
        from samplan.methods.medsam.train import step

        return step(network, batch, recipe, device, mp.section, optimizer=optimizer)

    def validation_step(self, network: "nn.Module", batch: dict[str, Any], recipe: "TrainingRecipe",
                        device: "torch.device", label_manager: "LabelManager", mp: MethodPlan) -> dict[str, Any]:
        """Loss and per-class tp/fp/fn of the thresholded masks (boxes without jitter)."""
        from samplan.methods.medsam.train import step

        return step(network, batch, recipe, device, mp.section)

    def missing_prompts_error(self, mp: MethodPlan) -> str | None:
        """A reference_jitter model needs boxes at prediction; fixed-box models do not."""
        from samplan.methods.medsam.predict import NEEDS_BOXES

        return NEEDS_BOXES if mp.section.box_policy.name == "reference_jitter" else None

    def validation_prompt_strategy(self, mp: MethodPlan) -> str | None:
        """A reference_jitter model is validated as MedSAM is evaluated: the reference's largest box, propagated."""
        return "propagate" if mp.section.box_policy.name == "reference_jitter" else None

    def reference_prompt_settings(self, mp: MethodPlan) -> "ReferencePromptSettings":
        """Boxes from label maps: one per planned label group, propagated by default; from a first-stage model's label
        maps one box per component, grown by the propagation margin (half the training jitter)."""
        from samplan.methods.medsam.predict import propagation_margin
        from samplan.prompts.case_prompts import ReferencePromptSettings

        s = mp.section
        return ReferencePromptSettings(strategy="propagate", label_groups=[list(g) for g in s.prompt.label_groups],
                                       model_prompt="box", box_margin=propagation_margin(s) / s.input_size)

    def predict_logits(self, network: "nn.Module", data: "torch.Tensor", mp: MethodPlan,
                       context: PredictionContext) -> "torch.Tensor":
        """Logits (K, Z, Y, X) from boxes (prompts or reference) or the fixed box; no mirroring, and no embedding
        cache: a fine-tuned encoder's embeddings change with every checkpoint."""
        from samplan.methods.medsam.predict import predict_case

        return predict_case(network, data, mp.section, context.device, prompts=context.prompts,
                            reference=context.reference)
