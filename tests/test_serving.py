"""Serving on a real local Ray Serve with a real HTTP port on 127.0.0.1, called with the official openai
client: completions, chat, streaming, errors, concurrency, failover, overload, disconnect."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest
import torch
from reliability.harness import replica_actors

from dgserve.config import DeployConfig
from dgserve.engine.single import generate_single
from dgserve.model.checkpoint import load

pytestmark = pytest.mark.slow
MODEL = "tiny-random"


def _deploy(serve_http, name: str, route: str, overrides: dict) -> str:
    from ray import serve

    from dgserve.routing.app import build_app

    base = {"name": name, "route_prefix": route, "model": {"path": MODEL},
            "replicas": {"num_replicas": 1, "num_cpus": 0.5}, "engine": {"kv_cache_memory": 16 << 20}}
    for k, v in overrides.items():
        base[k] = {**base.get(k, {}), **v} if isinstance(v, dict) else v
    serve.run(build_app(DeployConfig.from_args(base)), name=name, route_prefix=route)
    return serve_http + (route if route != "/" else "")


@pytest.fixture(scope="module")
def main_app(serve_http):
    from ray import serve

    yield _deploy(serve_http, "dgserve", "/", {"replicas": {"num_replicas": 2, "num_cpus": 0.5}})
    serve.delete("dgserve")  # free its CPUs for the other integration tests of the session


@pytest.fixture(scope="module")
def small_app(serve_http):
    """One replica that runs one request at a time and queues one: easy to overload."""
    from ray import serve

    yield _deploy(serve_http, "small", "/small", {
        "engine": {"kv_cache_memory": 16 << 20, "max_running": 1, "max_waiting": 1, "enable_prefix_cache": False}})
    serve.delete("small")


@pytest.fixture(scope="module")
def solo():
    lm = load(MODEL)

    def run(prompt: str, max_tokens: int, seed: int) -> str:
        # the replicas (num_cpus 0.5) run torch on one thread; CPU matrix kernels round differently with another
        # thread count, so the oracle runs on one thread too (whatever an earlier test left set)
        ids = lm.tokenizer.encode(prompt)
        before = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            out = generate_single(lm.model, ids, max_tokens=max_tokens, seed=seed, sampling=lm.generation.sampling,
                                  eos_token_ids=lm.generation.eos_token_ids)
        finally:
            torch.set_num_threads(before)
        return lm.tokenizer.decode(out.token_ids)

    return run


def _client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)


def test_openai_client_completions_chat_models(main_app, solo):
    c = _client(main_app)
    assert [m.id for m in c.models.list()] == [MODEL]
    r = c.completions.create(model=MODEL, prompt="Hello", max_tokens=40, seed=7)
    assert r.choices[0].text == solo("Hello", 40, 7)
    assert r.usage.completion_tokens <= 40 and r.usage.prompt_tokens > 0
    chunks = list(c.completions.create(model=MODEL, prompt="Hello", max_tokens=40, seed=7, stream=True,
                                       stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == r.choices[0].text
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    chat = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=33, seed=2)
    assert chat.choices[0].message.role == "assistant"
    assert chat.choices[0].finish_reason in ("stop", "length")
    stream = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=33,
                                       seed=2, stream=True)
    assert "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices) == chat.choices[0].message.content


def test_error_statuses_are_typed_exceptions(main_app):
    c = _client(main_app)
    with pytest.raises(openai.NotFoundError):
        c.completions.create(model="no-such-model", prompt="x", max_tokens=4)
    with pytest.raises(openai.BadRequestError):
        c.completions.create(model=MODEL, prompt="x", max_tokens=4, presence_penalty=1.0)
    with pytest.raises(openai.BadRequestError):
        c.completions.create(model=MODEL, prompt="x", max_tokens=4, logprobs=2, echo=True)
    with pytest.raises(openai.BadRequestError, match="no tool format"):
        c.chat.completions.create(model=MODEL, max_tokens=4, messages=[
            {"role": "user", "content": "x"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "1"}])
    with pytest.raises(openai.BadRequestError):
        c.completions.create(model=MODEL, prompt="x " * 5000, max_tokens=4)  # over the context limit
    with pytest.raises(openai.BadRequestError):
        c.completions.create(model=MODEL, prompt="x", max_tokens=-1)


def test_choices_of_one_request_through_serve(main_app):
    """A batch of prompts times n is one handle call per choice, all at once, under one API request."""
    c = _client(main_app)
    reply = c.completions.create(model=MODEL, prompt=["a b", "c d", "e f"], n=2, max_tokens=4, seed=3)
    assert [ch.index for ch in reply.choices] == list(range(6))
    stream = c.completions.create(model=MODEL, prompt=["a b", "c d"], n=2, max_tokens=4, seed=3, stream=True)
    assert {ch.choices[0].index for ch in stream if ch.choices} == {0, 1, 2, 3}


def test_32_concurrent_streams_equal_solo_runs(main_app, solo):
    client = openai.AsyncOpenAI(base_url=main_app + "/v1", api_key="unused", max_retries=0, timeout=300)
    prompts = [(f"request number {i}", 20 + (i * 7) % 50, 100 + i) for i in range(32)]

    async def one(prompt: str, max_tokens: int, seed: int) -> str:
        stream = await client.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens, seed=seed,
                                                 stream=True)
        return "".join([ch.choices[0].text async for ch in stream if ch.choices])

    async def main():
        return await asyncio.gather(*(one(*p) for p in prompts))

    texts = asyncio.run(main())
    assert len(texts) == 32 and all(texts)
    differ = [prompt for (prompt, max_tokens, seed), text in zip(prompts, texts, strict=True)
              if text != solo(prompt, max_tokens, seed)]
    assert differ == []  # bit for bit, also for the requests that shared forwards (dgserve.model.batch_invariance)


def test_failover_mid_stream_keeps_the_text(main_app, solo):
    import ray

    prompt, max_tokens, seed = "a long story", 32 * 6, 11
    expected = solo(prompt, max_tokens, seed)
    assert len(replica_actors("dgserve")) == 2
    received = ""
    killed = False
    with httpx.stream("POST", main_app + "/v1/completions", timeout=300,
                      json={"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "seed": seed,
                            "stream": True}) as resp:
        assert resp.status_code == 200
        for line in resp.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            assert "error" not in chunk, chunk
            if chunk.get("choices"):
                received += chunk["choices"][0]["text"]
            if received and not killed:
                # the replica that runs the request reports it in its routing stats
                for actor in replica_actors("dgserve"):
                    stats = ray.get(actor.record_routing_stats.remote())
                    if stats.get("running", 0) > 0:
                        ray.kill(actor, no_restart=False)
                        killed = True
                        break
    assert killed
    assert received == expected


def test_overload_answers_429_with_retry_after(small_app):
    async def main():
        async with httpx.AsyncClient(timeout=120) as client:
            body = {"model": MODEL, "prompt": "busy", "max_tokens": 32 * 8, "seed": 1}
            return await asyncio.gather(*(client.post(small_app + "/v1/completions", json=body) for _ in range(6)))

    responses = asyncio.run(main())
    codes = sorted(r.status_code for r in responses)
    assert 429 in codes and 200 in codes, codes
    for r in responses:
        if r.status_code == 429:
            assert int(r.headers["retry-after"]) >= 1
            assert r.json()["error"]["type"]


def test_the_default_config_sheds_overload_with_429(serve_http):
    """No queue knob set (engine.max_waiting unset, Serve's defaults): the replica takes its batch plus what it
    can serve within a tenth of the request timeout at its (prior) throughput, and answers the rest 429 at once.
    Here: 200 tokens/s x 0.8 s / 32-token requests -> 5 queued behind a batch of 64 = 69 in flight."""
    from ray import serve

    from dgserve.replicas.admission import QUEUE_WAIT_SHARE

    url = _deploy(serve_http, "defaults", "/defaults", {"ingress": {"request_timeout_s": 8.0}})
    config = DeployConfig.from_args({"ingress": {"request_timeout_s": 8.0}})
    assert config.engine.max_waiting is None and config.replicas.capacity_prior_tokens_per_s == 200.0
    bound = config.engine.max_running + int(200.0 * 8.0 * QUEUE_WAIT_SHARE / 32)
    try:
        async def main():
            limits = httpx.Limits(max_connections=200)
            async with httpx.AsyncClient(timeout=120, limits=limits) as client:
                body = {"model": MODEL, "prompt": "busy", "max_tokens": 32, "seed": 1, "ignore_eos": True,
                        "max_denoising_steps": 4}
                return await asyncio.gather(*(client.post(url + "/v1/completions", json=body)
                                              for _ in range(bound + 30)))

        responses = asyncio.run(main())
    finally:
        serve.delete("defaults")
    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 429}, sorted(codes)
    assert codes.count(429) >= 10 and codes.count(200) >= bound - 10, (codes.count(200), codes.count(429))
    for r in responses:
        if r.status_code == 429:
            assert int(r.headers["retry-after"]) >= 1 and r.json()["error"]["code"] == "server_overloaded"


def test_client_disconnect_frees_engine_memory(small_app):
    import ray

    with httpx.stream("POST", small_app + "/v1/completions", timeout=60,
                      json={"model": MODEL, "prompt": "go", "max_tokens": 32 * 50, "seed": 3, "stream": True}) as resp:
        for line in resp.iter_lines():
            if line.startswith("data: {"):
                break  # first canvas arrived: hang up
    from ray import serve

    replica = serve.get_deployment_handle("ModelReplica", app_name="small")
    assert replica.drain.remote(60.0).result(timeout_s=120), "the abandoned request was not cancelled in 60 s"
    stats = ray.get(replica_actors("small")[0].record_routing_stats.remote())
    assert stats["running"] == 0 and stats["waiting"] == 0
    assert stats["kv_blocks_used"] == 0  # every page of the abandoned request is back in the pool


def test_expert_parallel_gang_serves_the_same_text(serve_http, solo):
    """ep_size=2: two gang-scheduled ranks hold half the experts each; a request on either rank gives the
    single-device text for its seed."""
    from ray import serve

    url = _deploy(serve_http, "ep", "/ep", {"replicas": {"num_replicas": 1, "ep_size": 2, "num_cpus": 0.5},
                                            "engine": {"kv_cache_memory": 16 << 20, "max_running": 8}})
    try:
        c = _client(url)
        for seed in (5, 6, 7):
            r = c.completions.create(model=MODEL, prompt="expert parallel", max_tokens=40, seed=seed)
            assert r.choices[0].text == solo("expert parallel", 40, seed)
    finally:
        serve.delete("ep")
