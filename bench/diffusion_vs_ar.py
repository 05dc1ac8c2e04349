"""Block diffusion vs autoregressive decoding on the same backbone, same machine, one run, with a
roofline estimate for this CPU that explains the ratio.

Sides (batch 1 and ``--batch``; ``--new-tokens`` per sequence, prompts of ``--prompt-len``):
- ``hf_ar``: transformers' Gemma 4 causal LM with the same text dims, greedy ``generate`` with its KV
  cache (random weights; EOS disabled so every sequence runs to length);
- ``dg_ar``: dgserve's own encoder used as a causal LM with its KV cache (``bench/ar_baseline.py``);
- ``diffusion_S``: dgserve's engine, exactly S denoising steps per canvas (adaptive stopping off:
  random weights cannot converge; the published sampler typically stops after 12-16).

Roofline: a matmul microbenchmark measures the GFLOP/s this CPU reaches at the GEMM shapes of each
side (M = batch for AR, M = batch x canvas for a denoising step) and a copy measures memory GB/s.
A forward costs max(FLOPs / GFLOP/s, weight bytes / GB/s) + per-forward overhead; a denoising step
runs ~canvas x the per-token FLOPs of an AR step (plus the LM head, the self-conditioning
soft-embedding matmul and the vocabulary-wide sampling per canvas position), so on a compute-bound
CPU it costs ~canvas times more, while a GPU reads the weights once for both. From the measured step
times the script fits t_step(T tokens) = a + b*T and states which steps per canvas S and canvas C
would make diffusion win here: C/S > t_step(B*C)/t_AR(B), i.e. S < t_AR/b and C > S*a/(t_AR - S*b).

    python bench/diffusion_vs_ar.py            # bench-cpu (~88M): the recorded figures
    python bench/diffusion_vs_ar.py --small    # tiny-random: the smoke test
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.ar_baseline import generate_ar  # noqa: E402
from bench.bench_args import add_preset_args, add_run_args, int_list, resolve_preset  # noqa: E402
from bench.bench_record import BenchRun, md_table, set_threads  # noqa: E402
from bench.hf_models import gemma4_causal_lm  # noqa: E402
from bench.workload import RequestSpec, abba, drive_engine, make_engine, random_prompt  # noqa: E402
from dgserve.model.checkpoint import load  # noqa: E402
from dgserve.model.config import PRESETS, ModelConfig, human_params  # noqa: E402
from dgserve.model.generation_config import SamplingParams  # noqa: E402

BYTES = 4  # fp32 weights on CPU


# -- the machine: matmul and memory microbenchmarks ---------------------------------------------------


def gemm_gflops(m: int, k: int, n: int, min_s: float = 0.25) -> float:
    """Achieved fp32 GFLOP/s of ``[m, k] @ [k, n]`` (best of three timed batches)."""
    a, b = torch.randn(m, k), torch.randn(k, n)
    for _ in range(3):
        a @ b
    best = 0.0
    for _ in range(3):
        iters, t0 = 0, time.perf_counter()
        while True:
            a @ b
            iters += 1
            dt = time.perf_counter() - t0
            if dt >= min_s / 3:
                break
        best = max(best, 2.0 * m * k * n * iters / dt / 1e9)
    return best


def copy_gbps(mib: int = 256) -> float:
    """Achieved memory bandwidth (read + write) copying a ``mib`` MiB fp32 buffer."""
    x = torch.empty(mib << 18)
    y = torch.empty_like(x)
    y.copy_(x)
    best = 0.0
    for _ in range(5):
        t0 = time.perf_counter()
        y.copy_(x)
        best = max(best, 2 * x.numel() * 4 / (time.perf_counter() - t0) / 1e9)
    return best


# -- the model: FLOPs and bytes per forward ------------------------------------------------------------


def flops_per_token(cfg: ModelConfig, context: int, diffusion: bool) -> float:
    """Matmul FLOPs of one token through one forward (attention over ``context`` cached+own tokens).
    ``diffusion``: a canvas position of a denoising step, which adds the self-conditioning MLP and the
    soft-embedding matmul (softmax(logits) @ E) to the LM head."""
    t = cfg.text
    h = t.hidden_size
    f = 0.0
    for i in range(t.num_hidden_layers):
        hd, kvh = t.layer_head_dim(i), t.layer_kv_heads(i)
        q = t.num_attention_heads * hd
        kv = (2 if t.is_sliding(i) else 1) * kvh * hd
        ctx = min(context, t.sliding_window + cfg.canvas_length) if t.is_sliding(i) else context
        f += 2 * h * (q + kv) + 2 * q * h + 2 * 2 * q * ctx  # projections, scores and values
        f += 2 * 3 * h * t.intermediate_size + 2 * h * t.num_experts  # dense MLP, router
        f += t.top_k_experts * 2 * 3 * h * t.moe_intermediate_size
    f += 2 * h * t.vocab_size  # LM head
    if diffusion:
        f += 2 * h * t.vocab_size + 2 * 3 * h * t.intermediate_size  # soft embeddings, self-conditioning
    return f


def weight_bytes(cfg: ModelConfig, tokens: int) -> float:
    """Bytes of weights one forward over ``tokens`` tokens reads: everything but the experts, plus the
    experts its tokens are expected to hit (uniform routing)."""
    t = cfg.text
    counts = cfg.parameter_counts()
    dense = counts["total"] - counts["experts"]
    hit = t.num_experts * (1 - (1 - t.top_k_experts / t.num_experts) ** tokens)
    expert = 3 * t.hidden_size * t.moe_intermediate_size
    return BYTES * (dense + t.num_hidden_layers * hit * expert)


# -- the sides -----------------------------------------------------------------------------------------


def prompts(n: int, vocab: int, length: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [random_prompt(rng, vocab, length) for _ in range(n)]


def run_hf_ar(model: Any, batch: list[list[int]], new_tokens: int) -> dict[str, float]:
    ids = torch.tensor(batch)
    with torch.inference_mode():
        t0 = time.perf_counter()
        model(ids, use_cache=True)
        prefill = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
        wall = time.perf_counter() - t0
    got = out.shape[1] - ids.shape[1]
    assert got == new_tokens, (got, new_tokens)
    return {"new_tokens": len(batch) * got, "wall_s": wall, "tokens_per_s": len(batch) * got / wall,
            "step_s": max(wall - prefill, 1e-9) / max(1, got - 1), "prefill_s": prefill}


def run_dg_ar(model: Any, batch: list[list[int]], new_tokens: int) -> dict[str, float]:
    r = generate_ar(model, batch, new_tokens)
    return {"new_tokens": r.batch * r.new_tokens, "wall_s": r.wall_s, "tokens_per_s": r.tokens_per_s,
            "step_s": r.ms_per_token_step / 1000.0, "prefill_s": r.prefill_s}


def run_diffusion(engine: Any, lm: Any, batch: list[list[int]], new_tokens: int, steps: int,
                  tag: str) -> dict[str, float]:
    sampling = SamplingParams(max_denoising_steps=steps, stability_threshold=None, confidence_threshold=None)
    specs = [RequestSpec(i, p, new_tokens, seed=i) for i, p in enumerate(batch)]
    res = drive_engine(engine, specs, sampling, tag)
    summary = res.summary()
    assert summary["steps_per_canvas"] == steps, summary
    return {"new_tokens": res.tokens, "wall_s": res.wall_s, "tokens_per_s": res.tokens_per_s,
            "step_s": res.wall_s / max(1, res.forwards), "forwards": res.forwards}


# -- analysis ------------------------------------------------------------------------------------------


def break_even(a: float, b: float, t_ar: float, steps: list[int]) -> dict[str, Any]:
    """With t_step(T) = a + b*T, diffusion at S steps and canvas C beats an AR step of t_ar seconds
    per token when C*t_ar > S*(a + b*C): S < t_ar/b, and then C > S*a/(t_ar - S*b)."""
    s_max = t_ar / b if b > 0 else math.inf
    out: dict[str, Any] = {"max_steps_per_canvas_any_canvas": round(s_max, 2)}
    for s in steps:
        out[f"min_canvas_at_{s}_steps"] = (round(s * a / (t_ar - s * b), 1) if s < s_max else None)
    return out


def _break_even_note(key: str, v: dict[str, Any], steps: list[int]) -> str:
    needs = ", ".join(f"{s} steps: {v[f'min_canvas_at_{s}_steps'] or 'none'}" for s in steps)
    return (f"diffusion beats {key.replace('/', ' at ')} here only with fewer than "
            f"{v['max_steps_per_canvas_any_canvas']} steps per canvas; smallest winning canvas at {needs}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_preset_args(p, "tiny-random, batch 4 (the smoke test)")
    p.add_argument("--steps", default=None, help="denoising steps per canvas, comma separated (default 12,16,48; "
                   "small 2,4)")
    p.add_argument("--batch", type=int, default=None, help="the batched size (default 16; small 4)")
    p.add_argument("--prompt-len", type=int, default=None, help="prompt tokens (default 32; small 8)")
    p.add_argument("--new-tokens", type=int, default=None, help="new tokens per sequence (default one canvas)")
    p.add_argument("--reps", type=int, default=1, help="alternations of the side order (A..Z, Z..A, ...)")
    p.add_argument("--no-hf", action="store_true", help="skip transformers' Gemma 4 AR side")
    add_run_args(p)
    a = p.parse_args(argv)
    resolve_preset(p, a)
    a.steps = int_list(p, "--steps", a.steps or ("2,4" if a.small else "12,16,48"))
    a.micro_s = 0.05 if a.small else 0.25
    a.batch = a.batch or (4 if a.small else 16)
    a.prompt_len = a.prompt_len or (8 if a.small else 32)
    a.new_tokens = a.new_tokens or PRESETS[a.preset].canvas_length
    return a


def run(a: argparse.Namespace) -> None:
    bench = BenchRun("diffusion_vs_ar")
    threads = set_threads(a.threads)
    cfg = PRESETS[a.preset]
    c = cfg.canvas_length
    lm = load(a.preset, seed=a.seed)
    engine = make_engine(lm, prefix_cache=False)  # every diffusion run prefills its prompts, as AR does
    hf = None if a.no_hf else gemma4_causal_lm(cfg, seed=a.seed)
    batches = sorted({1, a.batch})
    ctx = a.prompt_len + a.new_tokens

    # the machine
    h, i_ = cfg.text.hidden_size, cfg.text.intermediate_size
    shapes = sorted({*batches, *(b * c for b in batches)})
    gflops = {f"M={m}": float(f"{gemm_gflops(m, h, i_, a.micro_s):.4g}") for m in shapes}
    gflops["peak (1024^3)"] = float(f"{gemm_gflops(1024, 1024, 1024, a.micro_s):.4g}")
    gbps = float(f"{copy_gbps(64 if a.small else 256):.4g}")
    bench.progress(f"GEMM GFLOP/s {gflops}, copy {gbps} GB/s")

    # warm-up, untimed
    warm = prompts(2, cfg.text.vocab_size, 4, a.seed + 99)
    run_dg_ar(lm.model, warm, 4)
    run_diffusion(engine, lm, warm, c, 2, "warm")
    if hf is not None:
        run_hf_ar(hf, warm, 4)

    sides = (["hf_ar"] if hf is not None else []) + ["dg_ar"] + [f"diffusion_{s}" for s in a.steps]
    measured: dict[str, dict[str, Any]] = {}
    for b in batches:
        batch = prompts(b, cfg.text.vocab_size, a.prompt_len, a.seed + b)
        for rep, side in abba(a.reps, sides):
            if side == "hf_ar":
                r = run_hf_ar(hf, batch, a.new_tokens)
            elif side == "dg_ar":
                r = run_dg_ar(lm.model, batch, a.new_tokens)
            else:
                r = run_diffusion(engine, lm, batch, a.new_tokens, int(side.split("_")[1]), f"{side}-{b}-{rep}")
            key = f"{side}/batch_{b}"
            bench.progress(f"{key}: {r['tokens_per_s']:.2f} tok/s in {r['wall_s']:.1f} s")
            best = measured.get(key)
            if best is None or r["tokens_per_s"] > best["tokens_per_s"]:  # best of the reps
                measured[key] = {k: round(v, 6) if isinstance(v, float) else v for k, v in r.items()}

    # fit t_step(T) = a + b*T from the diffusion runs at batch 1 and the largest batch
    per_s = {s: (measured[f"diffusion_{s}/batch_1"]["step_s"], measured[f"diffusion_{s}/batch_{batches[-1]}"]["step_s"])
             for s in a.steps}
    t1 = sum(v[0] for v in per_s.values()) / len(per_s)
    t2 = sum(v[1] for v in per_s.values()) / len(per_s)
    tok1, tok2 = c, batches[-1] * c
    b_fit = (t2 - t1) / (tok2 - tok1) if tok2 > tok1 else t1 / tok1
    a_fit = max(0.0, t1 - b_fit * tok1)

    # the roofline
    f_ar = flops_per_token(cfg, ctx, diffusion=False)
    f_diff = flops_per_token(cfg, ctx, diffusion=True)

    def gf(m: int) -> float:
        return max(gflops.get(f"M={m}", gflops["peak (1024^3)"]), 1e-6) * 1e9

    def roof_ar(b: int) -> float:
        return max(b * f_ar / gf(b), weight_bytes(cfg, b) / (max(gbps, 1e-6) * 1e9))

    def roof_step(b: int) -> float:
        return max(b * c * f_diff / gf(b * c), weight_bytes(cfg, b * c) / (max(gbps, 1e-6) * 1e9))

    rows: list[list[Any]] = []
    ratios: dict[str, float] = {}
    analysis: dict[str, Any] = {}
    for b in batches:
        for ar in [x for x in ("hf_ar", "dg_ar") if f"{x}/batch_{b}" in measured]:
            ar_m = measured[f"{ar}/batch_{b}"]
            t_ar = ar_m["step_s"]
            for s in a.steps:
                d = measured[f"diffusion_{s}/batch_{b}"]
                ratio = d["tokens_per_s"] / ar_m["tokens_per_s"]
                pred = (b * c / (s * roof_step(b))) / (b / roof_ar(b))
                ratios[f"diffusion_{s}_over_{ar}_batch_{b}"] = round(ratio, 4)
                rows.append([b, ar, ar_m["tokens_per_s"], s, d["tokens_per_s"], f"{ratio:.3f}x", f"{pred:.3f}x",
                             1000 * t_ar, 1000 * roof_ar(b), 1000 * d["step_s"], 1000 * roof_step(b)])
            # per sequence of the batch: B*C tokens per denoising step vs B tokens per AR step
            analysis[f"{ar}/batch_{b}"] = break_even(a_fit / b, b_fit, t_ar / b, a.steps)
    results: dict[str, Any] = {
        "preset": a.preset, "params_total": cfg.parameter_counts()["total"],
        "params_active": cfg.parameter_counts()["active"], "canvas": c, "prompt_len": a.prompt_len,
        "new_tokens": a.new_tokens, "batches": batches, "steps": a.steps, "threads": threads,
        "hf_ar_params": sum(p.numel() for p in hf.parameters()) if hf is not None else None,
        "machine_gemm_gflops": gflops, "machine_copy_gbps": gbps,
        "flops_per_token_ar": f_ar, "flops_per_token_denoise": f_diff,
        "roofline_ms": {f"batch_{b}": {"ar_step": round(1000 * roof_ar(b), 4),
                                       "denoise_step": round(1000 * roof_step(b), 4)} for b in batches},
        "measured": measured, "ratios": ratios,
        "fit": {"a_s_per_forward": round(a_fit, 6), "b_s_per_token": round(b_fit, 9),
                "roofline_b_s_per_token": round(f_diff / gf(tok2), 9),
                "roofline_a_s_weights": round(weight_bytes(cfg, tok2) / (max(gbps, 1e-6) * 1e9), 6)},
        "break_even": analysis,
    }
    table = md_table(["batch", "AR side", "AR tok/s", "steps", "diffusion tok/s", "ratio", "roofline ratio",
                      "AR ms/step", "AR roofline ms", "denoise ms/step", "denoise roofline ms"], rows)
    notes = [
        f"{a.preset} ({human_params(cfg.parameter_counts()['total'])} params), canvas {c}, prompt {a.prompt_len}, "
        f"{a.new_tokens} new tokens per sequence, {threads} torch threads, fp32",
        f"GEMM GFLOP/s at M rows (K={h}, N={i_}): {gflops}; copy {gbps} GB/s",
        f"FLOPs/token: AR {f_ar / 1e6:.1f} M, denoise position {f_diff / 1e6:.1f} M; one denoising step of a "
        f"canvas = {c} x {f_diff / 1e6:.1f} M = {c * f_diff / 1e9:.2f} GFLOP vs {f_ar / 1e6:.1f} MFLOP per AR token",
        f"fitted t_step(T) = {1000 * a_fit:.2f} ms + {1e6 * b_fit:.1f} us x T tokens (roofline b = "
        f"{1e6 * f_diff / gf(tok2):.1f} us)",
        *[_break_even_note(k, v, a.steps) for k, v in analysis.items()],
    ]
    bench.finish(results, table, a.out, notes)


def main(argv: list[str] | None = None) -> int:
    run(parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
