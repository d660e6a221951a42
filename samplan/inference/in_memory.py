"""The in-memory API with geometry: SimpleITK images in, SimpleITK label maps out, as samplan_predict does for files.

`predict_sitk(predictor, image)` segments a `SimpleITK.Image` (or one image per channel) and returns the label map
with the input's size, spacing, origin and direction. `array_properties(spacing, origin, direction)` gives a numpy
array the same geometry, for `Predictor.predict_array(array, properties=...)` and `label_map_image`.

Images become arrays exactly as samplan.dataset.image_io reads files: numpy axis order `(C, Z, Y, X)`, spacing in
that order, a 2D image `(C, 1, Y, X)` with nnU-Net's large dummy spacing on the first axis, and properties["geometry"]
in SimpleITK's own order (x, y, z). tests/test_python_api.py checks that the two agree, voxel for voxel.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import SimpleITK as sitk

from samplan.dataset.image_io import sitk_image_case
from samplan.errors import DatasetError, InputError
from samplan.inference.input_checks import trained_on_2d

if TYPE_CHECKING:
    from samplan.inference.predictor import Predictor

Properties = dict[str, Any]


def image_case(images: sitk.Image | Sequence[sitk.Image]) -> tuple[np.ndarray, Properties]:
    """One image (or one per channel, on one grid) -> float32 `(C, Z, Y, X)` and the properties image_io gives for a
    file with this header; InputError for vector pixels, 4D images, NaN/Inf voxels or channels on different grids."""
    channels = [images] if isinstance(images, sitk.Image) else list(images)
    if not channels:
        raise InputError("no image given; pass a SimpleITK.Image or a list of them (one per channel).")
    first = channels[0]
    arrays, properties = [], None
    for i, image in enumerate(channels):
        if i and (image.GetSize() != first.GetSize() or not _same_grid(image, first)):
            raise InputError(f"channel {i}: size/spacing/origin/direction differ from channel 0; all channels of an "
                             "image must share one grid (resample them onto channel 0, e.g. sitk.Resample(image, "
                             "channel_0)).")
        try:  # the conversion files get, so that an image and its file give the same arrays and geometry
            arr, props = sitk_image_case(image, f"channel {i}: ", "")
        except DatasetError as e:
            raise InputError(f"{e} For vector images give one scalar image per channel "
                             "(sitk.VectorIndexSelectionCast(image, c) for each component c).") from None
        arrays.append(arr.astype(np.float32, copy=False))
        properties = properties or props
    data = np.concatenate(arrays)
    if not np.all(np.isfinite(data)):
        raise InputError(f"the image has {int(data.size - np.count_nonzero(np.isfinite(data)))} NaN/Inf voxel(s); "
                         "replace them with a finite value (e.g. the image minimum) first.")
    return data, properties


def _same_grid(a: sitk.Image, b: sitk.Image, tol: float = 1e-4) -> bool:
    """Same spacing, origin and direction (image_io's tolerance for the channel files of a case)."""
    return all(np.allclose(x, y, atol=tol, rtol=tol) for x, y in ((a.GetSpacing(), b.GetSpacing()),
                                                                  (a.GetOrigin(), b.GetOrigin()),
                                                                  (a.GetDirection(), b.GetDirection())))


def array_properties(spacing: Sequence[float], origin: Sequence[float] | None = None,
                     direction: Sequence[float] | None = None) -> Properties:
    """Properties of a 3D numpy image `(Z, Y, X)` or `(C, Z, Y, X)`: `spacing` in mm in that array order (as for
    `predict_array`), `origin` (x, y, z) and `direction` (9 values, row-major) as SimpleITK's GetOrigin() and
    GetDirection() give them (defaults: 0 and identity). InputError when they are not a valid geometry."""
    spacing_zyx = [float(s) for s in spacing]
    if len(spacing_zyx) != 3 or min(spacing_zyx) <= 0:
        raise InputError(f"spacing must be 3 positive values in array order (z, y, x), got {list(spacing)}.")
    probe = sitk.Image([1, 1, 1], sitk.sitkUInt8)  # SimpleITK validates the geometry as it would for a file
    try:
        probe.SetSpacing(spacing_zyx[::-1])
        if origin is not None:
            probe.SetOrigin([float(o) for o in origin])
        if direction is not None:
            probe.SetDirection([float(d) for d in direction])
    except (RuntimeError, TypeError, ValueError) as e:
        # ITK's message: the first line with "ERROR", without the object address and the matrices it repeats
        line = next((x for x in str(e).splitlines() if "ERROR" in x), str(e).strip().splitlines()[0])
        reason = line.split("ERROR:")[-1].split("): ")[-1].split(". Refusing")[0].strip()
        raise InputError(f"origin must be 3 values (x, y, z) and direction 9 values (a 3x3 matrix, row-major, as "
                         f"SimpleITK's GetDirection() gives it) of an invertible matrix; got origin {origin}, "
                         f"direction {direction} ({reason}).") from None
    return {"spacing": spacing_zyx, "geometry": sitk_image_case(probe)[1]["geometry"]}


def label_map_image(seg: np.ndarray, properties: Properties) -> sitk.Image:
    """A label map `(Z, Y, X)` (or `(1, Z, Y, X)`) -> SimpleITK image with the geometry of `properties`, in the pixel
    type samplan_predict writes (uint8 when the labels fit, else int16)."""
    geometry = properties["geometry"]
    seg = np.asarray(seg)
    if seg.ndim == 4 and seg.shape[0] == 1:
        seg = seg[0]
    dtype = np.uint8 if seg.min(initial=0) >= 0 and seg.max(initial=0) < 256 else np.int16
    image = sitk.GetImageFromArray((seg[0] if geometry["ndim"] == 2 else seg).astype(dtype, copy=False))
    image.SetSpacing(geometry["spacing"])
    image.SetOrigin(geometry["origin"])
    image.SetDirection(geometry["direction"])
    return image


def predict_sitk(predictor: "Predictor", image: sitk.Image | Sequence[sitk.Image],
                 return_probabilities: bool = False) -> sitk.Image | tuple[sitk.Image, np.ndarray]:
    """Segment a SimpleITK image (or one per channel, in the model's channel order) with a
    samplan.inference.predictor.Predictor; returns the label map as a SimpleITK image on the input's grid (size,
    spacing, origin, direction), and with `return_probabilities` also float16 probabilities `(K, Z, Y, X)`."""
    data, properties = image_case(image)
    spatial = data.shape[1:]  # (1, Y, X) for a 2D image; the message shows SimpleITK's (x, y[, z]) size
    size = "x".join(str(s) for s in reversed(spatial[1:] if spatial[0] == 1 else spatial))
    flat = min(spatial) == 1  # as samplan_predict's header check: a 2D image, or a volume one voxel thick
    trained_2d = trained_on_2d(predictor.plans)
    if flat and trained_2d is False:
        raise InputError(f"a 2D image of {size} pixels, but this model was trained on 3D volumes; give the whole "
                         "volume, or predict with a model trained on 2D images.")
    if not flat and trained_2d is True:
        raise InputError(f"a 3D volume of {size} voxels, but this model was trained on 2D images; give 2D images "
                         "(one slice each), or predict with a model trained on 3D volumes.")
    result = predictor.predict_array(data, properties=properties, return_probabilities=return_probabilities)
    if return_probabilities:
        return label_map_image(result[0], properties), result[1]
    return label_map_image(result, properties)

