"""Per-channel intensity normalisation schemes, named as in nnU-Net's plans.

Every scheme maps one channel `(Z, Y, X)` to float32 of the same shape. The label map that comes out of
cropping (`-1` outside the nonzero mask, see samplan.preprocessing.cropping) tells the mask-based
schemes where the body is: voxels with `seg >= 0` are inside.
"""
from __future__ import annotations

from typing import Callable, Mapping

import numpy as np

from samplan.errors import SamplanError

# guards against division by ~0 on constant images
_EPS = 1e-8

IntensityProperties = Mapping[str, float]  # one channel of fingerprint["foreground_intensity_properties_per_channel"]
Normalizer = Callable[[np.ndarray, "np.ndarray | None", bool, "IntensityProperties | None"], np.ndarray]


def ct_normalization(image: np.ndarray, seg: np.ndarray | None, use_mask: bool, props: IntensityProperties | None) -> np.ndarray:
    """Clip to the dataset's foreground 0.5/99.5 percentiles, then z-score with the foreground mean/std."""
    if props is None:
        raise SamplanError("CTNormalization needs the foreground intensity properties of the fingerprint (plans.json).")
    out = image.astype(np.float32, copy=True)
    np.clip(out, props["percentile_00_5"], props["percentile_99_5"], out=out)
    out -= props["mean"]
    out /= max(float(props["std"]), _EPS)
    return out


def zscore_normalization(image: np.ndarray, seg: np.ndarray | None, use_mask: bool, props: IntensityProperties | None) -> np.ndarray:
    """Per-image z-score; with `use_mask`, statistics and the change only inside `seg >= 0` (outside stays as is, i.e. 0)."""
    out = image.astype(np.float32, copy=True)
    if use_mask:
        if seg is None:
            raise SamplanError("ZScoreNormalization with use_mask_for_norm needs the nonzero mask (seg >= 0) from cropping.")
        mask = seg >= 0
        values = out[mask]  # one gather and one scatter; the statistics work in place on this copy
        out[mask] = _standardize(values)
        return out
    return _standardize(out)


def _standardize(x: np.ndarray) -> np.ndarray:
    """(x - mean) / std in place on a float32 array, statistics accumulated in float64 without float64 copies."""
    x -= x.mean(dtype=np.float64)
    flat = x.ravel(order="K")  # a view for any single-block layout
    std = float(np.sqrt(np.einsum("i,i->", flat, flat, dtype=np.float64) / max(x.size, 1)))
    x /= max(std, _EPS)
    return x


def no_normalization(image: np.ndarray, seg: np.ndarray | None, use_mask: bool, props: IntensityProperties | None) -> np.ndarray:
    """Only the cast to float32."""
    return image.astype(np.float32, copy=True)


def rescale_to_01_normalization(image: np.ndarray, seg: np.ndarray | None, use_mask: bool, props: IntensityProperties | None) -> np.ndarray:
    """Per-image min-max rescale to [0, 1]."""
    out = image.astype(np.float32, copy=True)
    out -= out.min()
    out /= max(float(out.max()), _EPS)
    return out


def rgb_to_01_normalization(image: np.ndarray, seg: np.ndarray | None, use_mask: bool, props: IntensityProperties | None) -> np.ndarray:
    """Divide 8-bit colour values by 255; values outside [0, 255] mean the channel is not 8-bit RGB."""
    lo, hi = float(image.min()), float(image.max())
    if lo < 0 or hi > 255:
        raise SamplanError(
            f"RGBTo01Normalization expects 8-bit values in [0, 255] but found [{lo}, {hi}]. "
            "Name the channel differently in dataset.json (e.g. 'zscore') to use another normalisation."
        )
    out = image.astype(np.float32, copy=True)
    out /= 255.0
    return out


NORMALIZATION_SCHEMES: dict[str, Normalizer] = {
    "CTNormalization": ct_normalization,
    "ZScoreNormalization": zscore_normalization,
    "NoNormalization": no_normalization,
    "RescaleTo01Normalization": rescale_to_01_normalization,
    "RGBTo01Normalization": rgb_to_01_normalization,
}

# dataset.json channel name (case-insensitive) -> scheme; every other name gets ZScoreNormalization (nnU-Net's rule)
_CHANNEL_NAME_TO_SCHEME = {
    "ct": "CTNormalization",
    "nonorm": "NoNormalization",
    "zscore": "ZScoreNormalization",
    "rescale_to_0_1": "RescaleTo01Normalization",
    "rgb_to_0_1": "RGBTo01Normalization",
}


def scheme_for_channel_name(channel_name: str) -> str:
    """Normalisation scheme name for a dataset.json channel name (CT -> CTNormalization, unknown -> ZScore)."""
    return _CHANNEL_NAME_TO_SCHEME.get(channel_name.casefold(), "ZScoreNormalization")


def normalize_channel(
    image: np.ndarray,
    scheme: str,
    seg: np.ndarray | None = None,
    use_mask_for_norm: bool = False,
    intensity_properties: IntensityProperties | None = None,
) -> np.ndarray:
    """Normalise one channel `(Z, Y, X)` with the named scheme -> new float32 array (the input is not modified).

    `seg` is the cropped label map of the same shape (`-1` outside the nonzero mask).
    """
    fn = NORMALIZATION_SCHEMES.get(scheme)
    if fn is None:
        raise SamplanError(
            f"unknown normalisation scheme '{scheme}' in plans.json. Known: {', '.join(NORMALIZATION_SCHEMES)}."
        )
    return fn(image, seg, bool(use_mask_for_norm), intensity_properties)


def normalize(
    data: np.ndarray,
    seg: np.ndarray | None,
    schemes: list[str],
    use_mask_for_norm: list[bool],
    intensity_properties: Mapping[str, IntensityProperties] | None,
) -> np.ndarray:
    """Normalise `(C, Z, Y, X)` data channel by channel -> float32 `(C, Z, Y, X)`.

    `seg` is `(1, Z, Y, X)` (or None when no scheme uses the mask); `intensity_properties` is keyed by the
    channel index as a string ("0", "1", ...), as in the fingerprint.
    """
    if len(schemes) != data.shape[0] or len(use_mask_for_norm) != data.shape[0]:
        raise SamplanError(
            f"the plan lists {len(schemes)} normalisation scheme(s) and {len(use_mask_for_norm)} use_mask_for_norm "
            f"flag(s) but the image has {data.shape[0]} channel(s); re-run planning for this dataset."
        )
    out = np.empty(data.shape, dtype=np.float32)
    mask_seg = None if seg is None else seg[0]
    for c in range(data.shape[0]):
        props = None if intensity_properties is None else intensity_properties.get(str(c))
        out[c] = normalize_channel(data[c], schemes[c], mask_seg, use_mask_for_norm[c], props)
    return out
