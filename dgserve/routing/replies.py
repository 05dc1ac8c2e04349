"""How each endpoint words its answer: the final JSON body of /v1/completions and /v1/chat/completions,
and the SSE chunks of their streams (content, tool calls, finish, usage, draft), in OpenAI's exact shapes, for any
number of choices.
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
    ChatLogprobs,
    CompletionChoice,
    CompletionChunk,
    CompletionLogprobs,
    CompletionResponse,
    Draft,
    DraftChunk,
    DraftPayload,
    FinishReason,
    TokenLogprob,
    ToolCall,
    ToolCallDelta,
    TopLogprob,
    Usage,
)
from dgserve.routing.sse import sse_data, sse_event


@dataclass
class LoggedToken:
    """A returned token with its log-probability and its step's top alternatives (as text)."""

    token: str
    logprob: float
    top: list[tuple[str, float]] = field(default_factory=list)


@dataclass
class ChoiceResult:
    """One finished choice of a non-streaming reply."""

    index: int
    text: str | None  # None: a chat choice that is only tool calls
    finish_reason: FinishReason
    logprobs: list[LoggedToken] | None = None
    tool_calls: list[ToolCall] | None = None


def _bytes(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def chat_logprobs(tokens: list[LoggedToken]) -> ChatLogprobs:
    return ChatLogprobs(content=[
        TokenLogprob(token=t.token, logprob=t.logprob, bytes=_bytes(t.token),
                     top_logprobs=[TopLogprob(token=s, logprob=v, bytes=_bytes(s)) for s, v in t.top])
        for t in tokens])


def completion_logprobs(tokens: list[LoggedToken], offset: int) -> CompletionLogprobs:
    """``offset``: characters of the choice's text before the first of ``tokens``."""
    out = CompletionLogprobs()
    for t in tokens:
        out.tokens.append(t.token)
        out.token_logprobs.append(t.logprob)
        top: dict[str, float] = {}
        for s, v in t.top:
            top.setdefault(s, v)  # two ids may read the same; the likelier one is first
        out.top_logprobs.append(top)
        out.text_offset.append(offset)
        offset += len(t.token)
    return out


@dataclass
class Reply(ABC):
    id: str
    model: str
    include_usage: bool = False
    continuous_usage: bool = False  # every chunk carries the usage so far
    created: int = field(default_factory=lambda: int(time.time()))
    draft_object: ClassVar[Literal["text_completion.draft", "chat.completion.chunk.draft"]]

    @abstractmethod
    def response(self, choices: list[ChoiceResult], usage: Usage) -> BaseModel:
        """The non-streaming body."""

    @abstractmethod
    def _chunk(self, choices: list, usage: Usage | None = None) -> BaseModel: ...

    @abstractmethod
    def _content_choice(self, index: int, text: str | None, finish_reason: FinishReason | None,
                        logprobs: list[LoggedToken] | None, offset: int) -> BaseModel: ...

    def _send(self, chunk: BaseModel) -> str:
        # OpenAI puts "usage": null on every chunk only when include_usage was asked for.
        return sse_data(chunk, exclude=None if self.include_usage or self.continuous_usage else {"usage"})

    def _usage_so_far(self, usage: Usage | None) -> Usage | None:
        return usage if self.continuous_usage else None

    def opening(self, index: int, usage: Usage | None = None) -> list[str]:
        return []

    def content(self, index: int, text: str, logprobs: list[LoggedToken] | None = None, offset: int = 0,
                usage: Usage | None = None) -> str:
        return self._send(self._chunk([self._content_choice(index, text, None, logprobs, offset)],
                                      self._usage_so_far(usage)))

    def finish(self, index: int, finish_reason: FinishReason, usage: Usage | None = None) -> str:
        return self._send(self._chunk([self._content_choice(index, None, finish_reason, None, 0)],
                                      self._usage_so_far(usage)))

    def usage(self, usage: Usage) -> str:
        return self._send(self._chunk([], usage))

    def draft(self, event: DraftEvent, canvas_index: int) -> str:
        draft = Draft(text=event.text, token_ids=event.token_ids, step=event.step, canvas_index=canvas_index)
        return sse_event("draft", DraftChunk(id=self.id, object=self.draft_object, created=self.created,
                                             model=self.model, dgserve=DraftPayload(draft=draft)))


@dataclass
class CompletionReply(Reply):
    draft_object: ClassVar = "text_completion.draft"

    def response(self, choices: list[ChoiceResult], usage: Usage) -> CompletionResponse:
        return CompletionResponse(id=self.id, created=self.created, model=self.model, usage=usage, choices=[
            CompletionChoice(index=c.index, text=c.text or "", finish_reason=c.finish_reason,
                             logprobs=None if c.logprobs is None else completion_logprobs(c.logprobs, 0))
            for c in choices])

    def _chunk(self, choices: list, usage: Usage | None = None) -> CompletionChunk:
        return CompletionChunk(id=self.id, created=self.created, model=self.model, choices=choices, usage=usage)

    def _content_choice(self, index: int, text: str | None, finish_reason: FinishReason | None,
                        logprobs: list[LoggedToken] | None, offset: int) -> CompletionChoice:
        return CompletionChoice(index=index, text=text or "", finish_reason=finish_reason,
                                logprobs=None if logprobs is None else completion_logprobs(logprobs, offset))


@dataclass
class ChatReply(Reply):
    draft_object: ClassVar = "chat.completion.chunk.draft"

    def response(self, choices: list[ChoiceResult], usage: Usage) -> ChatCompletionResponse:
        return ChatCompletionResponse(id=self.id, created=self.created, model=self.model, usage=usage, choices=[
            ChatChoice(index=c.index, message=AssistantMessage(content=c.text, tool_calls=c.tool_calls),
                       finish_reason=c.finish_reason,
                       logprobs=None if c.logprobs is None else chat_logprobs(c.logprobs))
            for c in choices])

    def _chunk(self, choices: list, usage: Usage | None = None) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=self.id, created=self.created, model=self.model, choices=choices, usage=usage)

    def _content_choice(self, index: int, text: str | None, finish_reason: FinishReason | None,
                        logprobs: list[LoggedToken] | None, offset: int) -> ChatChunkChoice:
        return ChatChunkChoice(index=index, delta=ChatDelta(content=text), finish_reason=finish_reason,
                               logprobs=None if logprobs is None else chat_logprobs(logprobs))

    def opening(self, index: int, usage: Usage | None = None) -> list[str]:
        return [self._send(self._chunk([ChatChunkChoice(index=index, delta=ChatDelta(role="assistant", content=""))],
                                       self._usage_so_far(usage)))]

    def tool_calls(self, index: int, deltas: list[ToolCallDelta], usage: Usage | None = None) -> str:
        return self._send(self._chunk([ChatChunkChoice(index=index, delta=ChatDelta(tool_calls=deltas))],
                                      self._usage_so_far(usage)))
