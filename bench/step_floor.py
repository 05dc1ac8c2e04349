"""The floor under a denoising step on this machine: what no implementation with exact parity can avoid.

An implementation whose tokens equal the reference's bit for bit must run the same matrix multiplies (same
shapes, same BLAS kernels) and must draw the same ``Exp(1)`` stream behind ``torch.multinomial``
(``canvas x vocab`` draws per canvas and step, sequential in one generator). This script runs dgserve's
engine under ``torch.profiler`` with N requests of one canvas each, arriving together, and reports per
canvas-step (one canvas through one denoising step):

- ``wall_ms``: the engine's wall time (profiled run; the profiler adds a little);
- ``matmul_ms``: time inside matrix-multiply ops (``aten::mm``, ``addmm``, ``bmm``, ``_grouped_mm``), the
  forward's, the LM head's and the self-conditioning soft embeddings', prefill and commit forwards included;
- ``exp_ms``: the multinomial's exponential draws for one canvas, timed alone (one core);
- ``floor_ms`` = ``matmul_ms + exp_ms / threads``: an optimistic floor (nothing else costs anything, the
  draws spread perfectly over the cores), and ``max_tokens_per_s`` = tokens per canvas-step / floor: the
  most any exact-parity implementation could reach here with these kernels, to set against a goal.

    python bench/step_floor.py                 # bench-cpu, N = 1 and 8
    python bench/step_floor.py --small         # tiny-random (the smoke test)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.bench_args import add_preset_args, add_run_args, int_list, resolve_preset  # noqa: E402
from bench.bench_record import BenchRun, md_table, set_threads  # noqa: E402
from bench.workload import drive_engine, uniform_mix, warm_engine  # noqa: E402
from dgserve.model.checkpoint import load  # noqa: E402
from dgserve.model.config import human_params  # noqa: E402

MATMUL_OPS = frozenset({"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_grouped_mm"})


def exp_draw_ms(canvas: int, vocab: int, reps: int = 7) -> float:
    """Median time of one canvas's multinomial noise, ``[canvas, vocab]`` Exp(1) draws from one generator."""
    g = torch.Generator().manual_seed(0)
    buf = torch.empty(canvas, vocab)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        buf.exponential_(generator=g)
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_preset_args(p, "tiny-random, N = 1,2 (the smoke test)")
    p.add_argument("--concurrency", default=None, help="comma-separated N (default 1,8; small 1,2)")
    p.add_argument("--steps", type=int, default=None, help="max denoising steps per canvas (default 16; small 4)")
    p.add_argument("--prompt-len", type=int, default=None, help="prompt tokens (default 32; small 8)")
    add_run_args(p)
    a = p.parse_args(argv)
    resolve_preset(p, a)
    a.concurrency = int_list(p, "--concurrency", a.concurrency or ("1,2" if a.small else "1,8"))
    a.steps = a.steps or (4 if a.small else 16)
    a.prompt_len = a.prompt_len or (8 if a.small else 32)
    return a


def run(a: argparse.Namespace) -> None:
    bench = BenchRun("step_floor")
    threads = set_threads(a.threads)
    lm = load(a.preset, seed=a.seed)
    cfg = lm.config
    canvas, vocab = cfg.canvas_length, cfg.text.vocab_size
    engine, sampling = warm_engine(lm, a.steps, a.seed, max_running=max(64, max(a.concurrency)))
    exp_ms = exp_draw_ms(canvas, vocab)
    tokens_per_canvas_step = canvas / a.steps  # random weights: every canvas takes all its steps
    points: list[dict[str, Any]] = []
    for n in a.concurrency:
        specs = uniform_mix(n, vocab, a.prompt_len, canvas, seed=a.seed + n)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            res = drive_engine(engine, specs, sampling, f"n{n}")
        matmul_s = sum(e.self_cpu_time_total for e in prof.key_averages() if e.key in MATMUL_OPS) / 1e6
        canvas_steps = sum(o.denoise_steps for o in res.outcomes)
        floor_ms = matmul_s * 1e3 / canvas_steps + exp_ms / threads
        points.append({
            "concurrency": n, "canvas_steps": canvas_steps, "tokens_per_s": round(res.tokens_per_s, 3),
            "wall_ms": round(res.wall_s * 1e3 / canvas_steps, 2),
            "matmul_ms": round(matmul_s * 1e3 / canvas_steps, 2),
            "matmul_share": round(matmul_s / res.wall_s, 3),
            "exp_ms": round(exp_ms, 2), "floor_ms": round(floor_ms, 2),
            "max_tokens_per_s": round(tokens_per_canvas_step / (floor_ms / 1e3), 2),
        })
        bench.progress(f"N={n}: {points[-1]['wall_ms']} ms per canvas-step, matmul {points[-1]['matmul_ms']} ms")
    counts = cfg.parameter_counts()
    results = {"preset": a.preset, "params_total": counts["total"], "canvas": canvas, "vocab": vocab,
               "steps": a.steps, "prompt_len": a.prompt_len, "threads": threads,
               "tokens_per_canvas_step": tokens_per_canvas_step, "points": points}
    rows = [[p["concurrency"], p["tokens_per_s"], p["wall_ms"], p["matmul_ms"], f"{p['matmul_share']:.0%}",
             p["exp_ms"], p["floor_ms"], p["max_tokens_per_s"]] for p in points]
    table = md_table(["N", "engine tok/s", "wall ms / canvas-step", "matmul ms", "matmul share",
                      "Exp(1) draws ms (1 core)", "floor ms", "max tok/s at the floor"], rows)
    notes = [f"{a.preset} ({human_params(counts['total'])}), canvas {canvas}, vocab {vocab}, {a.steps} steps, "
             f"prompt {a.prompt_len}, {threads} threads, {bench.record_date()}", bench.command()]
    bench.finish(results, table, a.out, notes)


def main(argv: list[str] | None = None) -> int:
    run(parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
