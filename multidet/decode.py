"""Step 1: request bytes -> RGB PIL image (EXIF orientation applied), or a clear InputError."""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import BadRequest, CorruptImage, ImageTooLarge, UnsupportedImage

# Formats we accept (Pillow's format names). MPO is the multi-picture JPEG many cameras write.
ACCEPTED_FORMATS = ("JPEG", "MPO", "PNG", "GIF", "WEBP", "BMP", "TIFF")

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


def decode_image(data: bytes | bytearray | memoryview, max_pixels: int) -> Image.Image:
    """Decode ``data`` to an 8-bit RGB image in its displayed orientation.

    The pixel count is checked from the header before any pixel data is decoded, so a
    decompression bomb costs nothing. GIF/WebP animations use their first frame.
    """
    if data is None or len(data) == 0:
        raise BadRequest("empty request body: send the image bytes (e.g. curl -T image.jpg)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(bytes(data)))
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(f"image too large: {exc}") from exc
    except UnidentifiedImageError as exc:
        claimed = sniff(bytes(data[:16]))
        if claimed:
            raise CorruptImage(f"body starts like a {claimed} file but its header is corrupt") from exc
        raise UnsupportedImage(
            f"body is not a recognised image; accepted formats: {', '.join(ACCEPTED_FORMATS)}"
        ) from exc
    except (OSError, ValueError, SyntaxError) as exc:
        raise CorruptImage(f"cannot read image header: {exc}") from exc

    if img.format not in ACCEPTED_FORMATS:
        raise UnsupportedImage(
            f"image format {img.format} is not accepted; accepted formats: {', '.join(ACCEPTED_FORMATS)}"
        )
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


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # 16/32-bit grayscale: Pillow's convert() would clip at 255; rescale the real range instead.
        arr = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if img.mode.startswith("I;16") else max(float(arr.max()), 1.0)
        arr8 = np.clip(np.rint(arr * (255.0 / peak)), 0, 255).astype(np.uint8)
        return Image.fromarray(arr8, mode="L").convert("RGB")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        # Transparent pixels become white, as an image viewer shows them on a light page.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")  # L, P, CMYK, YCbCr, F, 1 ...
