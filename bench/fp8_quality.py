"""What FP8 weights cost in quality, measured on CPU with the FP8 emulation (the GPU's rounding of weights and
activations, products in fp32: ``dgserve.model.quantization``).

1. At a preset's dims (default ``bench-cpu``, deterministic random weights): the same weights in fp32, bf16 and FP8
   (quantized from the bf16 values, as loading a bf16 checkpoint does). For each of ``--prompts`` random prompts,
   the prompt's prefill and then one denoising step over a random canvas; the logits' relative L2 error and top-1
   agreement, bf16 vs fp32 (what bf16 itself costs), FP8 vs fp32 and FP8 vs bf16.
2. The shipped ``tiny`` model (trained): the same comparison on its held-out sorting prompts, and its exact-match
   accuracy on them (``dgserve.train.evaluate.sort_exact_match``, the checkpoint's sampler), bf16 vs FP8.

    python bench/fp8_quality.py              # bench-cpu + tiny (100 sorting problems)
    python bench/fp8_quality.py --small      # tiny-random + tiny (10 problems): the smoke test
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.ar_baseline import new_kv  # noqa: E402
from bench.bench_args import add_preset_args, add_run_args, resolve_preset  # noqa: E402
from bench.bench_record import BenchRun, md_table, set_threads  # noqa: E402
from dgserve.model.checkpoint import LoadedModel, load  # noqa: E402
from dgserve.model.config import human_params  # noqa: E402
from dgserve.model.kv import Segment  # noqa: E402
from dgserve.train.data import sort_eval_set, sort_prompt  # noqa: E402
from dgserve.train.evaluate import sort_exact_match  # noqa: E402

VARIANTS = {"fp32": {"dtype": "float32"}, "bf16": {"dtype": "bfloat16"},
            "fp8": {"dtype": "bfloat16", "quantization": "fp8", "fp8_emulation": True}}
PAIRS = (("bf16", "fp32"), ("fp8", "fp32"), ("fp8", "bf16"))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_preset_args(p, "tiny-random, 2 prompts, 10 sorting problems (the smoke test)")
    p.add_argument("--prompts", type=int, default=None, help="prompts of the logits comparison (default 8; small 2)")
    p.add_argument("--prompt-len", type=int, default=32, help="random prompt tokens at the preset (default 32)")
    p.add_argument("--problems", type=int, default=None, help="tiny's sorting problems (default 100; small 10)")
    add_run_args(p)
    a = p.parse_args(argv)
    resolve_preset(p, a)
    a.prompts = a.prompts or (2 if a.small else 8)
    a.problems = a.problems or (10 if a.small else 100)
    return a


@torch.inference_mode()
def step_logits(loaded: LoadedModel, prompt: list[int], canvas: torch.Tensor) -> torch.Tensor:
    """fp32 logits ``[C, V]`` of the first denoising step of ``canvas`` after ``prompt`` (exact execution)."""
    model = loaded.model
    kv = new_kv(model)
    model(torch.tensor(prompt), [Segment("encode", 0, len(prompt), 0)], kv)
    hidden = model(canvas, [Segment("denoise", 0, canvas.shape[0], len(prompt))], kv, None)
    return model.logits(hidden).float()


def compare(models: dict[str, LoadedModel], prompts: list[list[int]], seed: int) -> dict[str, dict[str, float]]:
    """Relative L2 error and top-1 agreement of each pair's logits, over every prompt's canvas positions."""
    cfg = next(iter(models.values())).config
    gen = torch.Generator().manual_seed(seed)
    canvases = [torch.randint(0, cfg.text.vocab_size, (cfg.canvas_length,), generator=gen) for _ in prompts]
    logits = {name: torch.cat([step_logits(m, p, c) for p, c in zip(prompts, canvases, strict=True)])
              for name, m in models.items()}
    out = {}
    for a, b in PAIRS:
        diff = (logits[a] - logits[b]).norm() / logits[b].norm()
        top1 = (logits[a].argmax(-1) == logits[b].argmax(-1)).float().mean()
        out[f"{a}_vs_{b}"] = {"rel_l2": round(float(diff), 5), "top1_agreement": round(float(top1), 4),
                              "positions": int(logits[b].shape[0])}
    return out


def run(a: argparse.Namespace) -> None:
    bench = BenchRun("fp8_quality")
    threads = set_threads(a.threads)
    results: dict[str, Any] = {"preset": a.preset, "threads": threads}
    rows: list[list[Any]] = []

    preset = {name: load(a.preset, seed=a.seed, **kw) for name, kw in VARIANTS.items()}
    cfg = preset["fp32"].config
    gen = torch.Generator().manual_seed(a.seed)
    prompts = torch.randint(3, cfg.text.vocab_size, (a.prompts, a.prompt_len), generator=gen).tolist()
    results[a.preset] = compare(preset, prompts, a.seed + 1)
    bench.progress(f"{a.preset}: {results[a.preset]['fp8_vs_bf16']}")
    rows += [[a.preset, pair, r["rel_l2"], r["top1_agreement"], r["positions"]]
             for pair, r in results[a.preset].items()]
    del preset

    tiny = {name: load("tiny", **kw) for name, kw in VARIANTS.items()}
    tok = tiny["fp32"].tokenizer
    prompts = [tok.encode(sort_prompt(d)) for d in sort_eval_set(a.prompts)]
    results["tiny"] = compare(tiny, prompts, a.seed + 2)
    rows += [["tiny", pair, r["rel_l2"], r["top1_agreement"], r["positions"]] for pair, r in results["tiny"].items()]
    exact = {}
    for name in ("bf16", "fp8"):
        acc, _, _ = sort_exact_match(tiny[name], tiny[name].generation.sampling, a.problems)
        exact[name] = round(acc, 4)
    results["tiny_sort_exact_match"] = {**exact, "problems": a.problems,
                                        "fp8_minus_bf16_points": round(100 * (exact["fp8"] - exact["bf16"]), 1)}
    bench.progress(f"tiny exact match: {results['tiny_sort_exact_match']}")

    table = md_table(["model", "logits", "relative L2 error", "top-1 agreement", "positions"], rows)
    table += ["", f"tiny, {a.problems} held-out sorting problems, exact match: bf16 {exact['bf16']:.0%}, FP8 "
              f"{exact['fp8']:.0%} ({results['tiny_sort_exact_match']['fp8_minus_bf16_points']:+.0f} points)"]
    notes = [f"{a.preset} ({human_params(cfg.parameter_counts()['total'])}), {a.prompts} prompts of "
             f"{a.prompt_len} tokens, one denoising step each over a random canvas; FP8 emulated (W8A8: e4m3 "
             f"weights per output channel, activations per token); {threads} threads, {bench.record_date()}",
             bench.command()]
    bench.finish(results, table, a.out, notes)


def main(argv: list[str] | None = None) -> int:
    run(parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
