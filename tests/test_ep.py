"""Expert parallelism without Ray: placement, per-rank memory, and EP=2/EP=4 process groups (gloo on CPU,
NCCL where CUDA exists) whose logits and seeded tokens equal the single-process model's.

Each group is W spawned processes; one worker function runs every scenario of that group so the
processes (and the torch imports) are paid once: a raw dispatcher call where one rank routes no
tokens and one rank receives none, packed model forwards (prefill + denoise) with a rank sitting a
forward out, the lockstep engine with uneven requests per rank (one rank with none), and - for EP=2 -
a collective timeout and a peer dying mid-request. Ray-hosted groups are in test_ep_ray.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import traceback
from pathlib import Path

import pytest
import torch

from dgserve.model.placement import ExpertPlacement

SKEW_SEED = 7


# -- pure logic: placement and memory ------------------------------------------------------------------

def _zipf_load(num_experts: int, hot_first: bool = True) -> list[float]:
    load = [1000.0 / (i + 1) ** 1.1 for i in range(num_experts)]
    return load if hot_first else load[::-1]


def test_contiguous_placement_shape():
    p = ExpertPlacement.contiguous(128, 8)
    assert [len(p.owned_experts(r)) for r in range(8)] == [16] * 8
    assert p.owned_experts(1) == list(range(16, 32))
    uneven = ExpertPlacement.contiguous(10, 4)
    assert [len(uneven.owned_experts(r)) for r in range(4)] == [3, 3, 2, 2]
    assert ExpertPlacement.from_json(p.to_json()) == p
    with pytest.raises(ValueError, match="fewer experts than ranks"):
        ExpertPlacement.contiguous(2, 4)


def test_load_aware_placement_lowers_imbalance():
    """Zipf-skewed load (exponent 1.1) with the hot experts numbered first: contiguous puts 5.5x the mean
    load on rank 0. Greedy packing without copies cannot go below hottest-expert/mean = 1.81 (and each rank
    must take 16 experts); with 8 spare slots (one replica of the 8 hottest) it is balanced to 0.1%."""
    load = _zipf_load(128)
    contiguous = ExpertPlacement.contiguous(128, 8).imbalance(load)
    greedy = ExpertPlacement.load_aware(load, 8)
    replicated = ExpertPlacement.load_aware(load, 8, num_redundant=8)
    assert contiguous > 5.0, contiguous
    assert greedy.imbalance(load) < 2.0, greedy.imbalance(load)
    assert replicated.imbalance(load) < 1.01, replicated.imbalance(load)
    assert replicated.imbalance(load) < greedy.imbalance(load) < contiguous / 2.5
    # equal memory per rank: same number of expert slots everywhere, every expert somewhere
    assert [len(replicated.owned_experts(r)) for r in range(8)] == [17] * 8
    assert all(1 <= len(r) <= 8 for r in replicated.replicas)
    assert replicated.replicas[0] != (0,) and len(replicated.replicas[0]) > 1  # the hottest expert is copied
    # a mildly skewed random load (every expert warm) also improves
    g = torch.Generator().manual_seed(SKEW_SEED)
    mild = (torch.rand(128, generator=g) * 3 + 1).pow(2)
    assert ExpertPlacement.load_aware(mild, 8).imbalance(mild) < ExpertPlacement.contiguous(128, 8).imbalance(mild)
    with pytest.raises(ValueError, match="multiple of world_size"):
        ExpertPlacement.load_aware(load, 8, num_redundant=3)


def test_roofline_worked_example():
    """The numbers docs/architecture.md works through (26B-A4B, 8 canvases, EP=4, DGX H100)."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from bench.ep_overhead import roofline
    from dgserve.model.config import PRESETS

    r = roofline(PRESETS["diffusiongemma-26b-a4b"], world=4, canvases=8)
    assert r.tokens == 2048
    assert r.expert_tflop_per_rank == pytest.approx(1.46, abs=0.01)
    assert r.expert_weight_gb_per_rank == pytest.approx(11.4, abs=0.05)
    assert r.expert_ms == pytest.approx(3.41, abs=0.01)  # weight-read bound
    assert r.a2a_mb_per_rank == pytest.approx(1038, abs=1)
    assert r.a2a_ms == pytest.approx(4.11, abs=0.01)
    one = roofline(PRESETS["diffusiongemma-26b-a4b"], world=1, canvases=1)
    assert one.a2a_ms == 0 and one.expert_ms == pytest.approx(13.63, abs=0.01)


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Path:
    from dgserve.model.checkpoint import load, save

    out = tmp_path_factory.mktemp("ep-tiny")
    save(load("tiny-random", seed=3).model, out)
    return out


