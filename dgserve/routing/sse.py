"""Server-Sent Events in OpenAI's streaming format: the wire encoding, a streaming response that always runs
its cleanup (so a client disconnect reaches the engine), and the OpenAPI description of such a stream.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

logger = logging.getLogger(__name__)

DONE = "data: [DONE]\n\n"
CLEANUP_TIMEOUT_S = 10.0


def sse_data(payload: BaseModel, *, exclude: set[str] | None = None) -> str:
    """A default ("message") event: what OpenAI clients parse as one chunk."""
    return f"data: {payload.model_dump_json(exclude=exclude)}\n\n"


def sse_event(event: str, payload: BaseModel) -> str:
    """A named event: EventSource clients deliver it only to a listener for that name."""
    return f"event: {event}\ndata: {payload.model_dump_json()}\n\n"


class EventStreamResponse(StreamingResponse):
    """A text/event-stream response that awaits ``on_close`` however it ends: finished, client gone (either
    ASGI disconnect style), or the serving task cancelled; also when the body iterator never started."""

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], Awaitable[None]]) -> None:
        super().__init__(content, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.move_on_after(CLEANUP_TIMEOUT_S, shield=True):
                body = self.body_iterator
                if hasattr(body, "aclose"):
                    await body.aclose()
                await self._on_close()


def stream_response_doc(chunk: type[BaseModel], draft: type[BaseModel], example: str) -> dict[str, Any]:
    """The ``text/event-stream`` entry of a route's 200 response for FastAPI's ``responses=``."""
    ref = "#/components/schemas/{}"
    return {
        "description": (
            "With `stream: false`: the JSON body. With `stream: true`: Server-Sent Events, each "
            f"`data: <{chunk.__name__} JSON>`, ending with `data: [DONE]`. With stream_options.include_usage the "
            "last chunk before [DONE] has empty `choices` and the `usage`. A failure after the stream started is "
            "sent as `data: <ErrorResponse JSON>` followed by [DONE] (the text is never silently cut short). "
            f"With stream_drafts: also `event: draft` events, `data: <{draft.__name__} JSON>`: provisional "
            "snapshots of the canvas being denoised, with empty `choices`, never part of the committed text."
        ),
        "content": {
            "text/event-stream": {
                "schema": _event_schema(ref.format(chunk.__name__), ref.format("ErrorResponse"),
                                        ref.format(draft.__name__)),
                "example": example,
                "x-dgserve-events": {
                    "message": {"oneOf": [{"$ref": ref.format(chunk.__name__)},
                                          {"$ref": ref.format("ErrorResponse")}]},
                    "draft": {"$ref": ref.format(draft.__name__)},
                },
            }
        },
    }


def _event_schema(chunk_ref: str, error_ref: str, draft_ref: str) -> dict[str, Any]:
    """One SSE event as parsed (``{"event", "data", "id"?}``), the Open API 3.1 convention for a stream's
    ``schema`` (3.2 calls it ``itemSchema``): ``data`` is JSON by ``contentMediaType``/``contentSchema``, except
    the closing ``[DONE]``. Tools such as schemathesis validate every event of a response against it."""

    def json_data(*refs: str) -> dict[str, Any]:
        return {"type": "string", "contentMediaType": "application/json",
                "contentSchema": {"anyOf": [{"$ref": r} for r in refs]}}

    return {
        "type": "object",
        "description": "One Server-Sent Event: `event` (\"message\" when the stream sends none) and its `data`.",
        "required": ["data"],
        "properties": {"event": {"type": "string", "enum": ["message", "draft"]}, "data": {"type": "string"},
                       "id": {"type": "string"}, "retry": {"type": "integer"}},
        "if": {"properties": {"event": {"const": "draft"}}, "required": ["event"]},
        "then": {"properties": {"data": json_data(draft_ref)}},
        "else": {"properties": {"data": {"if": {"const": DONE.removeprefix("data: ").strip()},
                                         "else": json_data(chunk_ref, error_ref)}}},
    }


def add_component_schemas(openapi: dict[str, Any], models: list[type[BaseModel]]) -> dict[str, Any]:
    """Add ``models`` (and what they reference) to ``components/schemas`` where not already there."""
    _, defs = models_json_schema([(m, "validation") for m in models], ref_template="#/components/schemas/{model}")
    schemas = openapi.setdefault("components", {}).setdefault("schemas", {})
    for name, schema in defs.get("$defs", {}).items():
        schemas.setdefault(name, schema)
    return openapi
