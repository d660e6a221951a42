"""samunetr: SAM-UNETR (Alzate-Grisales et al., IEEE Access 11:118217, 2023) - plan section.

A SAM ViT image encoder (fully fine-tuned) feeding a UNETR-style convolutional decoder, trained on 2D
slices of the transposed volume (slice axis 0, the base "2d" configuration). The paper uses ViT-H at a
128x128 input with 5 channels; samplan defaults to ViT-B and plans the input size from the data.

Input size rule (`plan_input_size`): each slice (at the 2d target spacing, median in-plane size L
pixels) is resized so that its longer side becomes S, so an object of e pixels covers e*S/L input
pixels. With the object size taken as the area-equivalent edge sqrt(a*b) of its in-plane bounding box
(a, b from the fingerprint's `inplane_extent_pixels`, scaled from the median raw spacing to the target
spacing; the smallest label decides), S is the smallest of {128, 192, 256, 384, 512, 768, 1024} for
which the p05 object still covers one 16-px token and the median object covers 3 tokens (48 px).
S is then capped by (a) the slice size: the smallest candidate >= L, i.e. no upsampling beyond the
native grid; (b) the budget's `max_sam_input` (CPU 256, CUDA 1024 by default); (c) memory: S steps
down while fewer than 2 slices fit in `budget.memory_gb`. Without label statistics only the caps apply.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

from samplan.dataset.dataset_json import channel_names, uses_regions
from samplan.errors import SamplanError
from samplan.experiment_planning.plans import ComputeBudget
from samplan.methods.base import TrainableMethod

if TYPE_CHECKING:
    import torch
    from torch import nn

    from samplan.dataset.labels import LabelManager
    from samplan.training.recipe import TrainingRecipe

INPUT_SIZES = (128, 192, 256, 384, 512, 768, 1024)
TOKEN_PX = 16
MEDIAN_OBJECT_TOKENS = 3
NATIVE_INPUT = 1024
MAX_BATCH = 32
CPU_MAX_BATCH = 8
SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)
SAM_PIXEL_STD = (58.395, 57.12, 57.375)


def _vit(embed_dim: int, depth: int, heads: int, global_blocks: list[int], window: int, params_m: float) -> dict[str, Any]:
    return {"embed_dim": embed_dim, "depth": depth, "num_heads": heads, "global_attn_indexes": global_blocks,
            "window_size": window, "params_m": params_m}


# SAM image encoders (segment_anything.build_sam); params_m = encoder parameters in millions
BACKBONES: dict[str, dict[str, Any]] = {
    "vit_b": _vit(768, 12, 12, [2, 5, 8, 11], 14, 89.7),
    "vit_l": _vit(1024, 24, 16, [5, 11, 17, 23], 14, 308.3),
    "vit_h": _vit(1280, 32, 16, [7, 15, 23, 31], 14, 631.6),
    # MedSAM's fine-tuned ViT-B (same architecture as vit_b)
    "medsam_vit_b": _vit(768, 12, 12, [2, 5, 8, 11], 14, 89.7),
    # samplan.models.backbones' random tiny encoder for tests (the decoder reads blocks 0..3, see unetr_decoder)
    "tiny_vit": _vit(64, 4, 2, [1, 3], 4, 0.25),
}
BACKBONE_ALIASES = {"tiny": "tiny_vit"}
PAPER_BACKBONE = "vit_h"
DEFAULT_BACKBONE = "vit_b"
FEATURE_SIZE = 20


def training_bytes(backbone: str, size: int, batch: int, feature_size: int = FEATURE_SIZE) -> float:
    """Rough fp32 training memory (bytes) of SAM-UNETR at input `size` and `batch`.

    Weights + gradients + two optimiser moments (16 bytes/parameter), per block ~68 bytes per token
    and channel of saved activations, attention maps (scores and softmax) of global and windowed
    blocks, and ~40 maps of F x size**2 floats for the convolutional decoder.
    """
    spec = BACKBONES[backbone]
    grid = size // TOKEN_PX
    tokens = grid * grid
    e, h, w = spec["embed_dim"], spec["num_heads"], spec["window_size"]
    n_global = len(spec["global_attn_indexes"])
    n_windows = math.ceil(grid / w) ** 2
    per_block = 68.0 * tokens * e
    attn = n_global * 8.0 * h * tokens**2 + (spec["depth"] - n_global) * 8.0 * h * n_windows * (w * w) ** 2
    decoder = 40.0 * 4 * feature_size * size * size
    per_sample = spec["depth"] * per_block + attn + decoder
    return spec["params_m"] * 1e6 * 16 + batch * per_sample


def batch_size_for(backbone: str, size: int, budget: ComputeBudget) -> int:
    """Largest batch (<= 32) whose estimated training memory fits in 75 % of the budget; 0 if none."""
    usable = 0.75 * budget.memory_gb * 1e9
    fixed = training_bytes(backbone, size, 0)
    per_sample = training_bytes(backbone, size, 1) - fixed
    return int(max(0, min(MAX_BATCH, (usable - fixed) // per_sample)))


def object_sizes_px(fingerprint: dict[str, Any], base_plan: dict[str, Any]) -> dict[str, float] | None:
    """Area-equivalent in-plane object edge (pixels at the 2d target spacing): p05 and median, smallest label.

    Raw pixel extents are scaled by median raw spacing / target spacing per in-plane axis. None when
    the fingerprint has no label statistics or no label occurs.
    """
    stats = fingerprint.get("label_statistics") or {}
    per_label = stats.get("per_label") or {}
    fwd = base_plan["transpose_forward"]
    inplane_raw_axes = fwd[1:]
    median_spacing = np.median(np.asarray(fingerprint["spacings"], dtype=float), axis=0)
    target = base_plan["configurations"]["2d"]["spacing"]
    scale = [median_spacing[a] / t for a, t in zip(inplane_raw_axes, target)]
    p05s, meds = [], []
    for entry in per_label.values():
        if not entry.get("cases_with_label"):
            continue
        if stats.get("slice_axis") == fwd[0] and "inplane_extent_pixels" in entry:
            ext = entry["inplane_extent_pixels"]
            p05, med = ext["p05"], ext["median"]
        else:  # slices of another axis were measured: fall back on the 3D boxes' in-plane sides
            ext = entry["extent_voxels"]
            p05 = [ext["p05"][a] for a in inplane_raw_axes]
            med = [ext["median"][a] for a in inplane_raw_axes]
        p05s.append(math.sqrt(p05[0] * scale[0] * p05[1] * scale[1]))
        meds.append(math.sqrt(med[0] * scale[0] * med[1] * scale[1]))
    if not p05s:
        return None
    return {"p05": min(p05s), "median": min(meds)}


def plan_input_size(
    slice_size: float, objects: dict[str, float] | None, budget: ComputeBudget, backbone: str
) -> dict[str, Any]:
    """Input edge S and why (rule in the module docstring); `slice_size` = longer median slice side in pixels."""

    def _enough(s: int) -> bool:
        scale = s / slice_size
        return objects["p05"] * scale >= TOKEN_PX and objects["median"] * scale >= MEDIAN_OBJECT_TOKENS * TOKEN_PX

    by_objects = None if objects is None else next((s for s in INPUT_SIZES if _enough(s)), INPUT_SIZES[-1])
    slice_cap = next((s for s in INPUT_SIZES if s >= slice_size), INPUT_SIZES[-1])
    budget_cap = max([s for s in INPUT_SIZES if s <= budget.max_sam_input] or [INPUT_SIZES[0]])
    limits = {"objects": by_objects or INPUT_SIZES[-1], "slice size": slice_cap, "budget": budget_cap}
    size = min(limits.values())
    # the first binding limit in this order names the reason (objects win ties: they were satisfied exactly)
    limited_by = next(k for k, v in limits.items() if v == size and (k != "objects" or objects is not None))
    while batch_size_for(backbone, size, budget) < 2 and size > INPUT_SIZES[0]:
        size = INPUT_SIZES[INPUT_SIZES.index(size) - 1]
        limited_by = "memory"
    out: dict[str, Any] = {
        "input_size": size, "limited_by": limited_by, "candidates": list(INPUT_SIZES),
        "by_objects": by_objects, "slice_cap": slice_cap, "budget_cap": budget_cap,
        "reference_slice_edge_px": float(slice_size),
    }
    if objects is not None:
        out["object_edge_px"] = {k: round(v, 3) for k, v in objects.items()}
        out["object_edge_at_input_px"] = {k: round(v * size / slice_size, 3) for k, v in objects.items()}
    return out


def channel_mapping(names: list[str]) -> dict[str, Any]:
    """How the C channels reach the encoder: "rgb" (R,G,B), "repeat" (1 channel) or "adapt_patch_embed"."""
    c = len(names)
    if c == 3 and [n.casefold() for n in names] == ["r", "g", "b"]:
        return {"mode": "rgb", "in_chans": 3, "num_input_channels": 3}
    if c == 1:
        return {"mode": "repeat", "in_chans": 3, "num_input_channels": 1}
    # the paper's 5-channel case: patch-embedding weights interpolated along the channel axis
    return {"mode": "adapt_patch_embed", "in_chans": c, "num_input_channels": c}


def intensity_mapping(mode: str, config_2d: dict[str, Any], fg_props: dict[str, dict[str, float]]) -> list[dict[str, Any]]:
    """Per channel, how values of the "2d" cache (already normalised by its scheme) become 0..255.

    CT: the foreground 0.5/99.5 percentile window (raw HU in `raw_window`, in cache units in
    `window`, since the cache holds clipped and z-scored CT). MR/other: per-image 0.5/99.5
    percentile clip (inside the nonzero mask when the plan normalises inside it), which is the same
    before or after the cache's per-image affine normalisation. RGB: kept as is; the cache z-scores
    channels named R/G/B per image, so 0..255 is restored by per-image min-max.
    """
    out = []
    for c, scheme in enumerate(config_2d["normalization_schemes"]):
        mask = bool(config_2d["use_mask_for_norm"][c])
        if scheme == "CTNormalization":
            p = fg_props[str(c)]
            lo, hi, mean, std = p["percentile_00_5"], p["percentile_99_5"], p["mean"], max(p["std"], 1e-8)
            out.append({"mode": "window", "window": [(lo - mean) / std, (hi - mean) / std], "raw_window": [lo, hi]})
        elif mode == "rgb" and scheme == "RGBTo01Normalization":
            out.append({"mode": "scale", "factor": 255.0})
        elif mode == "rgb" and scheme == "NoNormalization":
            out.append({"mode": "scale", "factor": 1.0})
        elif mode == "rgb":
            out.append({"mode": "percentile_clip", "lower_percentile": 0.0, "upper_percentile": 100.0, "within_mask": False})
        else:
            out.append({"mode": "percentile_clip", "lower_percentile": 0.5, "upper_percentile": 99.5, "within_mask": mask})
    return out


def pixel_statistics(in_chans: int, rgb_mean: tuple[float, ...] = SAM_PIXEL_MEAN,
                     rgb_std: tuple[float, ...] = SAM_PIXEL_STD) -> tuple[list[float], list[float]]:
    """SAM's (or the given RGB) pixel mean/std, interpolated along the channel axis like the patch-embedding weights."""
    if in_chans == 3:
        return [float(v) for v in rgb_mean], [float(v) for v in rgb_std]
    if in_chans == 1:
        return [float(np.mean(rgb_mean))], [float(np.mean(rgb_std))]
    pos = np.linspace(0.0, 2.0, in_chans)
    mean = np.interp(pos, [0, 1, 2], rgb_mean)
    std = np.interp(pos, [0, 1, 2], rgb_std)
    return [float(v) for v in mean], [float(v) for v in std]


