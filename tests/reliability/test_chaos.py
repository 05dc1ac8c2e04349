"""Chaos: concurrent streaming requests while model replicas are killed at random (``ray.kill`` on the ModelReplica
actors; Serve starts replacements). Every request the server accepted must either complete with exactly the text
of the same fixed-seed request run alone, or end with an explicit error event; a request refused before its stream
started (an HTTP error status) is counted too. A hang (past a generous timeout), a stream that ends without
``[DONE]`` and a finish reason (silent truncation), or text that differs from the solo run is a lost request, and
the suite fails on any.

Two scenarios: two single-device replicas (a kill fails requests over to the other replica), and one
expert-parallel gang of two ranks (a rank kill restarts the whole gang; the requests of both ranks are failed over
to the restarted gang, see EP_GANG).
"""

from __future__ import annotations

import asyncio
import collections
import json
import random
import time
from dataclasses import dataclass
from typing import Literal

import httpx
import pytest
from reliability.harness import MODEL, record, replica_actors, size

pytestmark = pytest.mark.slow

APP = "chaos"
DURATION_S = size(20, 180)  # how long new requests keep being sent
CONCURRENCY = size(4, 12)  # streams in flight at any time
KILLS = size(3, 16)  # replica kills spread over the duration
STEPS = 12  # max_denoising_steps per canvas: keeps requests (and the solo oracle) cheap on CPU
REQUEST_TIMEOUT_S = 240.0  # a request running longer than this is a hang
# distinct requests, reused round-robin (the solo oracle runs each once): 2-4 canvases of 32 tokens
WORKLOAD = [(f"chaos request {i}: tell a long story", 32 * (2 + i % 3), 1000 + i) for i in range(size(6, 12))]


@dataclass
class Outcome:
    kind: Literal["completed", "error_event", "refused", "lost"]
    detail: str = ""
    chunks: int = 0


async def _stream(client: httpx.AsyncClient, url: str, prompt: str, max_tokens: int, seed: int,
                  expected: str) -> Outcome:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "seed": seed, "stream": True,
            "max_denoising_steps": STEPS}
    text, finish, error, done, chunks = "", None, None, False, 0
    try:
        async with asyncio.timeout(REQUEST_TIMEOUT_S), client.stream("POST", url + "/v1/completions",
                                                                     json=body) as resp:
            if resp.status_code != 200:
                return Outcome("refused", f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}")
            async for line in resp.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    break
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    error = chunk["error"]
                    continue
                for choice in chunk.get("choices", []):
                    chunks += 1
                    text += choice["text"]
                    finish = choice.get("finish_reason") or finish
    except TimeoutError:
        return Outcome("lost", f"hang: no end after {REQUEST_TIMEOUT_S:g} s ({chunks} chunks)", chunks)
    except httpx.HTTPError as exc:
        return Outcome("lost", f"connection failed mid-request: {exc!r}", chunks)
    if error is not None:
        return Outcome("error_event", f"{error.get('code')}: {error.get('message')}", chunks)
    if not done or finish is None:
        return Outcome("lost", f"silent truncation: done={done} finish={finish} after {chunks} chunks", chunks)
    if text != expected:
        return Outcome("lost", f"text differs from the solo run ({len(text)} vs {len(expected)} chars)", chunks)
    return Outcome("completed", chunks=chunks)


@dataclass(frozen=True)
class Scenario:
    app: str
    overrides: dict
    duration_s: float
    concurrency: int
    kills: int
    min_kills: int
    ranks: int  # ModelReplica actors when whole (replicas x ep_size)
    min_completed: float = 0.5  # fraction of requests that must complete (the rest: explicit errors)


REPLICAS = Scenario(APP, {"replicas": {"num_replicas": 2, "num_cpus": 0.25}, "router": {"max_failovers": 4},
                          "engine": {"kv_cache_memory": 16 << 20, "max_waiting": 256}},
                    DURATION_S, CONCURRENCY, KILLS, size(2, 8), ranks=2)
# One EP gang of 2 ranks (each rank serves its own requests; MoE tokens cross ranks in lockstep). Killing a rank
# restarts the whole gang (RESTART_GANG). The surviving rank's engine fails at its next all-to-all, ends its requests
# with a retryable error event and refuses new ones (reporting itself failed to the router) until Serve's health
# check restarts the gang; the ingress resubmits those requests with their committed tokens, backing off while the
# gang is down (max_failovers x backoff covers a gang restart on this machine).
EP_GANG = Scenario("chaos-ep", {"replicas": {"num_replicas": 1, "ep_size": 2, "num_cpus": 0.5,
                                             "health_check_period_s": 2.0},
                                "router": {"max_failovers": 16, "failover_backoff_s": 0.25},
                                "engine": {"kv_cache_memory": 16 << 20, "max_waiting": 256}},
                   size(12, 90), size(2, 6), size(1, 4), 1, ranks=2, min_completed=0.5)


