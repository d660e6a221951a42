"""medsam: box-prompted SAM / MedSAM / LiteMedSAM (Ma et al., Nat. Commun. 2024), fine-tuned on 2D slices.

Input: each slice of the "2d" cache (C, Y, X) becomes 3 channels (`rgb_from_channels`), is mapped to [0, 1]
per the plan's intensity entries (no SAM pixel mean/std), resized so its longer side is the input size and
zero-padded bottom/right to a square. One box per image, single-mask output, binary target per box.

Box policies: "reference_jitter" (box of the target, each side moved outward by 0..max_jitter_px input
pixels), "fixed_full_image" (the whole slice: no box needed at inference), "fixed_planned_region" (the
union box of each label over the cached cases, padded; computed when a training starts and kept as the
network buffer `medsam_regions`, so it travels with the checkpoint).

Trainable parameters: the image encoder and mask decoder (prompt encoder frozen), or exactly the
parameters under the `unfreeze` prefixes (samplan_train --unfreeze); only those reach AdamW.
Pretrained weights ("checkpoint": "auto" = the backbone's official ones, a file, or "none" = random) are
loaded by `initialize_pretrained`, i.e. only when a new training starts, never for prediction.

Speed on a CPU: LiteMedSAM has only 9.8 M parameters but its TinyViT keeps the full 256x256 grid in its
first stage (1x1 patch embedding), about 75 GFLOP per image forward, so a training step costs
~200+ GFLOP per sample; see `medsam_steps` for what is done to keep the rest of a step cheap.

Outputs and thresholds: predict_logits returns (K, Z, Y, X) with the mask logit of each foreground label
(label-based datasets: channel 0 = background = constant 0, see `medsam_steps.predict_case`);
argmax then picks the label with the largest positive logit and background where all are <= 0, i.e.
exactly the per-label "logit > 0" rule of SAM. Regions: one sigmoid channel per region, the mask logit.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from samplan.dataset.dataset_json import channel_names, foreground_labels, regions, uses_regions
from samplan.errors import SamplanError
from samplan.experiment_planning.plans import ComputeBudget
from samplan.methods.base import TrainableMethod

if TYPE_CHECKING:
    import torch
    from torch import nn

    from samplan.dataset.labels import LabelManager
    from samplan.training.recipe import TrainingRecipe

# input size per supported backbone (TinyViT ones are fixed at 256; SAM ViTs take any multiple of 16)
BACKBONE_INPUT = {"litemedsam": 256, "medsam_vit_b": 1024, "vit_b": 1024, "vit_l": 1024, "vit_h": 1024,
                  "tiny_litemedsam": 256, "tiny_vit": 256}
DEFAULT_BACKBONE = "litemedsam"
MAX_JITTER_PX = 20
REGION_PAD_PX = 10
# per-sample training memory on CPU (GB, measured order of magnitude incl. activations, fp32)
_GB_PER_SAMPLE = {"litemedsam": 1.0, "medsam_vit_b": 9.0}
BOX_POLICIES = ("reference_jitter", "fixed_full_image", "fixed_planned_region")
CT_WINDOW_HU = (40.0 - 200.0, 40.0 + 200.0)  # level 40, width 400
TRAINABLE_MODULES = ["image_encoder", "mask_decoder"]


def rgb_from_channels(n: int) -> list[int]:
    """Which input channel feeds each of the 3 encoder channels: 1 -> [0,0,0], 2 -> [0,1,1], >=3 -> [0,1,2]."""
    return [0, 0, 0] if n == 1 else [0, 1, 1] if n == 2 else [0, 1, 2]


class MedSAMMethod(TrainableMethod):
    """Box-prompted (Lite)MedSAM fine-tuned on slices: image encoder + mask decoder trainable."""

    name = "medsam"
    dimensionality = "2d"
    needs_training = True

    def plan_section(self, fingerprint: dict[str, Any], base_plan: dict[str, Any], budget: ComputeBudget,
                     dataset_json: dict[str, Any]) -> dict[str, Any]:
        """Backbone, input size, channels, intensity mapping, box policy, trainable modules and recipe."""
        if "2d" not in base_plan["configurations"]:
            raise SamplanError("medsam needs the 2d configuration in the plan; re-plan with it.")
        cfg = base_plan["configurations"]["2d"]
        backbone = DEFAULT_BACKBONE
        names = channel_names(dataset_json)
        batch = int(max(1, min(16, (0.5 * budget.memory_gb) // _GB_PER_SAMPLE[backbone])))
        if budget.device == "cpu":
            batch = min(batch, 4)  # MedSAM-Lite's batch; a CPU step costs ~10 s per sample already
        return {
            "configurations": ["2d"],
            "backbone": backbone,
            "planned_backbone": backbone,  # "input_size" is this backbone's; another one (--backbone) gets its own
            "backbone_choices": list(BACKBONE_INPUT),
            "checkpoint": "auto",
            "input_size": BACKBONE_INPUT[backbone],
            "input_size_by_backbone": dict(BACKBONE_INPUT),
            "resize": "longest_side_then_pad",
            "channels": {"names": names, "rgb_from_channels": rgb_from_channels(len(names))},
            "intensity": {"per_channel": intensity_entries(cfg, base_plan["foreground_intensity_properties_per_channel"],
                                                           names),
                          "output_range": [0.0, 1.0], "pixel_mean_std": None},
            "box_policy": {"name": "reference_jitter", "max_jitter_px": MAX_JITTER_PX, "outward_only": True,
                           "per": "label", "region_pad_px": REGION_PAD_PX, "choices": list(BOX_POLICIES),
                           # propagated boxes grown by the mean outward jitter the model was trained with
                           "propagation_margin_px": MAX_JITTER_PX / 2},
            "inference": {"reference_jitter": "boxes at prediction (samplan_predict --prompts, or --prompt-strategy "
                                              "box|propagate --reference-dir), propagated up and down from each boxed slice",
                          "fixed": "every slice with the fixed box, unless boxes are given"},
            # which label values share one box when boxes come from reference label maps (one per output)
            "prompt": {"label_groups": [list(r) for r in regions(dataset_json)] if uses_regions(dataset_json)
                       else [[v] for v in foreground_labels(dataset_json)]},
            "trainable_modules": list(TRAINABLE_MODULES),
            "frozen_modules": ["prompt_encoder"],
            "unfreeze": None,
            "batch_size": batch,
            "recipe": {
                "loss": {"name": "dice_sigmoid_squared+bce", "weight_dice": 1.0, "weight_bce": 1.0},
                "optimizer": {"name": "AdamW", "lr": 1e-4, "weight_decay": 0.01},
                "lr_schedule": {"name": "constant"},
                "num_epochs": 100, "num_iterations_per_epoch": 50, "num_val_iterations_per_epoch": 10,
                "augmentation": "none",
            },
            "regions": uses_regions(dataset_json),
            "regions_values": [list(r) for r in regions(dataset_json)] if uses_regions(dataset_json) else None,
            "budget": budget.to_dict(),
        }

    def _section(self, plans: dict[str, Any]) -> dict[str, Any]:
        """The plan section with the backbone resolved (aliases) and its effective input size."""
        section = plans.get("methods", {}).get(self.name)
        if section is None:
            raise SamplanError("plans.json has no 'medsam' section; re-plan with samplan_plan_and_preprocess -m medsam.")
        if section["box_policy"]["name"] not in BOX_POLICIES:
            raise SamplanError(f"medsam box policy {section['box_policy']['name']!r} is not known; use one of "
                               f"{', '.join(BOX_POLICIES)}.")
        from samplan.models.backbones import backbone_spec

        spec = backbone_spec(str(section["backbone"]))
        if spec.name not in BACKBONE_INPUT:
            raise SamplanError(f"medsam backbone {section['backbone']!r} is not supported; use one of "
                               f"{', '.join(BACKBONE_INPUT)}.")
        if spec.fixed_input_size:
            size = spec.native_input_size
        elif spec.name == section.get("planned_backbone", DEFAULT_BACKBONE):
            size = int(section["input_size"])
        else:  # a --backbone override: that backbone's planned size
            size = int(section.get("input_size_by_backbone", {}).get(spec.name, spec.native_input_size))
        return {**section, "backbone": spec.name, "input_size": size}

    def check_plan(self, plans: dict[str, Any]) -> None:
        """Backbone, box policy, a --checkpoint file and the --unfreeze prefixes must be usable (before any output)."""
        section = self._section(plans)
        ckpt = str(section.get("checkpoint") or "auto")
        if ckpt.lower() not in ("auto", "none") and not Path(ckpt).expanduser().is_file():
            raise SamplanError(f"medsam checkpoint {ckpt} does not exist; give an existing file, 'auto' or 'none'.")
        unfreeze = section.get("unfreeze")
        if unfreeze is not None:
            if isinstance(unfreeze, str) or not unfreeze or not all(isinstance(p, str) and p for p in unfreeze):
                raise SamplanError(f"medsam 'unfreeze' must be a non-empty list of parameter name prefixes, got {unfreeze!r}.")
            import torch

            from samplan.models.backbones import build_sam_model

            try:
                with torch.device("meta"):  # only the parameter names are needed
                    model = build_sam_model(section["backbone"], input_size=section["input_size"])
            except RuntimeError:  # TinyViT reads tensor values while it is built: build it for real
                model = build_sam_model(section["backbone"], input_size=section["input_size"])
            set_trainable(model, list(unfreeze))

    def build_network(self, plans: dict[str, Any], configuration: str, num_input_channels: int,
                      num_outputs: int) -> "nn.Module":
        """The Sam model with random weights (see initialize_pretrained), trainable parameters set per plan."""
        import torch

        from samplan.methods.medsam_steps import EMPTY_REGION
        from samplan.models.backbones import build_sam_model

        section = self._section(plans)
        model = build_sam_model(section["backbone"], input_size=section["input_size"])
        n_fg = num_outputs if section.get("regions") else num_outputs - 1
        # per foreground output: union box (x0, y0, x1, y1) in fractions of the slice, empty until planned
        model.register_buffer("medsam_regions", torch.tensor([list(EMPTY_REGION)] * n_fg))
        set_trainable(model, list(section.get("unfreeze") or section["trainable_modules"]))
        model.medsam_section = section  # train/validation steps get no plans: the network carries its section
        return model

    def initialize_pretrained(self, network: "nn.Module", plans: dict[str, Any], configuration: str) -> str:
        """Load the planned pretrained weights and compute the planned regions (new trainings only); a log line."""
        from samplan.methods.medsam_steps import regions_from_cache
        from samplan.models.backbones import backbone_spec
        from samplan.models.weights import load_backbone_state
        from samplan.paths import preprocessed_root

        section = self._section(plans)
        spec = backbone_spec(section["backbone"])
        ckpt = str(section.get("checkpoint") or "auto")
        if ckpt.lower() == "none" or (ckpt == "auto" and spec.weights is None):
            source = "random weights" + (" (no official weights for this backbone)" if ckpt == "auto" else "")
        else:
            state = load_backbone_state(spec, ckpt, input_size=section["input_size"], in_chans=3, part="model")
            missing, unexpected = network.load_state_dict(state, strict=False)
            if unexpected or set(missing) - {"medsam_regions"}:
                raise SamplanError(f"medsam checkpoint {ckpt} does not fit {spec.name}: missing {list(missing)[:3]}, "
                                   f"unexpected {list(unexpected)[:3]}.")
            source = f"weights from {ckpt}"
        note = ""
        if section["box_policy"]["name"] != "fixed_full_image":
            cfg = plans["configurations"][configuration]
            cache = preprocessed_root() / str(plans.get("dataset_name", "")) / str(cfg.get("data_identifier", configuration))
            if cache.is_dir():
                regions_t, n = regions_from_cache(cache, section, network.medsam_regions.shape[0])
                network.medsam_regions.copy_(regions_t)
                note = f"; planned regions from {n} cached case(s)"
            else:
                note = f"; no cache at {cache}: planned regions = whole slice"
        if section["box_policy"]["name"] == "fixed_full_image" and network.medsam_regions.shape[0] > 1:
            # one single-mask output per box: the same box cannot ask for different labels
            note += "; note: fixed_full_image gives every label the same box, so labels cannot be told apart"
        return f"medsam: {spec.name} at {section['input_size']} px, {source}; {trainable_summary(network)}{note}"

    def training_recipe(self, plans: dict[str, Any], configuration: str,
                        label_manager: "LabelManager") -> "TrainingRecipe":
        """AdamW 1e-4 wd 0.01 over the trainable parameters only, constant lr, Dice(squared)+BCE, no augmentation."""
        import torch

        from samplan.methods.medsam_steps import MedSAMLoss
        from samplan.training.recipe import TrainingRecipe

        section = self._section(plans)
        r, opt = section["recipe"], section["recipe"]["optimizer"]
        cfg = plans["configurations"][configuration]

        def make_optimizer(params):
            trainable = [p for p in params if p.requires_grad]  # frozen parameters never reach the optimiser
            return torch.optim.AdamW(trainable, lr=float(opt["lr"]), weight_decay=float(opt["weight_decay"]))

        def make_scheduler(optimizer, num_epochs):
            return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: 1.0)

        fixed = section["box_policy"]["name"] != "reference_jitter"
        return TrainingRecipe(
            loss=MedSAMLoss(float(r["loss"]["weight_dice"]), float(r["loss"]["weight_bce"])),
            make_optimizer=make_optimizer, make_scheduler=make_scheduler,
            num_epochs=int(r["num_epochs"]), iterations_per_epoch=int(r["num_iterations_per_epoch"]),
            val_iterations_per_epoch=int(r["num_val_iterations_per_epoch"]), batch_size=int(section["batch_size"]),
            patch_size=tuple(int(p) for p in cfg["patch_size"]),
            # reference boxes need an object in the slice; fixed boxes also learn empty slices
            oversample_foreground=0.5 if fixed else 1.0,
            augmentation={"rotation_for_DA": (0.0, 0.0), "do_dummy_2d_data_aug": False, "mirror_axes": ()},
            mirror_axes=(), grad_clip=None)

    def train_step(self, network: "nn.Module", batch: dict[str, Any], recipe: "TrainingRecipe",
                   optimizer: "torch.optim.Optimizer", device: "torch.device") -> dict[str, float]:
        """One AdamW step on B slices, one box (and one binary target) each, decoded in one batched call."""
        from samplan.methods.medsam_steps import step

        return step(network, batch, recipe, device, _network_section(network), optimizer=optimizer)

    def validation_step(self, network: "nn.Module", batch: dict[str, Any], recipe: "TrainingRecipe",
                        device: "torch.device", label_manager: "LabelManager") -> dict[str, Any]:
        """Loss and per-class tp/fp/fn of the thresholded masks (boxes without jitter)."""
        from samplan.methods.medsam_steps import step

        return step(network, batch, recipe, device, _network_section(network))

    def missing_prompts_error(self, plans: dict[str, Any]) -> str | None:
        """A reference_jitter model needs boxes at prediction; fixed-box models do not."""
        from samplan.methods.medsam_steps import NEEDS_BOXES

        return NEEDS_BOXES if self._section(plans)["box_policy"]["name"] == "reference_jitter" else None

    def validation_prompt_strategy(self, plans: dict[str, Any]) -> str | None:
        """A reference_jitter model is validated as MedSAM is evaluated: the reference's largest box, propagated."""
        return "propagate" if self._section(plans)["box_policy"]["name"] == "reference_jitter" else None

    def predict_logits(self, network: "nn.Module", data: "torch.Tensor", plans: dict[str, Any], configuration: str,
                       *, mirror_axes: tuple[int, ...], device: "torch.device", prompts: Any = None,
                       embedding_cache: Any = None, reference: np.ndarray | None = None) -> "torch.Tensor":
        """Logits (K, Z, Y, X) float32 CPU from boxes (prompts or reference) or the fixed box; no mirroring.

        See medsam_steps.predict_case. `embedding_cache` is accepted and not used: a fine-tuned encoder's
        embeddings change with every checkpoint, so only samzeroshot's frozen backbones are cached.
        """
        from samplan.methods.medsam_steps import predict_case

        return predict_case(network, data, self._section(plans), device, prompts=prompts, reference=reference)


