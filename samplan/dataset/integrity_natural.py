"""Damage checks of 2D natural-image files (PNG, JPEG, BMP, TIFF), used by `samplan.dataset.integrity`.

PIL decodes a PNG whose IEND chunk (or the end of its last IDAT chunk) is gone without a word, and never checks
chunk CRCs when loading. The PNG walker below checks every chunk CRC, that the zlib pixel stream is intact and
ends, that it holds exactly the bytes the IHDR size implies, and that IEND is there. JPEG, BMP and TIFF carry no
checksum, so only their truncation can be found: a missing JPEG end marker, or pixel data reaching past the end.
"""
from __future__ import annotations

import struct
import warnings
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from PIL import Image

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}
# Adam7 passes: (x start, y start, x step, y step)
_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))
_PIECE = 1 << 20
_REEXPORT = "Copy it again from the source, or re-export it from the software that made it."


class _Broken(Exception):
    """A damage that stops the scan of a natural image."""


def natural_problems(path: Path, max_pixels: int) -> list[str]:
    """Damage of one PNG/JPEG/BMP/TIFF file as messages without the file name; [] when fine."""
    name = path.name.lower()
    try:
        if name.endswith(".png"):
            return _png(path, max_pixels)
        if name.endswith((".jpg", ".jpeg")):
            return _jpeg(path)
        return _pil_extent(path, max_pixels)
    except _Broken as e:
        return [str(e)]


@contextmanager
def pil_pixel_limit(max_pixels: int) -> Iterator[None]:
    """PIL refuses images above `max_pixels` inside the block (its bomb warning becomes an error); restored after."""
    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = old


def _pixel_limit(width: int, height: int, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise _Broken(f"is {width} x {height} = {width * height} pixels, above the limit of {max_pixels} pixels (a damaged "
                      "header or a decompression bomb). If the image really is that large, set SAMPLAN_MAX_IMAGE_PIXELS higher.")


def _png_raw_size(width: int, height: int, depth: int, color: int, interlace: int) -> int:
    """Bytes of the filtered pixel data (one filter byte per row) that IHDR implies."""
    bits = _PNG_CHANNELS.get(color, 0) * depth
    passes = _ADAM7 if interlace else ((0, 0, 1, 1),)
    total = 0
    for x0, y0, dx, dy in passes:
        w, h = -(-(width - x0) // dx), -(-(height - y0) // dy)
        if w > 0 and h > 0:
            total += h * (1 + (w * bits + 7) // 8)
    return total


def _png(path: Path, max_pixels: int) -> list[str]:
    with open(path, "rb") as f:
        if f.read(8) != _PNG_SIGNATURE:
            raise _Broken(f"cannot be read: it does not start with the PNG signature; it is not a PNG file or its first bytes were changed. {_REEXPORT}")
        inflater, expected, produced, first = zlib.decompressobj(), None, 0, True
        while True:
            head = f.read(8)
            if len(head) < 8:
                raise _Broken(f"is truncated: the PNG ends without its IEND chunk (the file was cut short). {_REEXPORT}")
            length, kind = struct.unpack(">I", head[:4])[0], head[4:]
            if first and kind != b"IHDR":
                raise _Broken(f"the first PNG chunk is {kind!r}, not IHDR; the header is damaged. {_REEXPORT}")
            crc, left, body = zlib.crc32(kind), length, b""
            while left:
                piece = f.read(min(left, _PIECE))
                if not piece:
                    raise _Broken(f"is truncated inside its {kind.decode('latin-1')} chunk (the file was cut short). {_REEXPORT}")
                left -= len(piece)
                crc = zlib.crc32(piece, crc)
                if kind == b"IHDR":
                    body += piece
                elif kind == b"IDAT" and expected is not None:
                    produced += _inflate(inflater, piece, expected - produced + 1)
            stored = f.read(4)
            if len(stored) < 4:
                raise _Broken(f"is truncated inside the checksum of its {kind.decode('latin-1')} chunk. {_REEXPORT}")
            if struct.unpack(">I", stored)[0] != crc:
                raise _Broken(f"the {kind.decode('latin-1')} chunk fails its CRC check: bytes in the file were changed. {_REEXPORT}")
            if first:
                if length != 13:
                    raise _Broken(f"the PNG IHDR chunk has {length} bytes instead of 13; the header is damaged. {_REEXPORT}")
                width, height, depth, color, _c, _f, interlace = struct.unpack(">IIBBBBB", body)
                _pixel_limit(width, height, max_pixels)
                expected = _png_raw_size(width, height, depth, color, interlace)
                first = False
            if kind == b"IEND":
                break
    if not inflater.eof:
        return [f"is truncated: its pixel data (IDAT) end before the end of the compressed stream. {_REEXPORT}"]
    if produced != expected:
        return [f"its pixel data hold {produced} bytes but its IHDR size implies {expected}; the header or the data are damaged. {_REEXPORT}"]
    return []


def _inflate(inflater: zlib._Decompress, data: bytes, room: int) -> int:
    """Feed compressed pixel data; the number of bytes it decompressed to, never decompressing past `room`."""
    n = 0
    while data and not inflater.eof:
        try:
            out = inflater.decompress(data, max(min(room - n, _PIECE), 1))
        except zlib.error as e:
            raise _Broken(f"its pixel data are corrupt ({e}). {_REEXPORT}") from e
        n += len(out)
        if n >= room:
            raise _Broken(f"its pixel data decompress to more bytes than its IHDR size implies; the header is damaged. {_REEXPORT}")
        data = inflater.unconsumed_tail
    return n


def _jpeg(path: Path) -> list[str]:
    with open(path, "rb") as f:
        if f.read(2) != b"\xff\xd8":
            raise _Broken(f"cannot be read: it does not start with the JPEG start marker; it is not a JPEG file or its first bytes were changed. {_REEXPORT}")
        f.seek(0, 2)
        f.seek(max(f.tell() - 64, 0))
        tail = f.read().rstrip(b"\0")  # some writers pad the file with zeros after the end marker
    if not tail.endswith(b"\xff\xd9"):
        return [f"is truncated: the JPEG end marker is missing (the file was cut short). {_REEXPORT}"]
    return []


def _pil_extent(path: Path, max_pixels: int) -> list[str]:
    """BMP/TIFF: the uncompressed pixel data (or TIFF strips) must fit inside the file."""
    size = path.stat().st_size
    try:
        with pil_pixel_limit(max_pixels), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # PIL warns about a truncated TIFF; the size check below reports it
            im = Image.open(path)
            _pixel_limit(*im.size, max_pixels)
        with im:
            ends = [t.offset + t.args[1] * (t.extents[3] - t.extents[1]) for t in im.tile
                    if t.codec_name == "raw" and len(t.args) > 1 and isinstance(t.args[1], int) and t.args[1] > 0]
            tags = getattr(im, "tag_v2", None)
            if tags is not None:
                for offsets, counts in ((273, 279), (324, 325)):  # strips, tiles
                    if offsets in tags and counts in tags:
                        ends += [o + c for o, c in zip(tags[offsets], tags[counts])]
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise _Broken(f"is larger than the limit of {max_pixels} pixels (a damaged header or a decompression bomb). If the "
                      "image really is that large, set SAMPLAN_MAX_IMAGE_PIXELS higher.") from None
    except (OSError, ValueError, SyntaxError) as e:
        return [f"cannot be parsed as an image ({e}). {_REEXPORT}"]
    if ends and max(ends) > size:
        return [f"is truncated: its pixel data need {max(ends)} bytes but the file holds {size}. {_REEXPORT}"]
    return []
