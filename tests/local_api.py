"""The API over an in-process engine backend (no Ray, no port): the shipped ``tiny`` model behind FastAPI's ASGI
transport, for tests that drive the OpenAI routes with httpx or the official ``openai`` client."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import openai
import torch

from dgserve.engine.engine import EngineConfig
from dgserve.routing.chat_backend import EngineChatBackend
from dgserve.routing.ingress_app import build_fastapi_app


@contextmanager
def tiny_backend(kv_bytes: int, execution: str = "auto") -> Iterator[EngineChatBackend]:
    """The tiny model's engine backend with a KV cache of ``kv_bytes``, at one torch thread (as a fractional-CPU
    replica runs; seeded outputs the tests pin were generated at one thread), in the given execution mode."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    local = EngineChatBackend.load("tiny", engine_config=EngineConfig(kv_cache_memory=kv_bytes,
                                                                                execution=execution))
    try:
        yield local
    finally:
        local.shutdown()
        torch.set_num_threads(before)


def http(backend: EngineChatBackend, timeout: float = 300) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(build_fastapi_app(backend)), base_url="http://test",
                             timeout=timeout)


def oai(backend: EngineChatBackend) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url="http://test/v1", api_key="none", max_retries=0, http_client=http(backend))


def chat(content: str, **extra: Any) -> dict[str, Any]:
    """A chat request body for the tiny model with one user message."""
    return {"model": "tiny", "messages": [{"role": "user", "content": content}], **extra}


async def stream_chunks(client: httpx.AsyncClient, path: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    """POST ``body`` streamed; the chunks before ``[DONE]`` (which must end the stream)."""
    async with client.stream("POST", path, json={**body, "stream": True}) as r:
        assert r.status_code == 200, await r.aread()
        text = (await r.aread()).decode()
    data = [line.removeprefix("data: ") for line in text.split("\n") if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    return [json.loads(d) for d in data[:-1]]
