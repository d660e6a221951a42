"""Image readers and writers chosen by file ending.

Arrays crossing this boundary are channel-first `(C, Z, Y, X)` in numpy (SimpleITK) axis order, and
`properties["spacing"]` is given in that same order (mm). 2D images become `(C, 1, Y, X)` with a
large dummy spacing on the first axis, as nnU-Net does, so 2D and 3D share one code path.
`properties` is plain JSON: everything needed to write a label map back with the input's geometry.
Every read first runs `integrity.file_problems` (the libraries read truncated or corrupted files silently) and
refuses images above the size limits (SAMPLAN_MAX_IMAGE_BYTES / SAMPLAN_MAX_IMAGE_PIXELS) before allocating them.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import SimpleITK as sitk
from PIL import Image

from samplan.dataset.integrity import MAX_PIXELS_ENV, file_problems, max_image_pixels, too_large
from samplan.dataset.integrity_natural import pil_pixel_limit
from samplan.errors import DatasetError

SITK_ENDINGS = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".nhdr", ".gipl")
NATURAL_ENDINGS = (".png", ".bmp", ".tif", ".tiff", ".jpg", ".jpeg")
SUPPORTED_ENDINGS = SITK_ENDINGS + NATURAL_ENDINGS
# nnU-Net's convention for the dummy out-of-plane spacing of 2D images
_DUMMY_2D_FACTOR = 999.0

Properties = dict[str, Any]


def _kind(path: str | Path) -> str:
    """'sitk' or 'natural' from the file name; DatasetError for anything else."""
    name = str(path).lower()
    if name.endswith(SITK_ENDINGS):
        return "sitk"
    if name.endswith(NATURAL_ENDINGS):
        return "natural"
    raise DatasetError(
        f"{path}: unsupported file ending. Supported: {', '.join(SUPPORTED_ENDINGS)}. "
        "Set `file_ending` in dataset.json to one of them and convert the files."
    )


def _read_sitk(path: Path) -> tuple[np.ndarray, Properties]:
    """One SimpleITK file -> (C, Z, Y, X) array and geometry."""
    try:
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        reader.ReadImageInformation()
        # refuse an absurd header before ITK allocates it: a damaged or hostile file must not exhaust memory
        one_voxel = sitk.Image([1] * reader.GetDimension(), reader.GetPixelID(), reader.GetNumberOfComponents())
        if msg := too_large(int(np.prod(reader.GetSize(), dtype=np.int64)) * sitk.GetArrayViewFromImage(one_voxel).nbytes,
                            "its header"):
            raise DatasetError(f"{path}: {msg}")
        img = reader.Execute()
    except RuntimeError as e:
        raise DatasetError(f"{path}: cannot be read by SimpleITK ({str(e).strip().splitlines()[-1]}).") from e
    return sitk_image_case(img, f"{path}: ", f"in a {path.suffix} file ")


def sitk_image_case(img: sitk.Image, where: str = "", container: str = "") -> tuple[np.ndarray, Properties]:
    """A SimpleITK image -> `(1, Z, Y, X)` array in its own pixel type and properties, as files are read: a 2D image is
    `(1, 1, Y, X)` with nnU-Net's dummy spacing on the first axis; DatasetError (prefixed `where`) for vector pixels
    or more than 3 dimensions. Used for files and for in-memory images alike (samplan.inference.in_memory)."""
    arr = sitk.GetArrayFromImage(img)
    spacing = list(img.GetSpacing())
    if img.GetNumberOfComponentsPerPixel() > 1:
        raise DatasetError(f"{where}vector/RGB pixels {container}are not supported; store one channel per file.")
    if arr.ndim == 2:
        arr = arr[None, None]
        nn_spacing = [max(spacing) * _DUMMY_2D_FACTOR, *spacing[::-1]]
    elif arr.ndim == 3:
        arr = arr[None]
        nn_spacing = spacing[::-1]
    else:
        raise DatasetError(f"{where}{arr.ndim}D images are not supported (expected 2D or 3D, one channel per file).")
    props = {
        "spacing": [abs(float(s)) for s in nn_spacing],
        "geometry": {
            "kind": "sitk",
            "spacing": spacing,
            "origin": list(img.GetOrigin()),
            "direction": list(img.GetDirection()),
            "ndim": img.GetDimension(),
        },
    }
    return arr, props


def _read_natural(path: Path, label: bool = False) -> tuple[np.ndarray, Properties]:
    """One 2D natural image (PNG, ...) -> (C, 1, Y, X): RGB keeps 3 channels, grey gives 1, alpha is dropped."""
    limit = max_image_pixels()
    try:
        with pil_pixel_limit(limit):  # PIL's own bomb check, with samplan's limit
            im = Image.open(path)
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        raise DatasetError(f"{path}: image is larger than the limit of {limit} pixels, a damaged header or a decompression "
                           f"bomb ({e}). If it really is that large, set {MAX_PIXELS_ENV} higher.") from e
    except (OSError, ValueError) as e:
        raise DatasetError(f"{path}: cannot be read as an image ({e}).") from e
    try:
        with im:
            im.load()
            mode = im.mode
            # palette masks (VOC style) stay as they are: their pixel values are the label indices, not the colours
            if mode in ("RGBA", "LA") or (mode == "P" and not label):
                im = im.convert("RGB" if mode != "LA" else "L")
            elif mode == "I;16":
                im = im.convert("I")
            arr = np.asarray(im)
    except (OSError, ValueError) as e:
        raise DatasetError(f"{path}: cannot be read as an image ({e}).") from e
    arr = arr.transpose(2, 0, 1)[:, None] if arr.ndim == 3 else arr[None, None]
    return arr, {"spacing": [_DUMMY_2D_FACTOR, 1.0, 1.0], "geometry": {"kind": "natural", "shape": list(arr.shape[2:])}}


def _read_one(path: str | Path, label: bool = False, check: bool = True) -> tuple[np.ndarray, Properties]:
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path} does not exist.")
    kind = _kind(path)
    # the readers accept truncated or corrupted files silently, so check the bytes first (verify does it itself)
    if check and (problems := file_problems(path)):
        raise DatasetError(" Also: ".join(problems))
    return _read_sitk(path) if kind == "sitk" else _read_natural(path, label)


def _same_geometry(a: Properties, b: Properties, tol: float = 1e-4) -> bool:
    """True when two properties describe the same voxel grid (spacing, origin, direction)."""
    ga, gb = a["geometry"], b["geometry"]
    if ga["kind"] != gb["kind"]:
        return False
    if ga["kind"] == "natural":
        return ga["shape"] == gb["shape"]
    return all(np.allclose(ga[k], gb[k], atol=tol, rtol=tol) for k in ("spacing", "origin", "direction"))


def read_images(files: Sequence[str | Path], check: bool = True) -> tuple[np.ndarray, Properties]:
    """Read all channel files of one case -> float32 `(C, Z, Y, X)` and properties; geometry must agree.

    `check=False` skips the damage check (`integrity.file_problems`) for callers that ran it already.
    """
    arrays, props = [], None
    for f in files:
        arr, p = _read_one(f, check=check)
        if props is None:
            props = p
        elif arr.shape[1:] != arrays[0].shape[1:]:
            raise DatasetError(f"{f}: shape {arr.shape[1:]} differs from {files[0]} {arrays[0].shape[1:]}; all channels of a case must share one grid.")
        elif not _same_geometry(props, p):
            raise DatasetError(f"{f}: spacing/origin/direction differ from {files[0]}; resample all channels onto one grid.")
        arrays.append(arr)
    if props is None:
        raise DatasetError("read_images called with no files")
    return np.vstack(arrays).astype(np.float32, copy=False), props


def read_seg(file: str | Path, check: bool = True) -> tuple[np.ndarray, Properties]:
    """Read a label map -> integer `(1, Z, Y, X)` array and properties (`check` as in `read_images`)."""
    arr, props = _read_one(file, label=True, check=check)
    if arr.shape[0] != 1:
        # RGB-saved masks: every channel must carry the same label values
        if not all(np.array_equal(arr[0], arr[c]) for c in range(1, arr.shape[0])):
            raise DatasetError(f"{file}: label image has {arr.shape[0]} differing channels; save labels as a single-channel (grey) image.")
        arr = arr[:1]
    if np.issubdtype(arr.dtype, np.floating):
        if not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
            raise DatasetError(f"{file}: label map has non-integer or NaN/Inf values; labels must be integers.")
    lo, hi = int(arr.min(initial=0)), int(arr.max(initial=0))
    # the smallest type that holds every value: a silent wrap (65535 -> -1) would hide a wrong mask
    dtype = np.int8 if -128 <= lo and hi <= 127 else np.int16 if -32768 <= lo and hi <= 32767 else np.int32
    return arr.astype(dtype), props


def write_seg(seg: np.ndarray, path: str | Path, properties: Properties) -> None:
    """Write a `(Z, Y, X)` label map with the geometry of `properties` (atomic: temp file then rename)."""
    from samplan.utils import atomic_path

    path = Path(path)
    geom = properties["geometry"]
    seg = np.asarray(seg)
    if seg.ndim == 4 and seg.shape[0] == 1:
        seg = seg[0]
    dtype = np.uint8 if seg.min(initial=0) >= 0 and seg.max(initial=0) < 256 else np.int16
    with atomic_path(path) as tmp:
        if geom["kind"] == "natural":
            Image.fromarray(seg[0].astype(np.uint8 if dtype == np.uint8 else np.uint16)).save(tmp, format=_pil_format(path))
            return
        arr = seg[0] if geom["ndim"] == 2 else seg
        img = sitk.GetImageFromArray(arr.astype(dtype, copy=False))
        img.SetSpacing(geom["spacing"])
        img.SetOrigin(geom["origin"])
        img.SetDirection(geom["direction"])
        sitk.WriteImage(img, str(tmp), useCompression=True)


def _pil_format(path: Path) -> str:
    """PIL format name from a file ending (the temporary file's suffix is not reliable)."""
    ext = path.name.lower().rsplit(".", 1)[-1]
    return {"jpg": "JPEG", "jpeg": "JPEG", "tif": "TIFF", "tiff": "TIFF"}.get(ext, ext.upper())