def _network_section(network: "nn.Module") -> dict[str, Any]:
    section = getattr(network, "medsam_section", None)
    if section is None:
        raise SamplanError("the medsam network has no plan section attached; build it with MedSAMMethod.build_network.")
    return section


def _matches(name: str, prefix: str) -> bool:
    p = prefix.rstrip(".")
    return name == p or name.startswith(p + ".")


def set_trainable(model: "nn.Module", prefixes: list[str]) -> int:
    """requires_grad = True exactly for parameters under one of `prefixes` (dotted names); returns their count.

    A prefix that matches no parameter is an error (a typo must not silently train nothing).
    """
    names = [n for n, _ in model.named_parameters()]
    for p in prefixes:
        if not any(_matches(n, p) for n in names):
            tops = sorted({n.split(".")[0] for n in names})
            raise SamplanError(f"--unfreeze {p!r} matches no parameter of the medsam model; names start with "
                               f"{', '.join(tops)} (e.g. {names[0]}).")
    count = 0
    for n, param in model.named_parameters():
        param.requires_grad_(any(_matches(n, p) for p in prefixes))
        count += param.numel() if param.requires_grad else 0
    return count


def trainable_summary(model: "nn.Module") -> str:
    """"N of M parameters trainable (modules ...)" for the training log."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    section = getattr(model, "medsam_section", {}) or {}
    prefixes = section.get("unfreeze") or section.get("trainable_modules") or []
    return f"{trainable:,} of {total:,} parameters trainable ({', '.join(prefixes)})"


def intensity_entries(config_2d: dict[str, Any], fg_props: dict[str, dict[str, float]],
                      names: list[str]) -> list[dict[str, Any]]:
    """Per channel, how cache values become [0, 1]: samunetr's mapping, with CT windowed at level 40 / width 400.

    MR/other: per-image 0.5/99.5 percentile clip (inside the nonzero mask when the plan normalises inside it,
    background kept 0); RGB: per-image min-max; CT: the raw HU window converted to cache units with the
    fingerprint's foreground mean/std (the cache holds z-scored HU).
    """
    from samplan.methods.samunetr import channel_mapping, intensity_mapping

    entries = intensity_mapping(channel_mapping(names)["mode"], config_2d, fg_props)
    for c, e in enumerate(entries):
        if e["mode"] == "window":
            p = fg_props[str(c)]
            mean, std = p["mean"], max(p["std"], 1e-8)
            e.update(raw_window=list(CT_WINDOW_HU), window=[(v - mean) / std for v in CT_WINDOW_HU])
    return entries
