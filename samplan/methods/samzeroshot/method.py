"""samzeroshot's registry entry: a PromptedMethod whose hooks call into .plan, .network and .predict."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from samplan.errors import SamplanError
from samplan.experiment_planning.budget import ComputeBudget
from samplan.methods.base import MethodPlan, PredictionContext, PromptedMethod
from samplan.methods.sam_common.plan import check_checkpoint_choice
from samplan.methods.sam_common.section import resolved_model_section
from samplan.methods.samzeroshot import plan

if TYPE_CHECKING:
    import torch
    from torch import nn

    from samplan.prompts.case_prompts import ReferencePromptSettings


class SAMZeroShotMethod(PromptedMethod):
    """Prompted SAM-family segmentation without training (the lung-CT paper's protocol, any backbone)."""

    name = "samzeroshot"
    dimensionality = "2d"
    section_type = plan.SAMZeroShotSection
    needs_prompts = ("samzeroshot needs prompts: samplan_predict --prompts FILE, or --prompt-strategy "
                     "oracle|box|propagate with --reference-dir DIR (reference label maps).")

    def plan_section(self, fingerprint: dict[str, Any], base_plan: dict[str, Any], budget: ComputeBudget,
                     dataset_json: dict[str, Any]) -> plan.SAMZeroShotSection:
        """Backbone, input size, channels, intensity mapping, prompt settings and output mode."""
        return plan.plan_section(fingerprint, base_plan, budget, dataset_json)

    def resolve(self, section: plan.SAMZeroShotSection) -> plan.SAMZeroShotSection:
        """The backbone's canonical name and effective input size."""
        return resolved_model_section(section, self.name)[0]

    def check(self, mp: MethodPlan) -> None:
        """A --checkpoint file must exist; region datasets are refused."""
        check_checkpoint_choice(self.name, mp.section.checkpoint)
        if mp.section.regions:
            raise SamplanError("samzeroshot supports label-based datasets only (this dataset.json defines regions).")

    def build_network(self, mp: MethodPlan, num_input_channels: int, num_outputs: int) -> "nn.Module":
        """The Sam model with random weights and an empty weights-identity buffer (filled by initialize_pretrained)."""
        from samplan.methods.samzeroshot.network import build_samzeroshot

        return build_samzeroshot(mp.section, num_outputs)

    def initialize_pretrained(self, network: "nn.Module", mp: MethodPlan) -> str:
        """Load the planned weights and record their identity (the embedding cache's key)."""
        from samplan.methods.samzeroshot.network import initialize_samzeroshot

        return initialize_samzeroshot(network, mp.section)

    def reference_prompt_settings(self, mp: MethodPlan) -> "ReferencePromptSettings":
        """The planned default strategy, oracle points / negative point / box, label groups, and what a first-stage
        model's components give (boxes grown by the propagation margin)."""
        from samplan.methods.samzeroshot.predict import margin_input_px
        from samplan.prompts.case_prompts import ReferencePromptSettings

        s = mp.section
        p = s.prompt
        margin = margin_input_px(s) / s.input_size
        return ReferencePromptSettings(strategy=p.strategy, label_groups=[list(g) for g in p.label_groups],
                                       points=p.points, negative_point=p.negative_point, box=p.box,
                                       model_prompt=p.from_model, box_margin=margin)

    def predict_logits(self, network: "nn.Module", data: "torch.Tensor", mp: MethodPlan,
                       context: PredictionContext) -> "torch.Tensor":
        """Logits (K, Z, Y, X) float32 CPU for the case's prompts; no mirroring."""
        if context.prompts is None:
            raise SamplanError(self.needs_prompts)
        from samplan.methods.samzeroshot.predict import predict_case

        return predict_case(network, data, mp.section, context.device, context.prompts,
                            embedding_cache=context.embedding_cache)