def test_rank_parameter_bytes(tiny_ckpt):
    """Each rank holds the dense weights plus exactly its experts (slice-read from safetensors)."""
    from dgserve.model.checkpoint import load
    from dgserve.model.ep_weights import load_rank_share, parameter_bytes

    full = load(tiny_ckpt)
    whole = parameter_bytes(full.model)
    num_experts = full.config.text.num_experts
    per_expert = whole["experts"] / num_experts
    for placement in (ExpertPlacement.contiguous(num_experts, 4),
                      ExpertPlacement.load_aware(_zipf_load(num_experts), 4, num_redundant=4)):
        for rank in range(4):
            owned = placement.owned_experts(rank)
            share = load_rank_share(tiny_ckpt, owned)
            got = parameter_bytes(share.model)["total"]
            expected = whole["dense"] + len(owned) * per_expert
            assert abs(got - expected) <= 0.01 * expected, (rank, got, expected)
            layer = share.model.layers[1].experts
            assert layer.expert_ids == owned
            torch.testing.assert_close(layer.down_proj, full.model.layers[1].experts.down_proj[owned], rtol=0, atol=0)
    # the published model: dense ~5.6 GB + 45.7 GB of experts in bf16; a rank of EP=8 holds dense + 1/8
    from dgserve.model.config import PRESETS

    counts = PRESETS["diffusiongemma-26b-a4b"].parameter_counts()
    dense_gb, experts_gb = 2 * (counts["total"] - counts["experts"]) / 1e9, 2 * counts["experts"] / 1e9
    assert 40 < experts_gb < 50 and 3 < dense_gb < 8


# -- process groups ------------------------------------------------------------------------------------

def _requests_for(rank: int, world: int):
    from dgserve.engine.request import GenerationRequest
    from dgserve.model.generation_config import SamplingParams

    per_rank = {2: [2, 0], 4: [2, 0, 1, 2], 1: [2]}[world]
    g = torch.Generator().manual_seed(100 + rank)
    out = []
    for i in range(per_rank[rank]):
        plen = int(torch.randint(3, 40, (1,), generator=g))
        out.append(GenerationRequest(
            prompt_ids=torch.randint(6, 512, (plen,), generator=g).tolist(),
            max_tokens=int(torch.randint(20, 50, (1,), generator=g)), seed=1000 * rank + i,
            sampling=SamplingParams(max_denoising_steps=5), request_id=f"r{rank}-{i}", ignore_eos=True))
    return out


async def _consume(engine, request, on_first_canvas=None):
    from dgserve.engine.request import CanvasEvent, FinalEvent

    tokens, final = [], None
    async for ev in engine.generate(request):
        if isinstance(ev, CanvasEvent):
            if not tokens and on_first_canvas is not None:
                on_first_canvas()
            tokens.extend(ev.token_ids)
        elif isinstance(ev, FinalEvent):
            final = ev
    return tokens, final


