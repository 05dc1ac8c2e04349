"""What HTTP + Ray Serve costs: aggregate tokens/s at saturation through the OpenAI API on a real local
Ray Serve (``dgserve.routing.app.build_app``, a real port on 127.0.0.1) vs the same engine in-process.

Same checkpoint, same engine settings, same requests, same client concurrency, one run, sides
alternating (A B, B A, ...), new prompts each round; the ratio compares each side's best round.
The load: ``--requests`` requests (prompt ``--prompt-len`` token ids,
``--max-tokens`` new tokens, ``ignore_eos``, one seed each) kept ``--concurrency`` in flight by a
closed-loop asyncio client. In-process, the client calls ``AsyncEngine.generate`` (what the replica
runs); over HTTP it POSTs ``/v1/completions`` with the token ids as the prompt (non-streaming unless
``--stream``) from this process, so the client's own CPU use counts against the serving side.

The model is written once as a checkpoint directory (the preset's random weights, the sampler in
``generation_config.json``, the ``tiny-random`` tokenizer files so the API can start; bench-cpu's
ids beyond that tokenizer's vocabulary decode to nothing, on both sides alike).

    python bench/serving_overhead.py            # bench-cpu (~88M): the recorded figure
    python bench/serving_overhead.py --small    # tiny-random, few requests: the smoke test
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.bench_args import add_preset_args, add_run_args, resolve_preset  # noqa: E402
from bench.bench_record import BenchRun, md_table, set_threads  # noqa: E402
from bench.workload import DEFAULT_KV_BYTES, RequestSpec, abba, uniform_mix, warmup_mix  # noqa: E402
from dgserve.model.checkpoint import ASSETS, GenerationDefaults, load, save  # noqa: E402
from dgserve.model.config import PRESETS, human_params  # noqa: E402
from dgserve.model.generation_config import SamplingParams  # noqa: E402

GOAL = 0.9
APP_NAME = "bench-overhead"
ROUTE = "/bench-overhead"
SERVED_NAME = "bench"


def write_checkpoint(preset: str, sampling: SamplingParams, out: Path, seed: int) -> None:
    lm = load(preset, seed=seed)
    save(lm.model, out, GenerationDefaults(sampling=sampling, eos_token_ids=lm.config.text.eos_token_id,
                                           pad_token_id=lm.config.text.pad_token_id))
    for f in (ASSETS / "tiny-random").iterdir():
        shutil.copy(f, out / f.name)


async def _closed_loop(specs: list[RequestSpec], concurrency: int, one) -> tuple[float, list[int], list[float]]:
    """Run ``one(spec) -> new tokens`` with ``concurrency`` in flight; (wall, tokens, latencies)."""
    sem = asyncio.Semaphore(concurrency)
    lat: list[float] = []

    async def guarded(s: RequestSpec) -> int:
        async with sem:
            t = time.perf_counter()
            n = await one(s)
            lat.append(time.perf_counter() - t)
            return n

    t0 = time.perf_counter()
    tokens = await asyncio.gather(*(guarded(s) for s in specs))
    return time.perf_counter() - t0, list(tokens), lat


def run_in_process(aengine: Any, specs: list[RequestSpec], concurrency: int, tag: str) -> dict[str, Any]:
    from dgserve.engine.request import FinalEvent, GenerationRequest

    sampling = aengine.engine.generation.sampling

    async def one(s: RequestSpec) -> int:
        req = GenerationRequest(prompt_ids=list(s.prompt_ids), max_tokens=s.max_tokens, seed=s.seed,
                                sampling=sampling, ignore_eos=True, min_tokens=s.max_tokens,
                                request_id=f"{tag}-{s.index}")  # as the API's ignore_eos asks
        async for ev in aengine.generate(req):
            if isinstance(ev, FinalEvent):
                if ev.finish_reason != "length":
                    raise RuntimeError(f"{req.request_id}: {ev.finish_reason} {ev.error}")
                return ev.stats.completion_tokens  # what the API's usage counts (pad ids are not text)
        raise RuntimeError(f"{req.request_id}: no final event")

    return _summary(*asyncio.run(_closed_loop(specs, concurrency, one)))


def run_http(base: str, specs: list[RequestSpec], concurrency: int, stream: bool) -> dict[str, Any]:
    import httpx

    async def main() -> tuple[float, list[int], list[float]]:
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        async with httpx.AsyncClient(base_url=base, timeout=1800, limits=limits) as client:

            async def one(s: RequestSpec) -> int:
                body: dict[str, Any] = {"model": SERVED_NAME, "prompt": list(s.prompt_ids),
                                        "max_tokens": s.max_tokens, "seed": s.seed, "ignore_eos": True}
                if not stream:
                    r = await client.post("/v1/completions", json=body)
                    if r.status_code != 200:
                        raise RuntimeError(f"HTTP {r.status_code} for request {s.index}: {r.text[:500]}")
                    return int(r.json()["usage"]["completion_tokens"])
                body.update(stream=True, stream_options={"include_usage": True})
                tokens = None
                async with client.stream("POST", "/v1/completions", json=body) as r:
                    if r.status_code != 200:
                        await r.aread()
                        raise RuntimeError(f"HTTP {r.status_code} for request {s.index}: {r.text[:500]}")
                    async for line in r.aiter_lines():
                        if line.startswith("data: {"):
                            chunk = json.loads(line[6:])
                            if chunk.get("usage"):
                                tokens = int(chunk["usage"]["completion_tokens"])
                if tokens is None:
                    raise RuntimeError("stream ended without usage")
                return tokens

            return await _closed_loop(specs, concurrency, one)

    return _summary(*asyncio.run(main()))


def _summary(wall: float, tokens: list[int], lat: list[float]) -> dict[str, Any]:
    return {"requests": len(tokens), "new_tokens": sum(tokens), "wall_s": round(wall, 4),
            "tokens_per_s": round(sum(tokens) / wall, 3), "latency_mean_s": round(statistics.fmean(lat), 4)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _replica_torch_threads() -> int | None:
    """torch's thread count inside the serving replica (Ray sets OMP_NUM_THREADS from num_cpus)."""
    import ray

    try:
        for entry in ray.util.list_named_actors(all_namespaces=True):
            if f"SERVE_REPLICA::{APP_NAME}#ModelReplica" in entry["name"]:
                actor = ray.get_actor(entry["name"], namespace=entry["namespace"])
                return int(ray.get(actor.__ray_call__.remote(lambda self: __import__("torch").get_num_threads()),
                                   timeout=30))
    except Exception:  # diagnostics only
        return None
    return None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_preset_args(p, "tiny-random, 8 requests (the smoke test)")
    p.add_argument("--requests", type=int, default=None, help="requests per side and rep (default 32; small 8)")
    p.add_argument("--concurrency", type=int, default=None, help="requests in flight (default 16; small 4)")
    p.add_argument("--prompt-len", type=int, default=None, help="prompt tokens (default 32; small 8)")
    p.add_argument("--max-tokens", type=int, default=None, help="new tokens per request (default one canvas)")
    p.add_argument("--steps", type=int, default=None, help="max denoising steps per canvas (default 16; small 4)")
    p.add_argument("--reps", type=int, default=None, help="alternations (default 2: A B B A; small 1)")
    p.add_argument("--stream", action="store_true", help="stream SSE over HTTP (default: plain JSON responses)")
    p.add_argument("--replica-cpus", type=float, default=None,
                   help="Ray num_cpus of the replica (default: all cores; Ray sets its torch threads from it)")
    p.add_argument("--http-base", default=None,
                   help="use an already running Ray Serve with its HTTP proxy at this URL (default: start one)")
    add_run_args(p, threads_help="in-process torch threads (default: the replica's, i.e. int(replica cpus))")
    a = p.parse_args(argv)
    resolve_preset(p, a)
    a.requests = a.requests or (8 if a.small else 32)
    a.concurrency = a.concurrency or (4 if a.small else 16)
    a.prompt_len = a.prompt_len or (8 if a.small else 32)
    a.max_tokens = a.max_tokens or PRESETS[a.preset].canvas_length
    a.steps = a.steps or (4 if a.small else 16)
    a.reps = a.reps or (1 if a.small else 2)
    a.replica_cpus = a.replica_cpus if a.replica_cpus is not None else float(os.cpu_count() or 1)
    return a


