"""Which distribution entropy-bound acceptance should read when a request has sampling filters: the filtered one (what
is sampled) or the unfiltered, temperature-scaled one (what the model believes). Measured on the ``tiny`` model's
held-out sorting problems in exact mode: exact-match accuracy, denoising steps per canvas and tokens per forward for
each filter setting under both choices.

    python bench/filter_entropy.py [--n 100]

dgserve uses ``sampling_filters.ACCEPTANCE_ENTROPY``; this script switches it for the measurement only.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.bench_record import BenchRun, md_table  # noqa: E402
from dgserve.engine import sampler  # noqa: E402
from dgserve.model.checkpoint import load  # noqa: E402
from dgserve.train.evaluate import sort_exact_match  # noqa: E402

SETTINGS = {"none": {}, "top_k 1": {"top_k": 1}, "top_k 5": {"top_k": 5}, "top_p 0.9": {"top_p": 0.9},
            "top_p 0.5": {"top_p": 0.5}, "min_p 0.1": {"min_p": 0.1}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=100, help="held-out sorting problems")
    parser.add_argument("--out", default=None, help="append the JSON record to this file")
    args = parser.parse_args(argv)
    bench = BenchRun("filter_entropy")
    torch.set_num_threads(1)
    loaded = load("tiny")
    base = loaded.generation.sampling
    points, rows = [], []
    default = sampler.ACCEPTANCE_ENTROPY
    try:
        for name, update in SETTINGS.items():
            for choice in ("unfiltered", "filtered"):
                if not update and choice == "filtered":
                    continue  # no filter: the two are the same distribution
                sampler.ACCEPTANCE_ENTROPY = choice
                acc, _, totals = sort_exact_match(loaded, base.model_copy(update=update), args.n)
                steps = totals["steps"] / totals["canvases"]
                per_forward = totals["tokens"] / totals["steps"]
                points.append({"filters": name, "acceptance_entropy": choice, "exact_match": acc,
                               "steps_per_canvas": round(steps, 3), "tokens_per_forward": round(per_forward, 3)})
                rows.append([name, choice, f"{acc:.0%}", f"{steps:.2f}", f"{per_forward:.2f}"])
                bench.progress(f"{name} / {choice}: {acc:.0%}")
    finally:
        sampler.ACCEPTANCE_ENTROPY = default
    table = md_table(["filters", "acceptance entropy", "exact match", "steps per canvas", "tokens per forward"], rows)
    notes = [f"tiny model, {args.n} held-out sorting problems (seed = index), one canvas each, exact mode, 1 thread",
             bench.command()]
    bench.finish({"n": args.n, "points": points}, table, args.out, notes)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
