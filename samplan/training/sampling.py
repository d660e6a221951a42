"""Where a training patch is taken from a cached case, and reading it (cropped and padded) from the lazy arrays.

Coordinates are in the cached (transposed) voxel grid, spatial axes (Z, Y, X). A 2D patch `(Y, X)` is
handled as the 3D patch `(1, Y, X)`: one slice along axis 0.

The rule is nnU-Net's: a patch may hang over the image by half of `need_to_pad` on each side, where
`need_to_pad` is the extra size of the sampled (initial) patch over the final one, so that the final
patch, cut from the centre after augmentation, still reaches every border voxel; when the image is
smaller than the patch it is padded on both sides. A foreground patch is centred on a random stored
voxel of a random class present in the case (its lower corner kept within the allowed range).
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

ClassLocations = Mapping[str, np.ndarray]  # key -> (n, 3) int array of (z, y, x)


def compact_class_locations(class_locations: Mapping[str, list]) -> dict[str, np.ndarray]:
    """props["class_locations"] ({key: [[c, z, y, x], ...]}) -> {key: (n, 3) int32 (z, y, x)}, far smaller in memory."""
    out = {}
    for key, locs in class_locations.items():
        arr = np.asarray(locs, dtype=np.int32).reshape(-1, 4)
        out[key] = np.ascontiguousarray(arr[:, 1:])
    return out


def _is_annotated_key(key: str) -> bool:
    """The 'all annotated voxels' entry of datasets with an ignore label is the one that includes -1."""
    return "-1" in key.split(",")


def pick_foreground_voxel(class_locations: ClassLocations, rng: np.random.Generator) -> np.ndarray | None:
    """A random stored voxel (z, y, x) of a class chosen uniformly among the classes present, or None without any.

    The 'annotated voxels' entry only counts when no real class is present (nnU-Net's rule).
    """
    eligible = [k for k, v in class_locations.items() if len(v) > 0]
    if len(eligible) > 1:
        eligible = [k for k in eligible if not _is_annotated_key(k)] or eligible
    if not eligible:
        return None
    locs = class_locations[eligible[int(rng.integers(len(eligible)))]]
    return locs[int(rng.integers(len(locs)))]


def pick_annotated_voxel(class_locations: ClassLocations, rng: np.random.Generator) -> np.ndarray | None:
    """A random annotated voxel (datasets with an ignore label), or None when the case has none stored."""
    for k, v in class_locations.items():
        if _is_annotated_key(k) and len(v) > 0:
            return v[int(rng.integers(len(v)))]
    return None


def patch_bounds(shape: Sequence[int], patch_size: Sequence[int], need_to_pad: Sequence[int]) -> tuple[list[int], list[int]]:
    """Lowest and highest allowed lower corner of a patch per spatial axis (both inclusive; may be negative)."""
    lbs, ubs = [], []
    for s, p, n in zip(shape, patch_size, need_to_pad):
        n = max(int(n), p - s)  # an image smaller than the patch is padded up to it
        lbs.append(-(n // 2) - (n % 2))  # written out: nnU-Net's `-n // 2` floors towards -inf
        ubs.append(s + n // 2 + n % 2 - p)
    return lbs, ubs


def sample_patch_corner(
    shape: Sequence[int],
    patch_size: Sequence[int],
    need_to_pad: Sequence[int],
    rng: np.random.Generator,
    centre: np.ndarray | None = None,
) -> list[int]:
    """Lower corner of a patch: uniform within the allowed range, or centred on `centre` (z, y, x) when given."""
    lbs, ubs = patch_bounds(shape, patch_size, need_to_pad)
    if centre is None:
        return [int(rng.integers(lo, hi + 1)) for lo, hi in zip(lbs, ubs)]
    # only the lower bound is enforced, as in nnU-Net: the voxel stays at the patch centre near the far border
    return [max(lo, int(c) - p // 2) for lo, c, p in zip(lbs, centre, patch_size)]


def crop_and_pad(array: Any, corner: Sequence[int], patch_size: Sequence[int], pad_value: float,
                 dtype: Any = None) -> np.ndarray:
    """Read `array[:, corner:corner + patch_size]` from a `(C, Z, Y, X)` array (numpy or lazy blosc2), padding
    with `pad_value` where the patch leaves the array; only the overlapping region is read."""
    shape = array.shape[1:]
    inside = tuple(slice(max(c, 0), min(c + p, s)) for c, p, s in zip(corner, patch_size, shape))
    if any(sl.start >= sl.stop for sl in inside):
        return np.full((array.shape[0], *patch_size), pad_value, dtype=dtype or array.dtype)
    region = np.asarray(array[(slice(None), *inside)])
    if dtype is not None:
        region = region.astype(dtype, copy=False)
    pads = [(0, 0)] + [(sl.start - c, c + p - sl.stop) for sl, c, p in zip(inside, corner, patch_size)]
    if any(a or b for a, b in pads):
        region = np.pad(region, pads, mode="constant", constant_values=pad_value)
    return region
