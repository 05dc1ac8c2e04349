"""EP groups hosted by Ray Serve gang scheduling (CPU, gloo): EP=2 and EP=4 gangs give the single-process
logits and seeded tokens; killing one rank's process restarts the whole gang, in-flight requests end
(an error event or a dead-actor error, both retryable) instead of hanging, and the group serves again."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from pathlib import Path

import pytest
import recording
import torch
from recording import RecordingEPReplica

from dgserve.engine.request import CanvasEvent, FinalEvent, GenerationRequest
from dgserve.model.generation_config import SamplingParams

pytestmark = pytest.mark.slow  # gang-scheduled Serve deployments on the session's Ray
log = logging.getLogger(__name__)
SAMPLING = SamplingParams(max_denoising_steps=5)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from dgserve.model.checkpoint import load, save

    out = tmp_path_factory.mktemp("ep-ray-tiny")
    loaded = load("tiny-random", seed=5)
    save(loaded.model, out)
    return out, load(out)


def _deploy(world: int, ckpt: Path, record_dir: Path, name: str, placement: str = "contiguous"):
    """The production EP deployment (what ``build_app`` serves behind the ingress), alone, with its rank class
    subclassed to save every step's logits (the subclass travels to the Ray workers by value)."""
    from ray import cloudpickle, serve

    cloudpickle.register_pickle_by_value(recording)

    from dgserve.config import DeployConfig
    from dgserve.routing.app import replica_deployment

    config = DeployConfig.from_args({
        "model": {"path": str(ckpt), "device": "cpu"}, "engine": {"kv_cache_memory": 4 << 20, "prefill_chunk": 24},
        "replicas": {"num_replicas": 1, "ep_size": world, "ep_placement": placement, "ep_collective_timeout_s": 20.0,
                     "num_cpus": 0.25, "health_check_period_s": 1.0}})
    started = time.monotonic()
    handle = serve.run(replica_deployment(config, RecordingEPReplica).bind(
                           config.replica_slice(), record_dir=str(record_dir), torch_threads=1),
                       name=name, route_prefix=None)
    log.info("EP=%d gang up in %.1fs", world, time.monotonic() - started)
    return handle


async def _generate(handle, req: GenerationRequest, first_canvas: asyncio.Event | None = None):
    tokens, final = [], None
    async for ev in handle.options(stream=True).generate.remote(req):
        if isinstance(ev, CanvasEvent):
            if first_canvas is not None:
                first_canvas.set()
            tokens.extend(ev.token_ids)
        elif isinstance(ev, FinalEvent):
            final = ev
    return tokens, final


def _requests(n: int, prefix: str, seed: int = 0) -> list[GenerationRequest]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        plen = int(torch.randint(3, 30, (1,), generator=g))
        out.append(GenerationRequest(prompt_ids=torch.randint(6, 512, (plen,), generator=g).tolist(),
                                     max_tokens=int(torch.randint(20, 60, (1,), generator=g)), seed=500 + i,
                                     sampling=SAMPLING, request_id=f"{prefix}{i}", ignore_eos=True))
    return out


async def _rank_infos(handle, world: int, timeout_s: float = 60.0) -> dict[int, dict]:
    """Every rank's info. The router sends each call to the least loaded rank, so calls are made in concurrent
    rounds: one in flight makes its rank busier, and the next goes elsewhere. A rank that has only just become
    ready may be passed over for a while (the router probes queue lengths and caches them), so the rounds go on
    until a deadline, with a pause between them, rather than for a fixed count."""
    infos: dict[int, dict] = {}
    deadline = time.monotonic() + timeout_s
    while len(infos) < world and time.monotonic() < deadline:
        for info in await asyncio.gather(*[handle.rank_info.remote() for _ in range(2 * world)]):
            infos[info["rank"]] = info
        if len(infos) < world:
            await asyncio.sleep(0.2)
    assert len(infos) == world, infos
    return infos


