"""The experiment planner: fingerprint + dataset.json -> plans.json dict (base plan + one section per method).

The base plan follows nnU-Net v2.8.1's default ExperimentPlanner: median target spacing with the
anisotropy rule, coarsest axis first, normalisation per channel, and for "3d_fullres" and "2d" the
largest patch (aspect ratio of 1/spacing, clipped to the median image) whose plain U-Net fits the
memory target, judged by dynamic_network_architectures' feature-map count against nnU-Net's
reference values, then the batch size that fills the memory, capped at 5 % of the dataset's voxels
and at least 2. No 3d_lowres/cascade is planned. The methods' sections are added above this package
(samplan.pipeline.planning), so the planner never imports a method.
"""
from __future__ import annotations

import copy
import pydoc
from typing import Any, Sequence

import numpy as np

from samplan.dataset.dataset_json import channel_names
from samplan.dataset.image_io import NATURAL_ENDINGS
from samplan.errors import SamplanError
from samplan.experiment_planning import spacing as sp
from samplan.experiment_planning.budget import ComputeBudget
from samplan.experiment_planning.plans import PLANS_NAME, PLANS_VERSION, PLANS_VERSION_KEY
from samplan.experiment_planning.topology import (
    Topology,
    initial_patch_size,
    plain_unet_architecture,
    pool_and_conv_props,
)

# nnU-Net's reference feature-map counts that fit in 8 GB at batch 2 (3D) / 12 (2D)
REFERENCE_VAL_3D = 560_000_000
REFERENCE_VAL_2D = 85_000_000
REFERENCE_GB = 8.0
REFERENCE_BS_3D = 2
REFERENCE_BS_2D = 12
MIN_BATCH_SIZE = 2
MAX_DATASET_COVERED = 0.05
_FINGERPRINT_KEYS = ("spacings", "shapes_after_crop", "median_relative_size_after_cropping",
                     "foreground_intensity_properties_per_channel")


def estimate_feature_map_size(architecture: dict, patch_size: Sequence[int], n_in: int, n_out: int) -> int:
    """Number of feature-map elements of the PlainConvUNet for one sample of `patch_size` (memory proxy)."""
    import torch  # imported here: only the U-Net search needs it, and it is slow to import

    kwargs = dict(architecture["arch_kwargs"])
    for key in architecture["_kw_requires_import"]:
        if kwargs[key] is not None:
            kwargs[key] = pydoc.locate(kwargs[key])
    net_class = pydoc.locate(architecture["network_class_name"])
    # the count needs only the layer layout, so build on the meta device: no weight memory, no init
    with torch.device("meta"):
        net = net_class(input_channels=n_in, num_classes=n_out, **kwargs)
    return int(net.compute_conv_feature_map_size(tuple(int(p) for p in patch_size)))


def fit_patch_and_batch(
    spacing: Sequence[float],
    median_shape: Sequence[float],
    n_in: int,
    n_out: int,
    n_voxels_dataset: float,
    memory_gb: float,
    cache: dict | None = None,
) -> tuple[Topology, dict, int]:
    """(topology, architecture, batch size) of one configuration at `spacing` (transposed order).

    Shrinks the patch one step of the current divisibility on the axis that is largest relative to
    the median shape until the estimated memory of a batch of 2 fits `memory_gb`.
    """
    cache = {} if cache is None else cache
    dim = len(spacing)
    reference = (REFERENCE_VAL_3D if dim == 3 else REFERENCE_VAL_2D) * memory_gb / REFERENCE_GB
    ref_bs = REFERENCE_BS_3D if dim == 3 else REFERENCE_BS_2D

    def _estimate(topo: Topology, arch: dict) -> int:
        key = (topo.patch_size, topo.pool_op_kernel_sizes)
        if key not in cache:
            cache[key] = estimate_feature_map_size(arch, topo.patch_size, n_in, n_out)
        return cache[key]

    topo = pool_and_conv_props(spacing, initial_patch_size(spacing, median_shape))
    arch = plain_unet_architecture(topo, dim)
    estimate = _estimate(topo, arch)
    while estimate / ref_bs * 2 > reference:
        ratios = [p / m for p, m in zip(topo.patch_size, median_shape[:dim])]
        axis = int(np.argsort(ratios)[-1])
        # step by the divisibility of the *smaller* patch so no valid size is skipped (256 -> 224, not 192)
        trial = list(topo.patch_size)
        trial[axis] -= topo.must_be_divisible_by[axis]
        step = pool_and_conv_props(spacing, trial).must_be_divisible_by[axis]
        patch = list(topo.patch_size)
        patch[axis] -= step
        topo = pool_and_conv_props(spacing, patch)
        arch = plain_unet_architecture(topo, dim)
        estimate = _estimate(topo, arch)

    batch = round(reference / estimate * ref_bs)
    # overfitting precaution: one step should not see more than 5 % of all voxels
    bs_cap = round(n_voxels_dataset * MAX_DATASET_COVERED / np.prod(topo.patch_size, dtype=np.float64))
    return topo, arch, int(max(min(batch, bs_cap), MIN_BATCH_SIZE))


