"""Turning a prompt or a chat into checked token ids: shared by the ingress's backend and the batch jobs."""

from __future__ import annotations

from typing import Any

from dgserve.engine.request import InvalidRequest, MaxTokensTooLarge, PromptTooLong
from dgserve.model.config import ModelConfig
from dgserve.model.tokenizer import TokenizerError, check_no_image_tokens


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
    placeholders (text only), as ``InvalidPromptError`` (a 400)."""

    def __init__(self, config: ModelConfig, tokenizer: Any) -> None:
        self._vocab = config.text.vocab_size
        self._tokenizer = tokenizer
        image_id = config.image_token_id
        self._image_id = image_id if image_id is not None and image_id < self._vocab else tokenizer.image_id

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

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        try:
            return self.check_ids(self._tokenizer.encode_chat(messages))
        except TokenizerError as exc:
            raise InvalidPromptError(str(exc)) from exc
