"""Step 1: request bytes -> RGB PIL image (EXIF orientation applied), or a clear InputError.

The decoder's work is bounded before it starts: only the accepted formats' parsers are tried, the
pixel count is read from the header, and each format's structure is checked on the raw bytes against
what its pixels could need (``DecodeLimits``): a JPEG's scans, a GIF's extension blocks before its
first frame, a TIFF's strip and tile tables, a run-length BMP's size. Each refusal names its limit.
"""

from __future__ import annotations

import io
import struct
import warnings

import numpy as np
from PIL import (  # noqa: F401  (the accepted formats' parsers, registered for Image.open(formats=...))
    BmpImagePlugin,
    GifImagePlugin,
    Image,
    ImageOps,
    JpegImagePlugin,
    MpoImagePlugin,
    PngImagePlugin,
    TiffImagePlugin,
    UnidentifiedImageError,
    WebPImagePlugin,
)

from .config import DecodeLimits
from .errors import BadRequest, CorruptImage, ImageTooComplex, ImageTooLarge, UnsupportedImage

# Formats we accept (Pillow's format names). MPO is the multi-picture JPEG many cameras write.
ACCEPTED_FORMATS = ("JPEG", "MPO", "PNG", "GIF", "WEBP", "BMP", "TIFF")

# The parsers tried (Pillow opens MPO with its JPEG parser)
PARSERS = tuple(f for f in ACCEPTED_FORMATS if f != "MPO")

# File signatures of the accepted formats: bytes that start like one but do not parse are a corrupt
# image (422), bytes that start like none of them are not an image at all (415).
SIGNATURES = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
)


def sniff(data: bytes) -> str | None:
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return next((fmt for sig, fmt in SIGNATURES if data.startswith(sig)), None)


