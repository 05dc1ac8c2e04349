"""The Ray-free OpenAI ingress, in-process: raw HTTP through httpx's ASGI transport, the official openai client,
and raw ASGI calls where a test needs to disconnect mid-request. The backend is a deterministic test double.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import httpx
import openai
import pytest
from starlette.requests import ClientDisconnect

from dgserve.engine.request import (
    CanvasEvent,
    DraftEvent,
    Event,
    FinalEvent,
    FinishReason,
    GenerationRequest,
    RequestStats,
    SamplingParams,
)
from dgserve.routing.ingress_app import IngressSettings, OverloadedError, build_fastapi_app

pytestmark = pytest.mark.anyio
MODEL = "google/diffusiongemma-test"
TOKENS_PER_CANVAS = 4


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class FakeBackend:
    """TEST DOUBLE for ChatBackend: one token per prompt character, a fixed list of canvases (4 tokens each),
    two drafts per canvas when asked, and knobs for overload, errors and hanging. Records what it was asked
    and which generations were closed or cancelled before their final event."""

    model_id = MODEL
    max_context = 64
    sampling_defaults = SamplingParams()

    def __init__(self, canvases: tuple[str, ...] = ("Hello", " world", "!"), finish: FinishReason = "stop",
                 error: str | None = None, overload: float | None = None, overload_on_first_event: bool = False,
                 hang_before_canvas: int | None = None, ready: bool = True) -> None:
        self.canvases = canvases
        self.finish: FinishReason = finish
        self.error = error
        self.overload = overload
        self.overload_on_first_event = overload_on_first_event
        self.hang_before_canvas = hang_before_canvas
        self.is_ready = ready
        self.requests: list[GenerationRequest] = []
        self.chats: list[list[dict[str, str]]] = []
        self.unfinished: list[str] = []  # request ids closed/cancelled before their FinalEvent
        self.hanging = asyncio.Event()

    async def tokenize_prompt(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, list):
            if max(prompt) >= 1000:
                raise ValueError("token id out of range: the vocabulary has 1000 tokens")
            return prompt
        return [ord(c) for c in prompt]

    async def tokenize_chat(self, messages: list[dict[str, str]]) -> list[int]:
        self.chats.append(messages)
        return [ord(c) for c in "".join(f"<{m['role']}>{m['content']}" for m in messages)][: self.max_context * 2]

    def generate(self, request: GenerationRequest) -> AsyncIterator[Event]:
        if self.overload is not None and not self.overload_on_first_event:
            raise OverloadedError(self.overload)
        self.requests.append(request)
        return self._events(request)

    async def _events(self, request: GenerationRequest) -> AsyncIterator[Event]:
        rid, finished = request.request_id, False
        try:
            if self.overload is not None:
                raise OverloadedError(self.overload)
            for i, text in enumerate(self.canvases):
                for step in range(1, 3) if request.draft_every else ():
                    yield DraftEvent(rid, token_ids=[7] * TOKENS_PER_CANVAS, text=f"DRAFT{i}.{step}", step=step)
                if i == self.hang_before_canvas:
                    self.hanging.set()
                    await asyncio.Event().wait()
                yield CanvasEvent(rid, token_ids=[9] * TOKENS_PER_CANVAS, text=text, canvas_index=i)
            stats = RequestStats(prompt_tokens=len(request.prompt_ids), cached_prompt_tokens=2)
            if self.error is not None:
                yield FinalEvent(rid, "error", stats, error=self.error)
            else:
                yield FinalEvent(rid, self.finish, stats)
            finished = True
        finally:
            if not finished:
                self.unfinished.append(rid)

    async def ready(self) -> bool:
        return self.is_ready


def http(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://test")


def oai(app: Any) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url="http://test/v1", api_key="test", max_retries=0, http_client=http(app))


def sse_events(body: str) -> list[tuple[str | None, str]]:
    """(event name, data) for each SSE event in a response body."""
    out = []
    for block in body.strip().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.split("\n"))
        out.append((fields.get("event"), fields["data"]))
    return out


def chat(**extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **extra}


# ----------------------------------------------------------------------------------------------- basics


async def test_models_health_ready() -> None:
    backend = FakeBackend(ready=False)
    async with http(build_fastapi_app(backend)) as client:
        assert (await client.get("/health")).json() == {"status": "ok"}
        not_ready = await client.get("/ready")
        assert not_ready.status_code == 503 and not_ready.json()["error"]["code"] == "not_ready"
        backend.is_ready = True
        assert (await client.get("/ready")).status_code == 200
        missing = await client.get("/nope")
        assert missing.status_code == 404 and missing.json()["error"]["type"] == "invalid_request_error"
    models = await oai(build_fastapi_app(backend)).models.list()
    assert [m.id for m in models.data] == [MODEL]


async def test_completion_maps_request_fields() -> None:
    backend = FakeBackend()
    body = {"model": MODEL, "prompt": "abc", "max_tokens": 20, "seed": 7, "stop": "\n", "temperature": 0.5,
            "entropy_bound": 0.3, "max_denoising_steps": 12, "user": "u1", "top_p": 1.0}
    async with http(build_fastapi_app(backend)) as client:
        r = await client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    data = r.json()
    assert data["object"] == "text_completion" and data["model"] == MODEL
    assert data["choices"] == [{"index": 0, "text": "Hello world!", "finish_reason": "stop", "logprobs": None}]
    assert data["usage"] == {"prompt_tokens": 3, "completion_tokens": 12, "total_tokens": 15,
                             "prompt_tokens_details": {"cached_tokens": 2}}
    (req,) = backend.requests
    assert req.prompt_ids == [97, 98, 99] and req.max_tokens == 20 and req.seed == 7 and req.stop == ("\n",)
    assert req.request_id == data["id"] and req.draft_every == 0
    # temperature scales the checkpoint's t_max -> t_min schedule (0.8 -> 0.4)
    assert req.sampling == SamplingParams(t_max=0.4, t_min=0.2, entropy_bound=0.3, max_denoising_steps=12)


async def test_temperature_zero_is_greedy_denoising_with_a_fixed_seed() -> None:
    backend = FakeBackend()
    async with http(build_fastapi_app(backend)) as client:
        r = await client.post("/v1/chat/completions", json=chat(temperature=0))
        seeded = await client.post("/v1/chat/completions", json=chat(temperature=0.0, seed=5))
    assert r.status_code == seeded.status_code == 200, r.text
    greedy, greedy_seeded = backend.requests
    # argmax sampling; acceptance keeps the checkpoint's schedule; renoising draws from a fixed seed
    assert greedy.sampling == SamplingParams(greedy=True) and greedy.seed == 0
    assert greedy_seeded.sampling.greedy and greedy_seeded.seed == 5


async def test_default_max_tokens_fills_the_context_or_the_setting() -> None:
    backend = FakeBackend()
    async with http(build_fastapi_app(backend)) as client:
        await client.post("/v1/completions", json={"model": MODEL, "prompt": [1, 2, 3, 4]})
    async with http(build_fastapi_app(backend, IngressSettings(default_max_tokens=8))) as client:
        await client.post("/v1/completions", json={"model": MODEL, "prompt": ["abcd"]})
    assert [r.max_tokens for r in backend.requests] == [60, 8]
    assert backend.requests[1].prompt_ids == [97, 98, 99, 100]


async def test_chat_non_stream_with_openai_client() -> None:
    backend = FakeBackend(finish="length")
    client = oai(build_fastapi_app(backend))
    result = await client.chat.completions.create(
        model=MODEL, max_completion_tokens=10,
        messages=[{"role": "developer", "content": "be brief"},
                  {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}])
    assert result.choices[0].message.content == "Hello world!"
    assert result.choices[0].message.role == "assistant" and result.choices[0].finish_reason == "length"
    assert result.usage is not None and result.usage.completion_tokens == 12
    assert backend.chats == [[{"role": "system", "content": "be brief"}, {"role": "user", "content": "a\nb"}]]
    assert backend.requests[0].max_tokens == 10


# -------------------------------------------------------------------------------------------- streaming


async def test_completion_stream_with_and_without_usage() -> None:
    app = build_fastapi_app(FakeBackend())
    async with http(app) as client:
        plain = await client.post("/v1/completions", json={"model": MODEL, "prompt": "x", "stream": True})
        with_usage = await client.post("/v1/completions", json={
            "model": MODEL, "prompt": "x", "stream": True, "stream_options": {"include_usage": True}})
    assert plain.headers["content-type"].startswith("text/event-stream")
    events = sse_events(plain.text)
    assert events[-1] == (None, "[DONE]")
    chunks = [json.loads(data) for _, data in events[:-1]]
    assert all("usage" not in c and c["object"] == "text_completion" for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks) == "Hello world!"
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None, None, None, "stop"]

    chunks = [json.loads(data) for _, data in sse_events(with_usage.text)[:-1]]
    assert all(c["usage"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == {"prompt_tokens": 1, "completion_tokens": 12, "total_tokens": 13,
                                   "prompt_tokens_details": {"cached_tokens": 2}}

    stream = await oai(app).completions.create(model=MODEL, prompt="x", stream=True,
                                               stream_options={"include_usage": True})
    text, usage = "", None
    async for chunk in stream:
        text += "".join(c.text for c in chunk.choices)
        usage = chunk.usage or usage
    assert text == "Hello world!" and usage is not None and usage.total_tokens == 13


async def test_chat_stream_with_openai_client() -> None:
    stream = await oai(build_fastapi_app(FakeBackend())).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], stream=True)
    chunks = [chunk async for chunk in stream]
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].choices[0].delta.content == ""
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "Hello world!"
    assert chunks[-1].choices[0].finish_reason == "stop" and chunks[-1].choices[0].delta.content is None
    assert all(c.object == "chat.completion.chunk" and c.usage is None for c in chunks)


async def test_drafts_only_when_asked_and_never_in_committed_text() -> None:
    backend = FakeBackend()
    app = build_fastapi_app(backend)
    async with http(app) as client:
        without = await client.post("/v1/chat/completions", json=chat(stream=True))
        with_drafts = await client.post("/v1/chat/completions", json=chat(stream=True, stream_drafts=True,
                                                                           draft_every=3))
    assert "DRAFT" not in without.text and "event: draft" not in without.text
    events = sse_events(with_drafts.text)
    drafts = [json.loads(data) for name, data in events if name == "draft"]
    assert len(drafts) == 6
    assert drafts[0]["object"] == "chat.completion.chunk.draft" and drafts[0]["choices"] == []
    assert drafts[2]["dgserve"]["draft"] == {"text": "DRAFT1.1", "token_ids": [7] * 4, "step": 1,
                                             "canvas_index": 1}
    assert all("DRAFT" not in data for name, data in events if name is None)
    assert [r.draft_every for r in backend.requests] == [0, 3]

    # The official client yields drafts as chunks with no choices: accumulators add nothing from them.
    stream = await oai(app).completions.create(model=MODEL, prompt="x", stream=True,
                                               extra_body={"stream_drafts": True})
    text, seen_drafts = "", []
    async for chunk in stream:
        text += "".join(c.text for c in chunk.choices)
        if chunk.object == "text_completion.draft":
            assert chunk.choices == []
            seen_drafts.append(chunk.model_extra["dgserve"]["draft"]["text"])
    assert text == "Hello world!"
    assert seen_drafts == ["DRAFT0.1", "DRAFT0.2", "DRAFT1.1", "DRAFT1.2", "DRAFT2.1", "DRAFT2.2"]
    assert backend.requests[-1].draft_every == IngressSettings().default_draft_every

    # ...and its chat accumulator (the `.stream()` helper) builds the message from committed text only.
    async with oai(app).chat.completions.stream(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                                extra_body={"stream_drafts": True}) as helper:
        final = await helper.get_final_completion()
    assert final.choices[0].message.content == "Hello world!"


async def test_engine_error_mid_stream_is_an_error_event() -> None:
    app = build_fastapi_app(FakeBackend(canvases=("Hello",), error="replica lost"))
    async with http(app) as client:
        r = await client.post("/v1/completions", json={"model": MODEL, "prompt": "x", "stream": True})
        non_stream = await client.post("/v1/completions", json={"model": MODEL, "prompt": "x"})
    events = sse_events(r.text)
    assert json.loads(events[0][1])["choices"][0]["text"] == "Hello"
    error = json.loads(events[1][1])["error"]
    assert error["code"] == "engine_error" and "replica lost" in error["message"]
    assert events[2] == (None, "[DONE]") and len(events) == 3
    assert non_stream.status_code == 500 and "replica lost" in non_stream.json()["error"]["message"]

    stream = await oai(app).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                                    stream=True)
    received = ""
    with pytest.raises(openai.APIError, match="replica lost"):
        async for chunk in stream:
            received += "".join(c.delta.content or "" for c in chunk.choices)
    assert received == "Hello"


async def test_engine_cancelled_is_503() -> None:
    async with http(build_fastapi_app(FakeBackend(finish="cancelled"))) as client:
        r = await client.post("/v1/chat/completions", json=chat())
    assert r.status_code == 503 and r.json()["error"]["code"] == "request_cancelled"


# ------------------------------------------------------------------------------------------------- 4xx


@pytest.mark.parametrize(("path", "body", "param", "needle"), [
    ("/v1/chat/completions", chat(n=200), "n", "less than or equal to 128"),
    ("/v1/chat/completions", chat(presence_penalty=0.5), "presence_penalty", "sampled in parallel"),
    ("/v1/chat/completions", chat(frequency_penalty=-1), "frequency_penalty", "sampled in parallel"),
    ("/v1/chat/completions", chat(repetition_penalty=1.2), "repetition_penalty", "accepts only 1.0"),
    ("/v1/chat/completions", chat(reasoning_effort="high"), "reasoning_effort", "unset or 'none'"),
    ("/v1/chat/completions", chat(top_k=5000), "top_k", "at most the 1024 most likely"),
    ("/v1/chat/completions", chat(logit_bias={"x": 1}), "logit_bias", "not one"),
    ("/v1/chat/completions", chat(logit_bias={"5": 101}), "logit_bias", "less than or equal to 100"),
    ("/v1/chat/completions", chat(logit_bias={str(i): 1 for i in range(65)}), "logit_bias", "at most 64"),
    ("/v1/chat/completions", chat(top_logprobs=3), "top_logprobs", "needs logprobs: true"),
    ("/v1/chat/completions", chat(n=2, stream=True, stream_drafts=True), "stream_drafts", "single choice"),
    ("/v1/chat/completions", chat(top_logprobs=21, logprobs=True), "top_logprobs", "less than or equal to 20"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "logprobs": 1, "echo": True}, "logprobs", "not both"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 4, "min_tokens": 5}, "min_tokens", "more than"),
    ("/v1/chat/completions", chat(chat_template_kwargs={"messages": []}), "chat_template_kwargs", "cannot set"),
    ("/v1/chat/completions", chat(tool_choice={"type": "function", "function": {"name": "g"}},
                                  tools=[{"type": "function", "function": {"name": "f"}}]), "tool_choice", "'g'"),
    ("/v1/chat/completions", chat(tool_choice="required"), "tool_choice", "needs tools"),
    ("/v1/chat/completions", chat(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "not": {"required": ["a"]}}}}), "response_format", "'not' is not supported"),
    ("/v1/chat/completions", chat(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {"a": {"$ref": "https://example.com/s.json"}}}}}), "response_format",
     "only local $ref"),
    ("/v1/chat/completions", chat(response_format={"type": "json_schema"}), "response_format", "needs a json_schema"),
    ("/v1/chat/completions", chat(tool_choice="required", response_format={"type": "json_object"}, tools=[
        {"type": "function", "function": {"name": "f"}}]), "response_format", "forced tool_choice"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "q"}, {
        "role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function", "function": {
            "name": "f", "arguments": "{}"}}]}, {"role": "tool", "tool_call_id": "c1", "content": "1"}]},
     "messages", "no tool format"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "what is this?"}, {"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages", "'image_url'"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "tool", "content": "x"}]}, "messages",
     "needs the tool_call_id"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "tool", "content": "x", "tool_call_id": "z"}]},
     "messages", "names no earlier assistant tool call"),
    ("/v1/chat/completions", chat(max_tokens=0), "max_tokens", "greater than or equal to 1"),
    ("/v1/chat/completions", chat(max_tokens="10"), "max_tokens", "valid integer"),
    ("/v1/chat/completions", chat(max_tokens=5, max_completion_tokens=6), "max_completion_tokens", "disagree"),
    ("/v1/chat/completions", chat(frobnicate=True), "frobnicate", "Unrecognized request argument"),
    ("/v1/chat/completions", chat(temperature=0.5, t_max=1.0), "t_max", "not both"),
    ("/v1/chat/completions", chat(t_min=0.9), "t_max", "must be greater than t_min"),
    ("/v1/chat/completions", chat(stream_options={"include_usage": True}), "stream_options", "stream is true"),
    ("/v1/chat/completions", chat(stream_drafts=True), "stream_drafts", "stream: true"),
    ("/v1/completions", {"model": MODEL, "prompt": []}, "prompt", "must not be an empty list"),
    ("/v1/completions", {"model": MODEL, "prompt": [[1], []]}, "prompt", "empty list of token ids"),
    ("/v1/completions", {"model": MODEL, "prompt": [5, 2000]}, "prompt", "out of range"),
    ("/v1/completions", {"model": MODEL, "prompt": "x" * 64}, "prompt", "maximum context length is 64"),
    ("/v1/completions", {"model": MODEL, "prompt": "x" * 10, "max_tokens": 60}, "max_tokens", "70 tokens"),
    ("/v1/completions", {"model": MODEL}, "prompt", "Missing required argument: prompt"),
])
async def test_bad_requests_are_openai_400s(path: str, body: dict[str, Any], param: str, needle: str) -> None:
    backend = FakeBackend()
    async with http(build_fastapi_app(backend)) as client:
        r = await client.post(path, json=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param
    assert needle in error["message"], error["message"]
    assert backend.requests == []


async def test_harmless_openai_fields_are_accepted() -> None:
    backend = FakeBackend()
    neutral = {"n": 1, "temperature": 1.0, "top_p": 1.0, "presence_penalty": 0, "frequency_penalty": 0.0,
               "logit_bias": {}, "user": "u", "metadata": {"k": "v"}, "store": False, "service_tier": "auto",
               "stop": ["\n\n", "END"], "seed": 3}
    async with http(build_fastapi_app(backend)) as client:
        r1 = await client.post("/v1/chat/completions", json=chat(
            **neutral, logprobs=False, tools=[], tool_choice="none", parallel_tool_calls=False,
            response_format={"type": "text"}, modalities=["text"], prompt_cache_key="k", safety_identifier="s",
            messages=[{"role": "system", "content": "s", "name": "sys"}, {"role": "user", "content": "q"},
                      {"role": "assistant", "content": "a", "refusal": None, "tool_calls": None},
                      {"role": "user", "content": "q2"}]))
        r2 = await client.post("/v1/completions", json={"model": MODEL, "prompt": "x", "echo": False,
                                                        "best_of": 1, **neutral})
    assert r1.status_code == 200, r1.text
    assert r2.status_code == 200, r2.text
    assert backend.requests[0].sampling == SamplingParams()  # temperature 1.0: the checkpoint's schedule


async def test_union_errors_read_well() -> None:
    async with http(build_fastapi_app(FakeBackend())) as client:
        r = await client.post("/v1/completions", json={"model": MODEL, "prompt": 5})
    assert r.json()["error"]["message"] == "prompt: Input should be a valid string or Input should be a valid list"


async def test_invalid_json_is_400() -> None:
    async with http(build_fastapi_app(FakeBackend())) as client:
        r = await client.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]


async def test_openai_client_sees_400_and_404() -> None:
    client = oai(build_fastapi_app(FakeBackend()))
    with pytest.raises(openai.BadRequestError, match="presence_penalty is not supported"):
        await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                             presence_penalty=1.0)
    with pytest.raises(openai.NotFoundError) as info:
        await client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
    assert info.value.code == "model_not_found" and info.value.param == "model"


@pytest.mark.parametrize("on_first_event", [False, True])
@pytest.mark.parametrize("stream", [False, True])
async def test_overload_is_429_with_retry_after(on_first_event: bool, stream: bool) -> None:
    backend = FakeBackend(overload=1.5, overload_on_first_event=on_first_event)
    async with http(build_fastapi_app(backend)) as client:
        r = await client.post("/v1/chat/completions", json=chat(stream=stream))
    assert r.status_code == 429
    assert r.headers["retry-after"] == "2" and r.headers["retry-after-ms"] == "1500"
    assert r.json()["error"]["type"] == "rate_limit_error"
    with pytest.raises(openai.RateLimitError):
        await oai(build_fastapi_app(backend)).chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "x"}], stream=stream)


async def test_body_too_large_is_413() -> None:
    app = build_fastapi_app(FakeBackend(), IngressSettings(max_body_bytes=200))
    big = chat(messages=[{"role": "user", "content": "x" * 500}])

    async def chunked() -> AsyncIterator[bytes]:  # no Content-Length: the limit counts the body as it arrives
        yield json.dumps(big).encode()

    async with http(app) as client:
        declared = await client.post("/v1/chat/completions", json=big)
        streamed = await client.post("/v1/chat/completions", content=chunked(),
                                     headers={"content-type": "application/json"})
        small = await client.post("/v1/chat/completions", json=chat())
    for r in (declared, streamed):
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    assert small.status_code == 200


async def test_api_key_hook() -> None:
    async def authorize(key: str | None) -> bool:
        return key == "sekrit"

    app = build_fastapi_app(FakeBackend(), authorize=authorize)
    async with http(app) as client:
        assert (await client.get("/health")).status_code == 200
        denied = await client.get("/v1/models")
        assert denied.status_code == 401 and denied.json()["error"]["code"] == "invalid_api_key"
        ok = await client.get("/v1/models", headers={"Authorization": "Bearer sekrit"})
        assert ok.status_code == 200
    with pytest.raises(openai.AuthenticationError):
        await oai(app).models.list()


# ------------------------------------------------------------------------------ disconnect and timeouts


async def call_asgi(app: Any, body: dict[str, Any], disconnect: asyncio.Event,
                    raises: BaseException | None = None) -> list[dict[str, Any]]:
    """POST /v1/... straight through ASGI; the client 'disconnects' when ``disconnect`` is set (``raises``: the
    host reports it by raising this from ``receive``, as Ray Serve's cancelled request task does)."""
    sent: list[dict[str, Any]] = []
    raw = json.dumps(body).encode()
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())],
             "server": ("test", 80), "client": ("test", 1234)}
    body_sent = False

    async def receive() -> dict[str, Any]:
        nonlocal body_sent
        if not body_sent:
            body_sent = True
            return {"type": "http.request", "body": raw, "more_body": False}
        await disconnect.wait()
        if raises is not None:
            raise raises
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await asyncio.wait_for(app(scope, receive, send), timeout=5)
    return sent


