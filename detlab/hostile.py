"""Small files built to make a decoder loop or allocate: each kind the service must refuse quickly.

For the tests and ``make soak`` (never imported by the serving path). Each maker returns the bytes of a
file a few hundred KB at most that, without the checks of ``multidet.decode``, would hold the worker
for seconds to minutes or ask for gigabytes: the same structure as the large versions, scaled down.
"""

from __future__ import annotations

import io
import struct

import numpy as np
from PIL import Image


def _noise(size: int, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(0)
    shape = (size, size, 3) if mode == "RGB" else (size, size)
    return Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode)


def jpeg_many_scans(scans: int = 2000, size: int = 64) -> bytes:
    """A real progressive JPEG whose last scan is repeated until it has ``scans`` scans (the decoder
    makes one pass over the whole image per scan)."""
    buf = io.BytesIO()
    _noise(size).save(buf, "JPEG", progressive=True, quality=90)
    data = buf.getvalue()
    last, end = data.rfind(b"\xff\xda"), data.rfind(b"\xff\xd9")
    have = data.count(b"\xff\xda")
    return data[:end] + data[last:end] * max(scans - have, 0) + b"\xff\xd9"


def gif_comment_blocks(blocks: int = 100_000) -> bytes:
    """A 1x1 GIF whose comment extension is ``blocks`` one-byte sub-blocks (Pillow joins them one by one)."""
    buf = io.BytesIO()
    Image.new("P", (1, 1)).save(buf, "GIF")
    data = buf.getvalue()
    at = 13 + (3 * (2 << (data[10] & 7)) if data[10] & 0x80 else 0)
    comment = b"\x21\xfe" + b"\x01x" * blocks + b"\x00"
    return data[:at] + comment + data[at:]


def _tiff(width: int, height: int, entries: list[tuple[int, int, int, bytes]], pixels: bytes) -> bytes:
    """A little-endian classic TIFF: one directory of (tag, type, count, value bytes) + pixel data."""
    out = bytearray(b"II*\x00" + struct.pack("<I", 8))
    n = len(entries)
    extra_at = 8 + 2 + 12 * n + 4
    directory, extra = bytearray(struct.pack("<H", n)), bytearray()
    for tag, typ, count, value in sorted(entries):
        if len(value) <= 4:
            directory += struct.pack("<HHI", tag, typ, count) + value.ljust(4, b"\x00")
        else:
            directory += struct.pack("<HHII", tag, typ, count, extra_at + len(extra))
            extra += value
    directory += b"\x00\x00\x00\x00"
    out += directory + extra
    return bytes(out) + pixels


def tiff_many_strips(strips: int = 100_000, size: int = 64) -> bytes:
    """A 64x64 grayscale TIFF that lists ``strips`` strips (at most 64, one per row, are possible)."""
    pixels_at = 8 + 2 + 12 * 9 + 4 + 8 * strips  # after the directory and the two tables
    offsets = struct.pack(f"<{strips}I", *([pixels_at] * strips))
    counts = struct.pack(f"<{strips}I", *([size] * strips))
    entries = [
        (256, 4, 1, struct.pack("<I", size)),
        (257, 4, 1, struct.pack("<I", size)),
        (258, 3, 1, struct.pack("<H", 8)),
        (259, 3, 1, struct.pack("<H", 1)),
        (262, 3, 1, struct.pack("<H", 1)),
        (273, 4, strips, offsets),
        (277, 3, 1, struct.pack("<H", 1)),
        (278, 4, 1, struct.pack("<I", 1)),
        (279, 4, strips, counts),
    ]
    return _tiff(size, size, entries, bytes(size * size))


def tiff_huge_tile(tile: int = 46_336, size: int = 64) -> bytes:
    """A 64x64 TIFF with one deflate tile declared ``tile`` x ``tile`` (the decoder allocates the tile)."""
    import zlib

    data = zlib.compress(bytes(size * size))
    pixels_at = 8 + 2 + 12 * 11 + 4
    entries = [
        (256, 4, 1, struct.pack("<I", size)),
        (257, 4, 1, struct.pack("<I", size)),
        (258, 3, 1, struct.pack("<H", 8)),
        (259, 3, 1, struct.pack("<H", 8)),  # deflate
        (262, 3, 1, struct.pack("<H", 1)),
        (277, 3, 1, struct.pack("<H", 1)),
        (284, 3, 1, struct.pack("<H", 1)),
        (322, 4, 1, struct.pack("<I", tile)),
        (323, 4, 1, struct.pack("<I", tile)),
        (324, 4, 1, struct.pack("<I", pixels_at)),
        (325, 4, 1, struct.pack("<I", len(data))),
    ]
    return _tiff(size, size, entries, data)


def bmp_rle(width: int = 2500, height: int = 2000) -> bytes:
    """An 8-bit run-length BMP of one-pixel runs (Pillow's RLE decoder is Python: ~0.4 us a pixel)."""
    row = bytes([1, 7]) * width + b"\x00\x00"
    pixels = row * height + b"\x00\x01"
    palette = b"".join(bytes([i, i, i, 0]) for i in range(256))
    at = 14 + 40 + len(palette)
    header = b"BM" + struct.pack("<IHHI", at + len(pixels), 0, 0, at)
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 8, 1, len(pixels), 2835, 2835, 256, 0)
    return header + info + palette + pixels


def png_extreme_aspect(width: int = 1_000_000, height: int = 1) -> bytes:
    """A legal 1-megapixel PNG of one row (a letterbox that pads before resizing asks for ~8 GB)."""
    buf = io.BytesIO()
    Image.new("L", (width, height), 128).save(buf, "PNG")
    return buf.getvalue()


def png16(size: int = 64) -> bytes:
    """A 16-bit grayscale PNG (its range is rescaled, not clipped)."""
    arr = (np.arange(size * size, dtype=np.uint32).reshape(size, size) * 16).astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


# name -> (maker, the status the service answers): each is refused (or served, where the image is
# valid) within a second or two, and the worker survives it
KINDS = {
    "jpeg_many_scans": (jpeg_many_scans, 422),
    "gif_comment_blocks": (gif_comment_blocks, 422),
    "tiff_many_strips": (tiff_many_strips, 422),
    "tiff_huge_tile": (tiff_huge_tile, 413),
    "bmp_rle_5mp": (bmp_rle, 413),
    "png_1000000x1": (png_extreme_aspect, 200),
}