def _forward_scenarios(rank, world, group, full, ckpt, placement, result):
    """Raw dispatcher + packed model forwards; compares to the full model in this process."""
    from dgserve.model.ep_dispatch import ExpertParallelDispatcher
    from dgserve.model.ep_weights import load_rank_share
    from dgserve.model.kv import Segment
    from dgserve.model.moe import LocalDispatcher

    device = group.device
    cfg = full.config.text
    owned = placement.owned_experts(rank)
    # 1) raw dispatcher, one call: rank 1 routes nothing; nobody routes to the last rank's experts
    share = load_rank_share(ckpt, owned, device=device)
    disp = ExpertParallelDispatcher(placement, rank, cfg.num_hidden_layers, group=group.group, device=device)
    avoid = set(placement.owned_experts(world - 1)) if world > 1 else set()
    allowed = torch.tensor([e for e in range(cfg.num_experts) if e not in avoid], device=device)
    g = torch.Generator().manual_seed(rank)
    n_tok = 0 if rank == 1 else 7 + 3 * rank
    x = torch.randn(n_tok, cfg.hidden_size, generator=g).to(device)
    pick = torch.stack([torch.randperm(len(allowed), generator=g)[:cfg.top_k_experts] for _ in range(n_tok)]) \
        if n_tok else torch.empty(0, cfg.top_k_experts, dtype=torch.long)
    index = allowed[pick.to(device)]
    weights = torch.rand(n_tok, cfg.top_k_experts, generator=g).to(device)
    out = disp(0, x, index, weights, share.model.layers[0].experts)
    if n_tok:
        ref = LocalDispatcher()(0, x, index, weights, full.model.layers[0].experts)
        result["dispatch_err"] = float((out - ref).abs().max())
    stats = disp.sync_stats()
    result["layer0_rank_load"] = stats.rank_load[0].tolist()
    # 2) packed forwards through the EP model: prefill of two sequences, then their canvases (denoise)
    share.model.dispatcher = ExpertParallelDispatcher(placement, rank, cfg.num_hidden_layers, group=group.group,
                                                      device=device)
    canvas = full.config.canvas_length
    # an EP rank never splits a packed forward (its peers run the same collectives), so the single-process
    # model packs short prompts too; then the forwards must agree bit for bit on CPU
    full.model.isolate_short_prompts = False
    errs = []
    for step, sit_out in enumerate((rank == 1, rank == world - 1)):
        if sit_out:  # no work on this rank for this step's two forwards: empty collectives only
            _sit_out_twice(share)
            continue
        kv_ep, kv_ref = _kv(cfg), _kv(cfg)
        gen = torch.Generator().manual_seed(10 * rank + step)
        lens = [5 + rank, 11 + 2 * step]
        prompt = torch.randint(0, cfg.vocab_size, (sum(lens),), generator=gen).to(device)
        segs = [Segment("encode", 0, lens[0], 0), Segment("encode", 1, lens[1], 0)]
        canv = torch.randint(0, cfg.vocab_size, (2 * canvas,), generator=gen).to(device)
        dsegs = [Segment("denoise", 0, canvas, lens[0]), Segment("denoise", 1, canvas, lens[1])]
        share.model(prompt, segs, kv_ep)  # forward 1: prefill of two sequences, packed
        full.model(prompt, segs, kv_ref)
        h_ep = share.model(canv, dsegs, kv_ep)  # forward 2: their canvases, packed
        h_ref = full.model(canv, dsegs, kv_ref)
        errs.append(float((share.model.logits(h_ep) - full.model.logits(h_ref)).abs().max()))
    full.model.isolate_short_prompts = True
    result["forward_logit_err"] = max(errs) if errs else 0.0
    return share


def _kv(cfg):
    from dgserve.model.kv import ContiguousKV

    return ContiguousKV(cfg.num_hidden_layers, [cfg.is_sliding(i) for i in range(cfg.num_hidden_layers)],
                        cfg.sliding_window)


