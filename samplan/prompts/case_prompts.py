"""The prompts of one case on its preprocessed slice grid: from a reference label map, or mapped from a prompts file.

Coordinates: a slice of the preprocessed case `(C, Z, Y, X)` is `(Y, X)`; points are `(x, y)` = (column, row)
pixels, boxes `[x0, y0, x1, y1]` inclusive, as in samplan.prompts.boxes. Reference-derived prompts are an oracle
(`CasePrompts.oracle`); prediction folders record where their prompts came from in PROMPTS_RECORD.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from samplan.errors import SamplanError
from samplan.prompts.boxes import box_from_mask, key_slice
from samplan.prompts.points import oracle_prompts

REFERENCE_STRATEGIES = ("oracle", "box", "propagate")
PROMPTS_RECORD = "prompts_used.json"  # written into a prompted prediction's folder, copied into its summary.json


@dataclass(frozen=True)
class GridPrompt:
    """One SAM call on slice `slice` of the preprocessed grid, painted with label value `label`.

    points `(N, 2)` float64 (x, y); point_labels `(N,)` int64 1/0; box `(4,)` float64 or None.
    """

    slice: int
    label: int
    points: np.ndarray
    point_labels: np.ndarray
    box: np.ndarray | None


@dataclass
class CasePrompts:
    """The prompts of one case: `propagate` means each prompt is a key slice whose box the method propagates."""

    case: str
    prompts: list[GridPrompt]
    strategy: str
    oracle: bool
    propagate: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ReferencePromptSettings:
    """How a method's prompts come from reference label maps: the strategy a run uses when none is given, which
    label values share one SAM call (`label_groups`, painted with the group's first value; None = one call per value
    found), for the "oracle" strategy whether to give the positive points, the negative point and the union box, and
    for prompts from a model's label maps what each connected component gives."""

    strategy: str = "oracle"
    label_groups: list[list[int]] | None = None
    points: bool = True
    negative_point: bool = True
    box: bool = False
    # prompts from a segmentation model's label maps (samplan.prompts.from_labels): what each component gives
    # ("box", "points" or "box+points", with the negative point when `negative_point`), and how much each box grows,
    # as a fraction of the slice's longer side (the method's margin at its input size)
    model_prompt: str = "box"
    box_margin: float = 0.0


def _no_points() -> tuple[np.ndarray, np.ndarray]:
    return np.zeros((0, 2), np.float64), np.zeros((0,), np.int64)


def label_map_and_groups(seg: np.ndarray, settings: ReferencePromptSettings) -> tuple[np.ndarray, list[list[int]]]:
    """The label map as `(Z, Y, X)` and its label groups: the settings', else one group per value found."""
    seg = np.asarray(seg)
    seg = seg[0] if seg.ndim == 4 else seg
    return seg, [list(map(int, g)) for g in settings.label_groups or [[v] for v in np.unique(seg) if v > 0]]


def reference_prompts(case: str, seg: np.ndarray, strategy: str,
                      settings: ReferencePromptSettings = ReferencePromptSettings()) -> CasePrompts:
    """Prompts from a reference label map `seg` `(Z, Y, X)` (or `(1, Z, Y, X)`; -1 = outside the crop, i.e. background).

    "oracle": the lung-CT paper's points (and box) per labelled slice; "box": the tight box per labelled slice;
    "propagate": the largest box of each label group, for the method to propagate.
    """
    if strategy not in REFERENCE_STRATEGIES:
        raise SamplanError(f"unknown prompt strategy {strategy!r}; use one of {', '.join(REFERENCE_STRATEGIES)}.")
    seg, groups = label_map_and_groups(seg, settings)
    out: list[GridPrompt] = []
    for group in groups:
        paint = group[0]
        if strategy == "propagate":
            boxes = [box_from_mask(np.isin(seg[z], group)) for z in range(seg.shape[0])]
            key = key_slice(boxes)
            if key is not None:
                out.append(GridPrompt(key, paint, *_no_points(), boxes[key]))
            continue
        for z in range(seg.shape[0]):
            sl = seg[z]
            if not np.isin(sl, group).any():
                continue
            if strategy == "box":
                out.append(GridPrompt(z, paint, *_no_points(), box_from_mask(np.isin(sl, group))))
                continue
            p = oracle_prompts(sl, group, with_box=settings.box)
            pts, lab = p.points, p.point_labels
            if not settings.negative_point:
                pts, lab = pts[lab == 1], lab[lab == 1]
            if not settings.points:
                pts, lab = _no_points()
            if len(pts) or p.box is not None:
                out.append(GridPrompt(z, paint, pts, lab, p.box))
    return CasePrompts(case, out, strategy, oracle=True, propagate=strategy == "propagate")


