"""Augmentation: nnU-Net's rotation / dummy-2D / initial-patch rules, image-label alignment, targets, determinism."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import ndimage
from batchgenerators.augmentations.utils import rotate_coords_2d, rotate_coords_3d
from batchgeneratorsv2.transforms.spatial.mirroring import MirrorTransform
from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform
from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
from batchgeneratorsv2.transforms.utils.pseudo2d import Convert2DTo3DTransform, Convert3DTo2DTransform

from samplan.dataset.labels import LabelManager
from samplan.engine.augmentation import (LabelTargetTransform, augmentation_params, build_train_transforms,
                                           build_val_transforms, initial_patch_size)

PLAIN = LabelManager((0, 1, 2), (), (), None)


def _reference_initial_size(patch, angle):
    """The initial patch as nnU-Net sizes it, from batchgenerators' own rotation helpers (independent of samplan)."""
    angle = min(angle, math.pi / 2)
    corner = np.array(patch, dtype=float)
    out = corner.copy()
    rotations = [(angle, 0, 0), (0, angle, 0), (0, 0, angle)] if len(patch) == 3 else None
    if rotations:
        for r in rotations:
            out = np.maximum(out, np.abs(rotate_coords_3d(corner, *r)))
    else:
        out = np.maximum(out, np.abs(rotate_coords_2d(corner, angle)))
    return [int(v) for v in out / 0.85]


def test_rotation_ranges_dummy_2d_and_mirror_axes():
    iso = augmentation_params((40, 56, 40))  # Hippocampus-like, isotropic
    assert not iso["do_dummy_2d_data_aug"]
    assert iso["rotation_for_DA"] == pytest.approx((-math.pi / 6, math.pi / 6))
    assert iso["mirror_axes"] == (0, 1, 2)
    aniso = augmentation_params((20, 192, 160))  # thick slices: in-plane rotation only, any angle
    assert aniso["do_dummy_2d_data_aug"]
    assert aniso["rotation_for_DA"] == pytest.approx((-math.pi, math.pi))
    assert aniso["initial_patch_size"][0] == 20  # axis 0 is never resampled, so it needs no margin
    assert aniso["initial_patch_size"][1:] == _reference_initial_size((20, 192, 160), math.pi)[1:]
    # a patch clipped to a small image hides the anisotropy; the spacing reveals it
    assert not augmentation_params((24, 40, 40))["do_dummy_2d_data_aug"]
    assert augmentation_params((24, 40, 40), spacing=(3.5, 1.0, 1.0))["do_dummy_2d_data_aug"]
    assert not augmentation_params((24, 40, 40), spacing=(1.2, 1.0, 1.0))["do_dummy_2d_data_aug"]
    square, elongated = augmentation_params((56, 40)), augmentation_params((512, 128))
    assert square["rotation_for_DA"] == pytest.approx((-math.pi, math.pi)) and square["mirror_axes"] == (0, 1)
    assert elongated["rotation_for_DA"] == pytest.approx((-math.pi / 12, math.pi / 12))
    assert square["initial_patch_size"] == [65, 65]  # 90 deg turns (56, 40) into (40, 56): max 56, / 0.85


def test_initial_patch_size_matches_nnunet_rule():
    rng = np.random.default_rng(0)
    for _ in range(300):
        patch = [int(v) for v in rng.integers(4, 300, rng.integers(2, 4))]
        angle = float(rng.choice([0.0, math.pi / 12, math.pi / 6, math.pi, 0.3]))
        assert initial_patch_size(patch, (-angle, angle)) == _reference_initial_size(patch, angle), (patch, angle)


def _spatial_part(pipeline: ComposeTransforms) -> ComposeTransforms:
    """The spatial transforms of a built pipeline, with rotation and scaling forced on."""
    keep = [t for t in pipeline.transforms
            if isinstance(t, (SpatialTransform, MirrorTransform, Convert3DTo2DTransform, Convert2DTo3DTransform))]
    for t in keep:
        if isinstance(t, SpatialTransform):
            t.p_rotation = t.p_scaling = 1.0
    return ComposeTransforms(keep)


def _blobs(shape):
    grids = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    a = np.exp(-sum((g - c) ** 2 for g, c in zip(grids, (0.2, -0.1, 0.1)[:len(shape)])) / 0.15)
    b = np.exp(-sum((g - c) ** 2 for g, c in zip(grids, (-0.3, 0.35, -0.2)[:len(shape)])) / 0.05)
    return (a + b).astype(np.float32)


