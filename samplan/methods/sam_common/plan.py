"""Torch-free plan parts shared by the SAM methods: intensity rules, channel mapping, backbone resolution, margins.

Intensity rules say, per channel of the "2d" cache (already normalised by its scheme), how values become [0, 1]
before a SAM encoder sees them (samplan.methods.sam_common.slice_input applies them):
- "window": clip to `window` (cache units) and scale; `raw_window` records it in raw units (CT: HU);
- "window_minmax": clip to `window`, then min-max per slice (the lung-CT paper's CT rule);
- "scale": x * factor / 255, clipped;
- "percentile_clip": clip each slice to its lower/upper percentiles (inside the nonzero mask when `within_mask`,
  which keeps the background 0) and scale.
"""
from __future__ import annotations

from dataclasses import dataclass
import math
from typing import Any, ClassVar, Literal, Sequence

import numpy as np

from samplan.errors import SamplanError
from samplan.experiment_planning.sections import PlanSection, info
from samplan.models.specs import BackboneSpec, backbone_spec, backbones_of

# backbones built as a segment_anything Sam (image encoder + prompt encoder + mask decoder): SAM ViT, MedSAM, TinyViT
SAM_MODEL_FAMILIES = ("sam", "litemedsam")
LITEMEDSAM_MARGIN_PX = 3.0  # LiteMedSAM's 3D inference grows the previous slice's box by 3 px ...
LITEMEDSAM_INPUT = 256  # ... at its 256 px input


@dataclass(frozen=True, kw_only=True)
class IntensityRule(PlanSection):
    """How one cache channel becomes [0, 1] (module docstring), by "mode"."""

    TAG_KEY: ClassVar[str] = "mode"


@dataclass(frozen=True, kw_only=True)
class WindowRule(IntensityRule):
    """Clip to `window` (cache units) and scale to [0, 1]."""

    TAG: ClassVar[str] = "window"
    mode: Literal["window"]
    window: list[float]
    raw_window: list[float] = info()


@dataclass(frozen=True, kw_only=True)
class WindowMinMaxRule(IntensityRule):
    """Clip to `window` (cache units), then min-max per slice."""

    TAG: ClassVar[str] = "window_minmax"
    mode: Literal["window_minmax"]
    window: list[float]
    raw_window: list[float] = info()


@dataclass(frozen=True, kw_only=True)
class ScaleRule(IntensityRule):
    """x * factor / 255, clipped to [0, 1] (factor 255 for [0, 1] caches, 1 for raw 0..255 ones)."""

    TAG: ClassVar[str] = "scale"
    mode: Literal["scale"]
    factor: float


@dataclass(frozen=True, kw_only=True)
class PercentileClipRule(IntensityRule):
    """Clip each slice to its percentiles (of the nonzero pixels when `within_mask`) and scale to [0, 1]."""

    TAG: ClassVar[str] = "percentile_clip"
    mode: Literal["percentile_clip"]
    lower_percentile: float
    upper_percentile: float
    within_mask: bool


def channel_mode(names: Sequence[str]) -> str:
    """How C channels reach a 3-channel encoder: "rgb" (R, G, B), "repeat" (one channel) or "adapt_patch_embed"."""
    if len(names) == 3 and [n.casefold() for n in names] == ["r", "g", "b"]:
        return "rgb"
    return "repeat" if len(names) == 1 else "adapt_patch_embed"


def encoder_channels(mode: str, n: int) -> list[int]:
    """The cache channel feeding each encoder channel: rgb [0, 1, 2], repeat [0, 0, 0], adapt_patch_embed 0..n-1."""
    if mode == "rgb":
        return [0, 1, 2]
    if mode == "repeat":
        return [0, 0, 0]
    if mode == "adapt_patch_embed":
        return list(range(n))
    raise SamplanError(f"channel mode {mode!r} is not known; use rgb, repeat or adapt_patch_embed.")


def rgb_from_channels(n: int) -> list[int]:
    """Which input channel feeds each of 3 encoder channels: 1 -> [0,0,0], 2 -> [0,1,1], >=3 -> [0,1,2]."""
    return [0, 0, 0] if n == 1 else [0, 1, 1] if n == 2 else [0, 1, 2]


def intensity_rules(mode: str, config_2d: dict[str, Any], fg_props: dict[str, dict[str, float]]) -> list[IntensityRule]:
    """Per channel, the rule for values of the "2d" cache.

    CT: the foreground 0.5/99.5 percentile window (the cache holds clipped and z-scored CT, so the window is given
    in cache units, and in HU as `raw_window`). MR/other: per-slice 0.5/99.5 percentile clip (inside the nonzero
    mask when the plan normalises inside it), the same before or after the cache's per-image affine normalisation.
    RGB: the cache z-scores channels named R/G/B per image, so 0..255 comes back by per-slice min-max.
    """
    out: list[IntensityRule] = []
    for c, scheme in enumerate(config_2d["normalization_schemes"]):
        mask = bool(config_2d["use_mask_for_norm"][c])
        if scheme == "CTNormalization":
            p = fg_props[str(c)]
            lo, hi = p["percentile_00_5"], p["percentile_99_5"]
            out.append(WindowRule(mode="window", window=to_cache_units((lo, hi), p), raw_window=[lo, hi]))
        elif mode == "rgb" and scheme == "RGBTo01Normalization":
            out.append(ScaleRule(mode="scale", factor=255.0))
        elif mode == "rgb" and scheme == "NoNormalization":
            out.append(ScaleRule(mode="scale", factor=1.0))
        elif mode == "rgb":
            out.append(PercentileClipRule(mode="percentile_clip", lower_percentile=0.0, upper_percentile=100.0,
                                          within_mask=False))
        else:
            out.append(PercentileClipRule(mode="percentile_clip", lower_percentile=0.5, upper_percentile=99.5,
                                          within_mask=mask))
    return out


