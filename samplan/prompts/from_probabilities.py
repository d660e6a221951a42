"""Prompts for one slice from a model's probability map (AutoSAM2's automatic prompts), torch-free.

The object is the map thresholded at `threshold`; a slice whose object has fewer than `min_pixels` pixels gets no
prompt (SAM would be asked to find something the model does not see). Then:
- positive points: the pixels with the highest distance-to-the-object's-border x probability, greedily, each at
  least `positive_spacing_px` from the ones taken (deep inside confident parts, spread over the object);
- negative points: pixels of a ring `negative_ring_px` wide around the object where the probability is below
  `negative_threshold`, least probable first, at least `negative_spacing_px` apart;
- a box: the tight box of the object dilated by `box_dilation_px`, padded on each side by
  max(`box_pad_min_px`, `box_pad_fraction` x its extent), clipped to the slice.
Coordinates follow samplan.prompts.points: `(x, y)` slice pixels, boxes `[x0, y0, x1, y1]`.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from samplan.prompts.boxes import box_from_mask, clip_box
from samplan.prompts.points import Prompts

_MAX_CANDIDATES = 4096  # the greedy spacing search looks at this many best pixels at most


@dataclass(frozen=True)
class ProbabilityPromptSettings:
    """How a probability map becomes prompts (module docstring); `points`/`box` say which prompt kinds to make."""

    threshold: float = 0.5
    min_pixels: int = 10
    points: bool = True
    box: bool = True
    num_positive: int = 5
    positive_spacing_px: float = 5.0
    num_negative: int = 3
    negative_threshold: float = 0.3
    negative_ring_px: int = 3
    negative_spacing_px: float = 10.0
    box_dilation_px: int = 3
    box_pad_fraction: float = 0.1
    box_pad_min_px: float = 5.0


def _spaced(candidates: np.ndarray, n: int, spacing: float) -> np.ndarray:
    """Up to n rows of `candidates` `(M, 2)` (in priority order), each at least `spacing` from those taken."""
    taken: list[np.ndarray] = []
    for c in candidates[:_MAX_CANDIDATES]:
        if len(taken) == n:
            break
        if all(np.hypot(*(c - t)) >= spacing for t in taken):
            taken.append(c)
    return np.asarray(taken, dtype=np.float64).reshape(-1, 2)


def _ordered(rc: np.ndarray, priority: np.ndarray) -> np.ndarray:
    """(row, col) pixels sorted by descending priority (ties by position, so the order is deterministic)."""
    order = np.lexsort((rc[:, 1], rc[:, 0], -priority))
    return rc[order]


def prompts_from_probabilities(prob: np.ndarray, s: ProbabilityPromptSettings) -> Prompts | None:
    """Prompts for one slice's probability map `(H, W)` in [0, 1], or None when the object is too small."""
    prob = np.asarray(prob, dtype=np.float32)
    mask = prob > s.threshold
    if int(mask.sum()) < max(1, s.min_pixels):
        return None
    points = np.zeros((0, 2)), np.zeros((0,), np.int64)
    if s.points:
        depth = ndimage.distance_transform_edt(mask)
        rc = np.argwhere(mask)
        pos = _spaced(_ordered(rc, depth[mask] * prob[mask]), s.num_positive, s.positive_spacing_px)
        ring = ndimage.binary_dilation(mask, iterations=max(1, s.negative_ring_px)) & ~mask
        ring &= prob < s.negative_threshold
        rc_ring = np.argwhere(ring)
        neg = _spaced(_ordered(rc_ring, -prob[ring]), s.num_negative, s.negative_spacing_px) if len(rc_ring) else \
            np.zeros((0, 2))
        xy = np.concatenate([pos, neg])[:, ::-1]  # (row, col) -> (x, y)
        points = xy.astype(np.float64), np.concatenate([np.ones(len(pos)), np.zeros(len(neg))]).astype(np.int64)
    box = None
    if s.box:
        grown = ndimage.binary_dilation(mask, iterations=s.box_dilation_px) if s.box_dilation_px > 0 else mask
        tight = box_from_mask(grown)
        pad = np.maximum(s.box_pad_min_px, s.box_pad_fraction * (tight[2:] - tight[:2] + 1))
        box = clip_box(tight + np.array([-pad[0], -pad[1], pad[0], pad[1]]), mask.shape)
    return Prompts(points=points[0], point_labels=points[1], box=box, oracle=False)