def _sit_out_twice(share):
    """A rank sitting out a step of two forwards (prefill + denoise) joins both empty."""
    cfg = share.model.config.text
    for _ in range(2):
        share.model.dispatcher.empty_forward([layer.experts for layer in share.model.layers], cfg.hidden_size,
                                             cfg.top_k_experts, share.model.dtype)


def _engine_scenario(rank, world, group, full, ckpt, placement, result):
    from recording import RecordingEngine

    from dgserve.engine.engine import EngineConfig
    from dgserve.engine.single import generate_single
    from dgserve.replicas.ep_engine import build_ep_engine

    ep = build_ep_engine(ckpt, group, placement, engine_class=RecordingEngine, engine_config=EngineConfig(
        kv_cache_memory=4 << 20, prefill_chunk=24, max_step_tokens=256), idle_poll_s=0.005, stats_sync_every=4)
    recorded = ep.engine.logits
    requests = _requests_for(rank, world)

    async def run_all():
        return await asyncio.gather(*[_consume(ep, r) for r in requests])

    outs = asyncio.run(run_all())
    token_ok, logit_err, finals = [], 0.0, []
    for req, (tokens, final) in zip(requests, outs, strict=True):
        solo = generate_single(full.model, req.prompt_ids, max_tokens=req.max_tokens, seed=req.seed,
                               sampling=req.sampling, ignore_eos=True, record_logits=True)
        token_ok.append(tokens == solo.token_ids)
        finals.append(final.finish_reason)
        assert len(recorded[req.request_id]) == len(solo.step_logits)
        for a, b in zip(recorded[req.request_id], solo.step_logits, strict=True):
            logit_err = max(logit_err, float((a - b.to(a.device)).abs().max()))
    # every rank finished its own requests; wait for the others, then stop the group together: the ranks agree
    # on the stop at one step, so the final counts below are equal on every rank
    group.store.set(f"engine-done/{rank}", "1")
    group.store.wait([f"engine-done/{r}" for r in range(world)])
    ep.shutdown()
    stats = ep.stats()
    result.update(engine_tokens_equal=token_ok, engine_logit_err=logit_err, engine_finals=finals,
                  engine_requests=len(requests), engine_empty_forwards=stats["ep_rank_empty_forwards"],
                  engine_steps=stats["ep_steps"], engine_imbalance=stats.get("ep_imbalance"),
                  engine_failed=ep.failed)


def _fast_engine_scenario(rank, world, group, full, ckpt, placement, result):
    """Fast execution over the EP group: each rank's requests complete, and their tokens equal a single-process
    fast engine's given the same requests at once (the same rows per step; counter-based randomness)."""
    from dgserve.engine.engine import Engine, EngineConfig
    from dgserve.engine.request import CanvasEvent, FinalEvent
    from dgserve.replicas.ep_engine import build_ep_engine

    cfg = EngineConfig(execution="fast", kv_cache_memory=4 << 20, max_step_tokens=256)
    ep = build_ep_engine(ckpt, group, placement, engine_config=cfg, idle_poll_s=0.005, stats_sync_every=4)
    requests = _requests_for(rank, world)

    async def run_all():
        return await asyncio.gather(*[_consume(ep, r) for r in requests])

    outs = asyncio.run(run_all())
    group.store.set(f"fast-done/{rank}", "1")
    group.store.wait([f"fast-done/{r}" for r in range(world)])
    settled = -1
    while ep.steps != settled:
        settled = ep.steps
        time.sleep(0.2)
    stats = ep.stats()
    ep.shutdown()
    single = Engine(full.model, full.generation, None, cfg)
    for r in requests:
        single.add_request(r)
    alone: dict[str, list[int]] = {}
    while single.has_work():
        for ev in single.step():
            if isinstance(ev, CanvasEvent):
                alone.setdefault(ev.request_id, []).extend(ev.token_ids)
            elif isinstance(ev, FinalEvent):
                alone.setdefault(ev.request_id, [])
    result.update(fast_requests=len(requests), fast_finals=[final.finish_reason for _, final in outs],
                  fast_lengths_ok=[len(t) == r.max_tokens for r, (t, _) in zip(requests, outs, strict=True)],
                  fast_tokens_equal=[t == alone[r.request_id] for r, (t, _) in zip(requests, outs, strict=True)],
                  fast_steps=stats["ep_steps"], fast_execution=ep.engine.execution)