def _running_replicas(app: str) -> int:
    from ray import serve

    status = serve.status().applications.get(app)
    if status is None or "ModelReplica" not in status.deployments:
        return 0
    return status.deployments["ModelReplica"].replica_states.get("RUNNING", 0)


async def _kill_replicas(sc: Scenario, stop_at: float, rng: random.Random, in_flight: list[int]) -> list[float]:
    """Kill a random replica (or EP rank) every duration / (kills + 1) seconds (jittered) once all are running
    and requests are streaming, so every kill lands mid-stream; returns the kill times."""
    import ray

    kills: list[float] = []
    interval = sc.duration_s / (sc.kills + 1)
    while len(kills) < sc.kills and time.monotonic() < stop_at:
        await asyncio.sleep(interval * rng.uniform(0.5, 1.5))
        while time.monotonic() < stop_at + 60 and (await asyncio.to_thread(_running_replicas, sc.app) < sc.ranks
                                                   or in_flight[0] == 0):
            await asyncio.sleep(0.5)  # wait for Serve's replacement (and for requests to be streaming)
        actors = await asyncio.to_thread(replica_actors, sc.app)
        if len(actors) < sc.ranks:
            continue
        ray.kill(rng.choice(actors), no_restart=False)
        kills.append(time.monotonic())
    return kills


def _run(sc: Scenario, serve_app, solo, suite: str) -> None:
    oracle_started = time.monotonic()
    expected = {(p, m, s): solo(p, m, s, STEPS) for p, m, s in WORKLOAD}  # before the clock starts
    oracle_s = time.monotonic() - oracle_started
    url = serve_app(sc.app, sc.overrides)
    rng = random.Random(20261127)
    outcomes: list[Outcome] = []
    in_flight = [0]

    async def worker(client: httpx.AsyncClient, first: int, stop_at: float) -> None:
        i = first
        while time.monotonic() < stop_at:
            prompt, max_tokens, seed = WORKLOAD[i % len(WORKLOAD)]
            in_flight[0] += 1
            try:
                outcomes.append(await _stream(client, url, prompt, max_tokens, seed,
                                              expected[(prompt, max_tokens, seed)]))
            finally:
                in_flight[0] -= 1
            i += sc.concurrency

    async def main() -> list[float]:
        stop_at = time.monotonic() + sc.duration_s
        limits = httpx.Limits(max_connections=sc.concurrency * 2)
        async with httpx.AsyncClient(timeout=httpx.Timeout(REQUEST_TIMEOUT_S), limits=limits) as client:
            killer = asyncio.create_task(_kill_replicas(sc, stop_at, rng, in_flight))
            await asyncio.gather(*(worker(client, i, stop_at) for i in range(sc.concurrency)))
            return await killer

    started = time.monotonic()
    kills = asyncio.run(main())
    counts = collections.Counter(o.kind for o in outcomes)
    lost = [o.detail for o in outcomes if o.kind == "lost"]
    record(suite, seconds=round(time.monotonic() - started, 1), oracle_seconds=round(oracle_s, 1),
           requests=len(outcomes), concurrency=sc.concurrency, ranks=sc.ranks, kills=len(kills),
           completed=counts["completed"], error_events=counts["error_event"], refused=counts["refused"],
           lost=len(lost), chunks=sum(o.chunks for o in outcomes),
           errors=sorted({o.detail for o in outcomes if o.kind in ("error_event", "refused")})[:5])
    assert not lost, lost[:5]
    assert len(kills) >= sc.min_kills, f"only {len(kills)} kills landed"
    assert counts["completed"] >= sc.min_completed * len(outcomes), counts  # failover, not errors, is the norm
    # whatever was killed, the app is whole again: Serve replaced the replicas
    deadline = time.monotonic() + 120
    while _running_replicas(sc.app) < sc.ranks and time.monotonic() < deadline:
        time.sleep(1)
    assert _running_replicas(sc.app) == sc.ranks


def test_streams_survive_random_replica_kills(serve_app, solo):
    _run(REPLICAS, serve_app, solo, "chaos")


def test_streams_survive_ep_rank_kills(serve_app, solo):
    _run(EP_GANG, serve_app, solo, "chaos_ep")
