"""Preprocess one case for a plan configuration: transpose -> crop to nonzero -> normalise -> resample.

The same code serves training (with a label map) and inference (seg None), so that a predictor sees
exactly what the network was trained on, and export can undo each step in reverse order using the
properties recorded here.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from samplan.dataset.dataset_json import DatasetJson
from samplan.dataset.image_io import read_images, read_seg
from samplan.errors import DatasetError, SamplanError
from samplan.preprocessing.cropping import crop_to_nonzero
from samplan.preprocessing.foreground import case_class_locations
from samplan.preprocessing.normalization import normalize
from samplan.preprocessing.resampling import compute_new_shape, resample

_RESAMPLING_KEYS = ("is_seg", "order", "order_z", "force_separate_z")


def configuration_plan(plans: dict[str, Any], configuration: str) -> dict[str, Any]:
    """The plan of one configuration ("2d", "3d_fullres", ...), or a SamplanError listing the available ones."""
    configs = plans.get("configurations", {})
    if configuration not in configs:
        raise SamplanError(
            f"configuration '{configuration}' is not in the plans of {plans.get('dataset_name', 'this dataset')}; "
            f"available: {', '.join(configs) or '(none)'}."
        )
    return configs[configuration]


def target_spacing(plan: dict[str, Any], spacing_transposed: Sequence[float]) -> list[float]:
    """The spacing a case is resampled to, transposed axis order; 2D plans keep the case's out-of-plane spacing."""
    spacing = [float(s) for s in plan["spacing"]]
    if len(spacing) < len(spacing_transposed):
        # 2D configurations work slice by slice: the distance between slices is left as it is
        spacing = [float(spacing_transposed[0]), *spacing]
    return spacing


def _resampling_kwargs(plan: dict[str, Any], key: str, is_seg: bool) -> dict[str, Any]:
    """Keyword arguments for resample() from the plan (missing keys fall back to nnU-Net's defaults)."""
    kwargs = {k: v for k, v in (plan.get(key) or {}).items() if k in _RESAMPLING_KEYS}
    kwargs.setdefault("order", 1 if is_seg else 3)
    kwargs["is_seg"] = is_seg
    return kwargs


def preprocess_case(
    images: np.ndarray,
    seg: np.ndarray | None,
    properties: dict[str, Any],
    plans: dict[str, Any],
    configuration: str,
) -> tuple[np.ndarray, np.ndarray | None, dict[str, Any]]:
    """Preprocess one case held in memory.

    `images` is `(C, Z, Y, X)` (any real dtype) and `seg` an integer `(1, Z, Y, X)` label map or None, both in
    the reader's axis order; `properties` comes from samplan.dataset.image_io (needs "spacing").
    Returns float32 data `(C, z, y, x)` and an int8/int16 label map `(1, z, y, x)` (-1 outside the nonzero
    mask; None when `seg` is None), in transposed axis order on the plan's grid, and a copy of `properties`
    with shape_before_cropping, bbox_used_for_cropping, shape_after_cropping_and_before_resampling
    (all transposed axis order) and spacing_after_resampling added. `properties["spacing"]` stays the
    original spacing in the reader's axis order.
    """
    plan = configuration_plan(plans, configuration)
    if images.ndim != 4:
        raise SamplanError(f"images must be channel-first (C, Z, Y, X), got shape {images.shape}")
    if seg is not None and seg.shape[1:] != images.shape[1:]:
        raise DatasetError(
            f"label map shape {seg.shape[1:]} differs from image shape {images.shape[1:]}; "
            "labels must be on the image grid (run samplan_plan_and_preprocess with verification)."
        )
    props = dict(properties)
    axes = [int(a) for a in plans.get("transpose_forward", [0, 1, 2])]
    data = images.transpose([0, *(a + 1 for a in axes)])
    if seg is not None:
        seg = seg.transpose([0, *(a + 1 for a in axes)])
    spacing = [float(props["spacing"][a]) for a in axes]

    props["shape_before_cropping"] = list(data.shape[1:])
    # cropping also returns the label map with -1 outside the nonzero mask, which mask-normalisation needs
    data, mask_seg, bbox = crop_to_nonzero(data, seg)
    props["bbox_used_for_cropping"] = bbox
    props["shape_after_cropping_and_before_resampling"] = list(data.shape[1:])

    new_spacing = target_spacing(plan, spacing)
    new_shape = compute_new_shape(data.shape[1:], spacing, new_spacing)
    # normalise before resampling: afterwards the nonzero mask would no longer match the image exactly
    data = normalize(
        data,
        mask_seg,
        list(plan["normalization_schemes"]),
        list(plan["use_mask_for_norm"]),
        plans.get("foreground_intensity_properties_per_channel"),
    )
    data = resample(data, new_shape, spacing, new_spacing, **_resampling_kwargs(plan, "resampling_fn_data_kwargs", False))
    out_seg = None
    if seg is not None:
        out_seg = resample(mask_seg, new_shape, spacing, new_spacing, **_resampling_kwargs(plan, "resampling_fn_seg_kwargs", True))
        small = out_seg.min(initial=0) >= -128 and out_seg.max(initial=0) <= 127
        out_seg = out_seg.astype(np.int8 if small else np.int16, copy=False)
    props["spacing_after_resampling"] = new_spacing
    return data, out_seg, props


def preprocess_case_files(
    image_files: Sequence[str | Path],
    seg_file: str | Path | None,
    plans: dict[str, Any],
    configuration: str,
    dataset_json: DatasetJson | None = None,
    check: bool = True,
) -> tuple[np.ndarray, np.ndarray | None, dict[str, Any]]:
    """Read a case's channel files (and label file) and preprocess it (see preprocess_case).

    `check=False` skips the damage check of the files, for callers whose files were just verified.

    With a label file and `dataset_json`, `properties["class_locations"]` holds sampled voxel coordinates
    per foreground label/region (see samplan.preprocessing.foreground), for foreground oversampling.
    """
    images, props = read_images(image_files, check=check)
    seg = None
    if seg_file is not None:
        seg, _ = read_seg(seg_file, check=check)
        if seg.shape[1:] != images.shape[1:]:
            raise DatasetError(
                f"{seg_file}: label shape {seg.shape[1:]} differs from image shape {images.shape[1:]} "
                f"({image_files[0]}); labels must be on the image grid."
            )
    data, seg, props = preprocess_case(images, seg, props, plans, configuration)
    if seg is not None and dataset_json is not None:
        props["class_locations"] = case_class_locations(seg, dataset_json)
    return data, seg, props
