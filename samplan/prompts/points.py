"""Point prompts for one 2D slice: the lung-CT paper's oracle, random point sampling and reference boxes.

Conventions (segment-anything's): a slice is a 2D array `(H, W)` (row, column); a point is float
`(x, y)` = (column, row) in pixel coordinates, the pixel centre of (row r, column c) being `(c, r)`;
point labels are 1 (positive, "object here") and 0 (negative, "background here"); a box is
`[x0, y0, x1, y1]` with inclusive pixel corners, as in `samplan.prompts.boxes`.

The oracle (Gutierrez et al., SAM zero-shot on lung CT, IEEE Access 2024) reads its prompts from the
reference masks, so results obtained with it are oracle results and must be reported as such; the
returned `Prompts` carries `oracle=True` to make that impossible to lose.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Literal

import numpy as np

from samplan.prompts.boxes import box_from_mask, jitter_box, pad_box, union_box

# how each point was obtained, recorded per point in `Prompts.point_sources`
CENTROID, ROW_RUN, COLUMN_RUN, NEAREST = "centroid", "row_run", "column_run", "nearest_pixel"
BOX_CENTRE, SAMPLED = "union_box_centre", "sampled"


@dataclass(frozen=True)
class Prompts:
    """Prompts for one SAM call on one slice.

    points: `(N, 2)` float64 `(x, y)` pixel coordinates; point_labels: `(N,)` int64, 1 positive / 0 negative;
    box: `(4,)` float64 `[x0, y0, x1, y1]` or None; oracle: True when derived from the reference masks;
    point_sources: one of the module's source names per point; negative_inside_mask: for the oracle, whether
    its negative point fell on a labelled pixel (None when there is no oracle negative point).
    """

    points: np.ndarray
    point_labels: np.ndarray
    box: np.ndarray | None = None
    oracle: bool = False
    point_sources: tuple[str, ...] = field(default=())
    negative_inside_mask: bool | None = None

    @property
    def empty(self) -> bool:
        """True when there is neither a point nor a box (nothing to prompt SAM with)."""
        return len(self.points) == 0 and self.box is None


def _no_points() -> tuple[np.ndarray, np.ndarray]:
    return np.zeros((0, 2), np.float64), np.zeros((0,), np.int64)


def _runs(line: np.ndarray) -> list[tuple[int, int]]:
    """Inclusive (start, end) index pairs of the contiguous True runs of a 1D boolean array."""
    padded = np.concatenate(([False], line, [False])).astype(np.int8)
    edges = np.flatnonzero(np.diff(padded))
    return [(int(s), int(e) - 1) for s, e in zip(edges[::2], edges[1::2])]


def inside_point(mask: np.ndarray) -> tuple[np.ndarray, str]:
    """A point `(x, y)` (float64) for a non-empty 2D mask `(H, W)`: its centre of mass, moved inside if needed.

    The centroid is kept when the pixel containing it (rounded coordinates) is in the mask. Otherwise, as in
    the lung-CT paper, it moves to the middle of the longest contiguous run of mask pixels on the row or
    the column through that pixel (a run here need not contain the centroid: for a ring or two blobs the
    row/column crosses the mask beside it). Ties: the run whose middle is nearest the centroid, the row
    first. When neither the row nor the column meets the mask (e.g. two blobs placed diagonally with a gap
    between them in both rows and columns, the centroid in the gap) the paper's rule is undefined and we take the mask pixel nearest the
    centroid (Euclidean, first in row-major order on ties). Returns the point and its source name.
    """
    m = np.asarray(mask, dtype=bool)
    rows, cols = np.nonzero(m)
    if rows.size == 0:
        raise ValueError("inside_point needs a non-empty mask")
    cy, cx = rows.mean(), cols.mean()
    # the centroid lies in the convex hull of the pixels, so its rounded position is inside the image
    r, c = int(np.floor(cy + 0.5)), int(np.floor(cx + 0.5))
    if m[r, c]:
        return np.array([cx, cy], np.float64), CENTROID
    candidates = []  # (-length, distance to centroid, order, point, source): min() picks the paper's run
    for s, e in _runs(m[r, :]):
        mid = (s + e) / 2.0
        candidates.append((-(e - s + 1), float(np.hypot(mid - cx, r - cy)), 0, (mid, float(r)), ROW_RUN))
    for s, e in _runs(m[:, c]):
        mid = (s + e) / 2.0
        candidates.append((-(e - s + 1), float(np.hypot(c - cx, mid - cy)), 1, (float(c), mid), COLUMN_RUN))
    if candidates:
        best = min(candidates, key=lambda t: t[:3])
        return np.array(best[3], np.float64), best[4]
    i = int(np.argmin((rows - cy) ** 2 + (cols - cx) ** 2))  # np.nonzero is row-major, argmin takes the first
    return np.array([cols[i], rows[i]], np.float64), NEAREST


def oracle_prompts(slice_labels: np.ndarray, label_values: Iterable[int], with_box: bool = False) -> Prompts:
    """The lung-CT paper's oracle prompts for one reference slice `(H, W)` (integer label map).

    One positive point per value of `label_values` present in the slice (in the given order), from
    `inside_point`; then one negative point at the centre `((x0 + x1) / 2, (y0 + y1) / 2)` of the union box
    of all present labels; with `with_box`, that union box as the box prompt. The paper's rule is kept even
    when the box centre lies on a labelled pixel (common for one compact object, where the negative point
    then contradicts the positive one): `negative_inside_mask` records it so reports can count such slices.
    A slice without any of the labels gives empty prompts (no points, no box): the method skips it.
    """
    seg = np.asarray(slice_labels)
    if seg.ndim != 2:
        raise ValueError(f"oracle_prompts expects one 2D slice (H, W), got shape {seg.shape}")
    points, sources, box = [], [], None
    union = np.zeros(seg.shape, bool)
    for v in label_values:
        m = seg == v
        if not m.any():
            continue
        p, src = inside_point(m)
        points.append(p)
        sources.append(src)
        union |= m
        box = union_box(box, box_from_mask(m))
    if box is None:
        pts, lab = _no_points()
        return Prompts(pts, lab, None, oracle=True)
    centre = np.array([(box[0] + box[2]) / 2.0, (box[1] + box[3]) / 2.0])
    inside = bool(union[int(np.floor(centre[1] + 0.5)), int(np.floor(centre[0] + 0.5))])
    pts = np.vstack(points + [centre]).astype(np.float64)
    lab = np.array([1] * len(points) + [0], np.int64)
    return Prompts(pts, lab, box if with_box else None, oracle=True,
                   point_sources=tuple(sources) + (BOX_CENTRE,), negative_inside_mask=inside)


def _draw(pool_rows: np.ndarray, pool_cols: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """`n` pixels `(x, y)` drawn uniformly from a pool, without replacement unless the pool is smaller than n."""
    if n <= 0 or pool_rows.size == 0:
        return np.zeros((0, 2), np.float64)
    if n <= pool_rows.size:
        idx = rng.choice(pool_rows.size, size=n, replace=False)
    else:  # every pixel once, the rest drawn again so the count stays n (batch shapes stay fixed)
        idx = np.concatenate([rng.permutation(pool_rows.size), rng.integers(0, pool_rows.size, n - pool_rows.size)])
    return np.stack([pool_cols[idx], pool_rows[idx]], axis=1).astype(np.float64)


def sample_points(mask: np.ndarray, n_pos: int, n_neg: int, rng: np.random.Generator,
                  neg_region: Literal["box", "image"] = "box", margin: float = 10.0) -> Prompts:
    """`n_pos` positive points drawn uniformly from a 2D mask `(H, W)`, then `n_neg` negatives from outside it.

    Points are pixel centres `(x, y)`, drawn without replacement while the region has enough pixels (then
    every pixel once and the rest with replacement, so the counts are exact). Negatives come from the
    pixels outside the mask inside its tight box padded by `margin` px and clipped to the image
    (`neg_region="box"`), or anywhere in the image (`"image"`). An empty mask gives no positive points, and
    its "box" region is undefined, so its negatives come from the whole image. A region without pixels
    (mask filling the padded box) gives no negatives. Reproducible for a seeded `rng`.
    """
    m = np.asarray(mask, dtype=bool)
    if neg_region not in ("box", "image"):
        raise ValueError(f"neg_region must be 'box' or 'image', got {neg_region!r}")
    pos = _draw(*np.nonzero(m), n_pos, rng)
    region = np.ones(m.shape, bool)
    box = box_from_mask(m)
    if neg_region == "box" and box is not None:
        x0, y0, x1, y1 = pad_box(box, margin, m.shape).astype(int)
        region = np.zeros(m.shape, bool)
        region[y0:y1 + 1, x0:x1 + 1] = True
    neg = _draw(*np.nonzero(region & ~m), n_neg, rng)
    labels = np.array([1] * len(pos) + [0] * len(neg), np.int64)
    return Prompts(np.vstack([pos, neg]), labels, None, point_sources=(SAMPLED,) * len(labels))


def box_prompt(mask: np.ndarray, max_shift: float = 0.0, rng: np.random.Generator | None = None,
               outward_only: bool = True) -> Prompts:
    """A reference box prompt for a 2D mask `(H, W)`: the tight box, or jittered by up to `max_shift` px.

    Jitter follows `boxes.jitter_box` (outward only by default, MedSAM's rule; needs `rng`). An empty mask
    gives no box. The prompt derives from the reference, so it is flagged `oracle=True`.
    """
    m = np.asarray(mask, dtype=bool)
    box = box_from_mask(m)
    if box is not None and max_shift > 0:
        if rng is None:
            raise ValueError("box_prompt with max_shift > 0 needs an rng")
        box = jitter_box(box, max_shift, m.shape, rng, outward_only=outward_only)
    pts, lab = _no_points()
    return Prompts(pts, lab, box, oracle=True)
