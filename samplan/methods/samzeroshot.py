"""samzeroshot: SAM zero-shot with oracle point/box prompts (Gutierrez et al., SAM zero-shot on lung CT, IEEE Access 2024).

No training. `samplan_train -m samzeroshot` only writes the model folder: plans/dataset/fingerprint and a
fold checkpoint holding the pretrained network's state dict (plus a `samzeroshot_weights_id` buffer, the
sha256 of the weights file or of the random state, which keys the embedding cache), so samplan_predict
and samplan_evaluate serve it like any trained model.

Input: each slice of the "2d" cache becomes 3 channels (`medsam.rgb_from_channels`). Intensity: CT channels
are clipped to the paper's window [-1400, 100] HU (in cache units) and then min-max scaled per slice;
MR/other: per-slice 0.5/99.5 percentile clip; RGB as is; all to [0, 1], i.e. 0..255 / 255. Then the
backbone's own normalisation ((0..255 - pixel_mean) / pixel_std: SAM's ImageNet statistics, or none for
(Lite)MedSAM), longest side resized to the input size, zero-padded after normalisation (as SAM does).

Prompts (given at prediction time, see `samplan.inference.prompted`): the paper's oracle (per labelled
slice, one positive point per label value at its centre of mass moved inside, one negative point at the
centre of the union box, optionally the box), boxes only, box propagation from the slice with the largest
reference box, or a user's prompts file. `prompt.label_groups` says which label values share one SAM call
(default: one call per label; the paper's merged lungs are `[[1, 2]]`, painted with the group's first
value). Output "single" (one mask, logit > 0) or "multimask" (the mask with the best predicted IoU).
Reference-derived prompts are an oracle: prediction folders record it in prompts_used.json.
Limitation: label-based datasets only (no region datasets).
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from samplan.dataset.dataset_json import channel_names, uses_regions
from samplan.errors import SamplanError
from samplan.experiment_planning.plans import ComputeBudget
from samplan.methods.base import TrainableMethod
from samplan.methods.medsam import BACKBONE_INPUT, rgb_from_channels

if TYPE_CHECKING:
    import torch
    from torch import nn

    from samplan.dataset.labels import LabelManager
    from samplan.training.recipe import TrainingRecipe

DEFAULT_BACKBONE = "litemedsam"  # the only real weights on the development machines (the paper: SAM ViT-L)
CT_WINDOW_HU = (-1400.0, 100.0)
STRATEGIES = ("oracle", "box", "propagate", "file")
OUTPUTS = ("single", "multimask")
NEEDS_PROMPTS = ("samzeroshot needs prompts: samplan_predict --prompts FILE, or --prompt-strategy oracle|box|propagate "
                 "with --reference-dir DIR (reference label maps).")


def intensity_entries(config_2d: dict[str, Any], fg_props: dict[str, dict[str, float]], names: list[str]) -> list[dict[str, Any]]:
    """Per channel: CT -> {"mode": "window_minmax", "window": cache units of [-1400, 100] HU}; others as samunetr maps them."""
    from samplan.methods.samunetr import channel_mapping, intensity_mapping

    entries = intensity_mapping(channel_mapping(names)["mode"], config_2d, fg_props)
    for c, e in enumerate(entries):
        if e["mode"] == "window":
            p = fg_props[str(c)]
            mean, std = p["mean"], max(p["std"], 1e-8)
            e.update(mode="window_minmax", raw_window=list(CT_WINDOW_HU), window=[(v - mean) / std for v in CT_WINDOW_HU])
    return entries


class SAMZeroShotMethod(TrainableMethod):
    """Prompted SAM-family segmentation without training (the lung-CT paper's protocol, any backbone)."""

    name = "samzeroshot"
    dimensionality = "2d"
    needs_training = False

    def plan_section(self, fingerprint: dict[str, Any], base_plan: dict[str, Any], budget: ComputeBudget,
                     dataset_json: dict[str, Any]) -> dict[str, Any]:
        """Backbone, input size, channels, intensity mapping, prompt strategy and output mode."""
        if "2d" not in base_plan["configurations"]:
            raise SamplanError("samzeroshot needs the 2d configuration in the plan; re-plan with it.")
        cfg = base_plan["configurations"]["2d"]
        names = channel_names(dataset_json)
        labels = sorted(int(v) for v in dataset_json["labels"].values() if not isinstance(v, list) and int(v) > 0)
        return {
            "configurations": ["2d"],
            "needs_training": False,
            "backbone": DEFAULT_BACKBONE,
            "planned_backbone": DEFAULT_BACKBONE,
            "backbone_choices": list(BACKBONE_INPUT),
            "checkpoint": "auto",
            "input_size": BACKBONE_INPUT[DEFAULT_BACKBONE],
            "input_size_by_backbone": dict(BACKBONE_INPUT),
            "resize": "longest_side_then_pad",
            "channels": {"names": names, "rgb_from_channels": rgb_from_channels(len(names))},
            "intensity": {"per_channel": intensity_entries(cfg, base_plan["foreground_intensity_properties_per_channel"], names),
                          "output_range": [0.0, 1.0], "then": "backbone pixel mean/std on 0..255"},
            "prompt": {"strategy": "oracle", "points": True, "negative_point": True, "box": False,
                       "label_groups": [[v] for v in labels], "choices": list(STRATEGIES)},
            "output": "single",
            "threshold": 0.0,
            # CPU: larger batches are slower per slice (LiteMedSAM, 2 cores: 1.17 s at 2, 1.38 s at 4, channels-last)
            "encoder_batch_size": 2 if budget.device == "cpu" else 16,
            "regions": uses_regions(dataset_json),
            "oracle_protocol": "prompts from reference masks are an oracle; results are labelled as such",
            "budget": budget.to_dict(),
        }

    def section(self, plans: dict[str, Any]) -> dict[str, Any]:
        """The plan section with the backbone resolved (aliases) and its effective input size."""
        section = plans.get("methods", {}).get(self.name)
        if section is None:
            raise SamplanError("plans.json has no 'samzeroshot' section; re-plan with samplan_plan_and_preprocess -m samzeroshot.")
        from samplan.models.backbones import backbone_spec

        spec = backbone_spec(str(section["backbone"]))
        if spec.family == "sam2":
            raise SamplanError(f"samzeroshot backbone {spec.name!r}: SAM2 backbones are not supported yet; use a SAM/MedSAM/LiteMedSAM one.")
        if spec.fixed_input_size:
            size = spec.native_input_size
        elif spec.name == section.get("planned_backbone", DEFAULT_BACKBONE):
            size = int(section["input_size"])
        else:
            size = int(section.get("input_size_by_backbone", {}).get(spec.name, spec.native_input_size))
        return {**section, "backbone": spec.name, "input_size": size}

    def check_plan(self, plans: dict[str, Any]) -> None:
        """Backbone, checkpoint file, prompt settings and output mode must be usable (before anything is written)."""
        section = self.section(plans)
        ckpt = str(section.get("checkpoint") or "auto")
        if ckpt.lower() not in ("auto", "none") and not Path(ckpt).expanduser().is_file():
            raise SamplanError(f"samzeroshot checkpoint {ckpt} does not exist; give an existing file, 'auto' or 'none'.")
        if section.get("regions"):
            raise SamplanError("samzeroshot supports label-based datasets only (this dataset.json defines regions).")
        if section["output"] not in OUTPUTS:
            raise SamplanError(f"samzeroshot output {section['output']!r} is not known; use one of {', '.join(OUTPUTS)}.")
        if section["prompt"]["strategy"] not in STRATEGIES:
            raise SamplanError(f"samzeroshot prompt strategy {section['prompt']['strategy']!r} is not known; use one of "
                               f"{', '.join(STRATEGIES)}.")

    def build_network(self, plans: dict[str, Any], configuration: str, num_input_channels: int,
                      num_outputs: int) -> "nn.Module":
        """The Sam model with random weights and an empty weights-identity buffer (filled by initialize_pretrained)."""
        import torch

        from samplan.models.backbones import build_sam_model

        section = self.section(plans)
        model = build_sam_model(section["backbone"], input_size=section["input_size"]).eval()
        model.register_buffer("samzeroshot_weights_id", torch.zeros(32, dtype=torch.uint8))
        for p in model.parameters():
            p.requires_grad_(False)
        model.samzeroshot_num_outputs = int(num_outputs)
        return model

    def initialize_pretrained(self, network: "nn.Module", plans: dict[str, Any], configuration: str) -> str:
        """Load the planned weights ('auto' = official, a file, or 'none' = random) and record their identity; a log line."""
        import hashlib

        import torch

        from samplan.models.backbones import backbone_spec
        from samplan.models.weights import load_backbone_state, resolve_weights, sha256_file

        section = self.section(plans)
        spec = backbone_spec(section["backbone"])
        ckpt = str(section.get("checkpoint") or "auto")
        if ckpt.lower() == "none" or (ckpt == "auto" and spec.weights is None):
            digest = hashlib.sha256()
            for k, v in sorted(network.state_dict().items()):
                if k != "samzeroshot_weights_id":
                    digest.update(k.encode())
                    digest.update(v.detach().cpu().contiguous().numpy().tobytes())
            identity, source = digest.hexdigest(), "random weights"
        else:
            state = load_backbone_state(spec, ckpt, input_size=section["input_size"], in_chans=3, part="model")
            missing, unexpected = network.load_state_dict(state, strict=False)
            if unexpected or set(missing) - {"samzeroshot_weights_id"}:
                raise SamplanError(f"samzeroshot checkpoint {ckpt} does not fit {spec.name}: missing {list(missing)[:3]}, "
                                   f"unexpected {list(unexpected)[:3]}.")
            path = resolve_weights(spec.weights, None) if ckpt == "auto" else Path(ckpt).expanduser()
            identity, source = sha256_file(path), f"weights {path}"
        network.samzeroshot_weights_id.copy_(torch.tensor(list(bytes.fromhex(identity)), dtype=torch.uint8))
        return f"samzeroshot: {spec.name} at {section['input_size']} px, {source} (sha256 {identity[:12]}), no training"

    def training_recipe(self, plans: dict[str, Any], configuration: str, label_manager: "LabelManager") -> "TrainingRecipe":
        """samzeroshot is not trained: a clear error (the trainer writes its model folder without a recipe)."""
        raise SamplanError("samzeroshot has no training; samplan_train -m samzeroshot only writes the model folder.")

    def missing_prompts_error(self, plans: dict[str, Any]) -> str | None:
        """samzeroshot always needs prompts."""
        return NEEDS_PROMPTS

    def predict_logits(self, network: "nn.Module", data: "torch.Tensor", plans: dict[str, Any], configuration: str,
                       *, mirror_axes: tuple[int, ...], device: "torch.device", prompts: Any = None,
                       embedding_cache: Any = None) -> "torch.Tensor":
        """Logits (K, Z, Y, X) float32 CPU for prompts in the preprocessed grid (`prompted.CasePrompts`); no mirroring."""
        if prompts is None:
            raise SamplanError(NEEDS_PROMPTS)
        from samplan.methods.samzeroshot_steps import predict_case

        return predict_case(network, data, self.section(plans), device, prompts, embedding_cache=embedding_cache)
