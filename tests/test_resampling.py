"""Resampling: new shapes, values against skimage's resize, the separate out-of-plane axis, label maps."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage
from skimage.transform import resize

from samplan.preprocessing.resampling import (
    compute_new_shape,
    resample,
    resample_probabilities,
    resample_to_spacing,
    separate_z_axis,
)


def _smooth(shape, seed=0, channels=1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack([ndimage.gaussian_filter(rng.normal(size=shape), 2.0) * 100 for _ in range(channels)]).astype(np.float32)


def _labels(shape, seed=0) -> np.ndarray:
    """(1, Z, Y, X) int8 map with an outside region (-1), background, and three blobs of different sizes."""
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    seg = np.zeros(shape, np.int8)
    seg[x + y > 1.2] = -1
    seg[(x**2 + y**2 + z**2) < 0.4] = 1
    seg[((x - 0.2) ** 2 + (y + 0.3) ** 2 + z**2) < 0.08] = 2
    noise = ndimage.gaussian_filter(rng.normal(size=shape), 1.5)
    seg[(noise > 0.12) & (seg == 0)] = 3
    return seg[None]


def test_compute_new_shape_rounds_per_axis():
    assert compute_new_shape((100, 200, 51), (1, 1, 1), (2, 2, 2)) == [50, 100, 26]
    assert compute_new_shape((20, 64, 64), (5.0, 0.7, 0.7), (5.0, 1.4, 1.0)) == [20, 32, 45]
    assert compute_new_shape((1, 300, 200), (999, 1, 1), (999, 0.5, 2)) == [1, 600, 100]
    with pytest.raises(ValueError):
        compute_new_shape((10, 10), (1, 1, 1), (1, 1, 1))


def test_separate_axis_rule():
    assert separate_z_axis((3.0, 0.8, 0.8), (3.0, 0.8, 0.8)) == 0
    assert separate_z_axis((1, 1, 1), (1, 1, 1)) is None
    assert separate_z_axis((1, 1, 1), (1, 4, 1)) == 1  # only the target is anisotropic
    assert separate_z_axis((4, 4, 1), (4, 4, 1)) is None  # two coarse axes: no separate axis
    assert separate_z_axis((1, 1, 1.5), (1, 1, 1.5), force_separate_z=True) == 2
    assert separate_z_axis((5, 1, 1), (5, 1, 1), force_separate_z=False) is None
    assert separate_z_axis((999, 1, 1), (999, 0.5, 0.5)) == 0  # 2D images


def test_unchanged_shape_is_a_no_op():
    data = _smooth((6, 10, 12))
    assert resample(data, (6, 10, 12), (1, 1, 1), (1, 1, 1)) is data
    seg = _labels((6, 10, 12))
    assert resample(seg, (6, 10, 12), (1, 1, 1), (1, 1, 1), is_seg=True) is seg


@pytest.mark.parametrize("new_shape", [(13, 25, 27), (29, 46, 32)])
def test_isotropic_data_matches_skimage_cubic_resize(new_shape):
    data = _smooth((20, 37, 41), channels=2)
    out = resample(data, new_shape, (1, 1, 1), (1, 1, 1), order=3)
    assert out.shape == (2, *new_shape) and out.dtype == np.float32
    for c in range(2):
        ref = resize(data[c].astype(float), new_shape, order=3, mode="edge", anti_aliasing=False)
        np.testing.assert_allclose(out[c], ref, atol=1e-4 * np.abs(ref).max())
        assert out[c].min() >= data[c].min() and out[c].max() <= data[c].max()  # clipped to the input range


def test_downsample_then_upsample_round_trip_stays_close():
    data = _smooth((24, 48, 40))
    down = resample_to_spacing(data, (1, 1, 1), (1.5, 1.5, 1.5))
    assert down.shape == (1, 16, 32, 27)
    up = resample(down, data.shape[1:], (1.5, 1.5, 1.5), (1, 1, 1))
    err = np.abs(up - data)[:, 2:-2, 2:-2, 2:-2]  # borders see the edge extension
    assert err.mean() < 0.02 * np.abs(data).max()


def test_anisotropic_axis_uses_nearest_slices():
    data = _smooth((5, 32, 30), channels=2)
    # 4 mm slices to 2 mm: every output slice must be a copy of one input slice (order_z 0) ...
    out = resample(data, (10, 32, 30), (4, 1, 1), (2, 1, 1), order=3, order_z=0)
    for k in range(10):
        src = int(np.clip(np.floor((k + 0.5) * 0.5 - 0.5 + 0.5), 0, 4))
        np.testing.assert_array_equal(out[:, k], data[:, src])
    # ... while plain 3D cubic resampling makes new values between the slices
    cubic = resample(data, (10, 32, 30), (4, 1, 1), (2, 1, 1), order=3, force_separate_z=False)
    assert not np.allclose(cubic[:, 1], data[:, 0])
    # order_z 1 interpolates linearly between neighbouring slices
    lin = resample(data, (10, 32, 30), (4, 1, 1), (2, 1, 1), order=3, order_z=1)
    np.testing.assert_allclose(lin[:, 2], 0.75 * data[:, 1] + 0.25 * data[:, 0], rtol=1e-5, atol=1e-4)


def test_anisotropic_inplane_matches_slicewise_skimage():
    data = _smooth((6, 33, 29))
    out = resample(data, (6, 50, 44), (4, 1, 1), (4, 0.66, 0.66))
    for z in range(6):
        ref = resize(data[0, z].astype(float), (50, 44), order=3, mode="edge", anti_aliasing=False)
        np.testing.assert_allclose(out[0, z], ref, atol=1e-4 * np.abs(ref).max())


def _reference_scores(seg: np.ndarray, new_shape) -> tuple[np.ndarray, np.ndarray]:
    labels = np.unique(seg)
    scores = np.stack([resize((seg == v).astype(float), new_shape, order=1, mode="edge", anti_aliasing=False) for v in labels])
    return labels, scores


@pytest.mark.parametrize("cur,new", [((1, 1, 1), (1.4, 1.3, 0.9)), ((1, 1, 1), (2, 2, 2)), ((3.5, 1, 1), (3.5, 0.7, 1.6))])
def test_label_maps_take_the_best_interpolated_label(cur, new):
    seg = _labels((18, 40, 36))
    out = resample_to_spacing(seg, cur, new, is_seg=True, order=1)
    assert out.dtype == seg.dtype
    assert set(np.unique(out)) <= set(np.unique(seg))
    axis = separate_z_axis(cur, new)
    if axis is None:
        labels, scores = _reference_scores(seg[0], out.shape[1:])
        best = scores.max(0)
        chosen = scores[np.searchsorted(labels, out[0]), *np.indices(out.shape[1:])]
        # every voxel gets a label with the top score; only exact ties may differ from a plain argmax
        np.testing.assert_array_equal(chosen, best)
        differs = out[0] != labels[scores.argmax(0)]
        assert np.all(np.sort(scores, axis=0)[-2][differs] == best[differs])
    for v in (1, 2, 3):  # every structure survives with roughly its volume
        frac_in, frac_out = (seg == v).mean(), (out == v).mean()
        assert abs(frac_out - frac_in) < 0.25 * frac_in


def test_label_resampling_separate_axis_is_nearest_between_slices():
    seg = _labels((6, 30, 28))
    out = resample(seg, (12, 30, 28), (4, 1, 1), (2, 1, 1), is_seg=True, order=1, order_z=0)
    np.testing.assert_array_equal(out[0, ::2], seg[0])
    np.testing.assert_array_equal(out[0, 1::2], seg[0])


def test_label_resampling_separate_axis_with_order_z_1():
    seg = _labels((12, 30, 28))
    # 3x coarser slices: output slice i sits exactly on input slice 3i+1, whose labels it must take
    out = resample(seg, (4, 30, 28), (1.5, 0.4, 0.4), (4.5, 0.4, 0.4), is_seg=True, order=1, order_z=1)
    np.testing.assert_array_equal(out[0], seg[0, 1::3])
    up = resample(seg, (24, 30, 28), (4, 1, 1), (2, 1, 1), is_seg=True, order=1, order_z=1)
    assert set(np.unique(up)) <= set(np.unique(seg))


def test_label_on_skipped_slices_disappears_cleanly():
    seg = np.zeros((1, 9, 12, 12), np.int8)
    seg[0, 3:6, 2:10, 2:10] = 1
    seg[0, 3, 4:6, 4:6] = 2  # only on slice 3; downsampling 9 -> 3 samples slices 1, 4 and 7 exactly
    out = resample(seg, (3, 12, 12), (1, 1, 1), (3, 3, 3), is_seg=True, order=1)
    assert set(np.unique(out)) == {0, 1}
    np.testing.assert_array_equal(out[0], seg[0, 1::3])


def test_single_label_map_is_filled():
    seg = np.full((1, 4, 5, 6), 2, np.int16)
    out = resample(seg, (7, 3, 9), (1, 1, 1), (1, 1, 1), is_seg=True)
    assert out.dtype == np.int16 and np.all(out == 2)


def test_2d_images_resample_in_plane_only():
    data = _smooth((1, 30, 40), channels=3)
    out = resample_to_spacing(data, (999, 1, 1), (999, 0.5, 2))
    assert out.shape == (3, 1, 60, 20)
    ref = resize(data[1, 0].astype(float), (60, 20), order=3, mode="edge", anti_aliasing=False)
    np.testing.assert_allclose(out[1, 0], ref, atol=1e-4 * np.abs(ref).max())


def test_probabilities_from_torch_are_linear_and_stay_in_range():
    rng = np.random.default_rng(3)
    logits = torch.from_numpy(rng.normal(size=(3, 8, 12, 10)).astype(np.float32))
    probs = torch.softmax(logits, 0)
    out = resample_probabilities(probs, (12, 20, 15), (1.5, 1, 1), (1, 0.6, 0.66))
    assert isinstance(out, np.ndarray) and out.shape == (3, 12, 20, 15) and out.dtype == np.float32
    assert out.min() >= 0 and out.max() <= 1
    np.testing.assert_allclose(out.sum(0), 1.0, atol=1e-5)  # linear interpolation keeps the partition of unity
    ref = resize(probs[0].numpy().astype(float), (12, 20, 15), order=1, mode="edge", anti_aliasing=False)
    np.testing.assert_allclose(out[0], ref, atol=1e-5)