def _check_against_single(full, requests, results, record_dir: Path) -> None:
    from dgserve.engine.single import generate_single

    for req, (tokens, final) in zip(requests, results, strict=True):
        assert final is not None and final.finish_reason == "length", final
        solo = generate_single(full.model, req.prompt_ids, max_tokens=req.max_tokens, seed=req.seed,
                               sampling=req.sampling, ignore_eos=True, record_logits=True)
        assert tokens == solo.token_ids, req.request_id
        recorded = torch.load(record_dir / f"{req.request_id}.pt")
        assert len(recorded) == len(solo.step_logits)
        for a, b in zip(recorded, solo.step_logits, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def ep2(serve_http, tiny, tmp_path_factory):  # serve_http: Serve started as every test of the session has it
    from ray import serve

    record = tmp_path_factory.mktemp("ep2-logits")
    handle = _deploy(2, tiny[0], record, "ep2", placement="load_aware")
    yield handle, record
    serve.delete("ep2")


def test_ep2_gang_matches_single_process(ep2, tiny):
    handle, record = ep2
    requests = _requests(5, "a")

    async def run():
        infos = await _rank_infos(handle, 2)
        results = await asyncio.gather(*[_generate(handle, r) for r in requests])
        return infos, results

    infos, results = asyncio.run(run())
    assert {i["world_size"] for i in infos.values()} == {2}
    assert len({i["gang_id"] for i in infos.values()}) == 1
    assert len({i["placement"] for i in infos.values()}) == 1  # rank 0 chose it; everyone got it
    _check_against_single(tiny[1], requests, results, record)


def test_killing_a_rank_restarts_the_gang(ep2, tiny):
    """SIGKILL rank 1 while a long request runs: the request ends (error event from the surviving rank, or
    a dead-actor error if it ran on the killed one) within the bound; Serve restarts both ranks (new pids,
    new gang) and the group serves the same tokens again, now with the load-aware placement computed from
    the expert counts the first incarnation published."""
    from ray.exceptions import RayError

    handle, _ = ep2
    # as long as the KV cache allows (fit_max_tokens: the engine lowers max_tokens to that, ~127 canvases)
    long = GenerationRequest(prompt_ids=[5, 6, 7], max_tokens=100_000, seed=1, ignore_eos=True, request_id="long",
                             sampling=SamplingParams(max_denoising_steps=48), fit_max_tokens=True)
    probe = _requests(1, "probe", seed=3)[0]

    async def run():
        before = await _rank_infos(handle, 2)
        streaming = asyncio.Event()
        task = asyncio.create_task(_generate(handle, long, streaming))
        await asyncio.wait_for(streaming.wait(), timeout=120)  # the long request is under way
        assert not task.done()
        killed_at = time.monotonic()
        os.kill(before[1]["pid"], signal.SIGKILL)
        try:
            _, final = await asyncio.wait_for(task, timeout=60)
            ended = ("event", final.finish_reason, final.error)
        except RayError as exc:  # the request was on the killed rank
            ended = ("raised", type(exc).__name__, str(exc)[:200])
        ended_after = time.monotonic() - killed_at
        attempts = 0
        while True:  # what the layer above does: retry until a healthy group answers
            attempts += 1
            assert time.monotonic() - killed_at < 150, f"the gang did not come back ({attempts} attempts)"
            req = GenerationRequest(prompt_ids=probe.prompt_ids, max_tokens=probe.max_tokens, seed=probe.seed,
                                    sampling=probe.sampling, ignore_eos=True, request_id=f"probe-{attempts}")
            try:
                tokens, final = await asyncio.wait_for(_generate(handle, req), timeout=60)
            except (RayError, TimeoutError):
                final = None
            if final is not None and final.finish_reason == "length":
                break
            await asyncio.sleep(0.5)
        serving_after = time.monotonic() - killed_at
        after = await _rank_infos(handle, 2)
        return before, after, ended, ended_after, serving_after, tokens, attempts

    before, after, ended, ended_after, serving_after, tokens, attempts = asyncio.run(run())
    log.info("rank killed: request ended after %.2fs (%s); serving again after %.1fs (%d attempts)",
             ended_after, ended, serving_after, attempts)
    assert ended[0] == "raised" or ended[1] == "error", ended  # it ended (within the 60 s deadline): no hang
    assert {i["pid"] for i in after.values()}.isdisjoint({i["pid"] for i in before.values()})  # whole gang
    assert after[0]["gang_id"] != before[0]["gang_id"]
    from dgserve.cluster.rendezvous import kv_get
    from dgserve.model.placement import ExpertPlacement
    from dgserve.replicas.ep_rank import choose_placement, expert_counts_key

    assert ExpertPlacement.from_json(before[0]["placement"]) == ExpertPlacement.contiguous(8, 2)  # nothing seen yet
    assert before[0]["placement_counts"] is None
    published = kv_get(expert_counts_key("ep2"))
    assert published is not None and sum(published["counts"]) > 0
    # the restarted gang placed experts from the counts the first incarnation published
    used = after[0]["placement_counts"]
    assert used is not None and sum(used) > 0
    restarted = ExpertPlacement.from_json(after[0]["placement"])
    assert restarted == choose_placement(8, 2, "load_aware", used)
    assert after[1]["placement"] == after[0]["placement"]
    from dgserve.engine.single import generate_single

    solo = generate_single(tiny[1].model, probe.prompt_ids, max_tokens=probe.max_tokens, seed=probe.seed,
                           sampling=probe.sampling, ignore_eos=True)
    assert tokens == solo.token_ids


def test_ep4_gang_matches_single_process(serve_http, tiny, tmp_path):
    from ray import serve

    handle = _deploy(4, tiny[0], tmp_path, "ep4")
    try:
        requests = _requests(6, "b", seed=1)

        async def run():
            infos = await _rank_infos(handle, 4)
            results = await asyncio.gather(*[_generate(handle, r) for r in requests])
            stats = await asyncio.gather(*[handle.engine_stats.remote() for _ in range(4)])
            return infos, results, stats

        infos, results, stats = asyncio.run(run())
        assert sorted(infos) == [0, 1, 2, 3]
        _check_against_single(tiny[1], requests, results, tmp_path)
        assert all(s["ep_world_size"] == 4 and s["ep_failed"] == 0 for s in stats)
    finally:
        serve.delete("ep4")
