"""The fast path on CUDA (skipped without a GPU; ``bench/gpu_suite.sh`` runs these first): a steady-state step
has no host synchronisation (``torch.cuda.set_sync_debug_mode("error")``), a captured CUDA graph replays to the
same outputs as the eager step, compiled layers agree with eager ones, and the engine serves requests with
graphs on."""

from __future__ import annotations

import pytest
import torch

from dgserve.engine import fast_step as fs
from dgserve.engine.engine import Engine, EngineConfig
from dgserve.engine.kv_pages import KVPagePool
from dgserve.engine.request import CanvasEvent, FinalEvent, GenerationRequest
from dgserve.engine.runner import FastRunner, Row
from dgserve.model.checkpoint import load
from dgserve.model.generation_config import SamplingParams

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
SAMPLING = SamplingParams(max_denoising_steps=8)


def _model(dtype: str = "bfloat16"):
    return load("tiny-random", dtype=dtype, device="cuda")


def _runner(lm, graphs: bool, compile: bool = False) -> tuple[FastRunner, KVPagePool]:
    cfg = lm.config
    pool = KVPagePool(cfg, 64, 64, block_size=16, dtype=lm.model.dtype, device="cuda",
                      scratch_tokens=cfg.canvas_length)
    # bucketed shapes even when eager: the eager runner's output is compared bit for bit with the graphed one's
    return FastRunner(lm.model, pool, num_slots=8, cuda_graphs=graphs, compile=compile, static_shapes=True), pool


def _denoise_rows(runner: FastRunner, pool: KVPagePool, n: int, fresh: bool, prefix: int = 20) -> list[Row]:
    """``n`` canvases over prompts of ``prefix`` tokens, prefilled by a fast step first."""
    tables = []
    for _ in range(n):
        table = pool.new_table()
        assert pool.ensure_capacity(table, prefix + runner.canvas)
        tables.append(table)
    prompt = list(range(5, 5 + prefix))
    runner.run([Row(fs.PREFILL, i, 0, t, prefix, prompt) for i, t in enumerate(tables)])
    for t in tables:
        t.mark_written(prefix)
    return [Row(fs.DENOISE, i, prefix, t, runner.canvas, fresh=fresh, cur_step=6, sampling=SAMPLING, seed=i)
            for i, t in enumerate(tables)]


def test_steady_state_step_does_not_synchronise():
    lm = _model()
    runner, pool = _runner(lm, graphs=False)
    rows = _denoise_rows(runner, pool, 3, fresh=True)
    runner.run(rows)  # first use: device tables, allocator
    layout = fs.StepLayout.build(lm.model, runner.block_size, runner.context_bucket(rows))
    inp = torch.from_numpy(runner._pack(_denoise_rows(runner, pool, 3, fresh=False), 4, layout)).cuda()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.inference_mode():
            out = fs.fast_step(lm.model, runner.algorithm, layout, inp, runner.state, pool.k_flat, pool.v_flat,
                               runner.scratch)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert out.shape == (4, 2 + runner.canvas)


def test_graphs_are_off_where_the_moe_would_sync():
    """fp32 on CUDA: torch's grouped kernel is bf16-only, the per-expert fallback reads counts on the host, so the
    runner runs eagerly instead of failing to capture."""
    runner, _ = _runner(_model("float32"), graphs=True)
    assert not runner.cuda_graphs


def test_graph_replay_equals_eager_step():
    """The same rows through an eager runner and a graphed one (same weights, same initial state) give the same
    output rows, step after step."""
    lm = _model("bfloat16")
    eager, pool_e = _runner(lm, graphs=False)
    graphed, pool_g = _runner(lm, graphs=True)
    rows_e = _denoise_rows(eager, pool_e, 3, fresh=True)
    rows_g = _denoise_rows(graphed, pool_g, 3, fresh=True)
    for step in range(4):
        for r in (*rows_e, *rows_g):
            r.fresh, r.cur_step = step == 0, 6 - step
        a, b = eager.run(rows_e), graphed.run(rows_g)
        assert (a == b).all(), step
    assert graphed._graphs, "no CUDA graph was captured"


def test_compiled_layers_match_eager():
    lm = _model()
    eager, pool_e = _runner(lm, graphs=False)
    rows = _denoise_rows(eager, pool_e, 2, fresh=True)
    want = eager.run(rows)
    lm2 = _model()
    compiled, pool_c = _runner(lm2, graphs=False, compile=True)
    try:
        got = compiled.run(_denoise_rows(compiled, pool_c, 2, fresh=True))
    finally:
        lm2.model.compiled_layer_rows = None
    agree = float((got[:, fs.OUT_TOKENS:] == want[:, fs.OUT_TOKENS:]).float().mean())
    assert agree > 0.8, agree  # compiled bf16 kernels round differently; most argmaxes agree


def test_engine_serves_requests_with_cuda_graphs():
    lm = _model()
    engine = Engine(lm.model, lm.generation, None, EngineConfig(kv_cache_memory=64 << 20))
    assert engine.execution == "fast" and engine.runner is not None and engine.runner.cuda_graphs
    for i in range(5):
        engine.add_request(GenerationRequest(prompt_ids=list(range(5, 20 + 7 * i)), max_tokens=70, seed=i,
                                             sampling=SAMPLING, request_id=f"r{i}", ignore_eos=True))
    tokens: dict[str, list[int]] = {}
    finals = {}
    while engine.has_work():
        for ev in engine.step():
            if isinstance(ev, CanvasEvent):
                tokens.setdefault(ev.request_id, []).extend(ev.token_ids)
            elif isinstance(ev, FinalEvent):
                finals[ev.request_id] = ev.finish_reason
    assert finals == {f"r{i}": "length" for i in range(5)}
    assert all(len(t) == 70 for t in tokens.values())
    assert engine.runner._graphs
