"""Find damaged image files that the reading libraries accept without complaint.

SimpleITK reads a truncated .nii.gz, .nii or .gipl as a full volume (the missing part is garbage or zeros), turns
NaN in a NIfTI file into 0, ignores the zlib checksum of a compressed .mha, and ignores the gzip checksum of an
.nrrd; PIL decodes a PNG whose last chunks are gone. `file_problems` finds these in one streaming pass over the
bytes (memory stays bounded by one chunk): it checks gzip/zlib checksums and stream ends, compares the data size
the header announces with what the file holds, looks for NaN/Inf in float data and for scaling that overflows,
and walks the PNG chunks. Raw (uncompressed) data carries no checksum, so a flipped byte there stays invisible.
"""
from __future__ import annotations

import bz2
import io
import os
import struct
import zlib
from pathlib import Path
from typing import Callable, Iterable, Iterator

import nibabel as nib
import numpy as np

from samplan.dataset.integrity_natural import natural_problems

CHUNK = 1 << 20
# limits against decompression bombs and absurd headers; raise them with these environment variables
MAX_BYTES_ENV, MAX_PIXELS_ENV = "SAMPLAN_MAX_IMAGE_BYTES", "SAMPLAN_MAX_IMAGE_PIXELS"
DEFAULT_MAX_BYTES = 8 << 30
DEFAULT_MAX_PIXELS = 1 << 28
REEXPORT = "Copy it again from the source, or re-export it from the scanner/software that made it."
_F32_MAX = float(np.finfo(np.float32).max)


class Damage(Exception):
    """One problem found while scanning a file (internal: turned into a message by `file_problems`)."""


def max_image_bytes() -> int:
    """Largest uncompressed image (bytes) samplan reads; env SAMPLAN_MAX_IMAGE_BYTES raises it."""
    return int(os.environ.get(MAX_BYTES_ENV, DEFAULT_MAX_BYTES))


def max_image_pixels() -> int:
    """Largest 2D image (pixels) samplan reads; env SAMPLAN_MAX_IMAGE_PIXELS raises it."""
    return int(os.environ.get(MAX_PIXELS_ENV, DEFAULT_MAX_PIXELS))


def too_large(n_bytes: int, what: str) -> str | None:
    """The message for an image whose uncompressed size exceeds `max_image_bytes()`, else None."""
    limit = max_image_bytes()
    if n_bytes <= limit:
        return None
    return (f"{what} announces {_size(n_bytes)} of voxel data, above the limit of {_size(limit)} "
            f"(a damaged header or a decompression bomb). If the image really is that large, set {MAX_BYTES_ENV} higher.")


def _size(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n} bytes"


def file_problems(path: str | Path) -> list[str]:
    """Every damage found in one image file, each message naming the file, the damage and the fix; [] when fine."""
    path = Path(path)
    name = path.name.lower()
    checker = next((c for ending, c in _CHECKERS if name.endswith(ending)), None)
    if checker is None:
        return []
    try:
        problems = checker(path)
    except Damage as e:
        problems = [str(e)]
    except OSError as e:
        problems = [f"cannot be opened ({e.strerror or e})."]
    except (ValueError, KeyError, IndexError, struct.error) as e:  # a header field that is not what it must be
        problems = [f"its header cannot be parsed ({type(e).__name__}: {e}); the file is damaged. {REEXPORT}"]
    return [f"{path}: {p}" for p in problems]


# ---------------------------------------------------------------- byte streams


def _file_chunks(f: io.BufferedIOBase) -> Iterator[bytes]:
    while chunk := f.read(CHUNK):
        yield chunk


