"""Target spacing, axis transpose, normalisation choice and resampling settings (nnU-Net v2.8.1 rules).

Spacings and shapes are lists of `[sz, sy, sx]` / `[z, y, x]` in raw numpy axis order (as in the
fingerprint) unless a name says "transposed". Every function here is a pure function of the
fingerprint / dataset.json values, so the planner and tests can call them directly.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

# an axis counts as anisotropic when its spacing is more than this many times the others'
ANISO_THRESHOLD = 3.0
# nnU-Net switches to mask-restricted normalisation when cropping removed more than a quarter of the volume
MASK_FOR_NORM_RELATIVE_SIZE = 3 / 4.0

# channel name (case-insensitive) -> normalisation scheme, as nnU-Net maps it; anything else is z-score
_SCHEME_BY_CHANNEL_NAME = {
    "ct": "CTNormalization",
    "nonorm": "NoNormalization",
    "zscore": "ZScoreNormalization",
    "rescale_to_0_1": "RescaleTo01Normalization",
    "rgb_to_0_1": "RGBTo01Normalization",
}
# only z-scoring keeps voxels outside the nonzero mask at 0 when normalising inside the mask
_SCHEMES_THAT_CAN_USE_MASK = {"ZScoreNormalization"}


def target_spacing(
    spacings: Sequence[Sequence[float]],
    shapes_after_crop: Sequence[Sequence[int]],
    overwrite: Sequence[float] | None = None,
) -> np.ndarray:
    """Full-resolution target spacing (raw axis order, float64 array of 3).

    The per-axis median of the case spacings, except for datasets whose coarsest axis is both
    anisotropic (spacing > 3x the largest other spacing) and short (median voxel count x 3 < the
    smallest other median count): that axis takes the 10th percentile of its spacings, kept just
    above the other axes' largest spacing, so thick-slice cases are not interpolated coarsely.
    """
    if overwrite is not None:
        return np.asarray(overwrite, dtype=np.float64)
    spacings_arr = np.vstack(spacings).astype(np.float64)
    target = np.percentile(spacings_arr, 50, axis=0)
    median_size = np.percentile(np.vstack(shapes_after_crop).astype(np.float64), 50, axis=0)

    worst = int(np.argmax(target))
    others = [i for i in range(len(target)) if i != worst]
    max_other_spacing = max(target[i] for i in others)
    min_other_size = min(median_size[i] for i in others)

    aniso_spacing = target[worst] > ANISO_THRESHOLD * max_other_spacing
    aniso_voxels = median_size[worst] * ANISO_THRESHOLD < min_other_size
    if aniso_spacing and aniso_voxels:
        lowres = float(np.percentile(spacings_arr[:, worst], 10))
        # the 10th percentile must not make this axis finer than the others
        if lowres < max_other_spacing:
            lowres = max(max_other_spacing, lowres) + 1e-5
        target[worst] = lowres
    return target


def transpose_axes(target: Sequence[float], suppress: bool = False) -> tuple[list[int], list[int]]:
    """(transpose_forward, transpose_backward) that put the coarsest axis of `target` first.

    Ties go to the lowest axis index (np.argmax), so isotropic data keeps [0, 1, 2].
    """
    if suppress:
        return [0, 1, 2], [0, 1, 2]
    worst = int(np.argmax(target))
    forward = [worst] + [i for i in range(3) if i != worst]
    backward = [forward.index(i) for i in range(3)]
    return forward, backward


def normalization_scheme(channel_name: str) -> str:
    """nnU-Net's normalisation class name for one channel name (case-insensitive; default z-score)."""
    return _SCHEME_BY_CHANNEL_NAME.get(channel_name.casefold(), "ZScoreNormalization")


def normalization_schemes_and_masks(
    channel_names: Sequence[str], median_relative_size_after_cropping: float
) -> tuple[list[str], list[bool]]:
    """Per channel: the scheme name and whether to normalise inside the nonzero mask only.

    The mask is used for z-scored channels when cropping to the nonzero region kept less than 3/4 of
    the median volume (a body inside zero background, e.g. skull-stripped brain MRI).
    """
    schemes = [normalization_scheme(n) for n in channel_names]
    if median_relative_size_after_cropping < MASK_FOR_NORM_RELATIVE_SIZE:
        masks = [s in _SCHEMES_THAT_CAN_USE_MASK for s in schemes]
    else:
        masks = [False] * len(schemes)
    return schemes, masks


def compute_new_shape(old_shape: Sequence[int], old_spacing: Sequence[float], new_spacing: Sequence[float]) -> list[int]:
    """Shape after resampling from `old_spacing` to `new_spacing` (rounded per axis)."""
    if not len(old_shape) == len(old_spacing) == len(new_spacing):
        raise ValueError(f"shape {old_shape}, spacing {old_spacing} and new spacing {new_spacing} differ in length")
    return [int(round(o / n * s)) for o, n, s in zip(old_spacing, new_spacing, old_shape)]


def median_shape_after_resampling(
    spacings: Sequence[Sequence[float]], shapes_after_crop: Sequence[Sequence[int]], target: Sequence[float]
) -> np.ndarray:
    """Median (float, raw axis order) of every case's cropped shape resampled to `target`."""
    new_shapes = [compute_new_shape(shape, sp, target) for sp, shape in zip(spacings, shapes_after_crop)]
    return np.median(np.asarray(new_shapes, dtype=np.float64), axis=0)


def resampling_kwargs() -> dict[str, dict]:
    """Resampling settings of a configuration: third-order data, linear segmentation and probabilities.

    `order_z` 0 and `force_separate_z` None mean: decide per case whether to resample the anisotropic
    axis separately (nearest neighbour along it), as nnU-Net does.
    """
    def _kw(is_seg: bool, order: int) -> dict:
        return {"is_seg": is_seg, "order": order, "order_z": 0, "force_separate_z": None}

    return {
        "resampling_fn_data_kwargs": _kw(False, 3),
        "resampling_fn_seg_kwargs": _kw(True, 1),
        "resampling_fn_probabilities_kwargs": _kw(False, 1),
    }
