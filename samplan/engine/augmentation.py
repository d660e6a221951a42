"""Training-time augmentation with batchgeneratorsv2, following nnU-Net v2.8.1's default pipeline.

Transforms work on ONE sample: image `(C, *spatial)` float32 and segmentation `(1, *spatial)` int16
(-1 outside the image's nonzero region), spatial being `(Z, Y, X)` for 3D patches or `(Y, X)` for 2D
slices. The loader samples a patch of `initial_patch_size` (larger than the final patch so that rotation
and scaling do not pull in empty corners); the spatial transform resamples it and crops the centre
back to `patch_size`. The segmentation leaves the pipeline as the training target (see `LabelTargetTransform`),
a list of targets (full resolution first) with deep supervision.

batchgeneratorsv2 draws from numpy's and torch's global generators: callers seed both per batch.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch
from batchgeneratorsv2.transforms.base.basic_transform import BasicTransform, SegOnlyTransform
from batchgeneratorsv2.transforms.intensity.brightness import MultiplicativeBrightnessTransform
from batchgeneratorsv2.transforms.intensity.contrast import BGContrast, ContrastTransform
from batchgeneratorsv2.transforms.intensity.gamma import GammaTransform
from batchgeneratorsv2.transforms.intensity.gaussian_noise import GaussianNoiseTransform
from batchgeneratorsv2.transforms.noise.gaussian_blur import GaussianBlurTransform
from batchgeneratorsv2.transforms.spatial.low_resolution import SimulateLowResolutionTransform
from batchgeneratorsv2.transforms.spatial.mirroring import MirrorTransform
from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform
from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
from batchgeneratorsv2.transforms.utils.deep_supervision_downsampling import DownsampleSegForDSTransform
from batchgeneratorsv2.transforms.utils.nnunet_masking import MaskImageTransform
from batchgeneratorsv2.transforms.utils.pseudo2d import Convert2DTo3DTransform, Convert3DTo2DTransform
from batchgeneratorsv2.transforms.utils.random import RandomTransform

from samplan.dataset.labels import LabelManager
from samplan.experiment_planning.recipe_sections import Augmentation

ANISO_THRESHOLD = 3.0  # nnU-Net: a 3D patch (or spacing) this much longer in-plane than along axis 0 is anisotropic
INITIAL_PATCH_MIN_SCALE = 0.85  # nnU-Net sizes the initial patch for this zoom-out, although scaling reaches 0.7
_MAX_ROTATION_FOR_SIZE = math.pi / 2  # beyond 90 degrees the bounding box of a rotated box no longer grows


def _deg(d: float) -> float:
    return d / 360.0 * 2.0 * math.pi  # nnU-Net's expression, so the angles match it to the last bit


def _rotation_matrices(angle: float) -> list[np.ndarray]:
    """Right-handed rotations by `angle` about spatial axes 0, 1 and 2 (3x3), as batchgenerators defines them."""
    c, s = math.cos(angle), math.sin(angle)
    return [np.array([[1, 0, 0], [0, c, -s], [0, s, c]]),
            np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]]),
            np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])]


def initial_patch_size(patch_size: Sequence[int], rotation: Sequence[float] | float,
                       min_scale: float = INITIAL_PATCH_MIN_SCALE) -> list[int]:
    """nnU-Net's enlarged sampling patch for a final patch `patch_size` ((Z, Y, X) or (Y, X)).

    Per axis: the largest absolute coordinate of the patch's corner vector (as a row vector times each
    single-axis rotation matrix by the largest |angle| of `rotation`, capped at 90 degrees; nnU-Net's
    convention, kept so that both pick the same sizes), at least the patch itself, divided by `min_scale`
    and truncated to int.
    """
    angle = max(abs(float(r)) for r in np.atleast_1d(rotation))
    angle = min(angle, _MAX_ROTATION_FOR_SIZE)
    corner = np.asarray(patch_size, dtype=float)
    extent = corner.copy()
    if len(corner) == 3:
        for rot in _rotation_matrices(angle):
            extent = np.maximum(extent, np.abs(corner @ rot))
    elif len(corner) == 2:
        c, s = math.cos(angle), math.sin(angle)
        extent = np.maximum(extent, np.abs(corner @ np.array([[c, -s], [s, c]])))
    else:
        raise ValueError(f"patch size must have 2 or 3 entries, got {list(patch_size)}")
    return [int(e) for e in extent / min_scale]


def augmentation_params(patch_size: Sequence[int], spacing: Sequence[float] | None = None) -> dict[str, Any]:
    """Rotation range, dummy-2D flag, initial patch size and mirror axes for a patch, as nnU-Net configures them.

    `patch_size`: (Y, X) for 2D or (Z, Y, X) for 3D in the plan's transposed order (coarsest axis first).
    2D: rotation +-15 deg when the patch is elongated (long/short side > 1.5), else +-180 deg; mirror (0, 1).
    3D: "dummy 2D" augmentation (in-plane rotation by +-180 deg, axis 0 untouched by spatial transforms and
    low-resolution simulation) when max(patch) / patch[0] > 3, else +-30 deg about every axis; mirror (0, 1, 2).
    `spacing` (optional, same order): also treat the data as anisotropic when spacing[0] > 3 * min(in-plane
    spacing), which catches small images whose patch was clipped to the image. Returns a dict with keys
    "rotation_for_DA" (lo, hi) radians, "do_dummy_2d_data_aug", "initial_patch_size" and "mirror_axes",
    ready to be passed to `build_train_transforms(**params, ...)` and read by the loader.
    """
    patch = [int(p) for p in patch_size]
    if len(patch) == 2:
        dummy_2d = False
        half = 15.0 if max(patch) / min(patch) > 1.5 else 180.0
        mirror_axes: tuple[int, ...] = (0, 1)
    elif len(patch) == 3:
        dummy_2d = max(patch) / patch[0] > ANISO_THRESHOLD
        if spacing is not None and len(spacing) == 3:
            dummy_2d = dummy_2d or float(spacing[0]) > ANISO_THRESHOLD * min(float(s) for s in spacing[1:])
        half = 180.0 if dummy_2d else 30.0
        mirror_axes = (0, 1, 2)
    else:
        raise ValueError(f"patch size must have 2 or 3 entries, got {patch}")
    rotation = (-_deg(half), _deg(half))
    initial = initial_patch_size(patch, rotation)
    if dummy_2d:
        initial[0] = patch[0]
    return {"rotation_for_DA": rotation, "do_dummy_2d_data_aug": dummy_2d,
            "initial_patch_size": initial, "mirror_axes": mirror_axes}


def slice_augmentation(section: Augmentation) -> dict[str, Any]:
    """`build_train_transforms` keyword arguments of a plan's 2D augmentation section (slices, no dummy 2D)."""
    rot = math.radians(float(section.rotation_deg))
    return {"rotation_for_DA": (-rot, rot), "mirror_axes": (0, 1) if section.mirror else (),
            "do_dummy_2d_data_aug": False, "intensity": bool(section.intensity),
            "scaling": tuple(float(v) for v in section.scaling)}


