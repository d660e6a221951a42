"""promise's registry entry: the hooks, each a thin call into .plan, .network, .data, .train or .predict."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from samplan.experiment_planning.budget import ComputeBudget
from samplan.methods.base import MethodPlan, PredictionContext, TrainableMethod
from samplan.methods.promise import plan
from samplan.methods.sam_common.plan import check_checkpoint_choice
from samplan.methods.sam_common.section import resolved_model_section

if TYPE_CHECKING:
    import torch
    from torch import nn

    from samplan.dataset.labels import LabelManager
    from samplan.engine.recipe import TrainingRecipe
    from samplan.prompts.case_prompts import ReferencePromptSettings


class PromiseMethod(TrainableMethod):
    """ProMISe: a frozen SAM-family model prompted by a trained APM, with IPS shifting its mask tokens."""

    name = "promise"
    dimensionality = "2d"
    section_type = plan.PromiseSection

    def plan_section(self, fingerprint: dict[str, Any], base_plan: dict[str, Any], budget: ComputeBudget,
                     dataset_json: dict[str, Any]) -> plan.PromiseSection:
        """Backbone, channels, intensity, APM/IPS sizes, prompt type, feature cache and recipe."""
        return plan.plan_section(fingerprint, base_plan, budget, dataset_json)

    def resolve(self, section: plan.PromiseSection) -> plan.PromiseSection:
        """The backbone's canonical name and input size; another backbone than the planned one (--backbone) gets
        its own feature blocks, prompt type, APM readout and box/heatmap loss weights."""
        from samplan.models.specs import backbone_spec

        section, spec = resolved_model_section(section, self.name)
        if spec.name == backbone_spec(section.planned_backbone).name:
            return section
        blocks, why = plan.feature_blocks(spec)
        output, output_why = plan.prompt_output(spec)
        weight, weight_why = plan.box_loss_weight(output)
        readout, readout_why = plan.apm_readout(output)
        loss = section.recipe.loss.replace(weight_box=weight, weight_box_reason=weight_why,
                                           weight_heatmap=plan.heatmap_loss_weight(readout))
        return section.replace(apm=section.apm.replace(feature_blocks=blocks, feature_blocks_reason=why,
                                                       readout=readout, readout_reason=readout_why),
                               prompt=section.prompt.replace(output=output, output_reason=output_why),
                               recipe=section.recipe.replace(loss=loss))

    def check(self, mp: MethodPlan) -> None:
        """A --checkpoint file must exist."""
        check_checkpoint_choice(self.name, mp.section.checkpoint)

    def build_network(self, mp: MethodPlan, num_input_channels: int, num_outputs: int) -> "nn.Module":
        """Frozen Sam (random weights until initialize_pretrained) + APM and/or IPS."""
        from samplan.methods.promise.network import build_promise

        return build_promise(mp.section, num_outputs)

    def initialize_pretrained(self, network: "nn.Module", mp: MethodPlan) -> str:
        """The planned SAM weights into the frozen model, their identity recorded; the log line gives both counts."""
        from samplan.methods.promise.network import initialize_promise

        return initialize_promise(network, mp.section)

    def training_recipe(self, mp: MethodPlan, label_manager: "LabelManager") -> "TrainingRecipe":
        """Adam over APM/IPS only, BCE + Dice (+ presence BCE), whole slices or augmented patches per plan."""
        from samplan.methods.promise.train import promise_recipe

        return promise_recipe(mp.section, mp.config)

    def training_loader(self, mp: MethodPlan, cache_dir: Path, case_ids: list[str], recipe: "TrainingRecipe",
                        label_manager: "LabelManager", *, train: bool, seed: int) -> Any:
        """Whole slices (features cached) without image augmentation; the trainer's patch loader with it."""
        if mp.section.image_augmentation:
            return None
        from samplan.methods.promise.data import SliceLoader

        return SliceLoader(cache_dir, case_ids, recipe.batch_size, recipe.oversample_foreground, train=train,
                           seed=seed)

    def train_step(self, network: "nn.Module", batch: dict[str, Any], recipe: "TrainingRecipe",
                   optimizer: "torch.optim.Optimizer", device: "torch.device", mp: MethodPlan) -> dict[str, float]:
        """One Adam step of the APM/IPS through the frozen prompt encoder and mask decoder."""
        from samplan.methods.promise.train import step

        return step(network, batch, recipe, device, mp.section, mp.cache_dir, optimizer=optimizer)

    def validation_step(self, network: "nn.Module", batch: dict[str, Any], recipe: "TrainingRecipe",
                        device: "torch.device", label_manager: "LabelManager", mp: MethodPlan) -> dict[str, Any]:
        """Loss and per-output tp/fp/fn of the gated masks."""
        from samplan.methods.promise.train import step

        return step(network, batch, recipe, device, mp.section, mp.cache_dir)

    def missing_prompts_error(self, mp: MethodPlan) -> str | None:
        """Only ips_oracle needs a reference (its prompts are sampled from it)."""
        from samplan.methods.promise.predict import NEEDS_REFERENCE

        return NEEDS_REFERENCE if mp.section.mode == "ips_oracle" else None

    def validation_prompt_strategy(self, mp: MethodPlan) -> str | None:
        """ips_oracle is validated with reference-derived prompts (an oracle, marked so in summary.json)."""
        return "oracle" if mp.section.mode == "ips_oracle" else None

    def reference_prompt_settings(self, mp: MethodPlan) -> "ReferencePromptSettings":
        """The planned label groups (ips_oracle samples its own points from the reference label map)."""
        from samplan.prompts.case_prompts import ReferencePromptSettings

        return ReferencePromptSettings(strategy="oracle", label_groups=[list(g) for g in mp.section.prompt.label_groups])

    def predict_logits(self, network: "nn.Module", data: "torch.Tensor", mp: MethodPlan,
                       context: PredictionContext) -> "torch.Tensor":
        """Logits (K, Z, Y, X) of every slice, no human prompt (ips_oracle: from context.reference); no mirroring.
        The embedding cache, when the run has one, holds the frozen SAM's features across runs."""
        from samplan.methods.promise.predict import predict_case

        cache = getattr(context.embedding_cache, "root", None)
        return predict_case(network, data, mp.section, context.device, reference=context.reference, cache_root=cache)
