"""Damage real image files the way disks, copies and exporters do (test tooling; also used by benchmarks/faults.py).

`make_clean(fmt, folder)` writes an undamaged file of one format from a real shared-data image; every function
in `DAMAGES` maps (src, dst) -> None, writing a damaged copy of `src` to `dst` (same ending; ValueError for
a format the damage does not apply to). `DETECTABLE` says for which formats a damage can be found at all:
raw (uncompressed) voxel data carry no checksum, so a flipped byte there is invisible to any check.
"""
from __future__ import annotations

import gzip
import re
import struct
import zlib
from pathlib import Path
from typing import Callable

import numpy as np
import SimpleITK as sitk
from PIL import Image

SHARED_RAW = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "raw"
VOLUME_SOURCE = SHARED_RAW / "Dataset004_Hippocampus" / "imagesTr" / "hippocampus_001_0000.nii.gz"
PICTURE_SOURCE = SHARED_RAW / "Dataset511_CVCClinicDB" / "imagesTr" / "seq01_frame001_0000.png"

# format name -> (file ending, compressed when written by SimpleITK)
_VOLUMES = {"nii.gz": (".nii.gz", True), "nii": (".nii", False), "mha": (".mha", False), "mha_zlib": (".mha", True),
            "nrrd": (".nrrd", False), "nrrd_gzip": (".nrrd", True), "gipl": (".gipl", False)}
_PICTURES = {"png": ".png", "jpg": ".jpg", "bmp": ".bmp", "tif": ".tif"}
FORMATS: list[str] = [*_VOLUMES, *_PICTURES]


def ending(fmt: str) -> str:
    """File ending of a format name in FORMATS."""
    return _VOLUMES[fmt][0] if fmt in _VOLUMES else _PICTURES[fmt]


def make_clean(fmt: str, folder: Path, stem: str = "img_0000") -> Path:
    """Write an undamaged `fmt` file made from a real shared-data image into `folder`; its path."""
    dst = Path(folder) / f"{stem}{ending(fmt)}"
    if fmt in _VOLUMES:
        src = sitk.ReadImage(str(VOLUME_SOURCE))
        # int16 so that a scaled NIfTI can overflow; geometry only, no NIfTI metadata into .mha/.nrrd headers
        img = sitk.GetImageFromArray(sitk.GetArrayFromImage(src).astype(np.int16) * 4)
        img.CopyInformation(src)
        sitk.WriteImage(img, str(dst), useCompression=_VOLUMES[fmt][1])
    elif fmt == "png":
        dst.write_bytes(PICTURE_SOURCE.read_bytes())
    else:
        with Image.open(PICTURE_SOURCE) as im:
            im.save(dst)
    return dst


# ---------------------------------------------------------------- helpers


def _is_gz(p: Path) -> bool:
    return p.name.lower().endswith(".gz")


def _plain(src: Path) -> bytes:
    """The file's bytes, gunzipped for .nii.gz (header edits are made on the plain bytes, then re-gzipped)."""
    return gzip.decompress(src.read_bytes()) if _is_gz(src) else src.read_bytes()


def _write_plain(dst: Path, data: bytes) -> None:
    dst.write_bytes(gzip.compress(data, compresslevel=1) if _is_gz(dst) else data)


def _header_length(data: bytes, name: str) -> int:
    """Bytes of the header (uncompressed formats; for .nii.gz of the file bytes before the deflate data)."""
    if name.endswith(".nii.gz"):
        return 40
    if name.endswith(".nii"):
        return 348
    if name.endswith(".mha"):
        return data.index(b"ElementDataFile = LOCAL") + 24
    if name.endswith(".nrrd"):
        return data.index(b"\n\n") + 2
    if name.endswith(".gipl"):
        return 256
    return {".png": 33, ".bmp": 54, ".tif": 140}.get(Path(name).suffix, 300)


def _cut(fraction: float | None = None, keep_header: float | None = None, drop: int = 0) -> Callable[[Path, Path], None]:
    def damage(src: Path, dst: Path) -> None:
        data = src.read_bytes()
        head = _header_length(data, src.name.lower())
        if keep_header is not None:
            n = int(head * keep_header)
        elif fraction is not None:
            n = head + int((len(data) - head) * fraction)
        else:
            n = len(data) - drop
        dst.write_bytes(data[:n])
    return damage


