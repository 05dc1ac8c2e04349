"""How each endpoint words its answer: the final JSON body of /v1/completions and /v1/chat/completions,
and the SSE chunks of their streams (content, finish, usage, draft), in OpenAI's exact shapes.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar, Literal

from pydantic import BaseModel

from dgserve.engine.request import DraftEvent
from dgserve.routing.openai_protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatDelta,
    CompletionChoice,
    CompletionChunk,
    CompletionResponse,
    Draft,
    DraftChunk,
    DraftPayload,
    FinishReason,
    Usage,
)
from dgserve.routing.sse import sse_data, sse_event


@dataclass
class Reply(ABC):
    id: str
    model: str
    include_usage: bool = False
    created: int = field(default_factory=lambda: int(time.time()))
    draft_object: ClassVar[Literal["text_completion.draft", "chat.completion.chunk.draft"]]

    @abstractmethod
    def response(self, text: str, finish_reason: FinishReason, usage: Usage) -> BaseModel:
        """The non-streaming body."""

    @abstractmethod
    def _chunk(self, choices: list, usage: Usage | None = None) -> BaseModel: ...

    @abstractmethod
    def _content_choice(self, text: str | None, finish_reason: FinishReason | None) -> BaseModel: ...

    def _send(self, chunk: BaseModel) -> str:
        # OpenAI puts "usage": null on every chunk only when include_usage was asked for.
        return sse_data(chunk, exclude=None if self.include_usage else {"usage"})

    def opening(self) -> list[str]:
        return []

    def content(self, text: str) -> str:
        return self._send(self._chunk([self._content_choice(text, None)]))

    def finish(self, finish_reason: FinishReason) -> str:
        return self._send(self._chunk([self._content_choice(None, finish_reason)]))

    def usage(self, usage: Usage) -> str:
        return self._send(self._chunk([], usage))

    def draft(self, event: DraftEvent, canvas_index: int) -> str:
        draft = Draft(text=event.text, token_ids=event.token_ids, step=event.step, canvas_index=canvas_index)
        return sse_event("draft", DraftChunk(id=self.id, object=self.draft_object, created=self.created,
                                             model=self.model, dgserve=DraftPayload(draft=draft)))


@dataclass
class CompletionReply(Reply):
    draft_object: ClassVar = "text_completion.draft"

    def response(self, text: str, finish_reason: FinishReason, usage: Usage) -> CompletionResponse:
        return CompletionResponse(id=self.id, created=self.created, model=self.model, usage=usage,
                                  choices=[CompletionChoice(text=text, finish_reason=finish_reason)])

    def _chunk(self, choices: list, usage: Usage | None = None) -> CompletionChunk:
        return CompletionChunk(id=self.id, created=self.created, model=self.model, choices=choices, usage=usage)

    def _content_choice(self, text: str | None, finish_reason: FinishReason | None) -> CompletionChoice:
        return CompletionChoice(text=text or "", finish_reason=finish_reason)


@dataclass
class ChatReply(Reply):
    draft_object: ClassVar = "chat.completion.chunk.draft"

    def response(self, text: str, finish_reason: FinishReason, usage: Usage) -> ChatCompletionResponse:
        return ChatCompletionResponse(
            id=self.id, created=self.created, model=self.model, usage=usage,
            choices=[ChatChoice(message=AssistantMessage(content=text), finish_reason=finish_reason)])

    def _chunk(self, choices: list, usage: Usage | None = None) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=self.id, created=self.created, model=self.model, choices=choices, usage=usage)

    def _content_choice(self, text: str | None, finish_reason: FinishReason | None) -> ChatChunkChoice:
        return ChatChunkChoice(delta=ChatDelta(content=text), finish_reason=finish_reason)

    def opening(self) -> list[str]:
        return [self._send(self._chunk([ChatChunkChoice(delta=ChatDelta(role="assistant", content=""))]))]
