"""Throughput and latency of dgserve's engine vs the number of concurrent requests, in-process.

For each N in ``--concurrency`` (default 1, 2, 4, ..., 64), N requests with the same prompt length
and output length arrive together; the engine runs them to completion (continuous batching, every
running canvas in every forward). Reported per N: aggregate tokens/s (all new tokens / wall time),
per-request tokens/s (mean of each request's tokens / its latency), time to first canvas (mean,
median, max), and canvases per forward. The sampler is the preset's (``--steps`` denoising steps,
adaptive stopping as configured: with random weights it never fires). A PNG plot goes to ``--plot``.

    python bench/concurrency_curve.py           # bench-cpu (~88M): the recorded figures
    python bench/concurrency_curve.py --small   # tiny-random, N = 1, 2, 4: the smoke test
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.bench_args import add_preset_args, add_run_args, int_list, resolve_preset  # noqa: E402
from bench.bench_record import BenchRun, md_table, set_threads  # noqa: E402
from bench.workload import drive_engine, uniform_mix, warm_engine  # noqa: E402
from dgserve.model.checkpoint import load  # noqa: E402
from dgserve.model.config import PRESETS, human_params  # noqa: E402

DEFAULT_PLOT = ROOT / "docs" / "bench" / "concurrency_curve.png"


def plot(points: list[dict[str, Any]], path: Path, title: str) -> str | None:
    """Three panels against N: aggregate tokens/s, per-request tokens/s, time to first canvas."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)", file=sys.stderr)
        return None
    n = [p["concurrency"] for p in points]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.2))
    panels = [("aggregate tokens/s", [p["tokens_per_s"] for p in points]),
              ("per-request tokens/s", [p["per_request_tokens_per_s"] for p in points]),
              ("time to first canvas (s)", [p["ttfc_mean_s"] for p in points])]
    for ax, (label, ys) in zip(axes, panels, strict=True):
        ax.plot(n, ys, marker="o")
        if label.startswith("time"):
            ax.fill_between(n, [p["ttfc_p50_s"] for p in points], [p["ttfc_max_s"] for p in points], alpha=0.2,
                            label="median .. max")
            ax.legend(fontsize=8)
        ax.set_ylim(bottom=0)
        ax.set_xscale("log", base=2)
        ax.set_xticks(n, [str(x) for x in n])
        ax.set_xlabel("concurrent requests")
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_preset_args(p, "tiny-random, N = 1,2,4 (the smoke test)")
    p.add_argument("--concurrency", default=None, help="comma-separated N (default 1,2,4,8,16,32,64; small 1,2,4)")
    p.add_argument("--steps", type=int, default=None, help="max denoising steps per canvas (default 16; small 4)")
    p.add_argument("--prompt-len", type=int, default=None, help="prompt tokens (default 32; small 8)")
    p.add_argument("--max-tokens", type=int, default=None, help="new tokens per request (default one canvas)")
    p.add_argument("--plot", default=None, help=f"PNG path (default {DEFAULT_PLOT.relative_to(ROOT)}; "
                   "'' for none)")
    p.add_argument("--noise-prefetch-bytes", type=int, default=None,
                   help="engine's sampling_noise_prefetch_bytes (default: the engine's; 0: draw inline, as before)")
    add_run_args(p)
    a = p.parse_args(argv)
    resolve_preset(p, a)
    a.concurrency = int_list(p, "--concurrency", a.concurrency or ("1,2,4" if a.small else "1,2,4,8,16,32,64"))
    a.steps = a.steps or (4 if a.small else 16)
    a.prompt_len = a.prompt_len or (8 if a.small else 32)
    a.max_tokens = a.max_tokens or PRESETS[a.preset].canvas_length
    a.plot = DEFAULT_PLOT if a.plot is None else (Path(a.plot) if a.plot else None)
    return a


def run(a: argparse.Namespace) -> None:
    bench = BenchRun("concurrency_curve")
    threads = set_threads(a.threads)
    lm = load(a.preset, seed=a.seed)
    cfg = lm.config
    engine, sampling = warm_engine(lm, a.steps, a.seed, max_running=max(64, max(a.concurrency)),
                                   noise_prefetch_bytes=a.noise_prefetch_bytes)
    vocab = cfg.text.vocab_size
    points: list[dict[str, Any]] = []
    for n in a.concurrency:
        res = drive_engine(engine, uniform_mix(n, vocab, a.prompt_len, a.max_tokens, seed=a.seed + n), sampling,
                           f"n{n}")
        points.append({"concurrency": n, **res.summary()})
        bench.progress(f"N={n}: {points[-1]['tokens_per_s']} tok/s aggregate, {points[-1]['wall_s']} s")
    counts = cfg.parameter_counts()
    state = bench.contention()
    title = (f"dgserve engine, {a.preset} ({human_params(counts['total'])}), canvas {cfg.canvas_length}, "
             f"{a.steps} steps, prompt {a.prompt_len}, {a.max_tokens} new tokens, {threads} threads, "
             f"{bench.record_date()}\n{bench.command()}"
             + (f"\nCONTENDED RUN (other processes {state['others_busy_share']:.0%} of core time, load "
                f"{bench.load_before[0]} -> {state['load_after'][0]}): not a figure of record"
                if state["contended"] else ""))
    png = plot(points, a.plot, title) if a.plot is not None else None
    results = {"preset": a.preset, "params_total": counts["total"], "canvas": cfg.canvas_length,
               "steps": a.steps, "prompt_len": a.prompt_len, "max_tokens": a.max_tokens, "threads": threads,
               "noise_prefetch_bytes": engine.config.sampling_noise_prefetch_bytes, "points": points, "plot": png}
    rows = [[p["concurrency"], p["tokens_per_s"], p["per_request_tokens_per_s"], p["ttfc_mean_s"], p["ttfc_p50_s"],
             p["ttfc_max_s"], p.get("canvases_per_forward", 0.0), p["wall_s"]] for p in points]
    table = md_table(["concurrent", "aggregate tok/s", "per-request tok/s", "TTFC mean s", "TTFC p50 s",
                      "TTFC max s", "canvases/forward", "wall s"], rows)
    notes = [title] + ([f"plot: {png}"] if png else [])
    bench.finish(results, table, a.out, notes)


def main(argv: list[str] | None = None) -> int:
    run(parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
