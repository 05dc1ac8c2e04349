"""The fast path's measurements for the GPU suite (``bench/gpu_suite.py`` calls them; each returns a dict).

- ``sync_debug``: one steady-state fast step under ``torch.cuda.set_sync_debug_mode("error")``;
- ``forward_modes``: the fast step (forward + sampler + state update) eager, with compiled layers, and replayed
  from a CUDA graph, at 1 / 8 / 64 canvases, with the agreement of each with eager; the forward alone, eager;
- ``sampler``: the exact sampler's 16-row chunks vs the fast path's per-canvas pass, per canvas;
- ``kernels``: CUDA kernels per fast forward (profiler), eager;
- ``engine_batch1``: one request, 16 steps per canvas: end-to-end tokens/s and steady state (canvas / time
  between committed canvases);
- ``engine_concurrent``: N requests arriving together, one canvas each: aggregate tokens/s;
- ``sampler_kernel``: the fast path's torch vocabulary pass vs the fused Triton sampler (``dgserve.kernels``), per
  canvas, with their agreement;
- ``moe_kernel``: one layer's experts, torch's grouped path (``grouped_mm``; FP8: ``_scaled_grouped_mm``) vs the
  Triton fused MoE, at a given number of canvases, with their difference;
- ``recommended_kernels``: from those, what ``dgserve.kernels.MEASURED_DEFAULTS`` should say for the card.
"""

from __future__ import annotations

import itertools
import statistics
import time
from typing import Any

import torch

from dgserve.engine import fast_step as fs
from dgserve.engine.engine import Engine, EngineConfig
from dgserve.engine.kv_pages import KVPagePool
from dgserve.engine.request import CanvasEvent, FinalEvent, GenerationRequest
from dgserve.engine.runner import FastRunner, Row
from dgserve.engine.sampler import vocab_pass
from dgserve.model.checkpoint import GenerationDefaults
from dgserve.model.diffusion_gemma import DiffusionGemma
from dgserve.model.generation_config import SamplingParams
from dgserve.model.moe import ExpertBatch, expert_counts

PREFIX = 32