def _failure_scenarios(rank, world, group, ckpt, placement, result):
    """EP=2 only: a collective that times out fails the request; a dead peer fails it at once."""
    from dgserve.cluster.process_group import sub_group
    from dgserve.engine.engine import EngineConfig
    from dgserve.engine.loop import EngineFailed
    from dgserve.engine.request import GenerationRequest
    from dgserve.model.generation_config import SamplingParams
    from dgserve.replicas.ep_engine import build_ep_engine

    cfg = EngineConfig(kv_cache_memory=2 << 20)
    long_request = GenerationRequest(prompt_ids=[7, 8, 9], max_tokens=4000, seed=1, ignore_eos=True,
                                     fit_max_tokens=True, sampling=SamplingParams(max_denoising_steps=48),
                                     request_id="long")  # capped to what the small cache holds: long enough
    # (a) peer alive but not taking part: rank 0's first collective times out after 2 s
    short = sub_group(group, timeout_s=2.0)
    if rank == 0:
        ep = build_ep_engine(ckpt, short, placement, engine_config=cfg)
        _, final = asyncio.run(_consume(ep, long_request))
        result["timeout_final"] = [final.finish_reason, final.error]
        try:
            ep.check_health()
            result["timeout_health"] = "healthy"
        except EngineFailed as exc:
            result["timeout_health"] = str(exc)
    # rank 1 stays alive without taking part until rank 0 has seen its collective time out
    group.store.set(f"timeout-done/{rank}", "1")
    group.store.wait([f"timeout-done/{r}" for r in range(world)])
    # (b) rank 1's process dies while rank 0 serves a long request (after its first canvas)
    ep = build_ep_engine(ckpt, group, placement, engine_config=cfg, owns_group=True)
    if rank == 1:
        group.store.wait(["death/first-canvas"])
        _write(result, rank)
        os._exit(0)
    tokens, final = asyncio.run(_consume(ep, long_request,
                                         on_first_canvas=lambda: group.store.set("death/first-canvas", "1")))
    result["death_final"] = [final.finish_reason, final.error, len(tokens)]
    result["death_retryable"] = final.retryable
    # a request arriving after the failure is refused at once, retryably (the ingress fails it over)
    late = GenerationRequest(prompt_ids=[1, 2], max_tokens=8, seed=2, request_id="late")
    _, late_final = asyncio.run(_consume(ep, late))
    result["late_final"] = [late_final.finish_reason, late_final.retryable, ep.stats()["ep_failed"]]


_OUT_DIR = ""


def _write(result, rank):
    Path(_OUT_DIR, f"rank{rank}.json").write_text(json.dumps(result))