def plan_configuration(
    data_identifier: str,
    spacing: Sequence[float],
    median_shape: Sequence[float],
    n_voxels_dataset: float,
    dataset_json: dict,
    schemes: list[str],
    masks: list[bool],
    memory_gb: float,
    cache: dict | None = None,
) -> dict[str, Any]:
    """One configuration entry of plans.json (see SCHEMAS.md); spacing/median_shape in transposed order."""
    n_in = len(dataset_json["channel_names"])
    # nnU-Net counts every entry of `labels` (background, regions, ignore) as an output for the estimate
    n_out = len(dataset_json["labels"])
    topo, arch, batch = fit_patch_and_batch(spacing, median_shape, n_in, n_out, n_voxels_dataset, memory_gb, cache)
    return {
        "data_identifier": data_identifier,
        "spacing": [float(s) for s in spacing],
        "median_image_size_in_voxels": [float(s) for s in median_shape],
        "patch_size": [int(p) for p in topo.patch_size],
        "batch_size": batch,
        "normalization_schemes": list(schemes),
        "use_mask_for_norm": [bool(m) for m in masks],
        **sp.resampling_kwargs(),
        "architecture": arch,
    }


def image_reader_writer(file_ending: str) -> str:
    """"natural" for PNG/JPEG/TIFF/BMP datasets, "sitk" otherwise."""
    return "natural" if file_ending.lower() in NATURAL_ENDINGS else "sitk"


def plan_base(
    dataset_name: str,
    dataset_json: dict,
    fingerprint: dict,
    overwrite_target_spacing: Sequence[float] | None = None,
    budget: ComputeBudget | None = None,
) -> dict[str, Any]:
    """The base plan (everything but "methods"): spacing, transpose, normalisation, 3d_fullres and 2d."""
    budget = budget or ComputeBudget()
    missing = [k for k in _FINGERPRINT_KEYS if k not in fingerprint]
    if missing:
        raise SamplanError(f"the fingerprint of {dataset_name} lacks {', '.join(missing)}; "
                           "re-run samplan_plan_and_preprocess with --clean to recompute it.")
    spacings, shapes = fingerprint["spacings"], fingerprint["shapes_after_crop"]
    if len(spacings) == 0 or len(spacings) != len(shapes):
        raise SamplanError(f"the fingerprint of {dataset_name} has {len(spacings)} spacings and {len(shapes)} shapes; "
                           "re-run samplan_plan_and_preprocess with --clean.")
    if overwrite_target_spacing is not None and len(overwrite_target_spacing) != 3:
        raise SamplanError(f"overwrite_target_spacing needs 3 values (z, y, x), got {list(overwrite_target_spacing)}.")
    # like nnU-Net, an overwritten spacing also drives the transpose and the 2d in-plane spacing
    target = sp.target_spacing(spacings, shapes, overwrite_target_spacing)
    if np.any(target <= 0):
        raise SamplanError(f"target spacing {target.tolist()} of {dataset_name} must be positive.")
    forward, backward = sp.transpose_axes(target)
    target_t = target[forward]
    median_t = sp.median_shape_after_resampling(spacings, shapes, target)[forward]
    n_training = dataset_json.get("numTraining", len(spacings))
    n_voxels_dataset = float(np.prod(median_t, dtype=np.float64) * n_training)
    schemes, masks = sp.normalization_schemes_and_masks(
        channel_names(dataset_json), fingerprint["median_relative_size_after_cropping"]
    )
    memory = budget.memory_gb
    cache: dict = {}
    configurations: dict[str, Any] = {}
    if median_t[0] != 1:  # a 2D dataset has one voxel along its (dummy) first axis
        configurations["3d_fullres"] = plan_configuration(
            "3d_fullres", target_t, median_t, n_voxels_dataset, dataset_json, schemes, masks, memory, cache)
    configurations["2d"] = plan_configuration(
        "2d", target_t[1:], median_t[1:], n_voxels_dataset, dataset_json, schemes, masks, memory, cache)

    file_ending = dataset_json.get("file_ending") or fingerprint.get("file_ending", "")
    return {
        "dataset_name": dataset_name,
        "plans_name": PLANS_NAME,
        PLANS_VERSION_KEY: PLANS_VERSION,
        "original_median_spacing_after_transp": [float(s) for s in np.median(np.asarray(spacings, float), 0)[forward]],
        "original_median_shape_after_transp": [int(round(s)) for s in np.median(np.asarray(shapes, float), 0)[forward]],
        "image_reader_writer": image_reader_writer(file_ending),
        "transpose_forward": [int(i) for i in forward],
        "transpose_backward": [int(i) for i in backward],
        "foreground_intensity_properties_per_channel": copy.deepcopy(
            fingerprint["foreground_intensity_properties_per_channel"]),
        "configurations": configurations,
        "compute_budget": budget.to_dict(),
    }