class LabelTargetTransform(SegOnlyTransform):
    """Segmentation `(1, *spatial)` -> training target via the LabelManager: class indices `(1, *spatial)` int64
    (-1 -> 0, the ignore label kept), or region masks `(R, *spatial)` float32 plus, with an ignore label, one last
    channel marking ignored voxels (what nnU-Net's region losses with an ignore label expect)."""

    def __init__(self, label_manager: LabelManager):
        super().__init__()
        self.label_manager = label_manager

    def _apply_to_segmentation(self, segmentation: torch.Tensor, **params) -> torch.Tensor:
        target = self.label_manager.segmentation_to_target(segmentation[None])[0]
        if self.label_manager.has_regions and self.label_manager.ignore_label is not None:
            ignored = (segmentation[:1] == self.label_manager.ignore_label).float()
            target = torch.cat([target, ignored])
        return target


def _target_transforms(deep_supervision_scales: Sequence[Sequence[float]] | None,
                       label_manager: LabelManager) -> list[BasicTransform]:
    """-1 removal and region conversion, then deep-supervision downsampling (nearest) of the target."""
    out: list[BasicTransform] = [LabelTargetTransform(label_manager)]
    if deep_supervision_scales is not None:
        out.append(DownsampleSegForDSTransform(ds_scales=[list(s) for s in deep_supervision_scales]))
    return out


