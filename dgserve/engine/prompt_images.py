"""Where a prompt's images sit, and what that means for prefill: checking the image spans against the prompt's
placeholder tokens, chunk boundaries that never cut an image (the encoder attends bidirectionally within one),
and prefix-cache keys that carry each image's content hash (same text, different image: different KV).
"""

from __future__ import annotations

from collections.abc import Sequence

from dgserve.engine.request import PromptImage


def check_images(prompt_ids: Sequence[int], images: Sequence[PromptImage], image_token_id: int | None) -> None:
    """Raise ValueError unless the images' spans are in order, inside the prompt, and cover exactly the prompt's
    image placeholder tokens. (A prompt without images is the caller's to check: as in the reference, its
    placeholder ids are then plain tokens.)"""
    if not images:
        return
    if image_token_id is None:
        raise ValueError("this model has no image token id: it cannot take images")
    end = 0
    for i, image in enumerate(images):
        if image.start < end or image.end > len(prompt_ids):
            raise ValueError(f"image {i} spans prompt positions [{image.start}, {image.end}), which overlap another "
                             f"image or leave the prompt of {len(prompt_ids)} tokens")
        if any(t != image_token_id for t in prompt_ids[image.start:image.end]):
            raise ValueError(f"image {i}'s positions [{image.start}, {image.end}) are not all image tokens")
        end = image.end
    placeholders = sum(1 for t in prompt_ids if t == image_token_id)
    covered = sum(image.image.num_soft_tokens for image in images)
    if placeholders != covered:
        raise ValueError(f"the prompt holds {placeholders} image tokens but its images have {covered} soft tokens")


def chunk_end(position: int, prompt_len: int, chunk: int, images: Sequence[PromptImage]) -> int:
    """End of the prefill chunk starting at ``position``: the next multiple of ``chunk`` (fixed boundaries), moved
    to the end of an image it would cut, so that every image is encoded within one forward."""
    end = min(prompt_len, (position // chunk + 1) * chunk)
    for image in images:
        if image.start < end < image.end:
            end = image.end
    return end


def spans_in(images: Sequence[PromptImage], start: int, end: int) -> list[PromptImage]:
    """The images whose soft tokens lie in ``[start, end)`` (a chunk never holds part of one)."""
    inside = [image for image in images if start <= image.start and image.end <= end]
    assert all(not (image.start < end and start < image.end) or image in inside for image in images), (
        "a prefill chunk cuts an image", start, end)
    return inside


def cut_points(images: Sequence[PromptImage]) -> list[tuple[int, int]]:
    """``(start, end)`` of each image: a cached prefix may end before or after an image, not inside it."""
    return [(image.start, image.end) for image in images]


def key_ids(prompt_ids: Sequence[int], images: Sequence[PromptImage]) -> list[int]:
    """The ids the prefix cache hashes: the prompt, with the first two placeholders of each image replaced by
    its 128-bit content hash (as two negative ints: never a token id). The hash chain carries the image into the
    key of every later block, so prompts that differ only in an image never share KV."""
    if not images:
        return list(prompt_ids)
    keys = list(prompt_ids)
    for image in images:
        digest = image.image.content_hash
        for j in range(min(2, image.end - image.start)):
            word = int.from_bytes(digest[8 * j:8 * j + 8], "little")
            keys[image.start + j] = -1 - (word >> 1)
    return keys


__all__ = ["check_images", "chunk_end", "cut_points", "key_ids", "spans_in"]
