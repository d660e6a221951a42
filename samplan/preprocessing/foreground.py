"""Sampled voxel locations of every foreground class, stored with each cached case for foreground oversampling.

The trainer centres some patches on a random voxel of a random class present in the case; storing a
sample of each class's voxels (rather than all of them) keeps the per-case metadata small while still
covering every part of large structures (at least 1 % of their voxels).
"""
from __future__ import annotations

import math
import zlib
from typing import Sequence

import numpy as np

from samplan.dataset.dataset_json import DatasetJson, foreground_labels, ignore_label, label_values, regions, uses_regions

MAX_SAMPLES = 10000  # per class, unless 1 % of the class is more
MIN_FRACTION = 0.01
SEED = 1234

ClassLocations = dict[str, list[list[int]]]  # key (see location_key) -> [[c, z, y, x], ...]


def location_key(values: Sequence[int]) -> str:
    """Key of a class in `class_locations`: its label values joined by commas ("1", or "1,2,3" for a region)."""
    return ",".join(str(int(v)) for v in values)


def annotated_key(dataset_json: DatasetJson) -> str | None:
    """Key of the 'annotated voxels' entry (all values but the ignore label, with -1), or None without an ignore label."""
    ign = ignore_label(dataset_json)
    if ign is None:
        return None
    return location_key([-1] + [v for v in label_values(dataset_json) if v != ign])


def classes_to_sample(dataset_json: DatasetJson) -> list[tuple[int, ...]]:
    """The label-value groups to sample: the foreground regions (region datasets) or labels, then annotated voxels.

    With an ignore label, one more group holds every annotated value (the nonzero-mask outside, -1,
    included), so that patches can also be drawn uniformly from annotated areas.
    """
    if uses_regions(dataset_json):
        groups = [r for r in regions(dataset_json) if any(v != 0 for v in r)]
    else:
        groups = [(v,) for v in foreground_labels(dataset_json)]
    key = annotated_key(dataset_json)
    if key is not None:
        groups.append(tuple(int(v) for v in key.split(",")))
    return groups


def sample_class_locations(
    seg: np.ndarray,
    classes: Sequence[Sequence[int]],
    seed: int = SEED,
    max_samples: int = MAX_SAMPLES,
    min_fraction: float = MIN_FRACTION,
) -> ClassLocations:
    """Sample voxel coordinates of each class in an integer label map `(1, Z, Y, X)`.

    For a class with n voxels, max(min(max_samples, n), ceil(min_fraction * n)) distinct voxels are drawn
    (seeded, so the result is reproducible). Returns `{location_key(class): [[c, z, y, x], ...]}` as plain
    lists of ints (JSON-ready); absent classes map to an empty list.
    """
    out: ClassLocations = {}
    for values in classes:
        key = location_key(values)
        vals = np.asarray(values, dtype=seg.dtype)
        mask = seg == vals[0] if len(vals) == 1 else np.isin(seg, vals)
        flat = np.flatnonzero(mask)
        del mask
        n = flat.size
        if n == 0:
            out[key] = []
            continue
        k = max(min(max_samples, n), math.ceil(n * min_fraction))
        # one generator per class, seeded by its key: adding a class does not change the samples of the others
        rng = np.random.default_rng([seed, zlib.crc32(key.encode())])
        picked = np.sort(rng.choice(flat, size=k, replace=False)) if k < n else flat
        out[key] = np.stack(np.unravel_index(picked, seg.shape), axis=1).tolist()
    return out


def case_class_locations(seg: np.ndarray, dataset_json: DatasetJson, seed: int = SEED) -> ClassLocations:
    """`sample_class_locations` for the classes that dataset.json declares (see classes_to_sample)."""
    return sample_class_locations(seg, classes_to_sample(dataset_json), seed=seed)
