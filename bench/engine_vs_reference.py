"""dgserve's engine vs transformers' reference ``generate``: same weights, same sampler, one run.

transformers' ``DiffusionGemmaForBlockDiffusion`` is built with the preset's dims and random weights,
saved, and loaded by dgserve, so both sides run identical weights and the identical
``generation_config.json`` sampler (entropy bound, temperature schedule, ``--steps`` denoising steps,
adaptive stopping as configured: with random weights it never fires, so every canvas takes all
steps on both sides). Outputs have fixed lengths: dgserve with ``ignore_eos``, the reference with an
EOS id one past the vocabulary. Only new tokens up to each request's ``max_tokens`` are counted.

(a) batch 1: one request; the sides alternate ``--reps-a`` times (A B, B A, ...), each round with a
    new prompt; the headline ratio compares each side's best round (medians are reported too).
    Also reports whether both sides produce the very same tokens for the same seed (they should:
    same weights, same sampler, same random stream; floating-point rounding differences flip samples
    of these near-uniform random-weight distributions, and the flips compound over the steps).
(b) ``--requests`` requests arriving every ``--gap`` seconds with varied prompt and output lengths.
    dgserve's engine admits each one as it arrives (continuous batching, in-process). The reference
    runs them as a user of ``generate`` would: static batches of ``--ref-batch`` in arrival order,
    each batch starting once its last request has arrived and the previous batch is done, prompts
    left-padded with an ``attention_mask`` (``generate`` accepts one; it does not shift positions per
    row; batches without padding get no mask), ``max_new_tokens`` = the batch's largest request,
    each request's output cut to its own length. Throughput = tokens / (last completion - first arrival).

    python bench/engine_vs_reference.py                 # bench-cpu (~88M), the recorded figures
    python bench/engine_vs_reference.py --small         # tiny-random, seconds: the smoke test
    python bench/engine_vs_reference.py --execution exact,fast   # both engine modes against the reference

With ``--execution fast`` the engine runs its fast mode (static-shape rows, counter-based sampling): the same
sampler and weights, not the same random stream, so its tokens differ from the reference's by design and the
token agreement is not reported for it; exact mode is bit-identical to the reference.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.bench_args import add_preset_args, add_run_args, resolve_preset  # noqa: E402
from bench.bench_record import BenchRun, md_table, set_threads  # noqa: E402
from bench.hf_models import reference_diffusion  # noqa: E402
from bench.workload import (  # noqa: E402
    LoadResult,
    Outcome,
    RequestSpec,
    abba,
    drive_engine,
    make_engine,
    staggered_mix,
    uniform_mix,
)
from dgserve.model.config import PRESETS, human_params  # noqa: E402
from dgserve.model.generation_config import SamplingParams  # noqa: E402

GOAL_BATCH1 = 2.0  # the engine issue's goals (exact mode)
GOAL_STAGGERED = 3.0
# fast mode's goals (issue 15): >= 1.5x at batch 1 (exact parity caps a CPU engine near 1.5x), >= 3x staggered
GOALS_BATCH1 = {"dgserve": GOAL_BATCH1, "dgserve-fast": 1.5}


class _CanvasClock:
    """A ``generate`` streamer that only notes when the first canvas came out and counts canvases and
    denoising steps (``put`` gets the prompt, then each canvas; ``put_draft`` each denoising step)."""

    def __init__(self, t0: float) -> None:
        self.t0 = t0
        self.puts = 0
        self.steps = 0
        self.first_canvas_s: float | None = None

    def put(self, value: torch.Tensor) -> None:
        self.puts += 1
        if self.puts == 2:
            self.first_canvas_s = time.perf_counter() - self.t0

    def put_draft(self, value: torch.Tensor | None = None, logits: torch.Tensor | None = None) -> None:
        self.steps += 1

    def end(self) -> None:
        pass

    @property
    def canvases(self) -> int:
        return max(0, self.puts - 1)


def drive_reference(ref: Any, specs: list[RequestSpec], batch_size: int,
                    keep_tokens: bool = False) -> LoadResult:
    """Static batches of ``batch_size`` in arrival order, left-padded, one ``generate`` call each."""
    order = sorted(specs, key=lambda s: s.arrival_s)
    outcomes: dict[int, Outcome] = {}
    forwards = 0
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    for i in range(0, len(order), batch_size):
        group = order[i:i + batch_size]
        wait = max(s.arrival_s for s in group) - (time.perf_counter() - t0)
        if wait > 0:
            time.sleep(wait)
        width = max(len(s.prompt_ids) for s in group)
        ids = torch.zeros(len(group), width, dtype=torch.long)
        mask = torch.zeros(len(group), width, dtype=torch.long)
        for row, s in enumerate(group):
            ids[row, width - len(s.prompt_ids):] = torch.tensor(s.prompt_ids)
            mask[row, width - len(s.prompt_ids):] = 1
        clock = _CanvasClock(t0)
        # a mask only where rows are padded: an all-ones mask means the same but takes another attention
        # path in transformers, whose float rounding differs from the unmasked one
        kwargs = {"attention_mask": mask} if bool((mask == 0).any()) else {}
        torch.manual_seed(group[0].seed)  # the reference samples from torch's global generator
        with torch.inference_mode():
            out = ref.generate(ids, max_new_tokens=max(s.max_tokens for s in group), streamer=clock, **kwargs)
        done = time.perf_counter() - t0
        forwards += clock.steps
        new = out.sequences[:, width:]
        for row, s in enumerate(group):
            got = min(s.max_tokens, new.shape[1])
            outcomes[s.index] = Outcome(arrival_s=s.arrival_s, new_tokens=got, first_canvas_s=clock.first_canvas_s,
                                        done_s=done, denoise_steps=clock.steps, canvases=clock.canvases,
                                        token_ids=new[row, :got].tolist() if keep_tokens else [])
    return LoadResult([outcomes[s.index] for s in sorted(specs, key=lambda s: s.index)], forwards=forwards,
                      cpu_s=time.process_time() - cpu0)


def _compare(runs: dict[str, list[dict[str, Any]]], side: str = "dgserve"
             ) -> tuple[dict[str, float], dict[str, float], float, float]:
    """Per side the median and the best tokens/s over the rounds; the ratios ``side`` / reference of the
    best (the headline: interference from other work only ever slows a run down) and of the medians."""
    med = {s: statistics.median(r["tokens_per_s"] for r in rs) for s, rs in runs.items()}
    best = {s: max(r["tokens_per_s"] for r in rs) for s, rs in runs.items()}
    return med, best, best[side] / best["reference"], med[side] / med["reference"]


def _record(part: dict[str, Any], runs: dict[str, list[dict[str, Any]]], side: str, goal: float
            ) -> tuple[dict[str, float], float]:
    """Put ``side``'s figures against the reference into ``part`` (keys prefixed by the mode, none for exact);
    returns the best tokens/s per side and the ratio of the bests."""
    med, best, ratio, ratio_median = _compare(runs, side)
    key = "" if side == "dgserve" else side.removeprefix("dgserve-") + "_"
    part.update({
        "reference_tokens_per_s": round(best["reference"], 3),
        f"dgserve_{key}tokens_per_s": round(best[side], 3), f"{key}ratio": round(ratio, 3),
        "reference_tokens_per_s_median": round(med["reference"], 3),
        f"dgserve_{key}tokens_per_s_median": round(med[side], 3), f"{key}ratio_median": round(ratio_median, 3),
        f"{key}goal": goal, f"{key}met": ratio >= goal})
    return best, ratio


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_preset_args(p, "tiny-random at the smallest sizes (the smoke test)")
    p.add_argument("--steps", type=int, default=None, help="max denoising steps per canvas (default 16; small 4)")
    p.add_argument("--parts", default="a,b", help="which parts to run: a, b or a,b")
    p.add_argument("--prompt-len", type=int, default=None, help="(a) prompt tokens (default 32; small 8)")
    p.add_argument("--max-tokens", type=int, default=None, help="(a) new tokens (default 2 canvases)")
    p.add_argument("--reps-a", type=int, default=None, help="(a) alternations (default 3; small 1)")
    p.add_argument("--requests", type=int, default=None, help="(b) requests (default 16; small 6)")
    p.add_argument("--ref-batch", type=int, default=None, help="(b) reference static batch (default 8; small 3)")
    p.add_argument("--gap", type=float, default=None, help="(b) seconds between arrivals (default 0.5; small 0.02)")
    p.add_argument("--prompt-range", default=None, help="(b) min,max prompt tokens (default 8,128; small 4,24)")
    p.add_argument("--tokens-range", default=None,
                   help="(b) min,max new tokens (default canvas/2,4 canvases: 32,256 for bench-cpu)")
    p.add_argument("--reps-b", type=int, default=1, help="(b) alternations (default 1: reference, then dgserve)")
    p.add_argument("--warmup", type=int, default=1, help="untimed warm-up generations per side")
    p.add_argument("--workdir", default=None, help="where to write the shared checkpoint (default: a temp dir)")
    p.add_argument("--execution", default="exact", help="engine modes to run against the reference: exact, fast or "
                   "exact,fast (each a side of the alternation)")
    p.add_argument("--compile", action="store_true", help="fast mode: torch.compile the layers (inductor)")
    add_run_args(p)
    a = p.parse_args(argv)
    resolve_preset(p, a)
    canvas = PRESETS[a.preset].canvas_length
    a.steps = a.steps or (4 if a.small else 16)
    a.prompt_len = a.prompt_len or (8 if a.small else 32)
    a.max_tokens = a.max_tokens or 2 * canvas
    a.reps_a = a.reps_a or (1 if a.small else 3)
    a.requests = a.requests or (6 if a.small else 16)
    a.ref_batch = a.ref_batch or (3 if a.small else 8)
    a.gap = a.gap if a.gap is not None else (0.02 if a.small else 0.5)
    a.prompt_range = _pair(a.prompt_range or ("4,24" if a.small else "8,128"), "--prompt-range")
    a.tokens_range = _pair(a.tokens_range or f"{canvas // 2},{4 * canvas}", "--tokens-range")
    a.parts = {x.strip() for x in a.parts.split(",") if x.strip()}
    if not a.parts or a.parts - {"a", "b"}:
        p.error("--parts: a, b or a,b")
    a.execution = [x.strip() for x in a.execution.split(",") if x.strip()]
    if not a.execution or set(a.execution) - {"exact", "fast"}:
        p.error("--execution: exact, fast or exact,fast")
    return a


def _side(mode: str) -> str:
    return "dgserve" if mode == "exact" else f"dgserve-{mode}"


def _pair(text: str, flag: str) -> tuple[int, int]:
    try:
        lo, hi = (int(x) for x in text.split(","))
    except ValueError:
        raise SystemExit(f"{flag} {text!r}: expected MIN,MAX") from None
    if not 1 <= lo <= hi:
        raise SystemExit(f"{flag} {text!r}: expected 1 <= MIN <= MAX")
    return lo, hi


def run(a: argparse.Namespace) -> None:
    bench = BenchRun("engine_vs_reference")
    threads = set_threads(a.threads)
    config = PRESETS[a.preset]
    sampling = SamplingParams(max_denoising_steps=a.steps)  # the reference defaults, --steps per canvas
    vocab, canvas = config.text.vocab_size, config.canvas_length
    with tempfile.TemporaryDirectory(dir=a.workdir) as tmp:
        t = time.perf_counter()
        ref, lm = reference_diffusion(config, sampling, Path(tmp) / "ckpt", seed=a.seed)
        build_s = time.perf_counter() - t
    engines = {_side(m): make_engine(lm, execution=m, compile=a.compile if m == "fast" else None)
               for m in a.execution}
    sides = ["reference", *engines]
    bench.progress(f"built and saved the reference, loaded it in dgserve in {build_s:.1f} s")
    counts = config.parameter_counts()
    results: dict[str, Any] = {
        "preset": a.preset, "params_total": counts["total"], "params_active": counts["active"],
        "canvas": canvas, "sampling": sampling.model_dump(), "threads": threads, "build_s": round(build_s, 2),
        "execution": a.execution, "compile": a.compile,
    }
    rows: list[list[Any]] = []

    # warm-up: two short requests of different prompt lengths (the reference's padded-batch path too)
    warm = staggered_mix(2, vocab, (4, 8), (canvas, canvas), 0.0, seed=a.seed + 99)
    for i in range(a.warmup):
        drive_reference(ref, warm, 2)
        for engine in engines.values():
            drive_engine(engine, warm, sampling, f"warm{i}")

    if "a" in a.parts:
        runs: dict[str, list[dict[str, Any]]] = {side: [] for side in sides}
        tokens: dict[tuple[int, str], list[int]] = {}
        for rnd, side in abba(a.reps_a, sides):
            spec = uniform_mix(1, vocab, a.prompt_len, a.max_tokens, seed=a.seed + rnd)  # new prompt per round
            res = (drive_reference(ref, spec, 1, keep_tokens=True) if side == "reference"
                   else drive_engine(engines[side], spec, sampling, f"a{rnd}", keep_tokens=True))
            runs[side].append(res.summary())
            tokens[rnd, side] = res.outcomes[0].token_ids
            bench.progress(f"(a) {side}: {runs[side][-1]['tokens_per_s']} tok/s")
        results["a"] = {"prompt_len": a.prompt_len, "max_tokens": a.max_tokens, "reps": a.reps_a, "runs": runs}
        for side in engines:
            goal = GOALS_BATCH1[side]
            best, ratio = _record(results["a"], runs, side, goal)
            if side == "dgserve":  # exact mode: the same random stream as the reference
                agree = [sum(x == y for x, y in zip(tokens[r, "reference"], tokens[r, side], strict=True))
                         / a.max_tokens for r in range(a.reps_a)]
                results["a"].update({"identical_tokens": all(x == 1.0 for x in agree),
                                     "token_agreement": [round(x, 4) for x in agree]})
            rows.append([f"(a) batch 1, {side}", f"{a.prompt_len} / {a.max_tokens}", best["reference"], best[side],
                         f"{ratio:.2f}x", f">= {goal:g}x", "met" if ratio >= goal else "not met"])

    if "b" in a.parts:
        runs = {side: [] for side in sides}
        useful = []
        for rnd, side in abba(a.reps_b, sides):
            # the same lengths and arrivals every round, new prompts (no prefix-cache hits from earlier rounds)
            specs = staggered_mix(a.requests, vocab, a.prompt_range, a.tokens_range, a.gap, seed=a.seed + 1,
                                  content_seed=a.seed + 1 + rnd)
            useful.append(sum(s.max_tokens for s in specs))
            res = (drive_reference(ref, specs, a.ref_batch) if side == "reference"
                   else drive_engine(engines[side], specs, sampling, f"b{rnd}"))
            runs[side].append(res.summary())
            bench.progress(f"(b) {side}: {runs[side][-1]['tokens_per_s']} tok/s")
        results["b"] = {"requests": a.requests, "gap_s": a.gap, "reference_batch": a.ref_batch,
                        "prompt_range": list(a.prompt_range), "tokens_range": list(a.tokens_range),
                        "useful_tokens": useful[0], "reps": a.reps_b, "runs": runs}
        for side in engines:
            best, ratio = _record(results["b"], runs, side, GOAL_STAGGERED)
            rows.append([f"(b) {a.requests} staggered, every {a.gap:g} s, {side}",
                         f"{a.prompt_range[0]}-{a.prompt_range[1]} / {a.tokens_range[0]}-{a.tokens_range[1]}",
                         best["reference"], best[side], f"{ratio:.2f}x", f">= {GOAL_STAGGERED:g}x",
                         "met" if ratio >= GOAL_STAGGERED else "not met"])

    table = md_table(["workload", "prompt / new tokens", "transformers tok/s", "dgserve tok/s", "ratio", "goal",
                      "verdict"], rows)
    notes = [f"{a.preset} ({human_params(counts['total'])} params), canvas {canvas}, {a.steps} denoising steps max, "
             f"adaptive stopping as configured on both sides, {threads} torch threads",
             f"reference = transformers {getattr(sys.modules.get('transformers'), '__version__', '?')} "
             f"generate, static batches of {a.ref_batch} (left-padded, attention_mask) for (b)"]
    bench.finish(results, table, a.out, notes)


def main(argv: list[str] | None = None) -> int:
    run(parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