@pytest.mark.parametrize("stream", [False, True])
async def test_disconnect_cancels_the_backend(stream: bool) -> None:
    backend = FakeBackend(hang_before_canvas=1)
    app = build_fastapi_app(backend)
    disconnect = asyncio.Event()
    call = asyncio.create_task(call_asgi(app, chat(stream=stream), disconnect))
    await asyncio.wait_for(backend.hanging.wait(), timeout=5)
    disconnect.set()
    sent = await call
    assert backend.unfinished == [backend.requests[0].request_id]
    if stream:  # what was committed before the disconnect had been sent
        assert b"Hello" in b"".join(m.get("body", b"") for m in sent)


class HostCancelled(Exception):
    """Stands for ray.exceptions.TaskCancelledError, what Ray Serve's ASGI receive raises after a disconnect."""


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("error", [HostCancelled("task was cancelled"), ClientDisconnect()])
async def test_a_disconnect_is_one_info_line(stream: bool, error: Exception, caplog: pytest.LogCaptureFixture) -> None:
    backend = FakeBackend(hang_before_canvas=1)
    app = build_fastapi_app(backend, disconnect_errors=(HostCancelled,))
    disconnect = asyncio.Event()
    caplog.set_level(logging.INFO)
    call = asyncio.create_task(call_asgi(app, chat(stream=stream), disconnect, raises=error))
    await asyncio.wait_for(backend.hanging.wait(), timeout=5)
    disconnect.set()
    await call
    assert backend.unfinished == [backend.requests[0].request_id]
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert not any(r.exc_info for r in caplog.records)
    if stream:  # a non-streaming request notices the disconnect itself (a 499, nothing to log)
        (line,) = [r.getMessage() for r in caplog.records if r.name == "dgserve.routing.disconnects"]
        assert line.startswith("client disconnected before POST /v1/chat/completions was answered")


