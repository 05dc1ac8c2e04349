"""What a new user hits through the API (issue 17, items 1-5), end to end in one process: the real FastAPI app
over a real engine (``EngineChatBackend`` in process, on the shipped, trained ``tiny`` model), driven over HTTP
with httpx and the official ``openai`` client. The prompts and seeds are the issue's own reproductions.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from local_api import chat, http, oai, stream_chunks, tiny_backend

from dgserve.engine.request import FinalEvent, GenerationRequest
from dgserve.model.checkpoint import load_metadata
from dgserve.routing.chat_backend import EngineChatBackend
from dgserve.train.paths import TINY_DIR

pytestmark = [pytest.mark.anyio,
              pytest.mark.skipif(not (TINY_DIR / "model.safetensors").is_file(), reason="tiny not trained yet")]

SORT = "sort 9 1 8 2 7 3"  # seed 7: the tiny model answers '1 2 3 7 8 9' (6 tokens), then EOS
STORY = "Write a long story about a king."  # seed 22: 22 tokens of text, then pad ids and no EOS
TOKENIZER = load_metadata("tiny").tokenizer
KV_BYTES = 2 << 20  # a small cache: the tiny model then holds 1,024 tokens in it (32 canvases of 32)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def backend() -> Iterator[EngineChatBackend]:
    with tiny_backend(KV_BYTES) as local:
        yield local



# ------------------------------------------------------------------ 1. a reply cut by max_tokens says "length"


@pytest.mark.parametrize(("max_tokens", "text", "finish"), [
    (2, "1 2", "length"), (5, "1 2 3 7 8", "length"),
    (6, "1 2 3 7 8 9", "stop"),  # the whole answer fits: the EOS right after it is not cut off
    (32, "1 2 3 7 8 9", "stop"),
])
async def test_chat_cut_by_max_tokens_says_length(backend, max_tokens, text, finish) -> None:
    async with http(backend) as client:
        r = await client.post("/v1/chat/completions", json=chat(SORT, seed=7, max_tokens=max_tokens))
        chunks = await stream_chunks(client, "/v1/chat/completions", chat(SORT, seed=7, max_tokens=max_tokens))
        done = await client.post("/v1/completions", json={"model": "tiny", "prompt": "Q: sort 9 4 7\nA:", "seed": 0,
                                                          "max_tokens": 2})
    body = r.json()
    assert body["choices"][0]["message"]["content"].strip() == text
    assert body["choices"][0]["finish_reason"] == finish
    assert body["usage"]["completion_tokens"] == min(max_tokens, 6)
    streamed = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert streamed == body["choices"][0]["message"]["content"]
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == finish
    assert done.json()["choices"][0]["finish_reason"] == "length"  # '4 7 9' cut after 2 tokens


# --------------------------------------------- 2. pad ids: not text, not counted, and an all-pad canvas ends it


async def test_usage_counts_no_pad_ids_and_an_all_pad_canvas_stops(backend) -> None:
    client = oai(backend)
    reply = await client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": STORY}],
                                                 seed=22, max_tokens=300)
    stream = await client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": STORY}],
                                                  seed=22, max_tokens=300, stream=True,
                                                  stream_options={"include_usage": True})
    chunks = [c async for c in stream]
    text = reply.choices[0].message.content or ""
    assert reply.choices[0].finish_reason == "stop"  # the model padded a whole canvas: the text is over
    assert reply.usage is not None and reply.usage.completion_tokens == 22  # was 300, 278 of them pad ids
    assert "<pad>" not in text and len(text) > 40
    assert chunks[-1].choices == [] and chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 22
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text

    # the engine's view: the token ids are the reference's (pad ids kept, as its sequences keep them), and it
    # stopped after the first all-pad canvas instead of denoising 10 canvases up to max_tokens
    tok = TOKENIZER
    events = [ev async for ev in backend.generate(GenerationRequest(
        tok.encode_chat([{"role": "user", "content": STORY}]), max_tokens=300, seed=22, request_id="story",
        sampling=backend.sampling_defaults))]
    final = events[-1]
    assert isinstance(final, FinalEvent) and final.stats.canvases == 2
    assert final.stats.new_tokens == 64 and final.stats.completion_tokens == 22


# -------------------------------------------------- 3. text that is not Unicode, bodies that are not JSON: 400s


async def test_lone_surrogates_and_undecodable_bodies_are_400s_that_say_why(backend) -> None:
    cases = [("/v1/chat/completions", b'{"model": "tiny", "messages": [{"role": "user", "content": "a\\ud800"}]}',
              "messages"),
             ("/v1/chat/completions", b'{"model": "tiny", "stream": true, "messages": [{"role": "user", "content": '
                                      b'[{"type": "text", "text": "\\ud800"}]}]}', "messages"),
             ("/v1/completions", b'{"model": "tiny", "prompt": "\\udfff b"}', "prompt"),
             ("/v1/completions", b'{"model": "tiny", "prompt": "x", "stream": true, "stop": ["\\ud800"]}', "stop")]
    async with http(backend) as client:
        for path, body, param in cases:
            r = await client.post(path, content=body, headers={"Content-Type": "application/json"})
            assert r.status_code == 400, r.text
            error = r.json()["error"]
            assert error["param"] == param and "lone UTF-16 surrogate" in error["message"], error
        bad_utf8 = await client.post("/v1/completions", content=b'{"model": "tiny", "prompt": "caf\xe9"}',
                                     headers={"Content-Type": "application/json"})
        form = await client.post("/v1/completions", content=b'{"model": "tiny", "prompt": "hi"}',
                                 headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert bad_utf8.status_code == 400 and "not valid UTF-8 (byte 0xe9 at offset 32)" in bad_utf8.text
    assert form.status_code == 400
    assert "must be JSON sent with Content-Type: application/json" in form.json()["error"]["message"]
    assert "application/x-www-form-urlencoded" in form.json()["error"]["message"]
    assert not backend.client.engine.has_work()


# ------------------------------------------------------------------- 4. temperature 0: greedy, deterministic


async def test_temperature_zero_is_deterministic_greedy_denoising(backend) -> None:
    client = oai(backend)

    async def ask(**extra: Any) -> str:
        r = await client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": SORT}],
                                                 max_tokens=32, **extra)
        assert r.choices[0].finish_reason == "stop"
        return r.choices[0].message.content or ""

    greedy = [await ask(temperature=0) for _ in range(3)]
    assert greedy[0].strip() == "1 2 3 7 8 9" and len(set(greedy)) == 1  # no seed, yet the same every time
    assert await ask(temperature=0, seed=0) == greedy[0]  # an unseeded greedy request renoises from seed 0
    streamed = await client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": SORT}],
                                                    max_tokens=32, temperature=0, stream=True)
    assert "".join([c.choices[0].delta.content or "" async for c in streamed if c.choices]) == greedy[0]


# ---------------------------------------- 5. prompt + max_tokens beyond the KV cache: refused or capped, at once


@pytest.mark.slow  # generates up to the cache's 1,024 tokens
async def test_max_tokens_beyond_the_kv_cache_is_refused_or_capped(backend) -> None:
    capacity = backend.client.engine.pool.token_capacity()
    assert capacity == 1024  # the reproduction: a cache of 1,024 tokens, max_tokens 2,048
    async with http(backend) as client:
        refused = await asyncio.wait_for(client.post(
            "/v1/chat/completions", json=chat(SORT, seed=7, max_tokens=2 * capacity)), timeout=30)
        streamed = await asyncio.wait_for(client.post(
            "/v1/chat/completions", json=chat(SORT, seed=7, max_tokens=2 * capacity, stream=True)), timeout=30)
        # no max_tokens: the server's default (what is left of the 4,096-token context) is lowered to what fits
        capped = await asyncio.wait_for(client.post(
            "/v1/completions", json={"model": "tiny", "prompt": "And the king said unto", "seed": 1,
                                     "ignore_eos": True}), timeout=300)
    for r in (refused, streamed):
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["param"] == "max_tokens" and error["code"] == "context_length_exceeded"
        assert f"the server's cache holds {capacity}" in error["message"] and "lower max_tokens to at most" in \
            error["message"]
    assert capped.status_code == 200, capped.text
    usage, choice = capped.json()["usage"], capped.json()["choices"][0]
    assert choice["finish_reason"] == "length"
    fits = (capacity - usage["prompt_tokens"]) // 32 * 32  # whole canvases
    assert 0 < usage["completion_tokens"] <= fits
    ids = TOKENIZER.encode("And the king said unto")
    events = [ev async for ev in backend.generate(GenerationRequest(
        ids, max_tokens=4000, seed=1, ignore_eos=True, fit_max_tokens=True, sampling=backend.sampling_defaults,
        request_id="capped"))]
    assert events[-1].finish_reason == "length" and events[-1].stats.new_tokens == fits
    assert not backend.client.engine.has_work()


def test_an_idle_engine_thread_sleeps(backend) -> None:
    """Thread CPU time of the engine's worker over an idle second: a spinning loop burns ~all of it."""
    thread = backend.client._thread
    assert thread.is_alive() and thread.ident is not None and not backend.client.engine.has_work()
    clock = time.pthread_getcpuclockid(thread.ident)
    before = time.clock_gettime(clock)
    threading.Event().wait(1.0)
    used = time.clock_gettime(clock) - before
    assert used < 0.05, f"the idle engine thread used {used:.3f} s of CPU in 1 s"

