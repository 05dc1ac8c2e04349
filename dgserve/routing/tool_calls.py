"""Tool calling in DiffusionGemma's chat format (Gemma 4's): OpenAI tool messages turned into what the checkpoint's
chat template renders, and the model's ``<|tool_call>call:NAME{key:value,...}<tool_call|>`` output turned back into
OpenAI ``tool_calls``, also incrementally as canvases commit.

Gemma 4's template takes ``tools`` (OpenAI function definitions), assistant messages with ``tool_calls`` whose
``arguments`` are objects, and the results as ``tool_responses`` (``{"name", "response"}``) on the assistant message
that made the calls: the model's turn goes on after them (an assistant answer that follows the results is that
turn's content). Values in a call are written ``<|"|>text<|"|>`` for
strings, bare for numbers, booleans and null, ``{key:value,...}`` and ``[value,...]`` for objects and arrays.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

from dgserve.routing.openai_protocol import ChatMessage, FunctionCall, ToolCall

CALL_START, CALL_END = "<|tool_call>", "<tool_call|>"
QUOTE = '<|"|>'


class ToolFormatError(ValueError):
    """A conversation the tool format cannot carry (a 400 naming the message)."""


def template_supports_tools(template: str | None) -> bool:
    """Whether a chat template renders tool declarations and calls (Gemma 4's reads ``tools`` and ``tool_calls``)."""
    return bool(template) and "tools" in template and "tool_calls" in template


def template_messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """The conversation as Gemma 4's chat template takes it: tool calls with object arguments, and each ``tool``
    message folded into the assistant message whose call it answers, as ``tool_responses``."""
    out: list[dict[str, Any]] = []
    names: dict[str, tuple[str, dict[str, Any]]] = {}  # call id -> (function name, the assistant message)
    for i, m in enumerate(messages):
        if m.role == "tool":
            if m.tool_call_id not in names:
                raise ToolFormatError(f"messages[{i}]: tool_call_id {m.tool_call_id!r} names no earlier assistant "
                                      "tool call")
            name, owner = names[m.tool_call_id or ""]
            owner.setdefault("tool_responses", []).append({"name": name, "response": _result(m.text)})
            continue
        entry = m.for_template()
        last = out[-1] if out else None
        if (m.role == "assistant" and not m.tool_calls and last is not None and last.get("tool_responses")
                and not last.get("content") and isinstance(entry["content"], str)):
            # the answer after the results: the same model turn goes on (Gemma 4 writes calls, results, answer)
            last["content"] = entry["content"]
            continue
        if m.tool_calls:
            calls = []
            for j, call in enumerate(m.tool_calls):
                try:
                    arguments = json.loads(call.function.arguments or "{}")
                except json.JSONDecodeError as exc:
                    raise ToolFormatError(f"messages[{i}].tool_calls[{j}].function.arguments is not JSON: {exc}") \
                        from None
                if not isinstance(arguments, dict):
                    raise ToolFormatError(f"messages[{i}].tool_calls[{j}].function.arguments must be a JSON object")
                calls.append({"id": call.id, "type": "function",
                              "function": {"name": call.function.name, "arguments": arguments}})
                names[call.id] = (call.function.name, entry)
            entry["tool_calls"] = calls
        out.append(entry)
    return out


def _result(text: str) -> Any:
    """A tool's result: its JSON when it is a JSON object (the template writes its fields), else the text."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return text
    return value if isinstance(value, dict) else text


# -------------------------------------------------------------------------------------- parsing the output


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def parse_call(body: str) -> tuple[str, dict[str, Any]] | None:
    """``call:NAME{...}`` (what sits between the call markers) as (name, arguments); None if malformed."""
    if not body.startswith("call:"):
        return None
    brace = body.find("{")
    name = body[5:brace].strip() if brace >= 0 else ""
    if not name or not body.rstrip().endswith("}"):
        return None
    try:
        value, end = _Values(body).value(brace)
    except ValueError:
        return None
    if not isinstance(value, dict) or body[end:].strip():
        return None
    return name, value


class _Values:
    """A recursive-descent reader of Gemma 4's argument values."""

    def __init__(self, text: str) -> None:
        self.text = text

    def _skip(self, i: int) -> int:
        while i < len(self.text) and self.text[i] in " \n\t\r":
            i += 1
        return i

    def value(self, i: int) -> tuple[Any, int]:
        t = self.text
        i = self._skip(i)
        if t.startswith(QUOTE, i):
            end = t.find(QUOTE, i + len(QUOTE))
            if end < 0:
                raise ValueError("unterminated string")
            return t[i + len(QUOTE):end], end + len(QUOTE)
        if t.startswith("{", i):
            return self._object(i + 1)
        if t.startswith("[", i):
            return self._array(i + 1)
        j = i
        while j < len(t) and t[j] not in ",}]":
            j += 1
        return _bare(t[i:j].strip()), j

    def _object(self, i: int) -> tuple[dict[str, Any], int]:
        out: dict[str, Any] = {}
        t = self.text
        i = self._skip(i)
        if t.startswith("}", i):
            return out, i + 1
        while True:
            i = self._skip(i)
            if t.startswith(QUOTE, i):
                key, i = self.value(i)
            else:
                colon = t.find(":", i)
                if colon < 0:
                    raise ValueError("a key without a value")
                key, i = t[i:colon].strip(), colon
            i = self._skip(i)
            if not t.startswith(":", i):
                raise ValueError("expected ':'")
            out[str(key)], i = self.value(i + 1)
            i = self._skip(i)
            if t.startswith(",", i):
                i += 1
            elif t.startswith("}", i):
                return out, i + 1
            else:
                raise ValueError("expected ',' or '}'")

    def _array(self, i: int) -> tuple[list[Any], int]:
        out: list[Any] = []
        t = self.text
        i = self._skip(i)
        if t.startswith("]", i):
            return out, i + 1
        while True:
            item, i = self.value(i)
            out.append(item)
            i = self._skip(i)
            if t.startswith(",", i):
                i += 1
            elif t.startswith("]", i):
                return out, i + 1
            else:
                raise ValueError("expected ',' or ']'")


def _bare(text: str) -> Any:
    if text in ("true", "false"):
        return text == "true"
    if text in ("null", ""):
        return None
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"not a value: {text!r}") from None