def _gunzip(raw: Iterable[bytes]) -> Iterator[bytes]:
    """Decompress a (multi-member) gzip stream, checking every member's CRC-32 and length and that it ends."""
    d = zlib.decompressobj(zlib.MAX_WBITS | 16)
    for i, chunk in enumerate(raw):
        if i == 0 and not chunk.startswith(b"\x1f\x8b"):
            raise Damage(f"cannot be read: it does not start with the gzip signature although its name says gzip, so it is "
                         f"not gzipped or its first bytes were changed. {REEXPORT}")
        while chunk:
            try:
                yield d.decompress(chunk, CHUNK)
            except zlib.error as e:
                raise Damage(f"the gzip data is corrupt ({e}: bytes were changed). {REEXPORT}") from e
            chunk = d.unconsumed_tail
            if d.eof:
                rest = d.unused_data
                if rest.strip(b"\0") and not rest.startswith(b"\x1f\x8b"):
                    raise Damage(f"holds {len(rest)}+ bytes of garbage after the end of its gzip stream. {REEXPORT}")
                if not rest.strip(b"\0"):
                    return  # zero padding after the stream, as some tools write
                d = zlib.decompressobj(zlib.MAX_WBITS | 16)  # a further gzip member
                chunk = rest
    if not d.eof:
        raise Damage("is truncated: the gzip stream ends before its end marker and checksum (the file was cut short "
                     f"during a copy, download or export). {REEXPORT}")


def _inflate(raw: Iterable[bytes], what: str) -> Iterator[bytes]:
    """Decompress one zlib stream (MetaImage), checking its Adler-32 and that it ends."""
    d = zlib.decompressobj()
    for chunk in raw:
        while chunk and not d.eof:
            try:
                yield d.decompress(chunk, CHUNK)
            except zlib.error as e:
                raise Damage(f"the compressed {what} is corrupt ({e}: bytes were changed). {REEXPORT}") from e
            chunk = d.unconsumed_tail
    if not d.eof:
        raise Damage(f"is truncated: the compressed {what} ends before its end marker (the file was cut short). {REEXPORT}")


def _bunzip(raw: Iterable[bytes]) -> Iterator[bytes]:
    d = bz2.BZ2Decompressor()
    for chunk in raw:
        try:
            yield d.decompress(chunk)
        except OSError as e:
            raise Damage(f"the bzip2 data is corrupt ({e}). {REEXPORT}") from e
    if not d.eof:
        raise Damage(f"is truncated: the bzip2 stream ends before its end marker. {REEXPORT}")


def _skip(stream: Iterable[bytes], n: int) -> Iterator[bytes]:
    """The stream without its first `n` bytes."""
    for chunk in stream:
        if n >= len(chunk):
            n -= len(chunk)
            continue
        yield chunk[n:]
        n = 0


