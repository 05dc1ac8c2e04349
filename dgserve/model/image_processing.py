"""Image bytes -> what the vision tower takes, equal to transformers' Gemma 4 image processor (PIL backend):
decoding within configured limits, aspect-preserving resize to the patch budget, patching, patch positions
and the number of soft tokens per image. Pillow only (no torchvision).

A ``ProcessedImage`` keeps its resized pixels as uint8 patches (a quarter of the float size, exact: the float
pixel values are computed from them as the reference computes them) and a content hash of what the model sees.
"""

from __future__ import annotations

import hashlib
import io
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps
from pydantic import BaseModel, ConfigDict, Field

from dgserve.model.vision_config import ImageProcessorConfig

# What clients may send (the OpenAI API's image formats); Pillow is told to try these decoders only.
ACCEPTED_FORMATS = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}


class ImageInputError(ValueError):
    """An image a user sent cannot be used; the message says which limit or what was wrong."""


class ImageDecodeError(ImageInputError):
    """The bytes are not a readable image (corrupt or truncated)."""


class UnsupportedImageTypeError(ImageInputError):
    """The bytes are an image of a format dgserve does not accept."""


class ImageTooLargeError(ImageInputError):
    """The encoded image is larger than ``max_bytes``."""


class TooManyPixelsError(ImageInputError):
    """The decoded image has more than ``max_pixels`` pixels."""


class TooManyImagesError(ImageInputError):
    """A request carries more than ``max_images_per_request`` images."""


