"""Point prompts: the lung-CT oracle (centroid, moved-inside rules, union-box negative) and point sampling."""
from __future__ import annotations

import numpy as np
import pytest

from samplan.prompts.points import (BOX_CENTRE, CENTROID, NEAREST, ROW_RUN, box_prompt, inside_point,
                                    oracle_prompts, sample_points)


def _at(mask: np.ndarray, point: np.ndarray) -> bool:
    """Whether the pixel containing point (x, y) is in the mask."""
    return bool(mask[int(np.floor(point[1] + 0.5)), int(np.floor(point[0] + 0.5))])


def test_two_labelled_blobs_give_centroids_and_a_negative_at_the_union_box_centre():
    seg = np.zeros((20, 30), np.int16)
    seg[2:6, 2:6] = 1      # centroid (x, y) = (3.5, 3.5)
    seg[10:14, 20:26] = 2  # centroid (22.5, 11.5)
    p = oracle_prompts(seg, [1, 2], with_box=True)
    assert p.oracle and p.points.dtype == np.float64 and p.points.shape == (3, 2)
    np.testing.assert_allclose(p.points, [[3.5, 3.5], [22.5, 11.5], [13.5, 7.5]])  # union box [2, 2, 25, 13]
    assert p.point_labels.tolist() == [1, 1, 0]
    assert p.point_sources == (CENTROID, CENTROID, BOX_CENTRE)
    assert p.box.tolist() == [2, 2, 25, 13]
    assert p.negative_inside_mask is False
    assert oracle_prompts(seg, [1, 2]).box is None  # box only on request
    # a label value absent from the slice gets no point
    only = oracle_prompts(seg, [2, 7])
    assert only.point_labels.tolist() == [1, 0] and only.points[0].tolist() == [22.5, 11.5]


def test_frame_whose_centroid_is_in_the_hole_moves_to_the_middle_of_the_longest_run():
    m = np.zeros((20, 20), bool)
    m[2:18, 2:18] = True
    m[4:16, 6:16] = False  # hole; left side 4 px thick (cols 2..5), other sides 2 px
    assert not _at(m, np.array([np.nonzero(m)[1].mean(), np.nonzero(m)[0].mean()]))
    point, source = inside_point(m)
    # row 10 through the centroid crosses cols 2..5 (4 px) and 16..17 (2 px); column crosses 2 px runs
    assert source == ROW_RUN and point.tolist() == [3.5, 10.0]
    seg = m.astype(np.int8)
    p = oracle_prompts(seg, [1])
    assert _at(m, p.points[0]) and p.point_labels.tolist() == [1, 0]
    assert p.negative_inside_mask is False  # the union box centre is in the hole


def test_ring_point_is_moved_inside():
    yy, xx = np.mgrid[:41, :41]
    r = np.hypot(yy - 20, xx - 20)
    ring = (r >= 8) & (r <= 10)
    point, source = inside_point(ring)
    assert source != CENTROID and _at(ring, point)


def test_diagonal_blobs_with_no_mask_on_the_centroid_row_or_column_fall_back_to_nearest_pixel():
    m = np.zeros((10, 10), bool)
    m[0:3, 0:3] = True
    m[7:10, 7:10] = True
    point, source = inside_point(m)
    assert source == NEAREST and point.tolist() == [2.0, 2.0]  # tie with (7, 7): first in row-major order


def test_mask_touching_the_border():
    m = np.zeros((10, 10), bool)
    m[:, 0] = True
    m[0, :] = True  # L along two borders, centroid (2.37, 2.37) off the mask
    point, source = inside_point(m)
    assert source == ROW_RUN and point.tolist() == [0.0, 2.0] and _at(m, point)
    edge = np.zeros((8, 8), np.int8)
    edge[5:8, 0:3] = 1
    p = oracle_prompts(edge, [1], with_box=True)
    assert p.points[0].tolist() == [1.0, 6.0] and p.box.tolist() == [0, 5, 2, 7]