def build_train_transforms(
    patch_size: Sequence[int],
    rotation_for_DA: Sequence[float],
    mirror_axes: Sequence[int],
    do_dummy_2d_data_aug: bool,
    deep_supervision_scales: Sequence[Sequence[float]] | None,
    label_manager: LabelManager,
    *,
    initial_patch_size: Sequence[int] | None = None,
    use_mask_for_norm: Sequence[bool] | None = None,
    intensity: bool = True,
    scaling: Sequence[float] = (0.7, 1.4),
) -> BasicTransform:
    """nnU-Net's default training augmentation for final patches of `patch_size` ((Z, Y, X) or (Y, X)).

    Spatial (rotation p=0.2 within `rotation_for_DA`, isotropic scaling within `scaling` (nnU-Net: 0.7-1.4) p=0.2,
    no elastic deformation,
    centre crop to `patch_size`; in-plane only when `do_dummy_2d_data_aug`), Gaussian noise, Gaussian blur,
    brightness, contrast, low-resolution simulation, inverted and plain gamma, mirroring along `mirror_axes`,
    zeroing outside the nonzero mask for channels normalised inside it, then the target transforms.
    `initial_patch_size` is what the loader samples; it is only checked here (it must cover `patch_size`).
    Gaussian blur runs without nnU-Net's timing benchmark, whose choice of FFT or direct convolution
    depends on the machine's speed and would make batches irreproducible. `intensity=False` leaves out the
    noise, blur, brightness, contrast, low-resolution and gamma transforms (a "light" rotation/scaling recipe).
    """
    patch = [int(p) for p in patch_size]
    if initial_patch_size is not None and any(int(i) < p for i, p in zip(initial_patch_size, patch)):
        raise ValueError(f"initial patch {list(initial_patch_size)} is smaller than the patch {patch}")
    rotation = tuple(float(r) for r in rotation_for_DA)
    transforms: list[BasicTransform] = []
    if do_dummy_2d_data_aug:
        transforms.append(Convert3DTo2DTransform())  # axis 0 joins the channels: rotate/scale in-plane only
    transforms.append(SpatialTransform(
        patch[1:] if do_dummy_2d_data_aug else patch, patch_center_dist_from_border=0, random_crop=False,
        p_elastic_deform=0, p_rotation=0.2, rotation=rotation, p_scaling=0.2,
        scaling=tuple(float(v) for v in scaling),
        p_synchronize_scaling_across_axes=1, bg_style_seg_sampling=False, border_mode_seg="constant",
        padding_value_seg=-1))
    if do_dummy_2d_data_aug:
        transforms.append(Convert2DTo3DTransform())
    transforms += [] if not intensity else [
        RandomTransform(GaussianNoiseTransform(noise_variance=(0, 0.1), p_per_channel=1, synchronize_channels=True),
                        apply_probability=0.1),
        RandomTransform(GaussianBlurTransform(blur_sigma=(0.5, 1.0), synchronize_channels=False, synchronize_axes=False,
                                              p_per_channel=0.5, benchmark=False), apply_probability=0.2),
        RandomTransform(MultiplicativeBrightnessTransform(multiplier_range=BGContrast((0.75, 1.25)),
                                                          synchronize_channels=False, p_per_channel=1),
                        apply_probability=0.15),
        RandomTransform(ContrastTransform(contrast_range=BGContrast((0.75, 1.25)), preserve_range=True,
                                          synchronize_channels=False, p_per_channel=1), apply_probability=0.15),
        RandomTransform(SimulateLowResolutionTransform(scale=(0.5, 1), synchronize_channels=False, synchronize_axes=True,
                                                       ignore_axes=(0,) if do_dummy_2d_data_aug else None,
                                                       allowed_channels=None, p_per_channel=0.5),
                        apply_probability=0.25),
        RandomTransform(GammaTransform(gamma=BGContrast((0.7, 1.5)), p_invert_image=1, synchronize_channels=False,
                                       p_per_channel=1, p_retain_stats=1), apply_probability=0.1),
        RandomTransform(GammaTransform(gamma=BGContrast((0.7, 1.5)), p_invert_image=0, synchronize_channels=False,
                                       p_per_channel=1, p_retain_stats=1), apply_probability=0.3),
    ]
    if mirror_axes:
        transforms.append(MirrorTransform(allowed_axes=tuple(int(a) for a in mirror_axes)))
    if use_mask_for_norm is not None and any(use_mask_for_norm):
        # voxels outside the nonzero mask (seg -1) were 0 after normalisation: keep them 0 after intensity changes
        transforms.append(MaskImageTransform(apply_to_channels=[i for i, m in enumerate(use_mask_for_norm) if m],
                                             channel_idx_in_seg=0, set_outside_to=0))
    transforms += _target_transforms(deep_supervision_scales, label_manager)
    return ComposeTransforms(transforms)


def build_val_transforms(deep_supervision_scales: Sequence[Sequence[float]] | None,
                         label_manager: LabelManager) -> BasicTransform:
    """Validation: no augmentation, only the target transforms (-1 removal, regions, deep-supervision targets)."""
    return ComposeTransforms(_target_transforms(deep_supervision_scales, label_manager))