@dataclass
class ParsedOutput:
    content: str  # text outside the calls (in order)
    calls: list[ToolCall]


class ToolCallParser:
    """Splits streamed text into content and complete tool calls. ``feed`` returns what a chunk adds: content that
    can no longer be the start of a call marker, and each call whose end marker arrived; ``finish`` the rest (an
    unfinished or malformed call comes back as content, as the model wrote it)."""

    def __init__(self) -> None:
        self._buffer = ""
        self.calls: list[ToolCall] = []

    def feed(self, text: str) -> ParsedOutput:
        self._buffer += text
        content, calls = [], []
        while True:
            start = self._buffer.find(CALL_START)
            if start < 0:
                keep = _partial_suffix(self._buffer, CALL_START)
                content.append(self._buffer[:len(self._buffer) - keep])
                self._buffer = self._buffer[len(self._buffer) - keep:]
                break
            end = self._buffer.find(CALL_END, start)
            if end < 0:
                content.append(self._buffer[:start])
                self._buffer = self._buffer[start:]
                break
            content.append(self._buffer[:start])
            body = self._buffer[start + len(CALL_START):end]
            parsed = parse_call(body)
            if parsed is None:
                content.append(self._buffer[start:end + len(CALL_END)])
            else:
                call = ToolCall(id=new_call_id(), function=FunctionCall(name=parsed[0],
                                                                         arguments=json.dumps(parsed[1])))
                calls.append(call)
                self.calls.append(call)
            self._buffer = self._buffer[end + len(CALL_END):]
        return ParsedOutput("".join(content), calls)

    def finish(self) -> str:
        rest, self._buffer = self._buffer, ""
        return rest


def _partial_suffix(text: str, marker: str) -> int:
    """The length of the longest end of ``text`` that begins ``marker``."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0
