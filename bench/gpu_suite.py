"""One-GPU benchmark suite for DiffusionGemma 26B-A4B with random bf16 weights (under 8 minutes).

First the fast path (``bench/gpu_fast.py``): a steady-state step under ``set_sync_debug_mode("error")``, the
step eager / graphed (/ compiled) at 1, 8 and 64 canvases with their agreement, the old vs the new sampler, CUDA
kernels per forward, batch-1 tokens/s at 16 steps (end to end and steady state) and the aggregate at 64
concurrent requests; the Triton kernels against the torch path (fused sampler; fused MoE vs ``grouped_mm``). Then
the same fast-path figures with FP8 weights (``--quantization``; the bf16 model is freed first, so both fit an
80 GB card in turn), with FP8 MoE kernel comparisons, weight bytes and peak memory. Then the exact path's figures on
the same card, for comparison: batch-1 block-diffusion
decoding (fixed 16/12/48 denoising steps), the autoregressive baseline on the same backbone
(``bench/ar_baseline.py``, batch 1 and 16), the exact engine and packed forwards at 8/32/64 canvases, and peak
GPU memory. Writes ``results.json`` and ``results.md`` to ``--out``; ``--cpu-smoke`` runs it all on
``tiny-random`` (no graphs, no sync-debug mode, no Triton kernels there; FP8 emulated).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import resource
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch

from bench import gpu_fast
from bench.ar_baseline import device_sync, generate_ar, new_kv
from dgserve import kernels
from dgserve.engine.memory_plan import memory_plan
from dgserve.engine.sampler import StabilityTracker, denoise_step, random_canvas, vocab_pass
from dgserve.engine.single import generate_single, make_generator
from dgserve.model import quantization as quant
from dgserve.model.checkpoint import _empty_model, resolve_dtype
from dgserve.model.config import PRESETS, human_params
from dgserve.model.diffusion_gemma import DiffusionGemma
from dgserve.model.generation_config import SamplingParams
from dgserve.model.kv import Segment

# The time guard counts from the wrapper's start (bench/gpu_suite.sh exports it), so interpreter
# start-up and imports are inside the budget; run directly, it counts from this import.
_STARTED = float(os.environ.get("DGSERVE_BENCH_T0") or time.time())

T = TypeVar("T")
GIB = float(1 << 30)
PACKED_LABEL = "packed forward timing (engine not yet in the loop)"


# -- settings ------------------------------------------------------------------------------------------


@dataclass
class Settings:
    config: str
    device: str
    dtype: str
    steps: list[int]  # the first is the headline; the rest run "if time allows"
    canvases: list[int]
    prompt_len: int
    ar_batch: int
    ar_tokens: int  # 0 on the command line = one canvas' worth (resolved in main)
    reps: int
    time_budget_s: float
    seed: int
    threads: int
    cpu_smoke: bool
    out: str
    fast_canvases: list[int] = field(default_factory=lambda: [1, 8, 64])
    concurrent: int = 64
    compile: bool = True
    quantizations: list[str] = field(default_factory=lambda: ["none", "fp8"])


def parse_args(argv: list[str] | None = None) -> Settings:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench/out/gpu", help="output folder (results.json, results.md)")
    p.add_argument("--cpu-smoke", action="store_true",
                   help="tiny-random on CPU in fp32 with fewer canvases and AR tokens (seconds; for tests)")
    p.add_argument("--config", default=None, help="preset name (default diffusiongemma-26b-a4b; smoke: tiny-random)")
    p.add_argument("--device", default=None, help="cuda or cpu (default cuda; smoke: cpu)")
    p.add_argument("--dtype", default=None, help="bfloat16 / float32 (default bfloat16; smoke: float32)")
    p.add_argument("--steps", default="16,12,48", help="denoising steps per canvas, comma separated")
    p.add_argument("--canvases", default=None, help="packed canvases, comma separated (default 8,32,64; smoke 2,4)")
    p.add_argument("--prompt-len", type=int, default=None, help="prompt tokens (default 32; smoke 8)")
    p.add_argument("--ar-batch", type=int, default=None, help="batched AR sequences (default 16; smoke 4)")
    p.add_argument("--ar-tokens", type=int, default=0, help="AR new tokens per sequence (default: canvas length)")
    p.add_argument("--reps", type=int, default=3, help="timed repetitions of each packed forward")
    p.add_argument("--time-budget", type=float, default=300.0,
                   help="seconds after start past which remaining measurements are skipped")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's; smoke 1)")
    p.add_argument("--fast-canvases", default=None,
                   help="fast path: canvases per step timed (default 1,8,64; smoke 1,2)")
    p.add_argument("--concurrent", type=int, default=None,
                   help="fast engine: concurrent requests (default 64; smoke 4)")
    p.add_argument("--quantization", default="none,fp8",
                   help="weight formats whose fast path is measured, in turn (default none,fp8; CPU: FP8 emulated)")
    p.add_argument("--no-compile", action="store_true",
                   help="skip the torch.compile'd timings (they compile for minutes)")
    a = p.parse_args(argv)
    smoke = bool(a.cpu_smoke)
    s = Settings(
        config=a.config or ("tiny-random" if smoke else "diffusiongemma-26b-a4b"),
        device=a.device or ("cpu" if smoke else "cuda"),
        dtype=a.dtype or ("float32" if smoke else "bfloat16"),
        steps=_ints(a.steps, "--steps"),
        canvases=_ints(a.canvases or ("2,4" if smoke else "8,32,64"), "--canvases"),
        prompt_len=a.prompt_len or (8 if smoke else 32),
        ar_batch=a.ar_batch or (4 if smoke else 16),
        ar_tokens=a.ar_tokens, reps=max(1, a.reps), time_budget_s=a.time_budget, seed=a.seed,
        threads=a.threads or (1 if smoke else 0), cpu_smoke=smoke, out=a.out,
        fast_canvases=_ints(a.fast_canvases or ("1,2" if smoke else "1,8,64"), "--fast-canvases"),
        concurrent=a.concurrent or (4 if smoke else 64), compile=not a.no_compile and not smoke,
        quantizations=[q.strip() for q in a.quantization.split(",") if q.strip()],
    )
    if not s.quantizations or set(s.quantizations) - {"none", "fp8"}:
        p.error(f"--quantization {a.quantization!r}: a comma-separated list of none and fp8")
    if s.config not in PRESETS:
        p.error(f"--config {s.config!r} is not a preset; choose one of {', '.join(sorted(PRESETS))}")
    if s.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but CUDA is not available (use --cpu-smoke, or --device cpu with a small --config)")
    Path(s.out).mkdir(parents=True, exist_ok=True)
    return s


def _ints(text: str, flag: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise SystemExit(f"{flag} {text!r}: expected comma-separated positive integers") from None
    if not values or min(values) < 1:
        raise SystemExit(f"{flag} {text!r}: expected comma-separated positive integers")
    return values


# -- timing and bookkeeping ----------------------------------------------------------------------------


def elapsed() -> float:
    return time.time() - _STARTED


@dataclass
class Suite:
    settings: Settings
    device: torch.device
    report: dict[str, Any] = field(default_factory=dict)
    peak_bytes: int = 0

    @property
    def deadline(self) -> float:
        """The time guard as a ``time.time()`` value."""
        return _STARTED + self.settings.time_budget_s

    def perf_deadline(self) -> float:
        """The time guard as a ``time.perf_counter()`` value (what ``generate_ar`` takes)."""
        return time.perf_counter() + (self.deadline - time.time())

    def sync(self) -> None:
        device_sync(self.device)()

    def timed(self, fn: Callable[[], T]) -> tuple[T, float]:
        """``fn()`` and its wall time in seconds, bracketed by device synchronisation."""
        self.sync()
        t0 = time.perf_counter()
        out = fn()
        self.sync()
        return out, time.perf_counter() - t0

    def measure(self, section: str, name: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """Run one measurement: skipped past the time budget, errors recorded instead of raised."""
        entry: dict[str, Any]
        if time.time() > self.deadline:
            entry = {"skipped": f"time guard: {elapsed():.0f}s elapsed > budget {self.settings.time_budget_s:.0f}s"}
        else:
            if self.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(self.device)
            t0 = time.perf_counter()
            try:
                entry = fn()
                entry["peak_gib"] = self.peak_gib()
            except Exception as exc:  # a failed measurement must not abort the others
                oom = isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()
                entry = {"error": f"{type(exc).__name__}: {str(exc)[:600]}", "oom": oom,
                         "peak_gib_before_error": self.peak_gib()}
            entry["measure_s"] = round(time.perf_counter() - t0, 3)
            _free(self.device)
        self.report.setdefault(section, {})[name] = entry
        status = entry.get("error") or entry.get("skipped") or "ok"
        print(f"[{elapsed():6.1f}s] {section}/{name}: {status}", flush=True)
        self.save()
        return entry

    def peak_gib(self) -> float:
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
        self.peak_bytes = max(self.peak_bytes, peak)
        return round(peak / GIB, 3)

    def save(self) -> None:
        self.report["meta"]["elapsed_s"] = round(elapsed(), 1)
        self.report["memory"]["peak_gib"] = round(self.peak_bytes / GIB, 3)
        out = Path(self.settings.out)
        (out / "results.json").write_text(json.dumps(self.report, indent=2) + "\n")
        (out / "results.md").write_text(markdown(self.report))


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _ms(seconds: float) -> float:
    return round(1000.0 * seconds, 3)


# -- model ---------------------------------------------------------------------------------------------


def build_random_model(config_name: str, dtype: torch.dtype, device: torch.device, seed: int,
                       quantization: str = "none") -> DiffusionGemma:
    """The preset with random weights drawn in place on ``device``: normal(0, 0.02) for matrices, ones
    for norms and scales (``checkpoint.init_random_``'s distribution; its device-independent CPU stream
    would take far too long for 25B parameters). ``fp8``: the FP8 modules (emulated on CPU), each matrix drawn in
    ``dtype`` a slice at a time and quantized, as loading a bf16 checkpoint does."""
    plan = quant.plan(quantization, device, dtype, emulation=device.type != "cuda")
    model = _empty_model(PRESETS[config_name], dtype, device, None, plan)
    gen = torch.Generator(device=device).manual_seed(seed)
    state = model.state_dict(keep_vars=True)
    scales = {quant.scale_name(n) for n, t in state.items() if quant.is_fp8(t)}
    with torch.no_grad():
        for name, tensor in state.items():
            if name in scales:
                continue
            if quant.is_fp8(tensor):
                for i in range(0, tensor.shape[0], 8):
                    full = torch.empty(tensor[i:i + 8].shape, dtype=dtype, device=device).normal_(0.0, 0.02,
                                                                                               generator=gen)
                    quant.quantize_into_(tensor, state[quant.scale_name(name)], full, start=i)
            elif tensor.dim() >= 2:
                tensor.normal_(0.0, 0.02, generator=gen)
            else:
                tensor.fill_(1.0)
    return model.eval()


def random_prompts(batch: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randint(3, vocab, (batch, length), generator=gen).tolist()  # ids 0-2: pad/eos/bos


# -- 1. batch-1 diffusion ------------------------------------------------------------------------------


def sampling_params(steps: int) -> SamplingParams:
    """Exactly ``steps`` denoising steps per canvas: adaptive stopping off."""
    return SamplingParams(max_denoising_steps=steps, stability_threshold=None, confidence_threshold=None)


@torch.inference_mode()
def diffusion_instrumented(suite: Suite, model: DiffusionGemma, prompt: list[int], steps: int) -> dict[str, Any]:
    """``generate_single``'s loop for one canvas with each model call timed, plus the commit (the
    encoder pass over the accepted canvas that the next canvas needs)."""
    cfg = model.config
    canvas_len, vocab, device = cfg.canvas_length, cfg.text.vocab_size, model.device
    sampling = sampling_params(steps)
    kv = new_kv(model)
    gen = make_generator(suite.settings.seed, device)
    n = len(prompt)
    forward_s: list[float] = []
    sampler_s: list[float] = []
    suite.sync()
    start = time.perf_counter()
    prompt_t = torch.tensor(prompt, dtype=torch.long, device=device)
    _, prefill_s = suite.timed(lambda: model(prompt_t, [Segment("encode", 0, n, 0)], kv))
    kv.trim()
    canvas = random_canvas(canvas_len, vocab, gen, device)
    argmax, soft = canvas, None
    tracker = StabilityTracker(sampling)
    done = 0
    for cur_step in range(steps, 0, -1):
        hidden, dt = suite.timed(lambda c=canvas, s=soft: model(c, [Segment("denoise", 0, canvas_len, n)], kv, s))
        forward_s.append(dt)
        step, dt = suite.timed(lambda h=hidden, c=canvas, k=cur_step: denoise_step(model, h, c, k, sampling, gen))
        sampler_s.append(dt)
        canvas, argmax, soft = step.canvas, step.argmax, step.soft
        done += 1
        if tracker.update(step.argmax, step.entropy):
            break
    committed = argmax.tolist()  # generate_single reads the canvas back to stream it
    denoised = time.perf_counter()
    _, commit_s = suite.timed(lambda: model(argmax, [Segment("encode", 0, canvas_len, n)], kv))
    kv.trim()
    wall = time.perf_counter() - start
    no_commit = denoised - start
    assert len(committed) == canvas_len and done == steps
    return {
        "new_tokens": canvas_len, "prompt_tokens": n, "steps": done,
        "prefill_ms": _ms(prefill_s),
        "denoise_forward_ms": _ms(statistics.fmean(forward_s)),
        "denoise_forward_ms_median": _ms(statistics.median(forward_s)),
        "sampler_ms": _ms(statistics.fmean(sampler_s)),
        "step_ms": _ms((sum(forward_s) + sum(sampler_s)) / done),
        "commit_ms": _ms(commit_s),
        "wall_s": round(wall, 4),
        "tokens_per_s": round(canvas_len / wall, 3),
        "wall_s_no_commit": round(no_commit, 4),
        "tokens_per_s_no_commit": round(canvas_len / no_commit, 3),
    }


def diffusion_generate_single(suite: Suite, model: DiffusionGemma, prompt: list[int], steps: int) -> dict[str, Any]:
    """Cross-check: the un-instrumented ``generate_single`` (one canvas; it ends before committing)."""
    canvas_len = model.config.canvas_length
    result, wall = suite.timed(lambda: generate_single(
        model, prompt, max_tokens=canvas_len, seed=suite.settings.seed, sampling=sampling_params(steps),
        eos_token_ids=model.config.text.eos_token_id, ignore_eos=True))
    assert len(result.token_ids) == canvas_len and result.stats.denoise_steps == steps
    return {"new_tokens": canvas_len, "steps": steps, "wall_s": round(wall, 4),
            "tokens_per_s": round(canvas_len / wall, 3)}


# -- 2. AR baseline ------------------------------------------------------------------------------------


def ar_measure(suite: Suite, model: DiffusionGemma, batch: int, tokens: int) -> dict[str, Any]:
    vocab = model.config.text.vocab_size
    prompts = random_prompts(batch, suite.settings.prompt_len, vocab, suite.settings.seed + 1)
    generate_ar(model, prompts, min(4, tokens))  # warm-up: kernels for these shapes
    result = generate_ar(model, prompts, tokens, deadline=suite.perf_deadline())
    out: dict[str, Any] = {
        "batch": batch, "prompt_tokens": result.prompt_tokens, "new_tokens": result.new_tokens,
        "prefill_ms": _ms(result.prefill_s), "ms_per_token_step": round(result.ms_per_token_step, 3),
        "wall_s": round(result.wall_s, 4), "tokens_per_s": round(result.tokens_per_s, 3),
        "tokens_per_s_per_seq": round(result.tokens_per_s / batch, 3),
    }
    if result.new_tokens < tokens:
        out["truncated_by_time_guard"] = True
    return out


# -- 3. packed denoise forwards ------------------------------------------------------------------------


@torch.inference_mode()
def packed_measure(suite: Suite, model: DiffusionGemma, canvases: int) -> dict[str, Any]:
    """One packed denoise forward over ``canvases`` canvases (distinct sequences, each with a cached
    prompt), the vocabulary pass over all their rows, and the packed commit (encode) forward."""
    cfg, s = model.config, suite.settings
    canvas_len, vocab, device = cfg.canvas_length, cfg.text.vocab_size, model.device
    steps = s.steps[0]
    p = s.prompt_len
    kv = new_kv(model)
    prompts = torch.tensor(random_prompts(canvases, p, vocab, s.seed + 2), dtype=torch.long, device=device)
    _, prefill_s = suite.timed(lambda: model(
        prompts.reshape(-1), [Segment("encode", q, p, 0) for q in range(canvases)], kv))
    kv.trim()
    gen = torch.Generator(device=device).manual_seed(s.seed + 3)
    canvas = torch.randint(0, vocab, (canvases * canvas_len,), generator=gen, device=device)
    segments = [Segment("denoise", q, canvas_len, p) for q in range(canvases)]
    temp = 0.6
    # warm-up, and a soft-embedding input so the timed forwards run the self-conditioning MLP
    hidden = model(canvas, segments, kv, None)
    vp = vocab_pass(model, hidden, temp, gen, canvas_len)
    argmax, soft = vp.argmax, vp.soft
    forward_s, vocab_s, commit_s = [], [], []
    commit_segments = [Segment("encode", q, canvas_len, p) for q in range(canvases)]
    for _ in range(s.reps):
        hidden, dt = suite.timed(lambda sc=soft: model(canvas, segments, kv, sc))
        forward_s.append(dt)
        # one canvas' rows per chunk: [canvas, vocab] fp32 temporaries, as an engine step would
        vp, dt = suite.timed(lambda h=hidden: vocab_pass(model, h, temp, gen, canvas_len))
        argmax, soft = vp.argmax, vp.soft
        vocab_s.append(dt)
        _, dt = suite.timed(lambda a=argmax: model(a, commit_segments, kv))
        commit_s.append(dt)
        for q in range(canvases):
            kv.truncate(q, p)  # forget the commit so the next repetition sees the same cache
    fwd, voc, com = (statistics.median(x) for x in (forward_s, vocab_s, commit_s))
    tokens = canvases * canvas_len
    return {
        "label": PACKED_LABEL, "canvases": canvases, "tokens": tokens, "prompt_tokens_per_seq": p,
        "steps_per_canvas": steps, "reps": s.reps, "fits": True,
        "prefill_ms": _ms(prefill_s),
        "forward_ms": _ms(fwd), "vocab_pass_ms": _ms(voc), "step_ms": _ms(fwd + voc), "commit_ms": _ms(com),
        "implied_tokens_per_s": round(tokens / (steps * (fwd + voc) + com), 3),
        "implied_tokens_per_s_forward_only": round(tokens / (steps * fwd + com), 3),
    }


def engine_measure(suite: Suite, model: DiffusionGemma, concurrent: int) -> dict[str, Any]:
    """The continuous-batching engine end to end: ``concurrent`` requests arrive together, each a short prompt
    and one canvas of new tokens at a fixed number of denoising steps; aggregate tokens/s over the wall time
    from submission to the last token (prefill and every step included), and time to first canvas."""
    from dgserve.engine.engine import Engine, EngineConfig
    from dgserve.engine.request import FinalEvent, GenerationRequest
    from dgserve.model.checkpoint import GenerationDefaults

    cfg, s = model.config, suite.settings
    canvas_len = cfg.canvas_length
    steps = s.steps[0]
    prompts = random_prompts(concurrent, s.prompt_len, cfg.text.vocab_size, s.seed + 5)
    kv_bytes = (4 << 30) if model.device.type == "cuda" else (64 << 20)
    engine = Engine(model, GenerationDefaults(eos_token_ids=()), None, EngineConfig(
        kv_cache_memory=kv_bytes, max_running=max(concurrent, 1), prefill_chunk=512,
        max_step_tokens=concurrent * (canvas_len + s.prompt_len) + 512, enable_prefix_cache=False))
    params = sampling_params(steps)

    def run() -> list[FinalEvent]:
        for i, p in enumerate(prompts):
            engine.add_request(GenerationRequest(prompt_ids=p, max_tokens=canvas_len, seed=s.seed + i,
                                                 sampling=params, request_id=f"e{i}", ignore_eos=True))
        return [e for e in engine.run_until_done() if isinstance(e, FinalEvent)]

    finals, wall = suite.timed(run)
    tokens = sum(f.stats.new_tokens for f in finals)
    ttfc = [f.stats.time_to_first_canvas for f in finals if f.stats.time_to_first_canvas is not None]
    return {
        "label": "continuous-batching engine, all requests arriving together", "concurrent": concurrent,
        "steps_per_canvas": steps, "new_tokens": tokens, "wall_s": round(wall, 4),
        "aggregate_tokens_per_s": round(tokens / wall, 3),
        "per_request_tokens_per_s": round(tokens / wall / max(1, concurrent), 3),
        "mean_time_to_first_canvas_s": round(statistics.mean(ttfc), 4) if ttfc else None,
        "forwards": engine.forwards,
        "ms_per_forward": round(1000 * wall / max(1, engine.forwards), 3),
        "max_canvases_per_forward": max(engine.canvases_in_forward, default=0),
    }


# -- report --------------------------------------------------------------------------------------------


def _fmt(v: Any, digits: int = 1) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:,.{digits}f}"
    return "-" if v is None else str(v)


def _status(entry: dict[str, Any]) -> str | None:
    if "error" in entry:
        return ("OOM: " if entry.get("oom") else "error: ") + entry["error"].splitlines()[0][:160]
    if "skipped" in entry:
        return "skipped (" + entry["skipped"] + ")"
    return None


def markdown(r: dict[str, Any]) -> str:
    m = r["meta"]
    lines = [
        f"# dgserve GPU suite: {m['config']} ({m['params_total']} total / {m['params_active']} active, random weights)",
        "",
        f"- device: {m['device']}; torch {m['torch']}; dtype {m['dtype']}; date {m['date']}",
        f"- command: `{m['command']}`",
        f"- model init {m['init_s']:.1f}s; suite elapsed {m['elapsed_s']:.1f}s; "
        f"weights {r['memory'].get('weights_gib', 0):.3f} GiB; peak {r['memory'].get('peak_gib', 0):.2f} GiB "
        f"({m['peak_memory_source']})",
        "",
        *fast_markdown(r.get("fast", {}), "Fast path (engine.execution=fast)"),
        *fast_markdown(r.get("kernels", {}), "Triton kernels vs the torch path (dgserve.kernels)"),
        *([f"Recommended `dgserve.kernels.MEASURED_DEFAULTS` entry: `{r['recommended_kernel_defaults']}`", ""]
          if r.get("recommended_kernel_defaults") else []),
        *fast_markdown(r.get("fast_fp8", {}), "Fast path with FP8 weights (model.quantization=fp8)"),
        "## Batch-1 diffusion decoding (one canvas, fixed steps, adaptive stopping off, ignore_eos)",
        "",
        "tok/s = new tokens / wall time (prefill + denoise steps + commit); 'no commit' stops after the last step.",
        "",
        "| steps | new tok | prefill ms | fwd ms/step | sampler ms/step | step ms | commit ms | wall s | tok/s "
        "| tok/s no commit | vs AR b1 |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    ar1 = r.get("ar", {}).get("batch_1", {})
    for name, e in r.get("diffusion", {}).items():
        st = _status(e)
        if st:
            lines.append(f"| {name.removeprefix('steps_')} | {st} |")
            continue
        ratio = e["tokens_per_s"] / ar1["tokens_per_s"] if "tokens_per_s" in ar1 else None
        lines.append(
            f"| {e['steps']} | {e['new_tokens']} | {_fmt(e['prefill_ms'])} | {_fmt(e['denoise_forward_ms'])} "
            f"| {_fmt(e['sampler_ms'])} | {_fmt(e['step_ms'])} | {_fmt(e['commit_ms'])} | {_fmt(e['wall_s'], 3)} "
            f"| {_fmt(e['tokens_per_s'])} | {_fmt(e['tokens_per_s_no_commit'])} | "
            f"{_fmt(ratio, 2) + 'x' if ratio else '-'} |")
    for name, e in r.get("generate_single", {}).items():
        st = _status(e)
        lines.append(f"\n`generate_single` ({name}, un-instrumented, no commit): "
                     + (st or f"{_fmt(e['wall_s'], 3)} s, {_fmt(e['tokens_per_s'])} tok/s"))
    lines += [
        "",
        "## Autoregressive baseline (same backbone as a causal LM, greedy, bench/ar_baseline.py)",
        "",
        "| batch | new tok/seq | prefill ms | ms/token step | wall s | tok/s (aggregate) | tok/s per seq |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, e in r.get("ar", {}).items():
        st = _status(e)
        if st:
            lines.append(f"| {name.removeprefix('batch_')} | {st} |")
            continue
        lines.append(f"| {e['batch']} | {e['new_tokens']} | {_fmt(e['prefill_ms'])} | {_fmt(e['ms_per_token_step'])} "
                     f"| {_fmt(e['wall_s'], 3)} | {_fmt(e['tokens_per_s'])} | {_fmt(e['tokens_per_s_per_seq'])} |")
    lines += [
        "",
        f"## Packed denoise forwards: {PACKED_LABEL}",
        "",
        "One forward over N canvases (distinct sequences, cached prompt each) + the vocabulary pass over "
        "all rows + one packed commit; implied tok/s = N x canvas / (steps x step + commit).",
        "",
        "| canvases | tokens | fwd ms | vocab ms | step ms | commit ms | implied tok/s | implied (fwd only) "
        "| peak GiB | fits |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name, e in r.get("packed", {}).items():
        st = _status(e)
        if st:
            lines.append(f"| {name.removeprefix('canvases_')} | {st} |")
            continue
        lines.append(f"| {e['canvases']} | {e['tokens']} | {_fmt(e['forward_ms'])} | {_fmt(e['vocab_pass_ms'])} "
                     f"| {_fmt(e['step_ms'])} | {_fmt(e['commit_ms'])} | {_fmt(e['implied_tokens_per_s'])} "
                     f"| {_fmt(e['implied_tokens_per_s_forward_only'])} | {_fmt(e['peak_gib'], 2)} "
                     f"| {_fmt(e['fits'])} |")
    if r.get("engine"):
        lines += ["", "## Continuous-batching engine (requests arriving together, one canvas each)", "",
                  "| concurrent | new tokens | wall s | aggregate tok/s | per-request tok/s | mean TTFC s "
                  "| forwards | ms/forward | max canvases/forward | peak GiB |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for name, e in r["engine"].items():
            st = _status(e)
            if st:
                lines.append(f"| {name.removeprefix('concurrent_')} | {st} |")
                continue
            lines.append(f"| {e['concurrent']} | {e['new_tokens']} | {_fmt(e['wall_s'], 3)} "
                         f"| {_fmt(e['aggregate_tokens_per_s'])} | {_fmt(e['per_request_tokens_per_s'])} "
                         f"| {_fmt(e['mean_time_to_first_canvas_s'], 3)} | {e['forwards']} "
                         f"| {_fmt(e['ms_per_forward'])} | {e['max_canvases_per_forward']} "
                         f"| {_fmt(e['peak_gib'], 2)} |")
    if r.get("ratios"):
        lines += ["", "## Ratios", ""]
        lines += [f"- {k}: {_fmt(v, 2)}x" for k, v in r["ratios"].items()]
    if r.get("problems"):
        lines += ["", "## Errors and skips", ""]
        lines += [f"- {p}" for p in r["problems"]]
    return "\n".join(lines) + "\n"


def fast_markdown(fast: dict[str, Any], title: str) -> list[str]:
    """A section of measurements: one line per measurement, its figures as key=value."""
    if not fast:
        return []
    lines = [f"## {title}", ""]
    for name, e in fast.items():
        st = _status(e)
        body = st or ", ".join(f"{k}={_fmt(v, 3)}" for k, v in e.items() if k not in ("measure_s",))
        lines.append(f"- **{name}**: {body}")
    return [*lines, ""]


def finish(suite: Suite) -> None:
    r = suite.report
    ratios: dict[str, float] = {}
    ar1 = r.get("ar", {}).get("batch_1", {})
    arb = r.get("ar", {}).get(f"batch_{suite.settings.ar_batch}", {})
    for name, e in r.get("diffusion", {}).items():
        if "tokens_per_s" in e and "tokens_per_s" in ar1:
            ratios[f"diffusion_{name}_over_ar_batch_1"] = round(e["tokens_per_s"] / ar1["tokens_per_s"], 3)
    if "tokens_per_s" in arb and "tokens_per_s" in ar1:
        ratios[f"ar_batch_{suite.settings.ar_batch}_over_ar_batch_1"] = round(
            arb["tokens_per_s"] / ar1["tokens_per_s"], 3)
    packed = r.get("packed", {})
    biggest = max((e["canvases"] for e in packed.values() if e.get("fits")), default=0)
    if biggest and "tokens_per_s" in arb:
        ratios[f"packed_{biggest}_implied_over_ar_batch_{suite.settings.ar_batch}"] = round(
            packed[f"canvases_{biggest}"]["implied_tokens_per_s"] / arb["tokens_per_s"], 3)
    r["ratios"] = ratios
    r["memory"]["largest_packed_canvases_fit"] = biggest
    for c in suite.settings.canvases:
        e = packed.get(f"canvases_{c}", {})
        if e.get("oom"):
            e["fits"] = False
    for name in (f"engine_batch1_steps_{suite.settings.steps[0]}", f"engine_concurrent_{suite.settings.concurrent}"):
        bf16, fp8 = r.get("fast", {}).get(name, {}), r.get("fast_fp8", {}).get(name, {})
        for key in ("tokens_per_s_end_to_end", "tokens_per_s_steady_state", "aggregate_tokens_per_s"):
            if key in bf16 and key in fp8:
                ratios[f"fp8_over_bf16_{name}_{key}"] = round(fp8[key] / bf16[key], 3)
    r["problems"] = [f"{sec}/{name}: {_status(e)}" for sec in ("fast", "kernels", "fast_fp8", "diffusion",
                                                                  "generate_single", "ar", "packed", "engine")
                     for name, e in r.get(sec, {}).items() if _status(e)]
    r["meta"]["total_s"] = round(elapsed(), 1)
    suite.save()


# -- fast path sections -------------------------------------------------------------------------------


def fast_section(suite: Suite, section: str, model: DiffusionGemma, prompt: list[int],
                 concurrent_prompts: list[list[int]]) -> None:
    """The fast path's figures for one model (``fast``: the bf16 weights; ``fast_fp8``: the FP8 ones)."""
    s = suite.settings
    head = s.steps[0]
    if suite.device.type == "cuda":
        suite.measure(section, "sync_debug", lambda: gpu_fast.sync_debug(model))
        if kernels.available(suite.device):
            suite.measure(section, "sync_debug_triton_kernels", lambda: gpu_fast.sync_debug(
                model, sampler_kernel="triton", moe_kernel="triton"))
    for c in s.fast_canvases:
        suite.measure(section, f"modes_{c}", lambda c=c: gpu_fast.forward_modes(model, c, s.reps, compile=False))
    if section == "fast":  # the sampler reads the tied embedding, which FP8 leaves in bf16
        suite.measure(section, "sampler", lambda: gpu_fast.sampler(model, s.reps))
    if suite.device.type == "cuda":
        suite.measure(section, "kernels", lambda: gpu_fast.kernels(model))
    suite.measure(section, f"engine_batch1_steps_{head}",
                  lambda: gpu_fast.engine_batch1(model, prompt, head, 4, compile=False))
    suite.measure(section, f"engine_concurrent_{s.concurrent}",
                  lambda: gpu_fast.engine_concurrent(model, concurrent_prompts, head, compile=False))
    if section == "fast_fp8" and suite.device.type == "cuda" and kernels.available(suite.device):
        suite.measure(section, f"engine_batch1_steps_{head}_triton",
                      lambda: gpu_fast.engine_batch1(model, prompt, head, 4, compile=False, kernel="triton"))
        suite.measure(section, f"engine_concurrent_{s.concurrent}_triton",
                      lambda: gpu_fast.engine_concurrent(model, concurrent_prompts, head, compile=False,
                                                         kernel="triton"))


