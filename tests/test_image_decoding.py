"""Decoding user images within limits: formats, corrupt and truncated data, byte and pixel limits, image
counts, EXIF orientation, and the reference's resize arithmetic at the published processor settings."""

from __future__ import annotations

import io
import struct
import zlib

import pytest
from PIL import Image

from dgserve.model.image_processing import (
    ImageDecodeError,
    ImageLimits,
    ImageTooLargeError,
    TooManyImagesError,
    TooManyPixelsError,
    UnsupportedImageTypeError,
    check_image_count,
    decode_image,
    num_soft_tokens,
    target_size,
)
from dgserve.model.vision_config import ImageProcessorConfig

LIMITS = ImageLimits(max_images_per_request=2, max_pixels=10_000, max_bytes=50_000)


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def picture(width: int = 40, height: int = 30, mode: str = "RGB") -> Image.Image:
    image = Image.new("RGB", (width, height), (10, 20, 30))
    for x in range(width):
        image.putpixel((x, x % height), (250, 100, 5))
    return image.convert(mode)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_accepted_formats_decode(fmt):
    decoded = decode_image(encode(picture(), fmt, **({"lossless": True} if fmt == "WEBP" else {})), LIMITS)
    assert decoded.size == (40, 30)
    if fmt != "JPEG":
        assert decoded.convert("RGB").getpixel((3, 3)) == (250, 100, 5)


@pytest.mark.parametrize(("fmt", "name"), [("GIF", "GIF"), ("BMP", "BMP"), ("TIFF", "TIFF")])
def test_other_image_formats_are_named_and_refused(fmt, name):
    with pytest.raises(UnsupportedImageTypeError, match=f"image is a {name} image; accepted formats are PNG, "
                                                         "JPEG and WebP"):
        decode_image(encode(picture(), fmt), LIMITS)


@pytest.mark.parametrize("data", [b"not an image at all", b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, b""])
def test_garbage_is_a_decode_error(data):
    with pytest.raises(ImageDecodeError):
        decode_image(data, LIMITS)


def test_truncated_image_is_a_decode_error():
    data = encode(picture(80, 60), "PNG", compress_level=0)
    with pytest.raises(ImageDecodeError, match="corrupt or truncated"):
        decode_image(data[: len(data) // 2], LIMITS)


def test_byte_limit_names_the_limit():
    data = encode(picture(), "PNG")
    tight = ImageLimits(max_bytes=len(data) - 1)
    with pytest.raises(ImageTooLargeError, match=f"is {len(data)} bytes; the limit is {len(data) - 1} bytes "
                                                 r"\(max_bytes\)"):
        decode_image(data, tight, what="image 2")
    assert decode_image(data, ImageLimits(max_bytes=len(data))).size == (40, 30)


def _png_header_claiming(width: int, height: int) -> bytes:
    """A few-byte PNG whose header claims ``width x height`` (its pixel data is a 1x1 image's)."""
    small = encode(Image.new("L", (1, 1)), "PNG")
    ihdr = bytearray(small[12:29])  # chunk type + 13 data bytes
    ihdr[4:12] = struct.pack(">II", width, height)
    return small[:12] + bytes(ihdr) + struct.pack(">I", zlib.crc32(ihdr)) + small[33:]


def test_pixel_limit_is_checked_before_decoding():
    with pytest.raises(TooManyPixelsError, match=r"is 200x300 = 60000 pixels; the limit is 10000 pixels "
                                                 r"\(max_pixels\)"):
        decode_image(_png_header_claiming(200, 300), LIMITS)
    # 400M pixels: past Pillow's decompression-bomb threshold too; still the same error
    with pytest.raises(TooManyPixelsError, match=r"400000000 pixels.*the limit is 10000 pixels \(max_pixels\)"):
        decode_image(_png_header_claiming(20_000, 20_000), LIMITS)
    with pytest.raises(ValueError, match="max_pixels"):
        ImageLimits(max_pixels=10**9)


def test_image_count_limit():
    check_image_count(2, LIMITS)
    with pytest.raises(TooManyImagesError, match=r"3 images; at most 2 are allowed \(max_images_per_request\)"):
        check_image_count(3, LIMITS)


def test_exif_orientation_is_applied():
    image = picture(40, 30)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees clockwise: viewers show it 30 wide, 40 tall
    decoded = decode_image(encode(image, "JPEG", exif=exif.tobytes()), LIMITS)
    assert decoded.size == (30, 40)


@pytest.mark.parametrize("max_soft_tokens", [70, 280, 1120])
@pytest.mark.parametrize(("height", "width"), [(480, 640), (1080, 1920), (4000, 3000), (10, 5000), (5000, 10),
                                               (768, 768), (1, 1)])
def test_resize_at_the_published_processor_settings(height, width, max_soft_tokens):
    from transformers.models.gemma4.image_processing_pil_gemma4 import get_aspect_ratio_preserving_size

    cfg = ImageProcessorConfig(max_soft_tokens=max_soft_tokens)  # patch 16, pooling 3
    expected = get_aspect_ratio_preserving_size(height, width, 16, cfg.max_patches, 3)
    assert target_size(height, width, cfg) == expected
    assert num_soft_tokens(height, width, cfg) == expected[0] * expected[1] // 48 ** 2 <= max_soft_tokens
