"""The choices of one API request: each is an engine request of its own (a prompt of a batch, a sample of ``n``);
this module follows each one's committed canvases (text, logprobs, tool calls) and merges their event streams.

A choice's output becomes, canvas by canvas, a ``ChoiceUpdate``: content, logged tokens and complete tool calls, as
the model's tool-call format is parsed (``dgserve.routing.tool_calls``), or as a forced call's JSON arguments
stream (``tool_choice`` naming a function, or ``required``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Literal

from dgserve.engine.request import CanvasEvent, Event, FinalEvent
from dgserve.routing.openai_protocol import FinishReason, FunctionCall, ToolCall
from dgserve.routing.replies import ChoiceResult, LoggedToken
from dgserve.routing.tool_calls import ToolCallParser, new_call_id

ToolMode = Literal["parse", "named", "required"]


@dataclass
class ChoiceUpdate:
    content: str = ""
    logprobs: list[LoggedToken] | None = None
    calls: list[ToolCall] = field(default_factory=list)  # complete calls (parse / required)
    arguments: str = ""  # named: a piece of the forced call's arguments
    call_started: ToolCall | None = None  # named: the call whose arguments follow (sent once, first)


@dataclass
class ChoiceState:
    """One choice's output so far."""

    index: int
    tools: ToolMode | None = None
    tool_name: str | None = None  # named mode
    top_logprobs: int | None = None  # report logprobs with this many alternatives (None: no logprobs)
    token_text: Callable[[int], str] = str
    echo: str = ""
    text: str = ""  # content so far (what `content` chunks carried)
    completion_tokens: int = 0
    logged: list[LoggedToken] = field(default_factory=list)
    calls: list[ToolCall] = field(default_factory=list)
    _parser: ToolCallParser = field(default_factory=ToolCallParser)
    _raw: str = ""  # forced calls: the JSON so far
    _named: ToolCall | None = None

    def canvas(self, event: CanvasEvent) -> ChoiceUpdate:
        self.completion_tokens += event.completion_tokens or 0
        update = ChoiceUpdate(logprobs=self._logged(event))
        if self.tools is None:
            update.content = event.text
        elif self.tools == "parse":
            parsed = self._parser.feed(event.text)
            update.content, update.calls = parsed.content, parsed.calls
            self.calls.extend(parsed.calls)
        elif self.tools == "named":
            self._raw += event.text
            if self._named is None:
                assert self.tool_name is not None
                self._named = ToolCall(id=new_call_id(), function=FunctionCall(name=self.tool_name, arguments=""))
                update.call_started = self._named
            update.arguments = event.text
        else:
            self._raw += event.text
        self.text += update.content
        return update

    def finish(self, final: FinalEvent, reason: FinishReason) -> tuple[ChoiceUpdate, FinishReason]:
        """What the end adds (content held back by the parser, a forced call) and the choice's finish reason."""
        update = ChoiceUpdate()
        if self.tools == "parse":
            update.content = self._parser.finish()
            self.text += update.content
        elif self.tools == "named" and self._named is not None:
            self._named.function.arguments = self._raw
            self.calls.append(self._named)
        elif self.tools == "required":
            call = _required_call(self._raw)
            if call is not None:
                update.calls = [call]
                self.calls.append(call)
            else:  # cut short (max_tokens): the text as it is
                update.content = self._raw
                self.text += self._raw
        if self.calls and reason == "stop":
            reason = "tool_calls"
        return update, reason

    def result(self, reason: FinishReason) -> ChoiceResult:
        content: str | None = self.echo + self.text
        if self.tools is not None and self.calls and not self.text.strip():
            content = None
        return ChoiceResult(self.index, content, reason, self.logged if self.top_logprobs is not None else None,
                            self.calls or None)

    def _logged(self, event: CanvasEvent) -> list[LoggedToken] | None:
        if self.top_logprobs is None:
            return None
        out = [LoggedToken(self.token_text(t), lp, [(self.token_text(i), v) for i, v in top])
               for t, lp, top in zip(event.logprob_token_ids or [], event.logprobs or [], event.top_logprobs or [],
                                     strict=True)]
        self.logged.extend(out)
        return out


def _required_call(raw: str) -> ToolCall | None:
    """``tool_choice: required``'s output, ``{"name": ..., "arguments": {...}}``, as a call (None if cut short)."""
    try:
        value = json.loads(raw)
        name, arguments = value["name"], value["arguments"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return None
    return ToolCall(id=new_call_id(), function=FunctionCall(name=str(name), arguments=json.dumps(arguments)))


def required_call_schema(tools: list[tuple[str, dict]]) -> dict:
    """The JSON schema of one call of any of ``tools`` ((name, parameters schema) pairs)."""
    return {"anyOf": [{"type": "object", "properties": {"name": {"const": name}, "arguments": params},
                       "required": ["name", "arguments"], "additionalProperties": False}
                      for name, params in tools]}


async def merged(streams: list[AsyncIterator[Event]], firsts: list[Event]) -> AsyncIterator[tuple[int, Event]]:
    """Every choice's events as (choice, event), in arrival order, until each has sent its FinalEvent; the first
    failure of any stream is raised (the others are then cancelled)."""
    queue: asyncio.Queue[tuple[int, Event | BaseException]] = asyncio.Queue()

    async def pump(i: int) -> None:
        try:
            event = firsts[i]
            await queue.put((i, event))
            while not isinstance(event, FinalEvent):
                try:
                    event = await anext(streams[i])
                except StopAsyncIteration:
                    raise RuntimeError("the backend's event stream ended without a FinalEvent") from None
                await queue.put((i, event))
        except Exception as exc:
            await queue.put((i, exc))

    tasks = [asyncio.create_task(pump(i)) for i in range(len(streams))]
    remaining = len(streams)
    try:
        while remaining:
            i, item = await queue.get()
            if isinstance(item, BaseException):
                raise item
            yield i, item
            if isinstance(item, FinalEvent):
                remaining -= 1
    finally:
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
