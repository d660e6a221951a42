"""Box prompt helpers: mask -> box, jitter, per-object boxes, scaling, key slice and 3D propagation order/stopping."""
from __future__ import annotations

import numpy as np
import pytest

from samplan.prompts.boxes import (box_area, box_from_mask, clip_box, full_image_box, jitter_box, key_slice,
                                   object_boxes, object_masks, pad_box, propagate, propagation_order, scale_box,
                                   union_box)


def test_box_from_mask_is_inclusive_xy_and_none_when_empty():
    m = np.zeros((10, 12), bool)
    assert box_from_mask(m) is None
    m[3, 7] = True
    assert box_from_mask(m).tolist() == [7, 3, 7, 3]  # x = column, y = row
    m[5:9, 2:4] = True
    assert box_from_mask(m).tolist() == [2, 3, 7, 8]
    assert box_area(box_from_mask(m)) == 6 * 6 and box_area(None) == 0
    assert full_image_box((10, 12)).tolist() == [0, 0, 11, 9]


def test_outward_jitter_stays_in_bounds_contains_the_object_and_moves_at_most_max():
    rng = np.random.default_rng(0)
    shape = (100, 120)
    box = np.array([5.0, 40.0, 60.0, 90.0])
    moved = np.zeros(4, bool)
    for _ in range(300):
        j = jitter_box(box, 20, shape, rng, outward_only=True)
        assert 0 <= j[0] <= box[0] and 0 <= j[1] <= box[1]
        assert box[2] <= j[2] <= shape[1] - 1 and box[3] <= j[3] <= shape[0] - 1
        assert np.all(np.abs(j - box) <= 20)
        moved |= j != box
    assert moved.all()  # every side does move sometimes
    # near the border the clipped box still contains the object
    edge = np.array([0.0, 0.0, 119.0, 99.0])
    assert np.array_equal(jitter_box(edge, 20, shape, rng, True), edge)


def test_two_sided_jitter_keeps_a_valid_box_inside_the_image():
    rng = np.random.default_rng(1)
    box = np.array([10.0, 10.0, 12.0, 11.0])
    shrunk = False
    for _ in range(300):
        j = jitter_box(box, 5, (30, 30), rng, outward_only=False)
        assert j[0] <= j[2] and j[1] <= j[3]
        assert j.min() >= 0 and j[[0, 2]].max() <= 29 and j[[1, 3]].max() <= 29
        shrunk |= j[0] > box[0] or j[2] < box[2]
    assert shrunk


def test_object_boxes_one_per_8_connected_component_largest_first():
    m = np.zeros((20, 20), bool)
    m[1:3, 1:3] = True                  # 4 px
    m[10:15, 5:12] = True               # 35 px
    m[3, 3] = True                      # diagonal neighbour of the first square: same object (8-connected)
    boxes = object_boxes(m)
    assert [b.tolist() for b in boxes] == [[5, 10, 11, 14], [1, 1, 3, 3]]
    masks = object_masks(m)
    assert [int(x.sum()) for x in masks] == [35, 5]
    assert object_boxes(np.zeros((4, 4))) == []


def test_scale_pad_clip_union():
    # pixel centres: pixel 0 of a 2x upscaled image spans 0..1, centre 0.5 -> 0.5 * 2 - 0.5
    assert scale_box(np.array([0, 0, 9, 4]), 2.0).tolist() == [0.5, 0.5, 18.5, 8.5]
    assert pad_box(np.array([2, 3, 5, 6]), 4, (8, 7)).tolist() == [0, 0, 6, 7]
    assert clip_box(np.array([-3, 2, 50, 1]), (10, 10)).tolist() == [0, 2, 9, 2]
    assert union_box(None, None) is None
    assert union_box(np.array([1, 2, 3, 4]), None).tolist() == [1, 2, 3, 4]
    assert union_box(np.array([1, 5, 3, 6]), np.array([2, 2, 8, 4])).tolist() == [1, 2, 8, 6]


def test_key_slice_is_the_largest_box_first_on_ties():
    b = np.array([0.0, 0.0, 2.0, 2.0])
    assert key_slice([None, b, b * 2, b * 2, None]) == 2
    assert key_slice([None, None]) is None
    assert key_slice([]) is None


def test_propagation_order_goes_up_then_down_from_the_key():
    assert list(propagation_order(5, 2)) == [(3, 2), (4, 3), (1, 2), (0, 1)]
    assert list(propagation_order(3, 0)) == [(1, 0), (2, 1)]
    assert list(propagation_order(1, 0)) == []


def test_propagate_prompts_each_slice_with_the_previous_prediction_and_stops_at_an_empty_one():
    n, shape = 9, (20, 20)
    objects = {z: (2 + z, 3, 6 + z, 8) for z in range(2, 6)}  # x0, y0, x1, y1 per slice (drifting right)
    objects[8] = (1, 1, 3, 3)  # unreachable: slice 6 and 7 are empty
    calls = []

    def predict_slice(z, box):
        calls.append((z, np.asarray(box).tolist()))
        m = np.zeros(shape, bool)
        if z in objects:
            x0, y0, x1, y1 = objects[z]
            m[y0:y1 + 1, x0:x1 + 1] = True
        return m

    out = propagate(n, 3, np.array([5.0, 3.0, 9.0, 8.0]), predict_slice)
    assert [z for z, _ in calls] == [3, 4, 5, 6, 2, 1]  # up until 6 (empty), then down until 1 (empty)
    assert calls[0][1] == [5, 3, 9, 8]                   # the key slice gets the given box
    assert calls[1][1] == [5, 3, 9, 8]                   # slice 4 gets the box of slice 3's prediction
    assert calls[2][1] == [6, 3, 10, 8]                  # ... and slice 5 the one of slice 4's
    assert calls[4][1] == [5, 3, 9, 8]                   # down: slice 2 from slice 3
    assert sorted(out) == [1, 2, 3, 4, 5, 6] and not out[6].any() and 8 not in out


@pytest.mark.parametrize("key", [0, 4])
def test_propagate_at_the_volume_ends(key):
    calls = []

    def predict_slice(z, box):
        calls.append(z)
        return np.ones((4, 4), bool)

    propagate(5, key, np.array([0.0, 0.0, 3.0, 3.0]), predict_slice)
    assert sorted(calls) == list(range(5)) and calls[0] == key


def test_propagation_margin_keeps_an_undersegmenting_model_from_shrinking_to_nothing():
    """A model that answers each box with the object inside it minus a 1-px rim (as a box-trained SAM does with
    tight boxes) loses 2 px of box per slice without a margin; a 2-px margin keeps the full object on every slice."""
    n, shape = 12, (40, 40)
    obj = np.zeros((n, *shape), bool)
    obj[:, 10:30, 10:30] = True

    def predict_slice(z, box):
        x0, y0, x1, y1 = (int(round(v)) for v in box)
        m = np.zeros(shape, bool)
        m[y0 + 1:y1, x0 + 1:x1] = True  # inclusive box minus one pixel on every side
        return m & obj[z]

    key_box = np.array([9.0, 9.0, 30.0, 30.0])
    tight = propagate(n, 0, key_box, predict_slice)
    grown = propagate(n, 0, key_box, predict_slice, margin=2.0)
    assert [int(tight[z].sum()) for z in range(4)] == [400, 324, 256, 196]  # 2 px narrower per slice
    assert not tight[10].any() and 11 not in tight  # shrank to nothing and stopped
    assert all(np.array_equal(grown[z], obj[z]) for z in range(n))