class ImageLimits(BaseModel):
    """Per-request image limits (a request beyond them gets a 400 that names the limit)."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)

    max_images_per_request: int = Field(8, ge=0)
    # width x height of the decoded image, before resizing; at most Pillow's decompression-bomb threshold
    max_pixels: int = Field(25_000_000, gt=0, le=Image.MAX_IMAGE_PIXELS or 2**62)
    max_bytes: int = Field(20 * 1024 * 1024, gt=0)  # encoded size of one image


def check_image_count(count: int, limits: ImageLimits) -> None:
    if count > limits.max_images_per_request:
        raise TooManyImagesError(
            f"the request has {count} images; at most {limits.max_images_per_request} are allowed "
            "(max_images_per_request)")


def decode_image(data: bytes, limits: ImageLimits, what: str = "image") -> Image.Image:
    """Decode PNG/JPEG/WebP bytes into an upright image (EXIF orientation applied), checking the byte and
    pixel limits before the pixels are decoded. The first frame of an animation is used."""
    if len(data) > limits.max_bytes:
        raise ImageTooLargeError(f"{what} is {len(data)} bytes; the limit is {limits.max_bytes} bytes (max_bytes)")
    if not data:
        raise ImageDecodeError(f"{what} is empty")
    try:
        with warnings.catch_warnings():
            # the pixel limit below is ours; Pillow's bomb warning would only duplicate it
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=list(ACCEPTED_FORMATS))
    except Image.UnidentifiedImageError as exc:
        kind = _sniff_other_format(data)
        if kind is not None:
            raise UnsupportedImageTypeError(
                f"{what} is a {kind} image; accepted formats are PNG, JPEG and WebP") from exc
        raise ImageDecodeError(f"{what} is not a readable PNG, JPEG or WebP image (corrupt or not an image)"
                               ) from exc
    except Image.DecompressionBombError as exc:  # beyond twice Pillow's own limit, which max_pixels stays under
        raise TooManyPixelsError(f"{what}: {exc}; the limit is {limits.max_pixels} pixels (max_pixels)") from exc
    except (OSError, ValueError) as exc:
        raise ImageDecodeError(f"{what} cannot be read: {exc}") from exc
    width, height = image.size
    if width * height > limits.max_pixels:
        raise TooManyPixelsError(f"{what} is {width}x{height} = {width * height} pixels; the limit is "
                                 f"{limits.max_pixels} pixels (max_pixels)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image.load()
            upright = ImageOps.exif_transpose(image)
    except (Image.DecompressionBombError, OSError, ValueError, SyntaxError, EOFError) as exc:
        raise ImageDecodeError(f"{what} is corrupt or truncated: {exc}") from exc
    return upright if upright is not None else image


def _sniff_other_format(data: bytes) -> str | None:
    """Name the format of an image Pillow can read but dgserve does not accept (for a clearer error)."""
    try:
        with Image.open(io.BytesIO(data)) as other:
            return str(other.format)
    except Exception:  # anything Pillow cannot identify is just "not an image"
        return None


@dataclass(frozen=True)
class ProcessedImage:
    """One image as the vision tower takes it (before padding to the batch's patch count)."""

    patches: torch.Tensor  # [n, 3 p^2] uint8: the resized RGB pixels of each patch, (row, column, channel) order
    positions: torch.Tensor  # [n, 2] int64: (x, y) patch coordinates, row-major
    num_soft_tokens: int  # placeholder tokens of this image in the prompt (n / pooling_kernel_size^2)
    height: int  # resized size in pixels
    width: int
    content_hash: bytes  # digest of what the model sees: same pixels after resizing -> same hash

    @property
    def num_patches(self) -> int:
        return self.patches.shape[0]


def target_size(height: int, width: int, cfg: ImageProcessorConfig) -> tuple[int, int]:
    """The reference's aspect-preserving size: the largest with at most ``max_patches`` patches and sides
    divisible by ``pooling_kernel_size x patch_size``."""
    p, k, max_patches = cfg.patch_size, cfg.pooling_kernel_size, cfg.max_patches
    factor = math.sqrt(max_patches * p ** 2 / (height * width))
    side = k * p
    th = math.floor(factor * height / side) * side
    tw = math.floor(factor * width / side) * side
    max_side = (max_patches // k ** 2) * side
    # an extreme aspect ratio rounds one side to 0: keep one pooled row (or column), as the reference does
    if th == 0:
        th, tw = side, min(math.floor(width / height) * side, max_side)
    elif tw == 0:
        th, tw = min(math.floor(height / width) * side, max_side), side
    assert th * tw <= max_patches * p ** 2, (height, width, th, tw)
    return th, tw


def num_soft_tokens(height: int, width: int, cfg: ImageProcessorConfig) -> int:
    th, tw = target_size(height, width, cfg)
    return (th // cfg.patch_size) * (tw // cfg.patch_size) // cfg.pooling_kernel_size ** 2


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB, with any transparency composited onto white (as the reference processor converts)."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


class ImageProcessor:
    """The reference Gemma 4 image processor, for one checkpoint's settings."""

    def __init__(self, config: ImageProcessorConfig) -> None:
        self.config = config

    def preprocess(self, image: Image.Image) -> ProcessedImage:
        cfg = self.config
        rgb = to_rgb(image)
        width, height = rgb.size
        if cfg.do_resize:
            th, tw = target_size(height, width, cfg)
            if (th, tw) != (height, width):
                rgb = rgb.resize((tw, th), resample=Image.Resampling(cfg.resample))
        pixels = np.asarray(rgb, dtype=np.uint8)  # [H, W, 3]
        h, w = pixels.shape[:2]
        p = cfg.patch_size
        ph, pw = h // p, w // p
        if ph == 0 or pw == 0 or ph * pw % cfg.pooling_kernel_size ** 2:
            raise ImageInputError(f"image of {w}x{h} pixels cannot be cut into {p}-pixel patches pooled "
                                  f"{cfg.pooling_kernel_size}x{cfg.pooling_kernel_size} (do_resize is off)")
        patches = (pixels[:ph * p, :pw * p].reshape(ph, p, pw, p, 3).transpose(0, 2, 1, 3, 4)
                   .reshape(ph * pw, p * p * 3))
        ys, xs = np.meshgrid(np.arange(ph), np.arange(pw), indexing="ij")
        positions = np.stack([xs, ys], axis=-1).reshape(ph * pw, 2)
        digest = hashlib.blake2b(digest_size=16)
        digest.update(np.array([ph, pw], dtype="<i8").tobytes())
        digest.update(np.ascontiguousarray(patches).tobytes())
        return ProcessedImage(
            patches=torch.from_numpy(np.ascontiguousarray(patches)),
            positions=torch.from_numpy(positions.astype(np.int64)),
            num_soft_tokens=ph * pw // cfg.pooling_kernel_size ** 2,
            height=h, width=w, content_hash=digest.digest(),
        )

    def pixel_values(self, patches: torch.Tensor) -> torch.Tensor:
        """uint8 patches -> float32 pixel values, with the reference's arithmetic (rescale in float64, then
        float32; normalisation in float32)."""
        cfg = self.config
        x = patches.to(torch.float64)
        if cfg.do_rescale:
            x = x * cfg.rescale_factor
        x = x.to(torch.float32)
        if cfg.do_normalize:
            channels = x.view(*x.shape[:-1], -1, 3)  # innermost is the channel
            mean = torch.tensor(cfg.image_mean, dtype=torch.float32)
            std = torch.tensor(cfg.image_std, dtype=torch.float32)
            x = ((channels - mean) / std).view(x.shape)
        return x

    def batch(self, images: Sequence[ProcessedImage], device: torch.device | str = "cpu"
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """The reference's batch layout: ``pixel_values [B, max_patches, 3 p^2]`` (fp32, zero padding) and
        ``positions [B, max_patches, 2]`` (``-1`` padding)."""
        cfg = self.config
        n = cfg.max_patches
        pixel_values = torch.zeros(len(images), n, 3 * cfg.patch_size ** 2, dtype=torch.float32)
        positions = torch.full((len(images), n, 2), -1, dtype=torch.int64)
        for i, image in enumerate(images):
            if image.num_patches > n:
                raise ImageInputError(f"image {i} has {image.num_patches} patches, more than max_patches={n}")
            if image.patches.shape[1] != pixel_values.shape[2]:
                raise ImageInputError(f"image {i} was cut into patches of {image.patches.shape[1]} values; this "
                                      f"model takes {pixel_values.shape[2]}")
            pixel_values[i, :image.num_patches] = self.pixel_values(image.patches)
            positions[i, :image.num_patches] = image.positions
        return pixel_values.to(device), positions.to(device)


__all__ = [
    "ACCEPTED_FORMATS", "ImageDecodeError", "ImageInputError", "ImageLimits", "ImageProcessor", "ImageTooLargeError",
    "ProcessedImage", "TooManyImagesError", "TooManyPixelsError", "UnsupportedImageTypeError", "check_image_count",
    "decode_image", "num_soft_tokens", "target_size", "to_rgb",
]
