"""Prompts from a segmentation model's label maps (a cascade's first stage), on the preprocessed slice grid.

Per label group, per slice along axis 0 (the planned slice axis of the "2d" grid), per connected component of the
group's mask on that slice: a box (the component's tight box grown by the method's margin) and/or points (the
positive point at the maximum of the distance transform inside the component: the pixel deepest inside it; the
negative point at the background pixel of the grown box farthest from the component, usually a box corner). Each
component is one SAM call, painted with the group's first label value; the method merges the calls of one slice.
Unlike reference-derived prompts these are not an oracle: the label maps are a model's prediction.
"""
from __future__ import annotations

from typing import Any

import numpy as np
from scipy import ndimage

from samplan.errors import SamplanError
from samplan.prompts.boxes import box_from_mask, object_masks, pad_box
from samplan.prompts.case_prompts import CasePrompts, GridPrompt, ReferencePromptSettings, label_map_and_groups

MODEL_PROMPTS = ("box", "points", "box+points")


def deepest_point(mask: np.ndarray) -> np.ndarray:
    """`(x, y)` of the pixel of a 2D mask farthest from its border (distance-transform maximum; first in raster order)."""
    dist = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
    r, c = np.unravel_index(int(np.argmax(dist)), mask.shape)
    return np.array([float(c), float(r)])


def outside_point(component: np.ndarray, foreground: np.ndarray, box: np.ndarray) -> np.ndarray | None:
    """`(x, y)` of the background pixel inside `box` farthest from `component` (None when the box has none)."""
    x0, y0, x1, y1 = (int(round(v)) for v in box)
    window = ~foreground[y0:y1 + 1, x0:x1 + 1]
    if not window.any():
        return None
    dist = ndimage.distance_transform_edt(~component)[y0:y1 + 1, x0:x1 + 1]
    dist = np.where(window, dist, -1.0)
    r, c = np.unravel_index(int(np.argmax(dist)), dist.shape)
    return np.array([float(c + x0), float(r + y0)])


def component_prompt(z: int, paint: int, component: np.ndarray, foreground: np.ndarray,
                     settings: ReferencePromptSettings) -> GridPrompt:
    """The prompt of one connected component on slice z: box and/or points as `settings.model_prompt` says."""
    h, w = component.shape
    box = pad_box(box_from_mask(component), settings.box_margin * max(h, w), (h, w))
    points, labels = [deepest_point(component)], [1]
    if settings.negative_point:
        neg = outside_point(component, foreground, box)
        if neg is not None:
            points.append(neg)
            labels.append(0)
    with_points = settings.model_prompt in ("points", "box+points")
    pts = np.array(points, np.float64) if with_points else np.zeros((0, 2), np.float64)
    lab = np.array(labels, np.int64) if with_points else np.zeros((0,), np.int64)
    return GridPrompt(z, paint, pts, lab, box if settings.model_prompt != "points" else None)


def model_prompts(case: str, seg: np.ndarray, settings: ReferencePromptSettings,
                  source: dict[str, Any] | None = None) -> CasePrompts:
    """Prompts from a model's label map `seg` `(Z, Y, X)` (or `(1, Z, Y, X)`; negative values are background).

    `source` describes the model that made the label map (recorded in the prompts, never an oracle).
    """
    if settings.model_prompt not in MODEL_PROMPTS:
        raise SamplanError(f"model prompts {settings.model_prompt!r} are not known; use one of {', '.join(MODEL_PROMPTS)}.")
    seg, groups = label_map_and_groups(seg, settings)
    out: list[GridPrompt] = []
    for group in groups:
        for z in range(seg.shape[0]):
            mask = np.isin(seg[z], group)
            if not mask.any():
                continue
            foreground = seg[z] > 0
            out.extend(component_prompt(z, group[0], comp, foreground, settings) for comp in object_masks(mask))
    return CasePrompts(case, out, "model", oracle=False, extra={"source": dict(source or {})})