def group_worker(rank: int, world: int, port: int, ckpt: str, out_dir: str, backend: str, scenarios: str) -> None:
    global _OUT_DIR
    _OUT_DIR = out_dir
    torch.set_num_threads(1)
    result: dict = {"t": []}
    t0 = time.monotonic()
    try:
        from dgserve.cluster.process_group import create_store, init_ep_group
        from dgserve.model.checkpoint import load

        # NCCL: one GPU per rank where there are enough (rank r on cuda:r), else every rank on cuda:0
        device = torch.device(f"cuda:{rank % torch.cuda.device_count()}") if backend == "nccl" \
            else torch.device("cpu")
        store = create_store("127.0.0.1", rank + 1, world, port=port)  # the parent serves the store
        group = init_ep_group(rank, world, store, device=device, backend=backend, timeout_s=60)
        result["t"].append(("init", time.monotonic() - t0))
        full = load(ckpt, device=device)
        num_experts = full.config.text.num_experts
        placements = {"contiguous": ExpertPlacement.contiguous(num_experts, world)}
        if world > 1:
            placements["replicated"] = ExpertPlacement.load_aware(_zipf_load(num_experts), world,
                                                                  num_redundant=world)
        for name, placement in placements.items():
            sub: dict = {}
            _forward_scenarios(rank, world, group, full, ckpt, placement, sub)
            result[name] = sub
            result["t"].append((name, time.monotonic() - t0))
        if "engine" in scenarios:
            sub = {}
            _engine_scenario(rank, world, group, full, ckpt, placements.get("replicated", placements["contiguous"]),
                             sub)
            result["engine"] = sub
            result["t"].append(("engine", time.monotonic() - t0))
        if "fast" in scenarios:
            _fast_engine_scenario(rank, world, group, full, ckpt, placements["contiguous"], result)
        if "failure" in scenarios:
            _failure_scenarios(rank, world, group, ckpt, placements["contiguous"], result)
    except BaseException as exc:  # reported to the parent, which fails the test with it
        result["error"] = f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"
    _write(result, rank)
    os._exit(0)  # skip process-group teardown races at interpreter exit


def run_group(world: int, ckpt: Path, tmp_path: Path, backend: str = "gloo", scenarios: str = "engine",
              timeout_s: float = 150.0, worker=group_worker) -> list[dict]:
    """Spawn ``world`` ranks of ``worker`` (same arguments as :func:`group_worker`); their JSON results."""
    import torch.distributed as dist
    import torch.multiprocessing as mp

    master = dist.TCPStore("127.0.0.1", 0, world + 1, is_master=True, wait_for_workers=False)
    ctx = mp.get_context("spawn")
    env_threads = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        procs = [ctx.Process(target=worker, args=(r, world, master.port, str(ckpt), str(tmp_path), backend,
                                                   scenarios)) for r in range(world)]
        for p in procs:
            p.start()
    finally:
        if env_threads is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = env_threads
    deadline = time.monotonic() + timeout_s
    for p in procs:
        p.join(max(1.0, deadline - time.monotonic()))
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
    assert not hung, f"ranks {hung} did not finish in {timeout_s}s"
    results = []
    for r in range(world):
        file = tmp_path / f"rank{r}.json"
        assert file.exists(), f"rank {r} wrote no result (exit code {procs[r].exitcode})"
        results.append(json.loads(file.read_text()))
    errors = [f"rank {r}: {res['error']}" for r, res in enumerate(results) if "error" in res]
    assert not errors, "\n".join(errors)
    return results


def _check_group(results: list[dict], world: int, exact: bool = False) -> None:
    """``exact`` (gloo on CPU): expert outputs are computed per (expert, source rank, segment), so the EP
    forwards equal the single-process forwards bit for bit, whatever the other ranks send."""
    tol = 0.0 if exact else 1e-5
    for r, res in enumerate(results):
        for name in ("contiguous", "replicated"):
            if name not in res:
                continue
            sub = res[name]
            if r != 1:
                assert sub["dispatch_err"] <= tol, (r, name, sub)
            assert sub["forward_logit_err"] <= tol, (r, name, sub)
            if name == "contiguous" and world > 1:
                assert sub["layer0_rank_load"][world - 1] == 0  # the last rank received no rows in that call
                assert sum(sub["layer0_rank_load"]) > 0
        eng = res["engine"]
        assert eng["engine_tokens_equal"] == [True] * eng["engine_requests"], (r, eng)
        assert eng["engine_logit_err"] <= 1e-5, (r, eng)
        assert eng["engine_finals"] == ["length"] * eng["engine_requests"]
        assert eng["engine_failed"] in (None, "the EP group shut down"), eng["engine_failed"]
    steps = {res["engine"]["engine_steps"] for res in results}
    assert len(steps) == 1, f"ranks took different numbers of steps: {steps}"  # lockstep
    if world > 1:
        idle_rank = results[1]["engine"]  # rank 1 has no requests: it only ran empty forwards
        assert idle_rank["engine_requests"] == 0
        assert idle_rank["engine_empty_forwards"] == idle_rank["engine_steps"] > 0
        assert results[0]["engine"]["engine_imbalance"] is not None