def kernel_section(suite: Suite, model: DiffusionGemma, weights: str, sampler: bool = True) -> None:
    """The Triton kernels against the torch path on this card, and the ``MEASURED_DEFAULTS`` entry they imply."""
    s = suite.settings
    if sampler:
        suite.measure("kernels", "sampler", lambda: gpu_fast.sampler_kernel(model, s.reps))
    for c in (min(s.fast_canvases), max(s.fast_canvases)):
        suite.measure("kernels", f"moe_{weights}_{c}", lambda c=c: gpu_fast.moe_kernel(model, c, max(s.reps, 5)))
    entries = suite.report.get("kernels", {})
    moe = [e for name, e in entries.items() if name.startswith("moe_")]
    suite.report["recommended_kernel_defaults"] = gpu_fast.recommended_kernels(
        suite.report["meta"]["device"], entries.get("sampler", {}), moe)


def _timed_build(suite: Suite, s: Settings, dtype: torch.dtype, device: torch.device,
                 quantization: str) -> DiffusionGemma | None:
    """A random model (``fp8``: FP8 weights), its build time and weight bytes in the report; None if it failed."""
    t0 = time.perf_counter()
    key = "fp8" if quantization == "fp8" else "bf16_rebuilt"
    try:
        model = build_random_model(s.config, dtype, device, s.seed, quantization)
        suite.sync()
    except Exception as exc:  # recorded; the rest of the suite goes on without this model
        suite.report["meta"][f"{key}_init_error"] = f"{type(exc).__name__}: {str(exc)[:600]}"
        _free(device)
        return None
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    suite.report["meta"][f"{key}_init_s"] = round(time.perf_counter() - t0, 2)
    if quantization == "fp8":
        suite.report["memory"]["fp8_weights_gib"] = round(weights / GIB, 3)
    print(f"[{elapsed():6.1f}s] {key} model ready ({weights / GIB:.2f} GiB of weights)", flush=True)
    return model


