"""U-Net topology from spacing and patch size: pooling per stage, conv kernels, patch divisibility.

All sequences are in the configuration's (transposed) axis order: 3 entries for 3D, 2 for 2D.
Same rule as nnU-Net v2.8.1 (`get_pool_and_conv_props`): pool only the axes whose current spacing is
within a factor 2 of the finest one and whose feature map is still at least 2x the minimum edge length;
use 3-wide kernels on an axis once its spacing is within a factor 2 of the finest; end with a 3x3(x3)
bottleneck; pad the patch size up to a multiple of 2**(pools per axis).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

# feature maps in the bottleneck keep at least this edge length
MIN_FEATURE_MAP_EDGE = 4
BASE_NUM_FEATURES = 32
MAX_FEATURES_2D = 512
MAX_FEATURES_3D = 320
CONVS_PER_STAGE = 2


@dataclass(frozen=True)
class Topology:
    """Pooling/convolution layout of a plain U-Net for one patch size.

    `pool_op_kernel_sizes[0]` is all ones (the first stage does not downsample), so there are
    `len(pool_op_kernel_sizes) == len(conv_kernel_sizes)` stages. `patch_size` has been padded up to
    a multiple of `must_be_divisible_by` on every axis.
    """

    num_pool_per_axis: tuple[int, ...]
    pool_op_kernel_sizes: tuple[tuple[int, ...], ...]
    conv_kernel_sizes: tuple[tuple[int, ...], ...]
    patch_size: tuple[int, ...]
    must_be_divisible_by: tuple[int, ...]

    @property
    def n_stages(self) -> int:
        """Number of resolution stages (encoder stages, including the first, non-pooling one)."""
        return len(self.pool_op_kernel_sizes)


def pad_shape(shape: Sequence[float], divisor: Sequence[int]) -> tuple[int, ...]:
    """Round every entry of `shape` (may be fractional: a median) up to the next multiple of `divisor`."""
    return tuple(int(math.ceil(float(s) / int(d)) * int(d)) for s, d in zip(shape, divisor))


def pool_and_conv_props(
    spacing: Sequence[float],
    patch_size: Sequence[float],
    min_feature_map_size: int = MIN_FEATURE_MAP_EDGE,
    max_numpool: int = 999999,
) -> Topology:
    """Topology of a plain U-Net for `patch_size` at `spacing` (nnU-Net's pooling rule, see module doc)."""
    dim = len(spacing)
    cur_spacing = [float(s) for s in spacing]
    cur_size = [float(s) for s in patch_size]
    pools: list[tuple[int, ...]] = [tuple([1] * dim)]
    convs: list[tuple[int, ...]] = []
    num_pool = [0] * dim
    kernel = [1] * dim

    while True:
        candidates = [i for i in range(dim) if cur_size[i] >= 2 * min_feature_map_size]
        if not candidates:
            break
        finest = min(cur_spacing[i] for i in candidates)
        candidates = [i for i in candidates if cur_spacing[i] / finest < 2 and num_pool[i] < max_numpool]
        # pooling a single axis alone is only worth it when its map stays reasonably large
        if len(candidates) == 1 and cur_size[candidates[0]] < 3 * min_feature_map_size:
            break
        if not candidates:
            break
        # kernels grow from 1 to 3 once an axis's spacing comes within a factor 2 of the finest; never shrink
        finest_all = min(cur_spacing)
        kernel = [3 if k == 3 or cur_spacing[d] / finest_all < 2 else 1 for d, k in enumerate(kernel)]
        stride = [1] * dim
        for i in candidates:
            stride[i] = 2
            num_pool[i] += 1
            cur_spacing[i] *= 2
            cur_size[i] = float(np.ceil(cur_size[i] / 2))
        pools.append(tuple(stride))
        convs.append(tuple(kernel))

    convs.append(tuple([3] * dim))  # bottleneck
    divisor = tuple(int(2**n) for n in num_pool)
    return Topology(
        num_pool_per_axis=tuple(num_pool),
        pool_op_kernel_sizes=tuple(pools),
        conv_kernel_sizes=tuple(convs),
        patch_size=pad_shape(patch_size, divisor),
        must_be_divisible_by=divisor,
    )


def features_per_stage(n_stages: int, dim: int) -> list[int]:
    """Feature maps per stage: 32 doubling per stage, capped at 320 (3D) or 512 (2D)."""
    cap = MAX_FEATURES_3D if dim == 3 else MAX_FEATURES_2D
    return [min(cap, BASE_NUM_FEATURES * 2**i) for i in range(n_stages)]


def initial_patch_size(spacing: Sequence[float], median_shape: Sequence[float]) -> list[float]:
    """Starting patch for the memory search: aspect ratio 1/spacing, volume 256**3 (3D) or 2048**2 (2D),
    clipped to the (possibly fractional) median image shape."""
    inv = 1.0 / np.asarray(spacing, dtype=np.float64)
    dim = len(spacing)
    if dim == 3:
        start = [round(i) for i in inv * (256**3 / np.prod(inv)) ** (1 / 3)]
    elif dim == 2:
        start = [round(i) for i in inv * (2048**2 / np.prod(inv)) ** (1 / 2)]
    else:
        raise ValueError(f"spacing must have 2 or 3 entries, got {list(spacing)}")
    return [min(s, m) for s, m in zip(start, median_shape[:dim])]


def plain_unet_architecture(topology: Topology, dim: int) -> dict:
    """The plan's "architecture" entry for dynamic_network_architectures' PlainConvUNet (JSON-ready)."""
    n = topology.n_stages
    return {
        "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
        "arch_kwargs": {
            "n_stages": n,
            "features_per_stage": features_per_stage(n, dim),
            "conv_op": f"torch.nn.modules.conv.Conv{dim}d",
            "kernel_sizes": [list(k) for k in topology.conv_kernel_sizes],
            "strides": [list(s) for s in topology.pool_op_kernel_sizes],
            "n_conv_per_stage": [CONVS_PER_STAGE] * n,
            "n_conv_per_stage_decoder": [CONVS_PER_STAGE] * (n - 1),
            "conv_bias": True,
            "norm_op": f"torch.nn.modules.instancenorm.InstanceNorm{dim}d",
            "norm_op_kwargs": {"eps": 1e-05, "affine": True},
            "dropout_op": None,
            "dropout_op_kwargs": None,
            "nonlin": "torch.nn.LeakyReLU",
            "nonlin_kwargs": {"inplace": True},
        },
        "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
    }