def fixed_steps(steps: int) -> SamplingParams:
    return SamplingParams(max_denoising_steps=steps, stability_threshold=None, confidence_threshold=None)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _pool(model: DiffusionGemma, rows: int) -> KVPagePool:
    cfg = model.config
    blocks = rows * (-(-(PREFIX + 2 * cfg.canvas_length) // 16) + 2) + 16
    sliding = rows * (-(-(cfg.text.sliding_window + 2 * cfg.canvas_length) // 16) + 2) + 16
    return KVPagePool(cfg, blocks, sliding, block_size=16, dtype=model.dtype, device=model.device,
                      scratch_tokens=cfg.canvas_length)


def _rows(runner: FastRunner, pool: KVPagePool, n: int) -> list[Row]:
    """``n`` canvases at their first step, each over a prompt of ``PREFIX`` tokens prefilled (one fast step)."""
    vocab = runner.model.config.text.vocab_size
    tables = []
    for _ in range(n):
        table = pool.new_table()
        assert pool.ensure_capacity(table, PREFIX + runner.canvas)
        tables.append(table)
    prompt = torch.randint(3, vocab, (PREFIX,), generator=torch.Generator().manual_seed(1)).tolist()
    runner.run([Row(fs.PREFILL, i, 0, t, PREFIX, prompt) for i, t in enumerate(tables)])
    for t in tables:
        t.mark_written(PREFIX)
    return [Row(fs.DENOISE, i, PREFIX, t, runner.canvas, fresh=True, cur_step=16, sampling=fixed_steps(16), seed=i)
            for i, t in enumerate(tables)]


def _input(runner: FastRunner, rows: list[Row]) -> tuple[fs.StepLayout, torch.Tensor]:
    layout = fs.StepLayout.build(runner.model, runner.block_size, runner.context_bucket(rows))
    return layout, torch.from_numpy(runner._pack(rows, runner.row_bucket(len(rows)), layout)).to(runner.device)


def _median_ms(fn, reps: int, device: torch.device) -> float:
    times = []
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return round(1000 * statistics.median(times), 3)


def sync_debug(model: DiffusionGemma, **kernels: str) -> dict[str, Any]:
    """One steady-state step (the runner's device program: ``kernels`` picks its sampler and MoE kernels) under
    ``set_sync_debug_mode("error")``: any host synchronisation raises."""
    pool = _pool(model, 4)
    runner = FastRunner(model, pool, num_slots=8, **kernels)
    rows = _rows(runner, pool, 4)
    runner.run(rows)  # warm-up (first-use copies, allocator)
    for r in rows:
        r.fresh = False
    layout, inp = _input(runner, rows)
    _sync(model.device)
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.inference_mode():
            out = runner.step_fn(model, runner.algorithm, layout, inp, runner.state, pool.k_flat, pool.v_flat,
                                 runner.scratch)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert out.shape == (runner.row_bucket(len(rows)), 2 + runner.canvas)
    return {"sync_free": True, "rows": 4, "sampler_kernel": runner.sampler_kernel, "moe_kernel": runner.moe_kernel}


def forward_modes(model: DiffusionGemma, canvases: int, reps: int, compile: bool) -> dict[str, Any]:
    """Eager / compiled / graphed fast steps over ``canvases`` rows with the same inputs and state."""
    device = model.device
    pool = _pool(model, canvases)
    out: dict[str, Any] = {"canvases": canvases}
    results: dict[str, torch.Tensor] = {}
    configs = [("eager", False, False), ("graphed", False, True)]
    if compile:
        configs += [("compiled", True, False), ("compiled_graphed", True, True)]
    for name, comp, graphs in configs:
        runner = FastRunner(model, pool, num_slots=canvases, compile=comp, cuda_graphs=graphs)
        try:
            rows = _rows(runner, pool, canvases)
            t0 = time.perf_counter()
            runner.run(rows)  # first run: compiles / captures
            out[f"{name}_first_s"] = round(time.perf_counter() - t0, 2)
            for r in rows:
                r.fresh = False
            results[name] = torch.from_numpy(runner.run(rows).copy())
            out[f"{name}_step_ms"] = _median_ms(lambda runner=runner, rows=rows: runner.run(rows), reps, device)
            if name == "eager":
                layout, inp = _input(runner, rows)
                with torch.inference_mode():
                    x = fs.step_inputs(model, layout, inp, runner.state, runner.scratch)
                    out["eager_forward_ms"] = _median_ms(
                        lambda x=x: model.forward_canvases(x.batch, pool.k_flat, pool.v_flat), reps, device)
            for table in {id(r.table): r.table for r in rows}.values():
                pool.free(table)
        finally:
            model.compiled_layer_rows = None
    for name, res in results.items():
        if name != "eager":
            same = (res[:, fs.OUT_TOKENS:] == results["eager"][:, fs.OUT_TOKENS:]).float().mean()
            out[f"{name}_argmax_agreement_with_eager"] = round(float(same), 5)
    return out


def sampler(model: DiffusionGemma, reps: int) -> dict[str, Any]:
    """Per canvas: the exact sampler (16-row chunks, 32 GEMMs against the tied embedding at 262,144) vs the
    fast pass (2 GEMMs), on the same hidden states."""
    device, c = model.device, model.config.canvas_length
    hidden = torch.randn(c, model.config.text.hidden_size, device=device, dtype=model.dtype)
    gen = torch.Generator(device=device).manual_seed(0)
    u = torch.rand(c, device=device)
    temp = torch.tensor(0.6, device=device)
    greedy = torch.tensor(False, device=device)
    with torch.inference_mode():
        old = _median_ms(lambda: vocab_pass(model, hidden, 0.6, gen, 16), reps, device)
        new = _median_ms(lambda: fs.canvas_vocab_pass(model, hidden, temp, u, greedy), reps, device)
    return {"exact_16_row_chunks_ms": old, "fast_per_canvas_ms": new, "speedup": round(old / new, 2)}


def kernels(model: DiffusionGemma) -> dict[str, Any]:
    from torch.profiler import ProfilerActivity, profile

    pool = _pool(model, 1)
    runner = FastRunner(model, pool, num_slots=2)
    rows = _rows(runner, pool, 1)
    runner.run(rows)
    layout, inp = _input(runner, rows)
    with torch.inference_mode():
        x = fs.step_inputs(model, layout, inp, runner.state, runner.scratch)
        model.forward_canvases(x.batch, pool.k_flat, pool.v_flat)
        _sync(model.device)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            model.forward_canvases(x.batch, pool.k_flat, pool.v_flat)
            _sync(model.device)
    n = sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
    return {"kernels_per_forward_one_canvas": n}


def _engine(model: DiffusionGemma, concurrent: int, compile: bool, kernel: str = "auto") -> Engine:
    c = model.config.canvas_length
    return Engine(model, GenerationDefaults(eos_token_ids=()), None, EngineConfig(
        execution="fast", kv_cache_memory=(8 << 30) if model.device.type == "cuda" else (64 << 20),
        max_running=max(concurrent, 1), max_step_tokens=max(concurrent, 1) * c + 512, enable_prefix_cache=False,
        compile=compile, cuda_graphs=model.device.type == "cuda", sampler_kernel=kernel, moe_kernel=kernel))


def _serve(engine: Engine, prompts: list[list[int]], max_tokens: int, steps: int, tag: str
           ) -> tuple[float, list[float], int]:
    """Wall seconds to the last final event, commit times of the first request's canvases, new tokens."""
    for i, p in enumerate(prompts):
        engine.add_request(GenerationRequest(prompt_ids=p, max_tokens=max_tokens, seed=i, sampling=fixed_steps(steps),
                                             request_id=f"{tag}{i}", ignore_eos=True))
    t0 = time.perf_counter()
    commits: list[float] = []
    tokens = 0
    while engine.has_work():
        for ev in engine.step():
            if isinstance(ev, CanvasEvent):
                tokens += len(ev.token_ids)
                if ev.request_id == f"{tag}0":
                    commits.append(time.perf_counter() - t0)
            elif isinstance(ev, FinalEvent):
                pass
    return time.perf_counter() - t0, commits, tokens


def engine_batch1(model: DiffusionGemma, prompt: list[int], steps: int, canvases: int, compile: bool,
                  kernel: str = "auto") -> dict[str, Any]:
    """``kernel``: the engine's sampler and MoE kernels (``auto``, ``torch`` or ``triton``)."""
    engine = _engine(model, 1, compile, kernel)
    c = model.config.canvas_length
    _serve(engine, [prompt], 2 * c, steps, "warm")  # captures the bucket's graphs
    wall, commits, tokens = _serve(engine, [prompt], canvases * c, steps, "b1_")
    gaps = [b - a for a, b in itertools.pairwise(commits)]
    return {"steps": steps, "new_tokens": tokens, "wall_s": round(wall, 4),
            "tokens_per_s_end_to_end": round(tokens / wall, 2),
            "first_canvas_s": round(commits[0], 4) if commits else None,
            "inter_canvas_ms": round(1000 * statistics.mean(gaps), 3) if gaps else None,
            "tokens_per_s_steady_state": round(c / statistics.mean(gaps), 2) if gaps else None,
            "forwards": engine.forwards, "compile": compile, "kernels": engine.runner.moe_kernel}


def engine_concurrent(model: DiffusionGemma, prompts: list[list[int]], steps: int, compile: bool,
                      kernel: str = "auto") -> dict[str, Any]:
    engine = _engine(model, len(prompts), compile, kernel)
    c = model.config.canvas_length
    _serve(engine, prompts[:2], c, 2, "warm")
    wall, _, tokens = _serve(engine, prompts, c, steps, "cc")
    return {"concurrent": len(prompts), "steps": steps, "new_tokens": tokens, "wall_s": round(wall, 4),
            "aggregate_tokens_per_s": round(tokens / wall, 2), "forwards": engine.forwards,
            "max_canvases_per_forward": max(engine.canvases_in_forward, default=0),
            "ms_per_forward": round(1000 * wall / max(1, engine.forwards), 3), "compile": compile,
            "kernels": engine.runner.moe_kernel}


def sampler_kernel(model: DiffusionGemma, reps: int) -> dict[str, Any]:
    """Per canvas, on the same hidden states and uniforms: the fast path's torch pass (``canvas_vocab_pass``) vs the
    fused Triton sampler (``kernel_vocab_pass``); both start from the same LM-head GEMM."""
    device, c = model.device, model.config.canvas_length
    gen = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(c, model.config.text.hidden_size, device=device, generator=gen).to(model.dtype)
    u = torch.rand(c, device=device, generator=gen)
    temp = torch.tensor(0.6, device=device)
    greedy = torch.tensor(False, device=device)
    with torch.inference_mode():
        torch_ms = _median_ms(lambda: fs.canvas_vocab_pass(model, hidden, temp, u, greedy), reps, device)
        triton_ms = _median_ms(lambda: fs.kernel_vocab_pass(model, hidden, temp, u, greedy), reps, device)
        a = fs.canvas_vocab_pass(model, hidden, temp, u, greedy)
        b = fs.kernel_vocab_pass(model, hidden, temp, u, greedy)
    rel = ((a[2] - b[2]).abs() / a[2].abs().clamp(min=1e-6)).max()
    return {"torch_per_canvas_ms": torch_ms, "triton_per_canvas_ms": triton_ms,
            "speedup": round(torch_ms / triton_ms, 3),
            "argmax_agreement": round(float((a[1] == b[1]).float().mean()), 5),
            "sample_agreement": round(float((a[0] == b[0]).float().mean()), 5),
            "entropy_max_rel_diff": float(rel), "soft_max_abs_diff": float((a[3] - b[3]).abs().max().float())}


def moe_kernel(model: DiffusionGemma, canvases: int, reps: int) -> dict[str, Any]:
    """Layer 0's experts over the (token, k) rows of ``canvases`` canvases, routed uniformly at random: the torch
    grouped path vs the Triton fused MoE (the same weights: bf16, or the FP8 model's). Times are per layer and for
    all layers (x the layer count); the weight bandwidth counts every expert's bytes once."""
    device, t = model.device, model.config.text
    experts = model.layers[0].experts
    rows = canvases * model.config.canvas_length * t.top_k_experts
    gen = torch.Generator(device=device).manual_seed(canvases)
    expert_of_row = torch.randint(0, len(experts.expert_ids), (rows,), device=device, generator=gen).sort().values
    batch = ExpertBatch(torch.randn(rows, t.hidden_size, device=device, generator=gen).to(model.dtype),
                        expert_counts(expert_of_row, len(experts.expert_ids)))
    weight_bytes = sum(p.numel() * p.element_size() for p in experts.parameters())
    torch_path = getattr(experts, "grouped_backend", "grouped_mm")
    old = experts.kernel
    out: dict[str, Any] = {"canvases": canvases, "rows": rows, "torch_path": torch_path,
                           "expert_weight_mib_per_layer": round(weight_bytes / 2**20, 1)}
    try:
        with torch.inference_mode():
            results = {}
            for kernel in ("torch", "triton"):
                experts.kernel = kernel
                ms = _median_ms(lambda: experts(batch), reps, device)
                results[kernel] = experts(batch).float()
                out[f"{kernel}_ms_per_layer"] = ms
                out[f"{kernel}_ms_all_layers"] = round(ms * t.num_hidden_layers, 3)
                out[f"{kernel}_weight_tb_per_s"] = round(weight_bytes / (ms / 1000) / 1e12, 3)
    finally:
        experts.kernel = old
    diff = results["triton"] - results["torch"]
    out["speedup"] = round(out["torch_ms_per_layer"] / out["triton_ms_per_layer"], 3)
    out["rel_l2_diff"] = float(diff.norm() / results["torch"].norm())
    out["max_abs_diff"] = float(diff.abs().max())
    return out


def recommended_kernels(device_name: str, sampler_entry: dict[str, Any], moe_entries: list[dict[str, Any]]
                        ) -> dict[str, Any]:
    """``MEASURED_DEFAULTS[device_name]`` as these measurements say: Triton where it was faster in every measured
    configuration and agreed with torch, torch otherwise."""
    pick: dict[str, str] = {}
    if "speedup" in sampler_entry:
        agrees = sampler_entry["argmax_agreement"] == 1.0
        pick["sampler"] = "triton" if sampler_entry["speedup"] > 1.0 and agrees else "torch"
    measured = [e for e in moe_entries if "speedup" in e]
    if measured:
        faster = all(e["speedup"] > 1.0 and e["rel_l2_diff"] < 0.02 for e in measured)
        pick["moe"] = "triton" if faster else "torch"
    return {device_name: pick}