def run(a: argparse.Namespace) -> None:
    bench = BenchRun("serving_overhead")
    threads = set_threads(a.threads or max(1, int(a.replica_cpus)))
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    from ray import serve

    from dgserve.cluster.local_ray import LIGHT_ENV
    from dgserve.config import DeployConfig
    from dgserve.engine.engine import Engine
    from dgserve.engine.loop import AsyncEngine
    from dgserve.routing.app import build_app

    sampling = SamplingParams(max_denoising_steps=a.steps)
    tmp = Path(tempfile.mkdtemp(prefix="dgserve-bench-"))
    started_ray = False
    try:
        ckpt = tmp / "ckpt"
        write_checkpoint(a.preset, sampling, ckpt, a.seed)
        config = DeployConfig.from_args({
            "name": APP_NAME, "route_prefix": ROUTE, "model": {"path": str(ckpt), "served_name": SERVED_NAME},
            "replicas": {"num_replicas": 1, "num_cpus": a.replica_cpus, "max_ongoing_requests": 1024},
            "engine": {"kv_cache_memory": DEFAULT_KV_BYTES, "max_running": 64, "max_waiting": 4096},
        })
        if a.http_base is None:
            if not ray.is_initialized():
                for k, v in LIGHT_ENV.items():
                    os.environ.setdefault(k, v)
                # the replicas' per-request log lines stay in Ray's log files, out of this report
                ray.init(num_cpus=max(4, int(a.replica_cpus) + 2), include_dashboard=False,
                         object_store_memory=128 << 20, log_to_driver=False)
                started_ray = True
            port = _free_port()
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            http_base = f"http://127.0.0.1:{port}"
        else:
            http_base = a.http_base.rstrip("/")
        t = time.perf_counter()
        serve.run(build_app(config), name=APP_NAME, route_prefix=ROUTE)
        deploy_s = time.perf_counter() - t
        bench.progress(f"deployed on Ray Serve in {deploy_s:.1f} s")
        base = http_base + ROUTE

        lm = load(str(ckpt))
        aengine = AsyncEngine(Engine(lm.model, lm.generation, lm.tokenizer, config.engine))
        vocab = lm.config.text.vocab_size
        try:
            warm = warmup_mix(lm, a.seed)
            run_in_process(aengine, warm, 2, "warm")
            run_http(base, warm, 2, a.stream)
            runs: dict[str, list[dict[str, Any]]] = {"in_process": [], "http_serve": []}
            for i, (rnd, side) in enumerate(abba(a.reps, ["in_process", "http_serve"])):
                # new prompts per round: no prefix-cache hits from an earlier round on either side
                specs = uniform_mix(a.requests, vocab, a.prompt_len, a.max_tokens, seed=a.seed + rnd)
                r = (run_in_process(aengine, specs, a.concurrency, f"r{i}") if side == "in_process"
                     else run_http(base, specs, a.concurrency, a.stream))
                runs[side].append(r)
                bench.progress(f"{side}: {r['tokens_per_s']} tok/s in {r['wall_s']} s")
        finally:
            aengine.shutdown()
        replica_threads = _replica_torch_threads()
        # before Ray goes away: the replica and the cluster's processes are this run's own CPU use
        state = bench.contention()
        with contextlib.suppress(Exception):
            serve.delete(APP_NAME)
    finally:
        if started_ray:
            with contextlib.suppress(Exception):
                serve.shutdown()
            ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)

    # headline: each side's best round (interference only ever slows a run down); medians beside it
    med = {side: statistics.median(r["tokens_per_s"] for r in rs) for side, rs in runs.items()}
    best = {side: max(r["tokens_per_s"] for r in rs) for side, rs in runs.items()}
    ratio = best["http_serve"] / best["in_process"]
    counts = lm.config.parameter_counts()
    results = {
        "preset": a.preset, "params_total": counts["total"], "canvas": lm.config.canvas_length,
        "steps": a.steps, "requests": a.requests, "concurrency": a.concurrency, "prompt_len": a.prompt_len,
        "max_tokens": a.max_tokens, "stream": a.stream, "reps": a.reps, "replica_num_cpus": a.replica_cpus,
        "replica_torch_threads": replica_threads, "in_process_torch_threads": threads,
        "deploy_s": round(deploy_s, 2), "runs": runs,
        "in_process_tokens_per_s": round(best["in_process"], 3),
        "http_serve_tokens_per_s": round(best["http_serve"], 3),
        "ratio": round(ratio, 4), "ratio_median": round(med["http_serve"] / med["in_process"], 4),
        "goal": GOAL, "met": ratio >= GOAL,
    }
    table = md_table(["load", "in-process tok/s", "HTTP + Ray Serve tok/s", "ratio", "goal", "verdict"],
                     [[f"{a.requests} req, {a.concurrency} in flight, {a.prompt_len} / {a.max_tokens} tokens",
                       best["in_process"], best["http_serve"], f"{ratio:.3f}", f">= {GOAL}",
                       "met" if ratio >= GOAL else "not met"]])
    notes = [f"{a.preset} ({human_params(counts['total'])} params), canvas {lm.config.canvas_length}, {a.steps} steps "
             f"max; replica num_cpus {a.replica_cpus:g} (torch threads {replica_threads}), in-process torch threads "
             f"{threads}; {'SSE streaming' if a.stream else 'non-streaming'} HTTP; best of {a.reps} round(s)"]
    bench.finish(results, table, a.out, notes, state=state)


def main(argv: list[str] | None = None) -> int:
    run(parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