def resolve_backbone_name(name: str) -> str:
    """A samunetr backbone name ("tiny" is an alias of "tiny_vit"); SamplanError listing the choices otherwise."""
    name = BACKBONE_ALIASES.get(str(name), str(name))
    if name not in BACKBONES:
        raise SamplanError(f"samunetr backbone {name!r} is not known; choose one of {', '.join(BACKBONES)} "
                           "(SAM ViT image encoders only).")
    return name


class SAMUNETRMethod(TrainableMethod):
    """SAM-UNETR: SAM ViT encoder + UNETR decoder on 2D slices."""

    name = "samunetr"
    dimensionality = "2d"
    needs_training = True

    def __init__(self, backbone: str = DEFAULT_BACKBONE):
        self.backbone = resolve_backbone_name(backbone)

    def plan_section(
        self, fingerprint: dict[str, Any], base_plan: dict[str, Any], budget: ComputeBudget, dataset_json: dict[str, Any]
    ) -> dict[str, Any]:
        """Backbone, input size, channel and intensity mapping, batch size and recipe for this dataset."""
        cfg = base_plan["configurations"]["2d"]
        size_plan = plan_input_size(max(cfg["median_image_size_in_voxels"]), object_sizes_px(fingerprint, base_plan),
                                    budget, self.backbone)
        size = size_plan["input_size"]
        channels = channel_mapping(channel_names(dataset_json))
        mean, std = pixel_statistics(channels["in_chans"])
        regions = uses_regions(dataset_json)
        batch = batch_size_for(self.backbone, size, budget)
        if budget.device == "cpu" and batch > 0:
            # memory would allow more, but the full-resolution decoder makes a CPU step of 32 slices ~15 s
            batch = min(batch, CPU_MAX_BATCH)
        section: dict[str, Any] = {
            "backbone": self.backbone,
            "backbone_choices": list(BACKBONES),
            "paper_backbone": PAPER_BACKBONE,
            "backbone_spec": {k: v for k, v in BACKBONES[self.backbone].items() if k != "params_m"} | {"patch_size": TOKEN_PX},
            "native_input_size": NATIVE_INPUT,
            "input_size": size,
            "token_grid": size // TOKEN_PX,
            "input_size_plan": size_plan,
            "resize": "longest_side_then_pad",
            "configuration": "2d",
            "slice_axis": 0,
            "channels": channels,
            "intensity": {
                "per_channel": intensity_mapping(channels["mode"], cfg, base_plan["foreground_intensity_properties_per_channel"]),
                "output_range": [0.0, 255.0],
                "pixel_mean": mean,
                "pixel_std": std,
            },
            "feature_size": FEATURE_SIZE,
            "feature_size_rule": "any F >= 1: the decoder maps the E token channels to multiples of F by convolutions",
            "configurations": ["2d"],
            "freeze_encoder": False,
            # "auto": the backbone's official weights (samplan_weights), "none": random; --checkpoint sets "checkpoint"
            "encoder_weights": "auto",
            "batch_size": max(1, batch),
            "recipe": {
                "loss": {"name": "dice_focal", "activation": "sigmoid" if regions else "softmax", "to_onehot_y": not regions},
                "optimizer": {"name": "Novograd", "lr": 1e-3, "weight_decay": 0.01,
                              "substitute": {"name": "AdamW", "lr": 1e-3, "weight_decay": 0.01}},
                "lr_schedule": {"name": "constant"},
                "num_epochs": 200,
                "num_iterations_per_epoch": 250,
                "num_val_iterations_per_epoch": 50,
                "oversample_foreground_percent": 0.33,
                "augmentation": "light",
                "augmentation_params": {"rotation_deg": 15.0, "scaling": [0.7, 1.4], "mirror": False, "intensity": False},
                "model_selection": {"metric": "dice", "postprocess": "keep_largest_component"},
            },
            "budget": budget.to_dict(),
        }
        if batch == 0:
            section["memory_warning"] = (
                f"{self.backbone} at {size}x{size} needs about {training_bytes(self.backbone, size, 1) / 1e9:.1f} GB "
                f"to train with batch 1, more than 75 % of the {budget.memory_gb:g} GB budget; use a smaller backbone "
                "or a larger budget.")
        return section

    # --- training and prediction (implemented in samplan.methods.samunetr_train) ---------------------------

    def configurations(self, plans: dict[str, Any]) -> list[str]:
        """Always the "2d" configuration (slices along axis 0 of the transposed volume)."""
        section = plans.get("methods", {}).get(self.name, {})
        return list(section.get("configurations") or [section.get("configuration", "2d")])

    def check_plan(self, plans: dict[str, Any]) -> None:
        """The backbone must be a known SAM ViT and a --checkpoint file must exist."""
        from samplan.methods.samunetr_train import check_section

        check_section(plans)

    def build_network(self, plans: dict[str, Any], configuration: str, num_input_channels: int, num_outputs: int) -> "nn.Module":
        """SliceAdapter(SAM encoder + UNETR decoder), random weights: cache slices (B, C, H, W) -> logits (B, K, H, W)."""
        from samplan.methods.samunetr_train import build_samunetr_network

        return build_samunetr_network(plans, num_input_channels, num_outputs)

    def initialize_pretrained(self, network: "nn.Module", plans: dict[str, Any], configuration: str) -> str:
        """Load the planned (or --checkpoint) encoder weights into a new network; called by the trainer, not the predictor."""
        from samplan.methods.samunetr_train import load_pretrained_encoder

        return load_pretrained_encoder(network, plans)

    def training_recipe(self, plans: dict[str, Any], configuration: str, label_manager: "LabelManager") -> "TrainingRecipe":
        """DiceFocal, AdamW 1e-3 / 0.01 (Novograd substitute), light augmentation (see samunetr_train)."""
        from samplan.methods.samunetr_train import samunetr_recipe

        return samunetr_recipe(plans, configuration, label_manager)

    def validation_step(self, network: "nn.Module", batch: dict[str, Any], recipe: "TrainingRecipe",
                        device: "torch.device", label_manager: "LabelManager") -> dict[str, Any]:
        """Loss and tp/fp/fn counted after keeping the largest component per slice and class (model selection)."""
        from samplan.methods.samunetr_train import validation_with_largest_component

        return validation_with_largest_component(network, batch, recipe, device, label_manager)

    def predict_logits(self, network: "nn.Module", data: "torch.Tensor", plans: dict[str, Any], configuration: str,
                       *, mirror_axes: tuple[int, ...], device: "torch.device") -> "torch.Tensor":
        """Logits (K, Z, Y, X) slice by slice (inference.dense), in batches of the plan section's batch size."""
        from samplan.inference.dense import predict_dense

        batch = int(plans["methods"][self.name]["batch_size"])
        return predict_dense(network, data, plans, configuration, mirror_axes=mirror_axes, device=device, batch_size=batch)