@pytest.mark.parametrize("patch", [(32, 40, 32), (48, 40)])
def test_spatial_transforms_keep_image_and_label_aligned(patch):
    params = augmentation_params(patch)
    spatial = _spatial_part(build_train_transforms(patch_size=patch, deep_supervision_scales=None,
                                                   label_manager=PLAIN, **params))
    img = _blobs(params["initial_patch_size"])
    seg = (img > 0.5).astype(np.int16)
    torch.manual_seed(0)
    np.random.seed(0)
    changed = []
    for _ in range(6):
        out = spatial(image=torch.from_numpy(img[None].copy()), segmentation=torch.from_numpy(seg[None].copy()))
        o_img, o_seg = out["image"][0].numpy(), out["segmentation"][0].numpy()
        assert o_img.shape == patch and o_seg.shape == patch
        fg = o_seg > 0
        assert fg.sum() > 100
        mismatch = fg != (o_img > 0.5)
        # interpolation may only disagree on the object's one-voxel border, never inside or outside it
        border = ndimage.binary_dilation(fg) & ~ndimage.binary_erosion(fg)
        assert not (mismatch & ~border).any()
        assert mismatch.sum() <= 0.25 * border.sum()
        centre = tuple(slice((s - p) // 2, (s - p) // 2 + p) for s, p in zip(img.shape, patch))
        changed.append(not np.allclose(o_img, img[centre], atol=1e-3))
    assert sum(changed) >= 5  # the transform really rotated/scaled


def test_dummy_2d_never_mixes_slices():
    patch = (8, 48, 48)
    params = augmentation_params(patch, spacing=(5.0, 1.0, 1.0))
    assert params["do_dummy_2d_data_aug"]
    shape = params["initial_patch_size"]
    img = np.broadcast_to(np.arange(1, shape[0] + 1, dtype=np.float32)[:, None, None], shape).copy()
    seg = np.zeros(shape, np.int16)

    def run(do_dummy_2d):
        p = {**params, "do_dummy_2d_data_aug": do_dummy_2d, "rotation_for_DA": (-0.5, 0.5), "mirror_axes": ()}
        spatial = _spatial_part(build_train_transforms(patch_size=patch, deep_supervision_scales=None,
                                                       label_manager=PLAIN, **p))
        torch.manual_seed(1)
        np.random.seed(1)
        outs = [spatial(image=torch.from_numpy(img[None].copy()), segmentation=torch.from_numpy(seg[None].copy()))
                for _ in range(4)]
        return [o["image"][0, :, 20:28, 20:28].numpy() for o in outs]

    expected = np.arange(1, patch[0] + 1, dtype=np.float32)[:, None, None]
    for centre in run(True):
        np.testing.assert_allclose(centre, np.broadcast_to(expected, centre.shape), atol=1e-4)
    assert any(not np.allclose(c, np.broadcast_to(expected, c.shape), atol=1e-2) for c in run(False))


def test_full_pipeline_targets_deep_supervision_and_determinism():
    patch = (16, 24, 24)
    params = augmentation_params(patch)
    ds = [[1.0, 1.0, 1.0], [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]]
    tr = build_train_transforms(patch_size=patch, deep_supervision_scales=ds, label_manager=PLAIN, **params)
    rng = np.random.default_rng(0)
    img = rng.normal(size=(2, *params["initial_patch_size"])).astype(np.float32)
    seg = rng.integers(-1, 3, size=(1, *params["initial_patch_size"])).astype(np.int16)

    def run(seed):
        np.random.seed(seed)
        torch.manual_seed(seed)
        return tr(image=torch.from_numpy(img.copy()), segmentation=torch.from_numpy(seg.copy()))

    a, b, c = run(5), run(5), run(6)
    assert a["image"].shape == (2, *patch) and a["image"].dtype == torch.float32
    assert [tuple(t.shape) for t in a["segmentation"]] == [(1, 16, 24, 24), (1, 8, 12, 12), (1, 4, 6, 6)]
    assert all(t.dtype == torch.int64 and t.min() >= 0 and t.max() <= 2 for t in a["segmentation"])  # -1 removed
    assert torch.equal(a["image"], b["image"]) and all(torch.equal(x, y) for x, y in zip(a["segmentation"], b["segmentation"]))
    assert not torch.equal(a["image"], c["image"])


def test_mask_for_norm_zeroes_outside_the_nonzero_region():
    patch = (24, 24)
    params = {**augmentation_params(patch), "mirror_axes": ()}
    tr = build_train_transforms(patch_size=patch, deep_supervision_scales=None, label_manager=PLAIN,
                                use_mask_for_norm=[True], **params)
    for t in tr.transforms:
        if isinstance(t, SpatialTransform):
            t.p_rotation = t.p_scaling = 0.0  # a plain centre crop, so the outside region stays where it was
    size = params["initial_patch_size"]
    seg = np.zeros((1, *size), np.int16)
    seg[0, :, : size[1] // 2] = -1
    off = (size[1] - patch[1]) // 2
    for s in range(5):
        np.random.seed(s)
        torch.manual_seed(s)
        out = tr(image=torch.ones((1, *size)) * 3, segmentation=torch.from_numpy(seg.copy()))
        outside = out["image"][0, :, : size[1] // 2 - off]
        assert torch.all(outside == 0) and torch.all(out["image"][0, :, size[1] // 2 - off:] != 0)


def test_region_targets_with_ignore_label_and_val_transforms():
    lm = LabelManager((), ((1, 2), (2,)), (1, 2), 3)
    seg = torch.tensor([[[-1, 0, 1], [2, 3, 2]]], dtype=torch.int16)  # (1, Y, X)
    target = LabelTargetTransform(lm)(segmentation=seg.clone())["segmentation"]
    assert target.dtype == torch.float32 and target.shape == (3, 2, 3)
    np.testing.assert_array_equal(target[0], [[0, 0, 1], [1, 0, 1]])
    np.testing.assert_array_equal(target[1], [[0, 0, 0], [1, 0, 1]])
    np.testing.assert_array_equal(target[2], [[0, 0, 0], [0, 1, 0]])  # the ignore mask, last
    val = build_val_transforms([[1, 1], [0.5, 0.5]], LabelManager((), ((1, 2), (2,)), (1, 2), None))
    big = torch.zeros((1, 8, 8), dtype=torch.int16)
    big[0, 2:6, 2:6] = 2
    out = val(image=torch.zeros((1, 8, 8)), segmentation=big)["segmentation"]
    assert [tuple(t.shape) for t in out] == [(2, 8, 8), (2, 4, 4)]
    assert out[1][0].sum() == out[1][1].sum() == 4
