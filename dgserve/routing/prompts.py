"""Turning a prompt or a chat (images included) into checked token ids: shared by the ingress's backend and the batch
jobs."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from dgserve.config import ImageSettings
from dgserve.engine.request import InvalidRequest, MaxTokensTooLarge, PromptImage, PromptTooLong
from dgserve.model.config import ModelConfig
from dgserve.model.image_processing import ImageInputError, ImageProcessor
from dgserve.model.tokenizer import TokenizerError, check_no_image_tokens
from dgserve.model.vision_checkpoint import VisionSpec
from dgserve.routing.image_prompts import expand_placeholders, load_images
from dgserve.routing.images import ImageURL


class InvalidPromptError(ValueError):
    """A prompt the model side refuses (token ids out of range, image placeholders, a conversation the chat
    template rejects, prompt + max_tokens too large for the KV cache): the ingress answers it with a 400 that
    names the request field at fault when there is one."""

    def __init__(self, message: str, param: str | None = None, code: str = "invalid_prompt") -> None:
        super().__init__(message)
        self.param = param
        self.code = code

    @classmethod
    def from_engine(cls, exc: InvalidRequest) -> InvalidPromptError:
        """The engine's refusal of a request (``Engine.check_request``) as a 400."""
        if isinstance(exc, MaxTokensTooLarge):
            return cls(f"The request does not fit this server's KV cache: {exc}.", "max_tokens",
                       "context_length_exceeded")
        if isinstance(exc, PromptTooLong):
            return cls(f"The prompt does not fit this server's KV cache: {exc}.", code="context_length_exceeded")
        return cls(str(exc))


class PromptEncoder:
    """Encodes prompts and chats with the checkpoint's tokenizer and rejects ids outside the vocabulary or image
    placeholders in text, as ``InvalidPromptError`` (a 400). Chats with image parts need ``vision`` (the
    checkpoint's vision tower, when the deployment loads it)."""

    def __init__(self, config: ModelConfig, tokenizer: Any, vision: VisionSpec | None = None,
                 images: ImageSettings | None = None, vision_off: bool = False) -> None:
        self._config = config
        self._vocab = config.text.vocab_size
        self._tokenizer = tokenizer
        image_id = config.image_token_id
        self._image_id = image_id if image_id is not None and image_id < self._vocab else tokenizer.image_id
        self._processor = ImageProcessor(vision.processor) if vision is not None else None
        self._image_settings = images or ImageSettings()
        self._vision_off = vision_off

    def check_ids(self, ids: list[int]) -> list[int]:
        bad = next((t for t in ids if not 0 <= t < self._vocab), None)
        if bad is not None:
            raise InvalidPromptError(f"token id {bad} is outside the vocabulary [0, {self._vocab})")
        try:
            check_no_image_tokens(ids, self._image_id)
        except TokenizerError as exc:
            raise InvalidPromptError(str(exc)) from exc
        return ids

    def encode(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, list):
            return self.check_ids(list(prompt))
        return self.check_ids(self._tokenizer.encode(prompt))

    def encode_chat(self, messages: list[dict[str, Any]], **options: Any) -> list[int]:
        """``options``: ``tools``, ``add_generation_prompt``, ``template_kwargs`` (``Tokenizer.encode_chat``)."""
        try:
            return self.check_ids(self._tokenizer.encode_chat(messages, **options))
        except TokenizerError as exc:
            raise InvalidPromptError(str(exc)) from exc

    def decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids)

    def token_text(self, token_id: int) -> str:
        """One token's text, special tokens included (what logprobs name a token by)."""
        return self._tokenizer.decode([token_id], skip_special_tokens=False)

    async def encode_chat_with_images(self, messages: list[dict[str, Any]], urls: Sequence[ImageURL], **options: Any
                                      ) -> tuple[list[int], tuple[PromptImage, ...]]:
        """``messages`` with one ``{"type": "image"}`` part per entry of ``urls`` (in order), rendered by the
        chat template; each image placeholder expanded to the image's soft-token run."""
        if self._processor is None:
            raise InvalidPromptError(
                "image inputs are turned off on this server (vision: off); start it with vision: auto (dgserve run "
                "--vision auto, or model.vision in the deploy config) to accept image_url parts" if self._vision_off
                else "this model has no vision tower (its checkpoint has no vision_config): send text content only",
                "messages")
        try:
            images = await load_images(urls, self._image_settings, self._processor)
            ids = self._tokenizer.encode_chat(messages, **options)
            ids, placed = expand_placeholders(ids, images, self._config)
        except (ImageInputError, TokenizerError) as exc:
            raise InvalidPromptError(str(exc), "messages") from exc
        bad = next((t for t in ids if not 0 <= t < self._vocab), None)
        if bad is not None:
            raise InvalidPromptError(f"token id {bad} is outside the vocabulary [0, {self._vocab})", "messages")
        return ids, placed
