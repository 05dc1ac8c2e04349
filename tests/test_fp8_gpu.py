"""FP8 weights and the Triton kernels on CUDA (skipped without a GPU of compute capability >= 8.9;
``bench/gpu_suite.sh`` runs these with the other CUDA tests, and ``tests/test_kernels.py`` compiled on the GPU):

- the W8A8 matmuls (``torch._scaled_mm`` / ``torch._scaled_grouped_mm``, or Triton where torch has no kernel) against
  the CPU emulation of the same weights and inputs; the trained tiny model's logits on the GPU against the emulation;
- a steady-state fast step with FP8 weights, and with both Triton kernels chosen, has no host synchronisation;
- a captured CUDA graph of the FP8 step with the Triton kernels replays to the eager step's output rows;
- the engine serves requests with FP8 weights, the Triton kernels and CUDA graphs.
"""

from __future__ import annotations

import pytest
import torch

from dgserve.engine import fast_step as fs
from dgserve.engine.engine import Engine, EngineConfig
from dgserve.engine.kv_pages import KVPagePool
from dgserve.engine.request import CanvasEvent, FinalEvent, GenerationRequest
from dgserve.engine.runner import FastRunner, Row
from dgserve.model import quantization as quant
from dgserve.model.checkpoint import SHIPPED_CHECKPOINTS, load
from dgserve.model.generation_config import SamplingParams
from dgserve.model.kv import Segment
from dgserve.model.moe import ExpertBatch

FP8_GPU = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not FP8_GPU, reason="needs a CUDA GPU of capability >= 8.9")]
SAMPLING = SamplingParams(max_denoising_steps=8)


def _fp8(name: str = "tiny-random", **kw):
    return load(name, dtype="bfloat16", device="cuda", quantization="fp8", **kw)


def test_w8a8_layers_on_cuda_match_the_emulation():
    gpu = _fp8()
    cpu = load("tiny-random", dtype="bfloat16", quantization="fp8", fp8_emulation=True)
    g = torch.Generator().manual_seed(0)
    lin_gpu, lin_cpu = gpu.model.layers[0].self_attn.q_proj, cpu.model.layers[0].self_attn.q_proj
    assert lin_gpu.compute == "w8a8" and torch.equal(lin_gpu.weight.cpu(), lin_cpu.weight)
    x = torch.randn(37, lin_cpu.in_features, generator=g).to(torch.bfloat16)
    torch.testing.assert_close(lin_gpu(x.cuda()).cpu(), lin_cpu(x), rtol=2e-2, atol=1e-3)
    ex_gpu, ex_cpu = gpu.model.layers[0].experts, cpu.model.layers[0].experts
    counts = torch.tensor([5, 0, 17, 1, 0, 33, 2, 9])
    x = torch.randn(int(counts.sum()), ex_cpu.down_proj.shape[1], generator=g).to(torch.bfloat16)
    got = ex_gpu(ExpertBatch(x.cuda(), counts.cuda())).cpu().float()
    want = ex_cpu(ExpertBatch(x, counts)).float()
    assert float((got - want).norm() / want.norm()) < 2e-2, ex_gpu.grouped_backend


def test_trained_tiny_logits_on_cuda_match_the_emulation():
    tiny = SHIPPED_CHECKPOINTS["tiny"]
    gpu, cpu = _fp8(str(tiny)), load(tiny, dtype="bfloat16", quantization="fp8", fp8_emulation=True)
    prompt = cpu.tokenizer.encode("sort 9 4 7 1")
    canvas = torch.randint(0, cpu.config.text.vocab_size, (cpu.config.canvas_length,),
                           generator=torch.Generator().manual_seed(1))
    out = []
    for lm in (gpu, cpu):
        from bench.ar_baseline import new_kv

        kv = new_kv(lm.model)
        dev = lm.model.device
        with torch.inference_mode():
            lm.model(torch.tensor(prompt, device=dev), [Segment("encode", 0, len(prompt), 0)], kv)
            out.append(lm.model.logits(lm.model(canvas.to(dev), [Segment("denoise", 0, canvas.shape[0],
                                                                                len(prompt))], kv, None)).cpu())
    rel = float((out[0] - out[1]).norm() / out[1].norm())
    top1 = float((out[0].argmax(-1) == out[1].argmax(-1)).float().mean())
    assert rel < 0.03 and top1 > 0.95, (rel, top1)


def _runner(lm, graphs: bool, kernel: str) -> tuple[FastRunner, KVPagePool]:
    cfg = lm.config
    pool = KVPagePool(cfg, 64, 64, block_size=16, dtype=lm.model.dtype, device="cuda", scratch_tokens=cfg.canvas_length)
    # bucketed shapes even when eager: the eager runner's output is compared bit for bit with the graphed one's
    return FastRunner(lm.model, pool, num_slots=8, cuda_graphs=graphs, sampler_kernel=kernel, moe_kernel=kernel,
                      static_shapes=True), pool


def _rows(runner: FastRunner, pool: KVPagePool, n: int, prefix: int = 20) -> list[Row]:
    tables = []
    for _ in range(n):
        table = pool.new_table()
        assert pool.ensure_capacity(table, prefix + runner.canvas)
        tables.append(table)
    runner.run([Row(fs.PREFILL, i, 0, t, prefix, list(range(5, 5 + prefix))) for i, t in enumerate(tables)])
    for t in tables:
        t.mark_written(prefix)
    return [Row(fs.DENOISE, i, prefix, t, runner.canvas, fresh=True, cur_step=6, sampling=SAMPLING, seed=i)
            for i, t in enumerate(tables)]


@pytest.mark.parametrize("kernel", ["torch", "triton"])
def test_fp8_steady_state_step_does_not_synchronise(kernel):
    from bench.gpu_fast import sync_debug

    assert sync_debug(_fp8().model, sampler_kernel=kernel, moe_kernel=kernel)["moe_kernel"] == kernel


def test_fp8_graph_with_triton_kernels_replays_to_the_eager_step():
    lm = _fp8()
    eager, pool_e = _runner(lm, graphs=False, kernel="triton")
    graphed, pool_g = _runner(lm, graphs=True, kernel="triton")
    assert graphed.cuda_graphs and isinstance(lm.model.layers[0].experts, quant.Fp8ExpertWeights)
    rows_e, rows_g = _rows(eager, pool_e, 3), _rows(graphed, pool_g, 3)
    for step in range(4):
        for r in (*rows_e, *rows_g):
            r.fresh, r.cur_step = step == 0, 6 - step
        assert (eager.run(rows_e) == graphed.run(rows_g)).all(), step
    assert graphed._graphs


def test_engine_serves_fp8_with_triton_kernels_and_cuda_graphs():
    lm = _fp8()
    engine = Engine(lm.model, lm.generation, None, EngineConfig(kv_cache_memory=64 << 20, sampler_kernel="triton",
                                                                moe_kernel="triton"))
    assert engine.execution == "fast" and engine.runner.cuda_graphs
    for i in range(5):
        engine.add_request(GenerationRequest(prompt_ids=list(range(5, 20 + 7 * i)), max_tokens=70, seed=i,
                                             sampling=SAMPLING, request_id=f"r{i}", ignore_eos=True))
    events = engine.run_until_done()
    assert {e.request_id: e.finish_reason for e in events if isinstance(e, FinalEvent)} == {
        f"r{i}": "length" for i in range(5)}
    for i in range(5):
        assert sum(len(e.token_ids) for e in events if isinstance(e, CanvasEvent) and e.request_id == f"r{i}") == 70