def decode_image(data: bytes | bytearray | memoryview, limits: DecodeLimits | int) -> Image.Image:
    """Decode ``data`` to an 8-bit RGB image in its displayed orientation (``limits``: DecodeLimits,
    or just the pixel limit).

    The pixel count and the format's structure are checked before any pixel data is decoded, so a
    decompression bomb or a file built to make the decoder loop costs nothing. GIF/WebP animations
    and multi-page TIFFs use their first frame.
    """
    if isinstance(limits, int):
        limits = DecodeLimits(max_image_pixels=limits)
    max_pixels = limits.max_image_pixels
    if data is None or len(data) == 0:
        raise BadRequest("empty request body: send the image bytes (e.g. curl -T image.jpg)")
    data = bytes(data)
    check_structure(data, limits)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=PARSERS)
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(f"image too large: {exc}") from exc
    except UnidentifiedImageError as exc:
        claimed = sniff(data[:16])
        if claimed:
            raise CorruptImage(f"body starts like a {claimed} file but its header is corrupt") from exc
        raise UnsupportedImage(
            f"body is not a recognised image; accepted formats: {', '.join(ACCEPTED_FORMATS)}"
        ) from exc
    except (OSError, ValueError, SyntaxError) as exc:
        raise CorruptImage(f"cannot read image header: {exc}") from exc

    width, height = img.size
    if width < 1 or height < 1:
        raise CorruptImage(f"image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise ImageTooLarge(f"image is {width}x{height} = {width * height} pixels; the limit is {max_pixels}")
    try:
        img.seek(0)
        img.load()
        img = ImageOps.exif_transpose(img)
        return _to_rgb(img)
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(f"image too large: {exc}") from exc
    except (OSError, ValueError, SyntaxError, EOFError, IndexError) as exc:
        raise CorruptImage(f"{img.format} image data is corrupt or truncated: {exc}") from exc


def header_pixels(data: bytes, limits: DecodeLimits) -> int:
    """Width x height from the header alone (0 where the image would be refused anyway: its own
    decode reports why)."""
    try:
        check_structure(data, limits)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=PARSERS) as img:
                return img.size[0] * img.size[1]
    except Exception:  # noqa: BLE001 - any unreadable header is the decoder's to report
        return 0


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # 16/32-bit grayscale: Pillow's convert() would clip at 255; rescale the real range instead,
        # a band of rows at a time (float64 temporaries of ~8 MB, not of the whole image)
        arr = np.asarray(img)
        peak = 65535.0 if img.mode.startswith("I;16") else max(float(arr.max()), 1.0)
        arr8 = np.empty(arr.shape, np.uint8)
        rows = max(1, (1 << 20) // max(arr.shape[1], 1))
        for y in range(0, arr.shape[0], rows):
            band = arr[y : y + rows].astype(np.float64)
            arr8[y : y + rows] = np.clip(np.rint(band * (255.0 / peak)), 0, 255)
        return Image.fromarray(arr8, mode="L").convert("RGB")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        # Transparent pixels become white, as an image viewer shows them on a light page.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")  # L, P, CMYK, YCbCr, F, 1 ...


# -- structure checks on the raw bytes, before any parser runs -------------------------------------
def check_structure(data: bytes, limits: DecodeLimits) -> None:
    """Refuse what would make the decoder loop or allocate beyond what the image's pixels need."""
    fmt = sniff(data[:16])
    if fmt == "JPEG":
        _check_jpeg(data, limits)
    elif fmt == "GIF":
        _check_gif(data, limits)
    elif fmt == "TIFF":
        _check_tiff(data, limits)
    elif fmt == "BMP":
        _check_bmp(data, limits)


def _check_jpeg(data: bytes, limits: DecodeLimits) -> None:
    # entropy-coded data stuffs every 0xFF with 0x00, so each FF DA is a start-of-scan marker (or in
    # metadata: an overcount, never an undercount)
    scans = data.count(b"\xff\xda")
    if scans > limits.max_jpeg_scans:
        raise ImageTooComplex(
            f"JPEG has {scans} scans; at most {limits.max_jpeg_scans} are decoded (setting max_jpeg_scans)"
        )


def _check_gif(data: bytes, limits: DecodeLimits) -> None:
    if len(data) < 13:
        return  # the parser reports it
    pos = 13
    if data[10] & 0x80:  # global colour table
        pos += 3 * (2 << (data[10] & 7))
    blocks = 0
    while pos < len(data) and data[pos] == 0x21:  # extensions before the first frame (0x2C)
        pos += 2
        while pos < len(data) and data[pos]:
            blocks += 1
            if blocks > limits.max_gif_blocks:
                raise ImageTooComplex(
                    f"GIF has more than {limits.max_gif_blocks} extension blocks before its first frame "
                    "(setting max_gif_blocks)"
                )
            pos += data[pos] + 1
        pos += 1


_TIFF_TYPES = {3: ("H", 2), 4: ("I", 4)}  # SHORT, LONG: the types of the size and table tags


def _check_tiff(data: bytes, limits: DecodeLimits) -> None:
    """The first page's strip and tile tables against its size (TIFF 6.0: at least one row per
    strip; tiles cover the image), and its tile size against the pixel limit."""
    e = "<" if data[:2] == b"II" else ">"
    try:
        (ifd,) = struct.unpack_from(e + "I", data, 4)
        (n,) = struct.unpack_from(e + "H", data, ifd)
        if n > 4096:
            raise ImageTooComplex(f"TIFF's first directory has {n} entries; at most 4096 are read")
        tags: dict[int, tuple[int, int]] = {}  # tag -> (count, first value)
        for i in range(n):
            tag, typ, count = struct.unpack_from(e + "HHI", data, ifd + 2 + 12 * i)
            if typ in _TIFF_TYPES:
                code, size = _TIFF_TYPES[typ]
                at = ifd + 2 + 12 * i + 8
                if count * size > 4:
                    (at,) = struct.unpack_from(e + "I", data, at)
                value = struct.unpack_from(e + code, data, at)[0] if count and at + size <= len(data) else 0
                tags[tag] = (count, value)
    except struct.error:
        return  # truncated: the parser reports it
    width, height = tags.get(256, (0, 0))[1], tags.get(257, (0, 0))[1]
    planes = tags.get(277, (1, 1))[1] if tags.get(284, (1, 1))[1] == 2 else 1
    if width < 1 or height < 1:
        return
    strips = max(tags.get(273, (0, 0))[0], tags.get(279, (0, 0))[0])
    if strips > height * max(planes, 1):
        raise CorruptImage(f"TIFF lists {strips} strips for an image of {height} rows")
    tw, th = tags.get(322, (0, 0))[1], tags.get(323, (0, 0))[1]
    if tw and th:
        if tw * th > max(4 * width * height, 1 << 20) or tw * th > limits.max_image_pixels:
            raise ImageTooLarge(f"TIFF declares tiles of {tw}x{th} pixels for a {width}x{height} image")
        tiles = max(tags.get(324, (0, 0))[0], tags.get(325, (0, 0))[0])
        if tiles > -(-width // tw) * -(-height // th) * max(planes, 1):
            raise CorruptImage(f"TIFF lists {tiles} tiles for a {width}x{height} image of {tw}x{th} tiles")


def _check_bmp(data: bytes, limits: DecodeLimits) -> None:
    if len(data) < 34 or struct.unpack_from("<I", data, 14)[0] < 40:
        return
    width, height = struct.unpack_from("<ii", data, 18)
    (compression,) = struct.unpack_from("<I", data, 30)
    pixels = abs(width) * abs(height)
    if compression in (1, 2) and pixels > limits.max_rle_pixels:
        raise ImageTooLarge(
            f"run-length BMP of {pixels} pixels; at most {limits.max_rle_pixels} (setting max_rle_pixels)"
        )