def to_cache_units(raw: Sequence[float], props: dict[str, float]) -> list[float]:
    """Raw CT values (HU) -> values of the z-scored cache, with the fingerprint's foreground mean/std."""
    mean, std = props["mean"], max(props["std"], 1e-8)
    return [(v - mean) / std for v in raw]


def with_ct_window(rules: list[IntensityRule], fg_props: dict[str, dict[str, float]], window_hu: Sequence[float],
                   minmax: bool = False) -> list[IntensityRule]:
    """The rules with every CT window replaced by the fixed HU window `window_hu` (then min-max when `minmax`)."""
    out: list[IntensityRule] = []
    for c, rule in enumerate(rules):
        if isinstance(rule, WindowRule):
            window, raw = to_cache_units(window_hu, fg_props[str(c)]), [float(v) for v in window_hu]
            rule = (WindowMinMaxRule(mode="window_minmax", window=window, raw_window=raw) if minmax
                    else WindowRule(mode="window", window=window, raw_window=raw))
        out.append(rule)
    return out


def resolve_backbone(name: str, planned: str, planned_input_size: int, method: str,
                     families: Sequence[str] = SAM_MODEL_FAMILIES) -> tuple[BackboneSpec, int]:
    """The spec of backbone `name` (aliases resolved) and its input size: the planned size for the planned backbone,
    the native one for another (a --backbone override) and always for fixed-size encoders (TinyViT)."""
    spec = backbone_spec(str(name))
    if spec.family not in families:
        raise SamplanError(f"{method} backbone {name!r} is not supported; use one of "
                           f"{', '.join(backbones_of(families))}.")
    if spec.fixed_input_size:
        return spec, spec.native_input_size
    if spec.name == backbone_spec(str(planned)).name:
        return spec, int(planned_input_size)
    return spec, spec.native_input_size


def num_foreground(regions: bool, num_outputs: int) -> int:
    """Foreground outputs of a prompted SAM method (one prompt set and one mask each): every region, or every label
    but the background."""
    return num_outputs if regions else num_outputs - 1


def litemedsam_margin_px(input_size: int) -> float:
    """LiteMedSAM's propagation margin (3 px at its 256 input) as pixels of an encoder input of `input_size`."""
    return LITEMEDSAM_MARGIN_PX * input_size / LITEMEDSAM_INPUT


def check_checkpoint_choice(method: str, checkpoint: str) -> None:
    """SamplanError unless `checkpoint` is "auto", "none" or an existing file (before anything is written)."""
    from pathlib import Path

    if checkpoint.lower() not in ("auto", "none") and not Path(checkpoint).expanduser().is_file():
        raise SamplanError(f"{method} checkpoint {checkpoint} does not exist; give an existing file, 'auto' or 'none'.")


def object_sizes_px(fingerprint: dict[str, Any], base_plan: dict[str, Any], configuration: str = "2d",
                    label: str = "smallest") -> dict[str, float] | None:
    """Area-equivalent in-plane object edges (pixels at the configuration's target spacing), "p05", "median" and
    "p95": each the smallest over the labels (`label` "smallest"), or those of the label whose p95 object is the
    largest ("largest": fragmented label maps have many specks, so the large objects say more of what is there).

    Raw pixel extents are scaled by median raw spacing / target spacing per in-plane axis. None when
    the fingerprint has no label statistics or no label occurs.
    """
    stats = fingerprint.get("label_statistics") or {}
    per_label = stats.get("per_label") or {}
    fwd = base_plan["transpose_forward"]
    inplane_raw_axes = fwd[1:]
    median_spacing = np.median(np.asarray(fingerprint["spacings"], dtype=float), axis=0)
    target = base_plan["configurations"][configuration]["spacing"][-2:]
    scale = [median_spacing[a] / t for a, t in zip(inplane_raw_axes, target)]
    sizes: list[dict[str, float]] = []
    for entry in per_label.values():
        if not entry.get("cases_with_label"):
            continue
        if stats.get("slice_axis") == fwd[0] and "inplane_extent_pixels" in entry:
            ext = {k: entry["inplane_extent_pixels"][k] for k in ("p05", "median", "p95")}
        else:  # slices of another axis were measured: fall back on the 3D boxes' in-plane sides
            ext = {k: [entry["extent_voxels"][k][a] for a in inplane_raw_axes] for k in ("p05", "median", "p95")}
        sizes.append({k: math.sqrt(v[0] * scale[0] * v[1] * scale[1]) for k, v in ext.items()})
    if not sizes:
        return None
    if label == "smallest":
        return {k: min(s[k] for s in sizes) for k in ("p05", "median", "p95")}
    return max(sizes, key=lambda s: s["p95"])