class _Payload:
    """Counts the voxel bytes of a stream and, for float data, its NaN/Inf; for integer data its min and max."""

    def __init__(self, dtype: np.dtype, expected: int):
        self.dtype, self.expected = dtype, expected
        self.n, self.nonfinite, self.lo, self.hi = 0, 0, None, None
        self._rest = b""

    def feed(self, stream: Iterable[bytes], track_range: bool = False) -> None:
        """Consume `stream`; stops early (without reading the rest) once it holds more than expected."""
        for chunk in stream:
            self.n += len(chunk)
            if self.n > self.expected:
                return  # extra data: already a problem, and a bomb must not be decompressed to its end
            data = self._rest + chunk
            usable = len(data) - len(data) % self.dtype.itemsize
            self._rest = data[usable:]
            if self.dtype.kind == "f":
                arr = np.frombuffer(data[:usable], self.dtype)
                self.nonfinite += arr.size - int(np.count_nonzero(np.isfinite(arr)))
            elif track_range and usable:
                arr = np.frombuffer(data[:usable], self.dtype)
                lo, hi = float(arr.min()), float(arr.max())
                self.lo, self.hi = min(lo, self.lo if self.lo is not None else lo), max(hi, self.hi if self.hi is not None else hi)

    def problems(self, what: str = "its header") -> list[str]:
        """Size disagreement and NaN/Inf as messages."""
        out = []
        if self.n < self.expected:
            out.append(f"is truncated: {what} announces {self.expected} bytes of voxel data but the file holds only {self.n} "
                       f"({self.n / max(self.expected, 1):.1%}); the rest would be read as garbage or zeros. {REEXPORT}")
        elif self.n > self.expected:
            out.append(f"holds more voxel data than {what} announces ({self.expected} bytes): the header's image size or "
                       f"data type is wrong, or data were appended. {REEXPORT}")
        if self.nonfinite:
            n_vox = max(self.expected // self.dtype.itemsize, 1)
            out.append(f"{self.nonfinite} NaN/Inf voxel(s) ({self.nonfinite / n_vox:.2%} of the image). Replace them with a "
                       "finite value (e.g. the image minimum) and save the file again.")
        return out


# ---------------------------------------------------------------- NIfTI


def _nifti(path: Path) -> list[str]:
    gz = path.name.lower().endswith(".gz")
    with open(path, "rb") as f:
        stream = _gunzip(_file_chunks(f)) if gz else _file_chunks(f)
        head, stream = _take(stream, 540)
        hdr = _nifti_header(head)
        try:
            shape, dtype = hdr.get_data_shape(), hdr.get_data_dtype()
        except Exception as e:  # noqa: BLE001 - nibabel raises several types for a damaged header
            raise Damage(f"the NIfTI header is damaged ({e}). {REEXPORT}") from e
        offset = int(hdr["vox_offset"])
        expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if msg := too_large(expected, "its NIfTI header"):
            return [msg]
        if offset < hdr.sizeof_hdr:
            raise Damage(f"the NIfTI header is damaged (vox_offset {offset} is impossible). {REEXPORT}")
        slope, inter = float(hdr["scl_slope"]), float(hdr["scl_inter"])
        # ITK applies scl_slope/scl_inter only when both are finite and the slope is non-zero, and then gives float32
        scaled = np.isfinite(slope) and np.isfinite(inter) and slope != 0 and (slope, inter) != (1.0, 0.0)
        payload = _Payload(dtype.newbyteorder(hdr.endianness), expected)
        payload.feed(_skip(_chain(head, stream), offset), track_range=scaled and dtype.kind in "iu")
    out = payload.problems("its NIfTI header (dim, datatype)")
    if np.isfinite(slope) and slope != 0 and not np.isfinite(inter):
        out.append(f"the NIfTI scl_inter is {inter} with scl_slope {slope}: readers disagree on such a file (nibabel refuses "
                   "it, SimpleITK ignores the scaling). Set scl_inter to 0 (and scl_slope to 1) or re-export it.")
    if scaled and payload.lo is not None:
        peak = max(abs(payload.lo * slope + inter), abs(payload.hi * slope + inter))
        if peak > _F32_MAX:
            out.append(f"its scaling (scl_slope {slope:g}, scl_inter {inter:g}) turns stored values into infinity "
                       f"(|value| up to {peak:.3g}). Fix scl_slope/scl_inter in the header or re-export it.")
    return out


def _nifti_header(head: bytes) -> nib.Nifti1Header:
    """NIfTI-1 or -2 header from the first bytes; Damage when it is not one."""
    for klass, size in ((nib.Nifti1Header, 348), (nib.Nifti2Header, 540)):
        if len(head) >= 4 and size in (struct.unpack("<i", head[:4])[0], struct.unpack(">i", head[:4])[0]):
            if len(head) < size:
                raise Damage(f"is truncated inside its NIfTI header ({len(head)} of {size} bytes). {REEXPORT}")
            hdr = klass.from_fileobj(io.BytesIO(head[:size]), check=False)
            magic = bytes(hdr["magic"]).rstrip(b"\0")
            if magic not in (b"n+1", b"n+2"):
                raise Damage(f"the NIfTI header is damaged (magic {magic!r}, expected 'n+1'). {REEXPORT}")
            return hdr
    raise Damage(f"cannot be read: it does not start with a NIfTI header (sizeof_hdr is neither 348 nor 540). {REEXPORT}")


def _take(stream: Iterator[bytes], n: int) -> tuple[bytes, Iterator[bytes]]:
    """The first `n` bytes of a stream (fewer when it is shorter) and the rest of the stream."""
    head = b""
    for chunk in stream:
        head += chunk
        if len(head) >= n:
            break
    return head, stream


def _chain(head: bytes, stream: Iterator[bytes]) -> Iterator[bytes]:
    yield head
    yield from stream


# ---------------------------------------------------------------- MetaImage and NRRD (text headers)

_MET_TYPES = {"MET_CHAR": "i1", "MET_UCHAR": "u1", "MET_SHORT": "i2", "MET_USHORT": "u2", "MET_INT": "i4", "MET_UINT": "u4",
              "MET_LONG_LONG": "i8", "MET_ULONG_LONG": "u8", "MET_FLOAT": "f4", "MET_DOUBLE": "f8"}
_NRRD_TYPES = {"f4": ("float",), "f8": ("double",), "i1": ("signed char", "int8", "int8_t"),
               "u1": ("uchar", "unsigned char", "uint8", "uint8_t"), "i2": ("short", "short int", "signed short", "signed short int", "int16", "int16_t"),
               "u2": ("ushort", "unsigned short", "unsigned short int", "uint16", "uint16_t"),
               "i4": ("int", "signed int", "int32", "int32_t"), "u4": ("uint", "unsigned int", "uint32", "uint32_t"),
               "i8": ("longlong", "long long", "long long int", "signed long long", "signed long long int", "int64", "int64_t"),
               "u8": ("ulonglong", "unsigned long long", "unsigned long long int", "uint64", "uint64_t")}
_NRRD_DTYPE = {name: code for code, names in _NRRD_TYPES.items() for name in names}


def _text_header(f: io.BufferedIOBase, end: Callable[[bytes], bool], limit: int = 1 << 16) -> tuple[list[bytes], int]:
    """Header lines up to (and including) the line for which `end` is true; and the byte offset after it."""
    lines, offset = [], 0
    while offset < limit:
        line = f.readline(limit)
        if not line:
            raise Damage(f"is truncated inside its header (no data section found). {REEXPORT}")
        offset += len(line)
        lines.append(line.rstrip(b"\r\n"))
        if end(lines[-1]):
            return lines, offset
    raise Damage("has no end of header in its first 64 KiB; it is not a valid header file.")


def _metaimage(path: Path) -> list[str]:
    with open(path, "rb") as f:
        lines, offset = _text_header(f, lambda l: l.split(b"=")[0].strip() == b"ElementDataFile")
    h = {k.strip(): v.strip() for k, _, v in (l.decode("latin-1").partition("=") for l in lines)}
    code = _MET_TYPES.get(h.get("ElementType", ""))
    if code is None or h.get("BinaryData", "True").lower() != "true" or "%" in h["ElementDataFile"] or h["ElementDataFile"] == "LIST":
        return []  # ASCII data, file lists and rare types: SimpleITK's own checks apply
    try:
        dims = [int(v) for v in h["DimSize"].split()]
        channels = int(h.get("ElementNumberOfChannels", "1"))
    except (KeyError, ValueError) as e:
        raise Damage(f"the MetaImage header is damaged (DimSize/ElementNumberOfChannels: {e}). {REEXPORT}") from e
    msb = h.get("BinaryDataByteOrderMSB", h.get("ElementByteOrderMSB", "False")).lower() == "true"
    dtype = np.dtype(code).newbyteorder(">" if msb else "<")
    expected = int(np.prod(dims, dtype=np.int64)) * channels * dtype.itemsize
    if msg := too_large(expected, "its MetaImage header"):
        return [msg]
    data_file = path if h["ElementDataFile"] == "LOCAL" else path.parent / h["ElementDataFile"]
    if not data_file.is_file():
        raise Damage(f"its data file {data_file.name} (ElementDataFile) does not exist. Put it beside the header.")
    skip = offset if data_file == path else int(h.get("HeaderSize", "0"))
    payload = _Payload(dtype, expected)
    with open(data_file, "rb") as f:
        if h.get("CompressedData", "False").lower() == "true":
            payload.feed(_inflate(_skip(_file_chunks(f), skip), "voxel data"))
        elif skip < 0:  # HeaderSize -1: the data are the last bytes of the file
            payload.n = min(data_file.stat().st_size, expected)
        else:
            payload.feed(_skip(_file_chunks(f), skip))
    return payload.problems("its MetaImage header (DimSize, ElementType)")


def _nrrd(path: Path) -> list[str]:
    with open(path, "rb") as f:
        if not f.read(4) == b"NRRD":
            raise Damage(f"cannot be read: it does not start with 'NRRD'; it is not an NRRD file or its header is damaged. {REEXPORT}")
        f.seek(0)
        detached = path.name.lower().endswith(".nhdr")
        try:
            lines, offset = _text_header(f, lambda l: l == b"" or (detached and l.startswith(b"data file")))
        except Damage:
            if not detached:
                raise
            return []  # a detached header without data file line: SimpleITK reports it
    h = {k.strip().lower(): v.strip() for k, _, v in (l.decode("latin-1").partition(":") for l in lines[1:] if not l.startswith(b"#"))}
    code, encoding = _NRRD_DTYPE.get(h.get("type", "").lower()), h.get("encoding", "raw").lower()
    if code is None or encoding not in ("raw", "gzip", "gz", "bzip2", "bz2") or int(h.get("line skip", "0")):
        return []  # text encodings and line skips: SimpleITK's own checks apply
    try:
        sizes = [int(v) for v in h["sizes"].split()]
    except (KeyError, ValueError) as e:
        raise Damage(f"the NRRD header is damaged (sizes: {e}). {REEXPORT}") from e
    dtype = np.dtype(code).newbyteorder(">" if h.get("endian", "little") == "big" else "<")
    expected = int(np.prod(sizes, dtype=np.int64)) * dtype.itemsize
    if msg := too_large(expected, "its NRRD header"):
        return [msg]
    data_file, skip = path, offset
    if "data file" in h or "datafile" in h:
        data_file, skip = path.parent / h.get("data file", h.get("datafile", "")), 0
        if "LIST" in data_file.name or "%" in data_file.name or not data_file.is_file():
            return []
    byte_skip = int(h.get("byte skip", h.get("byteskip", "0")))
    payload = _Payload(dtype, expected)
    with open(data_file, "rb") as f:
        raw = _skip(_file_chunks(f), skip)
        if encoding == "raw" and byte_skip < 0:
            payload.n = min(data_file.stat().st_size - skip, expected)
            return payload.problems("its NRRD header (sizes, type)")
        stream = _gunzip(raw) if encoding in ("gzip", "gz") else _bunzip(raw) if encoding != "raw" else raw
        payload.feed(_skip(stream, max(byte_skip, 0)))
    return payload.problems("its NRRD header (sizes, type)")


# ---------------------------------------------------------------- GIPL

_GIPL_TYPES = {7: "i1", 8: "u1", 15: "i2", 16: "u2", 31: "u4", 32: "i4", 64: "f4", 65: "f8"}
_GIPL_MAGIC = 0xEFFFE9B0


def _gipl(path: Path) -> list[str]:
    with open(path, "rb") as f:
        head = f.read(256)
        if len(head) < 256:
            raise Damage(f"is truncated inside its 256-byte GIPL header. {REEXPORT}")
        dims, (kind,), (magic,) = struct.unpack(">4H", head[:8]), struct.unpack(">H", head[8:10]), struct.unpack(">I", head[252:256])
        if magic != _GIPL_MAGIC:
            raise Damage(f"the GIPL header is damaged (wrong magic number). {REEXPORT}")
        code = _GIPL_TYPES.get(kind)
        if code is None:
            return []
        dtype = np.dtype(code).newbyteorder(">")
        expected = int(np.prod([d for d in dims if d > 0], dtype=np.int64)) * dtype.itemsize
        if msg := too_large(expected, "its GIPL header"):
            return [msg]
        payload = _Payload(dtype, expected)
        payload.feed(_file_chunks(f))
    return payload.problems("its GIPL header")


_CHECKERS: tuple[tuple[str, Callable[[Path], list[str]]], ...] = (
    (".nii.gz", _nifti), (".nii", _nifti), (".mha", _metaimage), (".mhd", _metaimage), (".nrrd", _nrrd), (".nhdr", _nrrd),
    (".gipl", _gipl),
    *((e, lambda p: natural_problems(p, max_image_pixels())) for e in (".png", ".bmp", ".tif", ".tiff", ".jpg", ".jpeg")),
)
