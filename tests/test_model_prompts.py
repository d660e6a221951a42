"""Prompts from a model's label maps (boxes and points per label, slice and component) and largest-component
post-processing, on label maps whose answers are known."""
from __future__ import annotations

import numpy as np
import pytest

from samplan.inference.postprocessing import keep_largest_component, postprocess
from samplan.prompts.case_prompts import ReferencePromptSettings
from samplan.prompts.from_labels import deepest_point, model_prompts, outside_point


def _label_map() -> np.ndarray:
    """(Z, Y, X) = (3, 40, 50): slice 1 has two label-1 squares and one label-2 bar; slice 2 one label-1 square."""
    seg = np.zeros((3, 40, 50), np.uint8)
    seg[1, 5:16, 5:16] = 1  # 11 x 11, centre (10, 10)
    seg[1, 25:30, 30:35] = 1  # 5 x 5, centre (row 27, col 32)
    seg[1, 20:22, 5:45] = 2
    seg[2, 30:33, 10:13] = 1
    return seg


def test_boxes_per_label_slice_and_component_grown_by_the_margin():
    settings = ReferencePromptSettings(label_groups=[[1], [2]], model_prompt="box", box_margin=2 / 50)
    p = model_prompts("c", _label_map(), settings, {"method": "unet"})
    assert p.strategy == "model" and p.oracle is False and p.extra["source"] == {"method": "unet"}
    got = sorted((g.slice, g.label, tuple(g.box)) for g in p.prompts)
    assert got == [(1, 1, (3.0, 3.0, 17.0, 17.0)), (1, 1, (28.0, 23.0, 36.0, 31.0)), (1, 2, (3.0, 18.0, 46.0, 23.0)),
                   (2, 1, (8.0, 28.0, 14.0, 34.0))]  # each tight box + 2 px (2/50 of the longer side), clipped
    assert all(len(g.points) == 0 for g in p.prompts)


def test_points_are_the_deepest_pixel_and_a_background_pixel_of_the_box():
    settings = ReferencePromptSettings(label_groups=[[1]], model_prompt="box+points", negative_point=True,
                                       box_margin=4 / 50)
    seg = _label_map()
    prompts = [g for g in model_prompts("c", seg, settings).prompts if g.slice == 1]
    big = prompts[0]  # components come largest first
    np.testing.assert_array_equal(big.points[0], [10.0, 10.0])  # the centre of the 11 x 11 square
    assert list(big.point_labels) == [1, 0]
    x, y = big.points[1].astype(int)
    assert seg[1, y, x] == 0 and big.box[0] <= x <= big.box[2] and big.box[1] <= y <= big.box[3]
    # farthest from the component inside the grown box: a corner of the box
    assert (x, y) in {(1, 1), (1, 19), (19, 1), (19, 19)}
    only_points = model_prompts("c", seg, ReferencePromptSettings(label_groups=[[1]], model_prompt="points",
                                                                   negative_point=False))
    assert all(g.box is None and list(g.point_labels) == [1] for g in only_points.prompts)


def test_point_helpers_on_edge_cases():
    m = np.zeros((5, 5), bool)
    m[0, :] = True  # touching the border: the padded distance transform still prefers the middle of the row
    np.testing.assert_array_equal(deepest_point(m), [0.0, 0.0])
    assert outside_point(m, m, np.array([0.0, 0.0, 4.0, 0.0])) is None  # no background in the box


def test_an_empty_label_map_gives_no_prompts_and_unknown_kinds_are_refused():
    from samplan.errors import SamplanError

    assert model_prompts("c", np.zeros((2, 8, 8), np.uint8), ReferencePromptSettings()).prompts == []
    with pytest.raises(SamplanError, match="use one of box, points, box\\+points"):
        model_prompts("c", _label_map(), ReferencePromptSettings(model_prompt="scribble"))


def test_keep_largest_component_per_label():
    seg = _label_map()
    out = keep_largest_component(seg, 1)
    assert (out[1, 25:30, 30:35] == 0).all() and (out[1, 5:16, 5:16] == 1).all()
    assert (out[2] == 0).all()  # slice 2's square is a separate 3D component, smaller
    assert np.array_equal(out == 2, seg == 2)  # other labels untouched
    assert np.array_equal(postprocess(seg, []), seg)