@pytest.mark.slow  # W spawned processes, each importing torch and loading the model
def test_ep2_gloo_matches_single_process_and_fails_cleanly(tiny_ckpt, tmp_path):
    results = run_group(2, tiny_ckpt, tmp_path, scenarios="engine,fast,failure")
    _check_group(results, 2, exact=True)
    for res in results:  # fast execution over the group too
        assert res["fast_execution"] == "fast"
        assert res["fast_finals"] == ["length"] * res["fast_requests"]
        assert res["fast_lengths_ok"] == [True] * res["fast_requests"]
        assert res["fast_tokens_equal"] == [True] * res["fast_requests"]
    assert len({res["fast_steps"] for res in results}) == 1  # lockstep
    reason, error = results[0]["timeout_final"]
    assert reason == "error" and "EP rank 0 failed" in error, error
    assert "timed out" in error.lower(), error  # the group's 2 s collective timeout ended it, not a hang's deadline
    assert "failed" in results[0]["timeout_health"]
    reason, error, tokens = results[0]["death_final"]
    assert reason == "error" and ("closed" in error.lower() or "peer" in error.lower() or "failed" in error), error
    assert tokens > 0  # it failed mid-request, after its first canvas
    assert results[0]["death_retryable"] is True  # the group's failure, not the request's
    assert results[0]["late_final"] == ["error", True, 1]


@pytest.mark.slow  # W spawned processes, each importing torch and loading the model
def test_ep4_gloo_matches_single_process(tiny_ckpt, tmp_path):
    results = run_group(4, tiny_ckpt, tmp_path)
    _check_group(results, 4, exact=True)


# -- NCCL: written and reviewed, run where a GPU exists --------------------------------------------------

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="NCCL tests need CUDA")


@pytest.mark.gpu
@needs_cuda
def test_ep1_nccl_group_matches_single_process(tiny_ckpt, tmp_path):
    results = run_group(1, tiny_ckpt, tmp_path, backend="nccl")
    res = results[0]
    assert res["contiguous"]["forward_logit_err"] <= 1e-5
    assert res["engine"]["engine_tokens_equal"] == [True] * res["engine"]["engine_requests"]
    assert res["engine"]["engine_logit_err"] <= 1e-5


@pytest.mark.gpu
@pytest.mark.parametrize("world", [2, 4])
@needs_cuda
def test_nccl_group_one_gpu_per_rank(tiny_ckpt, tmp_path, world):
    """The real setup: W ranks on W GPUs of one node."""
    if torch.cuda.device_count() < world:
        pytest.skip(f"needs {world} GPUs, found {torch.cuda.device_count()}")
    _check_group(run_group(world, tiny_ckpt, tmp_path, backend="nccl"), world)


@pytest.mark.gpu
@needs_cuda
def test_ep2_nccl_on_one_gpu(tiny_ckpt, tmp_path):
    """Two ranks on one GPU: NCCL normally refuses ("Duplicate GPU detected"); then this skips."""
    if torch.cuda.device_count() >= 2:
        pytest.skip("two GPUs present: test_nccl_group_one_gpu_per_rank is the real test")
    try:
        results = run_group(2, tiny_ckpt, tmp_path, backend="nccl")
    except AssertionError as exc:
        if "Duplicate GPU" in str(exc) or "invalid usage" in str(exc).lower():
            pytest.skip(f"NCCL does not allow two ranks on one GPU here: {str(exc)[:200]}")
        raise
    _check_group(results, 2)

