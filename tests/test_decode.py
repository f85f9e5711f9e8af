"""decode: every accepted kind of image becomes RGB in its displayed orientation; bad input is a clear 4xx."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from detlab import hostile
from helpers import encode, jpeg_declaring
from multidet.config import ConfigError, Settings
from multidet.decode import ACCEPTED_FORMATS, DecodeLimits, decode_image
from multidet.errors import BadRequest, CorruptImage, ImageTooComplex, ImageTooLarge, InputError, UnsupportedImage

MAX = 40_000_000


def gradient(w=64, h=48) -> Image.Image:
    x = np.linspace(0, 255, w, dtype=np.uint8)[None, :].repeat(h, 0)
    y = np.linspace(0, 255, h, dtype=np.uint8)[:, None].repeat(w, 1)
    return Image.fromarray(np.stack([x, y, 255 - x], -1), "RGB")


def test_real_jpeg(photos):
    img = decode_image(photos["coffee"], MAX)
    assert img.mode == "RGB" and img.size == (600, 400)


@pytest.mark.parametrize(
    "fmt,kw",
    [
        ("PNG", {}),
        ("GIF", {}),
        ("BMP", {}),
        ("TIFF", {}),
        ("WEBP", {"lossless": True}),
        ("JPEG", {"progressive": True, "quality": 95}),
    ],
)
def test_accepted_formats(fmt, kw):
    assert fmt in ACCEPTED_FORMATS
    img = decode_image(encode(gradient(), fmt, **kw), MAX)
    assert img.mode == "RGB" and img.size == (64, 48)
    # same picture: a lossless format matches the source exactly, a lossy one closely
    diff = np.abs(np.asarray(img, np.int16) - np.asarray(gradient(), np.int16)).mean()
    assert diff < (12 if fmt in ("JPEG", "GIF") else 1e-9)


@pytest.mark.parametrize("mode", ["L", "CMYK", "RGBA", "LA", "P", "1", "I;16"])
def test_modes_become_rgb(mode):
    src = (
        gradient().convert(mode)
        if mode != "I;16"
        else Image.fromarray(np.arange(64 * 48, dtype=np.uint16).reshape(48, 64) * 21)
    )
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    img = decode_image(encode(src, fmt), MAX)
    assert img.mode == "RGB" and img.size == (64, 48)


def test_16bit_png_keeps_its_range():
    arr = np.full((10, 10), 65535, np.uint16)
    arr[:, :5] = 32768
    img = decode_image(encode(Image.fromarray(arr), "PNG"), MAX)
    px = np.asarray(img)
    assert px[0, 9].tolist() == [255, 255, 255] and px[0, 0].tolist() == [128, 128, 128]


def test_transparent_pixels_become_white():
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    rgba.putpixel((0, 0), (255, 0, 0, 255))
    px = np.asarray(decode_image(encode(rgba, "PNG"), MAX))
    assert px[0, 0].tolist() == [255, 0, 0] and px[3, 3].tolist() == [255, 255, 255]


def test_exif_orientation_applied():
    src = gradient(80, 40)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise for display
    img = decode_image(encode(src, "JPEG", exif=exif, quality=95), MAX)
    assert img.size == (40, 80)
    expected = src.transpose(Image.Transpose.ROTATE_270)
    assert np.abs(np.asarray(img, np.int16) - np.asarray(expected, np.int16)).mean() < 12


def test_gif_first_frame():
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    assert np.asarray(decode_image(buf.getvalue(), MAX))[0, 0].tolist() == [255, 0, 0]


def test_tiny_and_extreme_aspect():
    assert decode_image(encode(Image.new("RGB", (1, 1)), "PNG"), MAX).size == (1, 1)
    assert decode_image(encode(Image.new("RGB", (10000, 1)), "PNG"), MAX).size == (10000, 1)


def png_declaring(width: int, height: int) -> bytes:
    def chunk(tag, payload):
        return struct.pack(">I", len(payload)) + tag + payload + struct.pack(">I", zlib.crc32(tag + payload))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.mark.parametrize(
    "make",
    [
        lambda p: jpeg_declaring(p, 30000, 30000),
        lambda p: jpeg_declaring(p, 10000, 5000),
        lambda p: png_declaring(30000, 30000),
    ],
)
def test_decompression_bomb_refused_from_header(photos, make):
    with pytest.raises(ImageTooLarge) as err:
        decode_image(make(photos["chelsea"]), MAX)
    assert err.value.status == 413 and ("pixels" in err.value.message or "too large" in err.value.message)


@pytest.mark.parametrize(
    "body,cls,status",
    [
        (b"", BadRequest, 400),
        (b"hello, this is text", UnsupportedImage, 415),
        (b"<html><body>not an image</body></html>", UnsupportedImage, 415),
        (b"\xff\xd8\xff\xe0" + b"garbage" * 50, CorruptImage, 422),
        (b"\xff\xd8\xff\xe0" + b"\x00garbage" * 50, CorruptImage, 422),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, CorruptImage, 422),
    ],
)
def test_bad_bytes(body, cls, status):
    with pytest.raises(cls) as err:
        decode_image(body, MAX)
    assert err.value.status == status and "\n" not in err.value.message


def test_truncated_jpeg(photos):
    with pytest.raises(CorruptImage) as err:
        decode_image(photos["coffee"][:5000], MAX)
    assert err.value.status == 422 and "truncated" in err.value.message


def test_unaccepted_format():
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, "PDF")
    with pytest.raises(InputError) as err:
        decode_image(buf.getvalue(), MAX)
    assert err.value.status == 415


@pytest.mark.parametrize("kind", sorted(hostile.KINDS))
def test_hostile_structure_is_refused_before_decoding(kind):
    """Each file built to make the decoder loop or allocate gets its status from the structure check
    (a valid one, the 1,000,000 x 1 PNG, is decoded), naming the limit it broke."""
    make, status = hostile.KINDS[kind]
    if status == 200:
        assert decode_image(make(), DecodeLimits()).size == (1_000_000, 1)
        return
    with pytest.raises(InputError) as err:
        decode_image(make(), DecodeLimits())
    assert err.value.status == status and "\n" not in err.value.message


def test_structure_limits_are_settings():
    """The limits come from the settings; what a smaller limit refuses, a larger one decodes."""
    progressive = encode(gradient(), "JPEG", progressive=True)  # ~10 scans: always accepted
    assert decode_image(progressive, Settings().decode_limits).size == (64, 48)
    with pytest.raises(ImageTooComplex, match="max_jpeg_scans"):
        decode_image(progressive, Settings(max_jpeg_scans=2).decode_limits)
    rle = hostile.bmp_rle(64, 64)
    assert decode_image(rle, Settings().decode_limits).size == (64, 64)
    with pytest.raises(ImageTooLarge, match="max_rle_pixels"):
        decode_image(rle, Settings(max_rle_pixels=1000).decode_limits)
    gif = hostile.gif_comment_blocks(100)
    assert decode_image(gif, Settings().decode_limits).size == (1, 1)
    with pytest.raises(ImageTooComplex, match="max_gif_blocks"):
        decode_image(gif, Settings(max_gif_blocks=50).decode_limits)
    strips = hostile.tiff_many_strips(strips=64)  # one strip a row: legal
    assert decode_image(strips, Settings().decode_limits).size == (64, 64)
    with pytest.raises(ConfigError):
        Settings(max_jpeg_scans=0)


def test_16bit_conversion_in_bands_equals_the_whole_image():
    """The banded 16-bit rescale gives what one float64 pass over the whole image gives."""
    rng = np.random.default_rng(3)
    arr = rng.integers(0, 65536, (1500, 900), dtype=np.uint16)  # > 1 band of rows
    img = decode_image(encode(Image.fromarray(arr), "PNG"), MAX)
    expected = np.clip(np.rint(arr.astype(np.float64) * (255.0 / 65535.0)), 0, 255).astype(np.uint8)
    assert np.array_equal(np.asarray(img)[..., 0], expected)


# -- decoding in a child process: a deadline and a memory bound (multidet.isolation) -----------------


def first(photos: dict[str, bytes]) -> bytes:
    return next(iter(photos.values()))


def test_isolated_decode_gives_the_same_pixels(photos):
    from multidet.isolation import InProcessDecoder, IsolatedDecoder

    iso, here = IsolatedDecoder(DecodeLimits(), 30, 1024), InProcessDecoder(DecodeLimits())
    try:
        for body in [*photos.values(), hostile.png16(), encode(Image.new("RGBA", (7, 5)), "PNG")]:
            assert iso(body).tobytes() == here(body).tobytes()
        for body, cls in (
            (b"", BadRequest),
            (b"not an image", UnsupportedImage),
            (hostile.jpeg_many_scans(), ImageTooComplex),
        ):
            with pytest.raises(cls):
                iso(body)  # the same refusals, raised in the parent
        assert iso.restarts == 0
    finally:
        iso.close()
    assert Settings().decode_deadline_s > 0  # served this way by default


def test_decode_past_its_deadline_is_422_and_the_next_image_decodes(photos):
    """A run-length BMP of 40 M one-pixel runs takes Pillow's Python decoder many seconds; with its
    structure limit lifted only the deadline stops it: 422, the child is replaced, the next image is
    served. (The margin is 0.2 s against several seconds: no machine is that fast.)"""
    from multidet.isolation import DecodeTimeout, IsolatedDecoder

    iso = IsolatedDecoder(DecodeLimits(max_rle_pixels=10**9), 0.2, 1024)
    try:
        with pytest.raises(DecodeTimeout) as err:
            iso(hostile.bmp_rle(8000, 5000))
        assert err.value.status == 422 and "decode_deadline_s" in err.value.message and iso.restarts == 1
        assert iso(first(photos)).size == Image.open(io.BytesIO(first(photos))).size
    finally:
        iso.close()


def test_decode_needing_more_memory_than_allowed_is_413(photos):
    """A 12k x 12k grey PNG (a few hundred kB, header within max_image_pixels once raised) needs 144 MB
    as L and 432 MB as RGB; a child capped at 256 MiB cannot: 413, and the next image is served."""
    from multidet.isolation import DecodeOutOfMemory, IsolatedDecoder

    buf = io.BytesIO()
    Image.new("L", (12_000, 12_000), 0).save(buf, "PNG")
    iso = IsolatedDecoder(DecodeLimits(max_image_pixels=300_000_000), 120, 256)
    try:
        with pytest.raises(DecodeOutOfMemory) as err:
            iso(buf.getvalue())
        assert err.value.status == 413 and "decode_memory_mib" in err.value.message
        assert iso(first(photos)).size == Image.open(io.BytesIO(first(photos))).size
    finally:
        iso.close()


def test_a_decoder_that_dies_fails_its_image_alone(photos):
    import os
    import signal

    from multidet.isolation import IsolatedDecoder

    iso = IsolatedDecoder(DecodeLimits(), 30, 1024)
    try:
        iso(first(photos))
        os.kill(iso._proc.pid, signal.SIGKILL)  # as a segfault in a codec would
        iso._proc.wait()
        assert iso(first(photos)).size == Image.open(io.BytesIO(first(photos))).size  # a new child took over
    finally:
        iso.close()


def test_decode_bounds_are_settings():
    from multidet.isolation import InProcessDecoder, IsolatedDecoder, decoder_for

    assert isinstance(decoder_for(Settings(decode_deadline_s=0)), InProcessDecoder)
    iso = decoder_for(Settings.from_mapping({"decode_deadline_s": "2.5", "decode_memory_mib": "512"}))
    assert isinstance(iso, IsolatedDecoder) and (iso.deadline_s, iso.memory_mib) == (2.5, 512)
    for bad in ({"decode_deadline_s": -1}, {"decode_memory_mib": 8}):
        with pytest.raises(ConfigError):
            Settings(**bad)