@pytest.mark.parametrize("stream", [False, True])
async def test_cancelled_serving_task_cancels_the_backend(stream: bool) -> None:
    """Ray Serve reports a client disconnect by cancelling the task that runs the ASGI app."""
    backend = FakeBackend(hang_before_canvas=1)
    call = asyncio.create_task(call_asgi(build_fastapi_app(backend), chat(stream=stream), asyncio.Event()))
    await asyncio.wait_for(backend.hanging.wait(), timeout=5)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    assert backend.unfinished == [backend.requests[0].request_id]


@pytest.mark.parametrize("stream", [False, True])
async def test_request_timeout(stream: bool) -> None:
    backend = FakeBackend(hang_before_canvas=1)
    async with http(build_fastapi_app(backend, IngressSettings(request_timeout_s=0.2))) as client:
        r = await client.post("/v1/chat/completions", json=chat(stream=stream))
    if stream:
        events = sse_events(r.text)
        assert json.loads(events[1][1])["choices"][0]["delta"]["content"] == "Hello"
        assert json.loads(events[-2][1])["error"]["code"] == "request_timeout"
        assert events[-1] == (None, "[DONE]")
    else:
        assert r.status_code == 408 and r.json()["error"]["code"] == "request_timeout"
    assert backend.unfinished == [backend.requests[0].request_id]


# -------------------------------------------------------------------------------------------------- docs


def test_openapi_documents_extensions_and_sse() -> None:
    schema = build_fastapi_app(FakeBackend()).openapi()
    components = schema["components"]["schemas"]
    for model in ("CompletionRequest", "ChatCompletionRequest"):
        props = components[model]["properties"]
        for field in ("entropy_bound", "max_denoising_steps", "t_max", "t_min", "seed", "stream_drafts",
                      "draft_every"):
            assert field in props, (model, field)
        assert "dgserve extension" in props["entropy_bound"]["description"]
        assert "t_max" in props["temperature"]["description"]
    for path in ("/v1/completions", "/v1/chat/completions"):
        ok = schema["paths"][path]["post"]["responses"]["200"]
        assert {"application/json", "text/event-stream"} <= set(ok["content"])
        assert "event: draft" in ok["description"]
    assert {"DraftChunk", "ChatCompletionChunk", "CompletionChunk", "ErrorResponse"} <= set(components)
    assert "429" in schema["paths"]["/v1/chat/completions"]["post"]["responses"]