def raw_to_grid(points_zyx: np.ndarray, properties: Mapping[str, Any], plans: Mapping[str, Any],
                grid_shape: Sequence[int]) -> np.ndarray:
    """Continuous raw array indices `(N, 3)` (axis order of the reader, pixel centres at integers) -> indices in the
    preprocessed grid `(N, 3)` `(z, y, x)`: transpose, minus the crop box start, then the resampling's
    pixel-centre mapping `(i + 0.5) * new / old - 0.5` per axis."""
    p = np.atleast_2d(np.asarray(points_zyx, np.float64))
    forward = [int(a) for a in plans.get("transpose_forward", [0, 1, 2])]
    t = p[:, forward]
    start = np.array([int(b[0]) for b in properties["bbox_used_for_cropping"]], np.float64)
    old = np.array(properties["shape_after_cropping_and_before_resampling"], np.float64)
    new = np.array([int(s) for s in grid_shape][-3:], np.float64)
    return (t - start + 0.5) * (new / old) - 0.5


def file_prompts(case: str, slice_prompts: Sequence[Any], properties: Mapping[str, Any], plans: Mapping[str, Any],
                 grid_shape: Sequence[int]) -> CasePrompts:
    """A prompts file's `SlicePrompt`s (raw voxel grid of the case) -> `GridPrompt`s on the preprocessed grid `(Z, Y, X)`.

    The raw slice axis (0) must stay the slice axis after the plan's transpose (a raw slice would otherwise
    cut across many network slices); boxes are the min/max of their two mapped corners, clipped to the slice.
    """
    forward = [int(a) for a in plans.get("transpose_forward", [0, 1, 2])]
    n_z, h, w = [int(s) for s in grid_shape][-3:]
    if forward[0] != 0 and int(properties["shape_before_cropping"][forward.index(0)]) > 1:
        raise SamplanError(f"case {case}: the plan transposes the slice axis (transpose_forward {forward}); prompts-file "
                           "slices cannot be mapped to the network's slices. Use --prompt-strategy with --reference-dir.")
    out = []
    for sp in slice_prompts:
        pts = np.asarray(sp.points, np.float64).reshape(-1, 2)
        xy = [pts] if sp.box is None else [pts, np.asarray(sp.box, np.float64).reshape(2, 2)]
        xy = np.vstack(xy)
        zyx = np.stack([np.full(len(xy), float(sp.slice)), xy[:, 1], xy[:, 0]], axis=1)
        g = raw_to_grid(zyx, properties, plans, grid_shape)
        z = int(np.clip(np.floor(g[0, 0] + 0.5), 0, n_z - 1)) if len(g) else 0
        gx, gy = np.clip(g[:, 2], 0, w - 1), np.clip(g[:, 1], 0, h - 1)
        n = len(pts)
        box = None
        if sp.box is not None:
            box = np.array([gx[n:].min(), gy[n:].min(), gx[n:].max(), gy[n:].max()])
        out.append(GridPrompt(z, int(sp.label), np.stack([gx[:n], gy[:n]], axis=1), np.asarray(sp.point_labels, np.int64), box))
    return CasePrompts(case, out, "file", oracle=False)