def _flip(where: str) -> Callable[[Path, Path], None]:
    def damage(src: Path, dst: Path) -> None:
        data = bytearray(src.read_bytes())
        at = {"header": 18 if src.suffix.lower() == ".png" else 20, "middle": len(data) // 2, "end": len(data) - 6}[where]
        data[at] ^= 0x5A
        dst.write_bytes(bytes(data))
    return damage


def _resize_header(delta: int) -> Callable[[Path, Path], None]:
    """The header announces one row more (delta=+1) or fewer (-1) than the data hold."""
    def damage(src: Path, dst: Path) -> None:
        data, name = bytearray(_plain(src)), src.name.lower()
        if ".nii" in name:
            data[42:44] = struct.pack("<h", struct.unpack("<h", data[42:44])[0] + delta)  # dim[1]
        elif name.endswith(".mha"):
            data = bytearray(re.sub(rb"DimSize = (\d+)", lambda m: b"DimSize = %d" % (int(m[1]) + delta), bytes(data), count=1))
        elif name.endswith(".nrrd"):
            data = bytearray(re.sub(rb"sizes: (\d+)", lambda m: b"sizes: %d" % (int(m[1]) + delta), bytes(data), count=1))
        elif name.endswith(".gipl"):
            data[0:2] = struct.pack(">H", struct.unpack(">H", data[0:2])[0] + delta)
        elif name.endswith(".png"):
            data[20:24] = struct.pack(">I", struct.unpack(">I", data[20:24])[0] + delta)  # IHDR height, with a valid CRC
            data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
        elif name.endswith(".bmp"):
            data[22:26] = struct.pack("<i", struct.unpack("<i", data[22:26])[0] + delta)
        else:
            raise ValueError(f"no header size edit for {src.name}")
        _write_plain(dst, bytes(data))
    return damage


def _non_finite(src: Path, dst: Path) -> None:
    """Float voxels with NaN and Inf, written by SimpleITK with the source's compression."""
    img = sitk.ReadImage(str(src))
    arr = sitk.GetArrayFromImage(img).astype(np.float32)
    arr[3, 10, 10:14] = np.nan
    arr[4, 0, 0] = np.inf
    out = sitk.GetImageFromArray(arr)
    out.CopyInformation(img)
    head = src.read_bytes()[:2000]
    compressed = _is_gz(src) or b"CompressedData = True" in head or b"encoding: gzip" in head
    sitk.WriteImage(out, str(dst), useCompression=compressed)


def _nifti_scaling(slope: float, inter: float) -> Callable[[Path, Path], None]:
    def damage(src: Path, dst: Path) -> None:
        data = bytearray(_plain(src))
        data[112:120] = struct.pack("<ff", slope, inter)  # scl_slope, scl_inter
        _write_plain(dst, bytes(data))
    return damage


DAMAGES: dict[str, Callable[[Path, Path], None]] = {
    "truncate_in_header": _cut(keep_header=0.5),
    "truncate_early": _cut(fraction=0.1),
    "truncate_middle": _cut(fraction=0.5),
    "truncate_late": _cut(fraction=0.97),
    "truncate_last_byte": _cut(drop=1),
    "flip_header_byte": _flip("header"),
    "flip_middle_byte": _flip("middle"),
    "flip_end_byte": _flip("end"),
    "header_more_voxels": _resize_header(+1),
    "header_fewer_voxels": _resize_header(-1),
    "nan_inf_values": _non_finite,
    "scaling_overflows": _nifti_scaling(1e37, 0.0),
    "scaling_bad_intercept": _nifti_scaling(2.0, float("inf")),
}

_ALL, _NIFTI = set(FORMATS), {"nii.gz", "nii"}
_CHECKSUMMED = {"nii.gz", "mha_zlib", "nrrd_gzip", "png"}
DETECTABLE: dict[str, set[str]] = {
    "truncate_in_header": _ALL,
    "truncate_early": _ALL,
    "truncate_middle": _ALL,
    "truncate_late": _ALL,
    "truncate_last_byte": _ALL,
    # the byte at offset 20 is the image width in BMP/TIFF (becoming absurd); elsewhere no check covers it
    "flip_header_byte": {"nii.gz", "png", "bmp", "tif"},
    "flip_middle_byte": _CHECKSUMMED,
    "flip_end_byte": _CHECKSUMMED,
    "header_more_voxels": _ALL - {"jpg", "tif"},
    "header_fewer_voxels": _ALL - {"jpg", "tif", "bmp"},  # BMP: bytes after the pixel data are allowed
    "nan_inf_values": set(_VOLUMES),
    "scaling_overflows": _NIFTI,
    "scaling_bad_intercept": _NIFTI,
}
