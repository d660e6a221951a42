"""U-Net topology: pooling per axis, conv kernels, patch divisibility and the memory-driven patch search."""
from __future__ import annotations

import numpy as np
import pytest

from samplan.experiment_planning.planner import (
    REFERENCE_BS_3D,
    REFERENCE_GB,
    REFERENCE_VAL_3D,
    estimate_feature_map_size,
    fit_patch_and_batch,
)
from samplan.experiment_planning.topology import (
    MIN_FEATURE_MAP_EDGE,
    initial_patch_size,
    pad_shape,
    plain_unet_architecture,
    pool_and_conv_props,
)


def _check_consistent(spacing, patch, topo):
    """Properties every topology must have, whatever the input."""
    dim = len(spacing)
    assert len(topo.pool_op_kernel_sizes) == len(topo.conv_kernel_sizes) == topo.n_stages
    assert topo.pool_op_kernel_sizes[0] == (1,) * dim
    assert topo.conv_kernel_sizes[-1] == (3,) * dim  # bottleneck
    strides = np.array(topo.pool_op_kernel_sizes)
    assert set(np.unique(strides)) <= {1, 2}
    # divisibility = product of the strides, and the padded patch honours it
    assert tuple(np.prod(strides, axis=0)) == topo.must_be_divisible_by
    assert tuple(2 ** np.array(topo.num_pool_per_axis)) == topo.must_be_divisible_by
    assert all(p % d == 0 for p, d in zip(topo.patch_size, topo.must_be_divisible_by))
    assert all(p >= s and p < s + d for p, s, d in zip(topo.patch_size, patch, topo.must_be_divisible_by))
    # an axis is only pooled while its map is at least twice the minimum edge
    size = np.array(patch, dtype=float)
    for stride in strides[1:]:
        assert np.all(size[stride == 2] >= 2 * MIN_FEATURE_MAP_EDGE)
        size = np.where(stride == 2, np.ceil(size / 2), size)
    # kernels become 3 on an axis and stay 3
    kernels = np.array(topo.conv_kernel_sizes)
    assert np.all(np.diff(kernels, axis=0) >= 0)


def test_isotropic_cube_pools_every_axis_down_to_four():
    topo = pool_and_conv_props([1.0, 1.0, 1.0], [128, 128, 128])
    _check_consistent([1, 1, 1], [128, 128, 128], topo)
    assert topo.num_pool_per_axis == (5, 5, 5)  # 128 -> 4
    assert all(k == (3, 3, 3) for k in topo.conv_kernel_sizes)
    assert topo.patch_size == (128, 128, 128)


def test_anisotropic_spacing_pools_in_plane_first_with_flat_kernels():
    spacing, patch = [3.0, 0.5, 0.5], [24, 256, 256]
    topo = pool_and_conv_props(spacing, patch)
    _check_consistent(spacing, patch, topo)
    # the thick axis is left alone until the in-plane spacing has caught up to within a factor 2
    assert topo.pool_op_kernel_sizes[1] == (1, 2, 2)
    assert topo.conv_kernel_sizes[0] == (1, 3, 3)
    first_z = next(i for i, s in enumerate(topo.pool_op_kernel_sizes) if s[0] == 2)
    inplane_spacing_then = 0.5 * 2 ** sum(s[1] == 2 for s in topo.pool_op_kernel_sizes[:first_z])
    assert 3.0 / inplane_spacing_then < 2
    assert topo.num_pool_per_axis[1] > topo.num_pool_per_axis[0]


def test_patch_is_padded_to_divisibility():
    topo = pool_and_conv_props([1.0, 1.0], [50, 35])
    _check_consistent([1, 1], [50, 35], topo)
    assert topo.patch_size == pad_shape([50, 35], topo.must_be_divisible_by)
    assert topo.patch_size != (50, 35)


def test_small_axis_is_not_pooled():
    topo = pool_and_conv_props([1.0, 1.0, 1.0], [6, 64, 64])
    _check_consistent([1, 1, 1], [6, 64, 64], topo)
    assert topo.num_pool_per_axis[0] == 0
    assert topo.patch_size[0] == 6


@pytest.mark.parametrize("seed", range(4))
def test_random_shapes_are_consistent(seed):
    rng = np.random.default_rng(seed)
    for _ in range(50):
        dim = int(rng.choice([2, 3]))
        spacing = list(rng.choice([0.4, 0.8, 1.0, 1.5, 3.0, 5.0], dim) * rng.uniform(0.9, 1.1, dim))
        patch = list(rng.integers(5, 300, dim))
        _check_consistent(spacing, patch, pool_and_conv_props(spacing, patch))


def test_pad_shape_keeps_multiples_and_rounds_fractions_up():
    assert pad_shape([64, 65, 40.5], [16, 16, 8]) == (64, 80, 48)


def test_initial_patch_follows_inverse_spacing_and_median_clip():
    patch = initial_patch_size([2.0, 1.0, 1.0], [500, 500, 500])
    assert patch[1] == patch[2] and abs(patch[1] / patch[0] - 2) < 0.05
    assert initial_patch_size([1.0, 1.0, 1.0], [36.0, 50.0, 35.0]) == [36.0, 50.0, 35.0]


def test_architecture_builds_the_real_network_and_caps_features():
    topo = pool_and_conv_props([1.0, 1.0, 1.0], [128, 128, 128])
    arch = plain_unet_architecture(topo, 3)
    kw = arch["arch_kwargs"]
    assert kw["features_per_stage"] == [32, 64, 128, 256, 320, 320]
    assert len(kw["n_conv_per_stage_decoder"]) == kw["n_stages"] - 1
    small = estimate_feature_map_size(arch, (64, 64, 64), 1, 3)
    big = estimate_feature_map_size(arch, (128, 128, 128), 1, 3)
    assert 0 < small < big


def test_patch_search_fits_memory_and_shrinks_with_less_memory():
    spacing, median = [1.0, 0.8, 0.8], [200.0, 400.0, 400.0]
    n_vox = float(np.prod(median)) * 50
    topo8, arch8, bs8 = fit_patch_and_batch(spacing, median, 1, 2, n_vox, 8.0)
    topo3, _, bs3 = fit_patch_and_batch(spacing, median, 1, 2, n_vox, 3.0)
    for topo, gb in ((topo8, 8.0), (topo3, 3.0)):
        est = estimate_feature_map_size(plain_unet_architecture(topo, 3), topo.patch_size, 1, 2)
        assert est / REFERENCE_BS_3D * 2 <= REFERENCE_VAL_3D * gb / REFERENCE_GB
        _check_consistent(spacing, topo.patch_size, topo)
    assert np.prod(topo3.patch_size) < np.prod(topo8.patch_size)
    assert bs8 >= 2 and bs3 >= 2