def test_negative_point_inside_a_single_object_is_kept_and_recorded():
    seg = np.zeros((10, 10), np.uint8)
    seg[2:8, 2:8] = 3
    p = oracle_prompts(seg, [3])
    np.testing.assert_allclose(p.points, [[4.5, 4.5], [4.5, 4.5]])  # the paper's rule, regardless
    assert p.negative_inside_mask is True


def test_empty_slice_gives_empty_oracle_prompts():
    p = oracle_prompts(np.zeros((6, 7), np.int16), [1, 2], with_box=True)
    assert p.empty and p.points.shape == (0, 2) and p.point_labels.shape == (0,) and p.box is None and p.oracle
    with pytest.raises(ValueError):
        oracle_prompts(np.zeros((2, 6, 7), np.int16), [1])


def _blob() -> np.ndarray:
    m = np.zeros((40, 50), bool)
    m[10:20, 15:30] = True
    return m


@pytest.mark.parametrize("neg_region", ["box", "image"])
def test_sampled_points_counts_inside_outside_and_distinct(neg_region):
    m = _blob()
    p = sample_points(m, 6, 9, np.random.default_rng(0), neg_region=neg_region, margin=3)
    assert p.points.shape == (15, 2) and p.point_labels.tolist() == [1] * 6 + [0] * 9 and not p.oracle
    assert all(_at(m, q) for q in p.points[:6]) and not any(_at(m, q) for q in p.points[6:])
    assert len({tuple(q) for q in p.points}) == 15  # without replacement
    if neg_region == "box":  # tight box [15, 10, 29, 19] padded by 3
        assert np.all((p.points[6:, 0] >= 12) & (p.points[6:, 0] <= 32))
        assert np.all((p.points[6:, 1] >= 7) & (p.points[6:, 1] <= 22))


def test_image_negatives_reach_beyond_the_padded_box():
    p = sample_points(_blob(), 0, 200, np.random.default_rng(1), neg_region="image", margin=3)
    assert p.points.shape == (200, 2) and np.any(p.points[:, 1] > 22)


def test_sampling_is_reproducible_for_a_seed():
    m = _blob()
    a = sample_points(m, 4, 4, np.random.default_rng(7))
    b = sample_points(m, 4, 4, np.random.default_rng(7))
    c = sample_points(m, 4, 4, np.random.default_rng(8))
    assert np.array_equal(a.points, b.points) and not np.array_equal(a.points, c.points)


def test_sampling_small_and_empty_masks():
    tiny = np.zeros((10, 10), bool)
    tiny[4, 4:6] = True
    p = sample_points(tiny, 5, 0, np.random.default_rng(0))
    assert len(p.points) == 5 and {tuple(q) for q in p.points} == {(4.0, 4.0), (5.0, 4.0)}
    six = np.zeros((10, 10), bool)
    six[2:4, 5:8] = True
    exact = sample_points(six, 6, 0, np.random.default_rng(3))
    assert sorted(map(tuple, exact.points)) == [(x, y) for x in (5.0, 6.0, 7.0) for y in (2.0, 3.0)]
    e = sample_points(np.zeros((10, 10), bool), 3, 4, np.random.default_rng(0))
    assert e.point_labels.tolist() == [0] * 4  # no positives; negatives from the whole image
    full = sample_points(np.ones((5, 5), bool), 2, 3, np.random.default_rng(0))
    assert full.point_labels.tolist() == [1, 1]  # nothing outside the mask to sample
    with pytest.raises(ValueError):
        sample_points(tiny, 1, 1, np.random.default_rng(0), neg_region="ring")


def test_reference_box_prompts_tight_and_jittered():
    m = _blob()
    assert box_prompt(m).box.tolist() == [15, 10, 29, 19] and box_prompt(m).oracle
    j = box_prompt(m, max_shift=5, rng=np.random.default_rng(0))
    assert j.box[0] <= 15 and j.box[1] <= 10 and j.box[2] >= 29 and j.box[3] >= 19
    assert np.all(np.abs(j.box - [15, 10, 29, 19]) <= 5)
    assert box_prompt(np.zeros((4, 4), bool)).box is None
    with pytest.raises(ValueError):
        box_prompt(m, max_shift=5)
