"""Normalisation schemes on hand-made arrays."""
from __future__ import annotations

import numpy as np
import pytest

from samplan.errors import SamplanError
from samplan.preprocessing.normalization import (
    NORMALIZATION_SCHEMES,
    normalize,
    normalize_channel,
    scheme_for_channel_name,
)

CT_PROPS = {"mean": 40.0, "std": 80.0, "percentile_00_5": -100.0, "percentile_99_5": 300.0, "median": 35.0,
            "min": -1024.0, "max": 3000.0}


def _body_image(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """An MR-like channel (Z, Y, X) with a zero background and the matching cropped label map (-1 outside)."""
    img = np.zeros((6, 20, 24), dtype=np.float32)
    img[1:5, 4:16, 5:20] = rng.normal(300, 50, (4, 12, 15))
    seg = np.where(img != 0, 0, -1).astype(np.int8)
    seg[2:4, 6:10, 8:12] = 1
    return img, seg


def test_ct_clips_to_percentiles_then_zscores_with_foreground_stats():
    img = np.array([[[-1024.0, -100.0, 0.0, 40.0, 300.0, 2000.0]]], dtype=np.int16)
    out = normalize_channel(img, "CTNormalization", intensity_properties=CT_PROPS)
    assert out.dtype == np.float32 and out.shape == img.shape
    lo = (CT_PROPS["percentile_00_5"] - CT_PROPS["mean"]) / CT_PROPS["std"]
    hi = (CT_PROPS["percentile_99_5"] - CT_PROPS["mean"]) / CT_PROPS["std"]
    np.testing.assert_allclose(out[0, 0, [0, 1]], lo, rtol=1e-6)  # -1024 clipped up to the 0.5 percentile
    np.testing.assert_allclose(out[0, 0, [4, 5]], hi, rtol=1e-6)  # 2000 clipped down to the 99.5 percentile
    assert out[0, 0, 3] == pytest.approx(0.0, abs=1e-6)  # the foreground mean maps to 0
    assert out[0, 0, 2] == pytest.approx(-40.0 / 80.0)


def test_ct_requires_intensity_properties():
    with pytest.raises(SamplanError, match="intensity properties"):
        normalize_channel(np.zeros((1, 2, 2)), "CTNormalization")


def test_zscore_with_mask_uses_inside_stats_and_leaves_outside_zero():
    img, seg = _body_image(np.random.default_rng(0))
    out = normalize_channel(img, "ZScoreNormalization", seg=seg, use_mask_for_norm=True)
    inside = seg >= 0
    assert np.all(out[~inside] == 0)
    assert out[inside].mean() == pytest.approx(0.0, abs=1e-5)
    assert out[inside].std() == pytest.approx(1.0, abs=1e-4)
    # the statistics ignore the outside: a whole-image z-score would put the outside far from zero
    whole = normalize_channel(img, "ZScoreNormalization", seg=seg, use_mask_for_norm=False)
    assert whole.mean() == pytest.approx(0.0, abs=1e-5) and np.all(whole[~inside] < -0.5)


def test_zscore_mask_without_seg_is_an_error():
    with pytest.raises(SamplanError, match="nonzero mask"):
        normalize_channel(np.ones((2, 2, 2)), "ZScoreNormalization", seg=None, use_mask_for_norm=True)


def test_constant_image_does_not_divide_by_zero():
    out = normalize_channel(np.full((2, 3, 3), 7.0), "ZScoreNormalization")
    assert np.all(np.isfinite(out)) and np.all(out == 0)


def test_no_rescale_and_rgb_schemes():
    rng = np.random.default_rng(1)
    img = rng.integers(3, 250, (1, 8, 9)).astype(np.uint8)
    np.testing.assert_array_equal(normalize_channel(img, "NoNormalization"), img.astype(np.float32))
    r = normalize_channel(img, "RescaleTo01Normalization")
    assert r.min() == 0.0 and r.max() == pytest.approx(1.0)
    rgb = normalize_channel(img, "RGBTo01Normalization")
    np.testing.assert_allclose(rgb, img / 255.0, rtol=1e-6)
    with pytest.raises(SamplanError, match=r"\[0, 255\]"):
        normalize_channel(img.astype(np.float32) * 2, "RGBTo01Normalization")


def test_unknown_scheme_names_the_known_ones():
    with pytest.raises(SamplanError, match="ZScoreNormalization"):
        normalize_channel(np.zeros((1, 1, 1)), "MinMaxMagic")


def test_channel_name_mapping_is_case_insensitive_with_zscore_default():
    assert scheme_for_channel_name("CT") == "CTNormalization"
    assert scheme_for_channel_name("ct") == "CTNormalization"
    assert scheme_for_channel_name("rgb_to_0_1") == "RGBTo01Normalization"
    assert scheme_for_channel_name("noNorm") == "NoNormalization"
    assert scheme_for_channel_name("T2") == "ZScoreNormalization"
    assert set(NORMALIZATION_SCHEMES) >= {"CTNormalization", "RescaleTo01Normalization"}


def test_normalize_runs_each_channel_with_its_own_scheme_and_keeps_input():
    rng = np.random.default_rng(2)
    img, seg = _body_image(rng)
    ct = rng.normal(100, 200, img.shape).astype(np.float32)
    data = np.stack([img, ct])
    before = data.copy()
    out = normalize(data, seg[None], ["ZScoreNormalization", "CTNormalization"], [True, False], {"1": CT_PROPS})
    np.testing.assert_array_equal(data, before)
    np.testing.assert_array_equal(out[0], normalize_channel(img, "ZScoreNormalization", seg, True))
    np.testing.assert_array_equal(out[1], normalize_channel(ct, "CTNormalization", None, False, CT_PROPS))
    with pytest.raises(SamplanError, match="channel"):
        normalize(data, seg[None], ["ZScoreNormalization"], [True], None)
