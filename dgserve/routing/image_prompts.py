"""A chat with image parts -> prompt ids and ``PromptImage``s: the images loaded (``routing.images``), decoded and
preprocessed within the configured limits, the chat template rendered with one image placeholder per image, and
each placeholder expanded to ``<boi> <image> x num_soft_tokens <eoi>`` as the reference processor expands it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import httpx

from dgserve.config import ImageSettings
from dgserve.engine.prompt_images import check_images
from dgserve.engine.request import PromptImage
from dgserve.model.config import ModelConfig
from dgserve.model.image_processing import (
    ImageInputError,
    ImageProcessor,
    ProcessedImage,
    check_image_count,
    decode_image,
)
from dgserve.routing.images import ImageURL, load_image_bytes


async def load_images(urls: Sequence[ImageURL], settings: ImageSettings, processor: ImageProcessor
                      ) -> list[ProcessedImage]:
    """Fetch (concurrently), decode and preprocess the images of one request; ImageInputError names the part."""
    check_image_count(len(urls), settings.limits)
    async with httpx.AsyncClient(follow_redirects=False, trust_env=False) as client:
        blobs = await asyncio.gather(*(load_image_bytes(url, settings.fetch, settings.limits.max_bytes, client)
                                       for url in urls))

    def prepare(data: bytes, where: str) -> ProcessedImage:
        return processor.preprocess(decode_image(data, settings.limits, what=f"{where}: the image"))

    # decoding and resizing are CPU work: off the event loop
    return list(await asyncio.gather(*(asyncio.to_thread(prepare, data, url.where)
                                       for data, url in zip(blobs, urls, strict=True))))


def expand_placeholders(ids: Sequence[int], images: Sequence[ProcessedImage], config: ModelConfig
                        ) -> tuple[list[int], tuple[PromptImage, ...]]:
    """Replace the i-th image placeholder of ``ids`` by image i's ``<boi>? <image> x n <eoi>?`` run."""
    image_id = config.image_token_id
    if image_id is None:
        raise ImageInputError("this model has no image token: it cannot take images")
    found = sum(1 for t in ids if t == image_id)
    if found != len(images):
        raise ImageInputError(f"the chat template produced {found} image placeholders for {len(images)} images "
                              "(is there an image placeholder token in the text?)")
    out: list[int] = []
    placed: list[PromptImage] = []
    pending = iter(images)
    for token in ids:
        if token != image_id:
            out.append(token)
            continue
        image = next(pending)
        if config.boi_token_id is not None:
            out.append(config.boi_token_id)
        placed.append(PromptImage(len(out), image))
        out.extend([image_id] * image.num_soft_tokens)
        if config.eoi_token_id is not None:
            out.append(config.eoi_token_id)
    check_images(out, placed, image_id)
    return out, tuple(placed)


__all__ = ["expand_placeholders", "load_images"]