def memory_plans(config, dtype: torch.dtype, device: torch.device) -> dict[str, Any]:
    """What ``memory_plan`` predicts for this card, bf16 and FP8 weights (64 running requests, 4,096-token context)."""
    if device.type != "cuda":
        return {}
    total = torch.cuda.get_device_properties(device).total_memory
    return {q: {"weights_gib": round(p.weight_bytes / GIB, 2), "max_canvases": p.max_canvases}
            for q in ("none", "fp8") for p in [memory_plan(config, dtype, total, quantization=q)]}


# -- main ----------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    s = parse_args(argv)
    if s.threads:
        torch.set_num_threads(s.threads)
    device = torch.device(s.device)
    dtype = resolve_dtype(s.dtype)
    config = PRESETS[s.config]
    counts = config.parameter_counts()
    s.ar_tokens = s.ar_tokens or config.canvas_length
    if device.type == "cuda":
        device_name = torch.cuda.get_device_name(device)
    else:
        device_name = f"CPU {platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"
    suite = Suite(settings=s, device=device)
    suite.report = {
        "meta": {
            "device": device_name, "torch": torch.__version__, "cuda": torch.version.cuda or "none",
            "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),  # noqa: UP017
            "config": s.config, "dtype": s.dtype,
            "command": os.environ.get("DGSERVE_BENCH_COMMAND") or shlex.join([sys.executable, *sys.argv]),
            "params_total": human_params(counts["total"]), "params_active": human_params(counts["active"]),
            "peak_memory_source": "torch.cuda.max_memory_allocated" if device.type == "cuda"
            else "getrusage ru_maxrss (process RSS)",
            "init_s": 0.0, "elapsed_s": 0.0,
        },
        "settings": {k: v for k, v in vars(s).items()},
        "memory": {"peak_gib": 0.0},
        "fast": {}, "kernels": {}, "fast_fp8": {}, "diffusion": {}, "generate_single": {}, "ar": {}, "packed": {},
        "engine": {},
    }
    out = Path(s.out)
    print(f"dgserve GPU suite: {s.config} on {device_name}, torch {torch.__version__}, out {out}", flush=True)

    t0 = time.perf_counter()
    torch.manual_seed(s.seed)
    try:
        model = build_random_model(s.config, dtype, device, s.seed)
        suite.sync()
    except Exception as exc:  # nothing else can run: say why in the JSON, then fail
        suite.report["meta"]["fatal"] = f"model init: {type(exc).__name__}: {str(exc)[:600]}"
        suite.save()
        raise
    suite.report["meta"]["init_s"] = round(time.perf_counter() - t0, 2)
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    suite.report["memory"]["weights_gib"] = round(weights / GIB, 3)
    suite.report["memory"]["after_init_gib"] = suite.peak_gib()
    print(f"[{elapsed():6.1f}s] model ready in {suite.report['meta']['init_s']:.1f}s "
          f"({weights / GIB:.2f} GiB of weights)", flush=True)

    prompt = random_prompts(1, s.prompt_len, config.text.vocab_size, s.seed)[0]
    ar_tokens = s.ar_tokens
    head, *more_steps = s.steps

    # the fast path first: what this suite is for now
    on_cuda = device.type == "cuda"
    concurrent_prompts = random_prompts(s.concurrent, s.prompt_len, config.text.vocab_size, s.seed + 7)
    if "none" in s.quantizations:
        fast_section(suite, "fast", model, prompt, concurrent_prompts)
    if on_cuda and kernels.available(device):
        kernel_section(suite, model, "bf16" if dtype == torch.bfloat16 else s.dtype)
    if "fp8" in s.quantizations:
        del model  # the FP8 model next, alone on the card
        _free(device)
        fp8_model = _timed_build(suite, s, dtype, device, "fp8")
        if fp8_model is not None:
            fast_section(suite, "fast_fp8", fp8_model, prompt, concurrent_prompts)
            if on_cuda and kernels.available(device):
                kernel_section(suite, fp8_model, "fp8", sampler=False)
            del fp8_model
            _free(device)
        model = _timed_build(suite, s, dtype, device, "none")  # back to bf16 for the exact path's figures
        if model is None:
            finish(suite)
            return 1
    suite.report["memory"]["plan"] = memory_plans(config, dtype, device)

    # warm-up (kernels, allocator) for the batch-1 diffusion shapes; not reported
    try:
        diffusion_instrumented(suite, model, prompt, 2)
    except Exception as exc:  # the measurements below record their own errors
        suite.report["meta"]["warmup_error"] = f"{type(exc).__name__}: {str(exc)[:600]}"
        _free(device)
    suite.measure("diffusion", f"steps_{head}", lambda: diffusion_instrumented(suite, model, prompt, head))
    suite.measure("ar", "batch_1", lambda: ar_measure(suite, model, 1, ar_tokens))
    suite.measure("engine", f"concurrent_{max(s.canvases)}", lambda: engine_measure(suite, model, max(s.canvases)))
    if s.compile:  # compiling takes minutes: after the figures that matter most
        for c in (min(s.fast_canvases), max(s.fast_canvases)):
            suite.measure("fast", f"modes_compiled_{c}",
                          lambda c=c: gpu_fast.forward_modes(model, c, s.reps, compile=True))
        suite.measure("fast", f"engine_batch1_steps_{head}_compiled",
                      lambda: gpu_fast.engine_batch1(model, prompt, head, 4, compile=True))
        suite.measure("fast", f"engine_concurrent_{s.concurrent}_compiled",
                      lambda: gpu_fast.engine_concurrent(model, concurrent_prompts, head, compile=True))
    for c in s.canvases:
        if f"concurrent_{c}" not in suite.report["engine"]:
            suite.measure("engine", f"concurrent_{c}", lambda c=c: engine_measure(suite, model, c))
    for c in s.canvases:
        suite.measure("packed", f"canvases_{c}", lambda c=c: packed_measure(suite, model, c))
    for steps in more_steps:
        suite.measure("diffusion", f"steps_{steps}", lambda n=steps: diffusion_instrumented(suite, model, prompt, n))
    if s.ar_batch > 1:
        suite.measure("ar", f"batch_{s.ar_batch}", lambda: ar_measure(suite, model, s.ar_batch, ar_tokens))
    suite.measure("generate_single", f"steps_{head}",
                  lambda: diffusion_generate_single(suite, model, prompt, head))
    finish(suite)
    print()
    print((out / "results.md").read_text(), flush=True)
    print(f"wrote {out / 'results.json'} and {out / 'results.md'} in {elapsed():.1f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
