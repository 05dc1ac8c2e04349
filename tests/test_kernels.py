"""The Triton kernels of ``dgserve.kernels`` against the torch paths they replace: under ``TRITON_INTERPRET=1`` on
CPU (set here, before any kernel module is imported), compiled on CUDA where a GPU is present.

- the fused denoising sampler against ``fast_step.canvas_vocab_pass``: the entropy within 1e-5 relative, the same
  argmax, the same samples from the same uniforms, the soft embeddings within the rounding of their dtype; at the
  published vocabulary of 262,144 for one row, odd row counts and a vocabulary that is not a whole number of chunks;
- the fused MoE against the reference expert computation (one matmul per expert): bf16 and fp32, FP8 W8A8 against
  the CPU emulation, FP8 weight-only against the dequantized weights; experts without rows, odd row counts, no rows;
- the fast runner with both kernels chosen gives the torch runner's tokens.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from dgserve import kernels
from dgserve.engine import fast_step as fs
from dgserve.kernels import fused_moe, quantize
from dgserve.model import quantization as quant
from dgserve.model.checkpoint import _empty_model, load
from dgserve.model.config import TINY_RANDOM
from dgserve.model.moe import ExpertBatch, ExpertWeights, expert_runs

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
pytestmark = [pytest.mark.skipif(not kernels.available(DEVICE), reason="Triton cannot run here"),
              # masked lanes (past a row's end) compute inf - inf, and tanh's unused branch 0 / 0; never stored
              pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning")]


@pytest.fixture(autouse=True)
def _one_blas_thread():
    """The interpreter runs ``tl.dot`` as numpy matmuls, whose OpenBLAS thread pool only thrashes on a small shared
    machine (1,000x slower here). Compiled on a GPU, numpy is not involved."""
    if DEVICE.type == "cuda":
        yield
        return
    import threadpoolctl

    with threadpoolctl.threadpool_limits(limits=1, user_api="blas"):
        yield


def _vocab_model(vocab: int, hidden: int, dtype: torch.dtype, softcap: float | None):
    """A one-layer DiffusionGemma whose tied embedding is all the vocabulary pass reads."""
    text = TINY_RANDOM.text.model_copy(update={
        "vocab_size": vocab, "hidden_size": hidden, "num_hidden_layers": 1, "layer_types": ("full_attention",),
        "final_logit_softcapping": softcap})
    model = _empty_model(TINY_RANDOM.model_copy(update={"text": text}), dtype, DEVICE, None)
    g = torch.Generator().manual_seed(vocab)
    with torch.no_grad():
        model.embed_tokens.weight.copy_(torch.randn(vocab, hidden, generator=g) * 0.05)
    return model


SAMPLER_CASES = {
    # vocab, hidden, rows, dtype, temperature, softcap, hidden scale (spread of the logits)
    "published-vocab-one-row": (262_144, 32, 1, torch.float32, 0.6, 30.0, 25.0),
    "odd-rows-odd-vocab": (5_003, 48, 37, torch.float32, 0.8, 30.0, 20.0),
    "bf16": (3_000, 64, 21, torch.bfloat16, 0.5, 30.0, 20.0),
    "small-vocab-no-softcap": (777, 16, 5, torch.float32, 1.0, None, 4.0),
    "flat": (4_096, 16, 9, torch.float32, 0.9, 30.0, 2.0),
}


@pytest.mark.parametrize("case", SAMPLER_CASES)
def test_sampler_kernel_matches_torch_fast_path(case):
    vocab, hidden, rows, dtype, temp, softcap, spread = SAMPLER_CASES[case]
    model = _vocab_model(vocab, hidden, dtype, softcap)
    g = torch.Generator().manual_seed(rows)
    h = (torch.randn(rows, hidden, generator=g) * spread).to(dtype).to(DEVICE)
    u = torch.rand(rows, generator=g).to(DEVICE)
    t = torch.tensor(temp, device=DEVICE)
    with torch.inference_mode():
        want = fs.canvas_vocab_pass(model, h, t, u, torch.tensor(False, device=DEVICE))
        got = fs.kernel_vocab_pass(model, h, t, u, torch.tensor(False, device=DEVICE))
        greedy = fs.kernel_vocab_pass(model, h, t, u, torch.tensor(True, device=DEVICE))
    sample, argmax, entropy, soft = (x.cpu() for x in got)
    assert torch.equal(argmax, want[1].cpu())
    # the two paths sum in different orders: a uniform within ~1e-7 of a token's CDF boundary could pick its
    # neighbour; these inputs have none, and the draws follow the distribution (test_fast_path checks that)
    assert torch.equal(sample, want[0].cpu())
    assert rows == 1 or not torch.equal(sample, argmax)  # the rows sample, they do not all take the argmax
    # entropies near zero are fp32's resolution of log(sum) in both paths (~1e-7 absolute)
    torch.testing.assert_close(entropy, want[2].cpu(), rtol=1e-5, atol=1e-6)
    tol = {"rtol": 1e-4, "atol": 1e-5} if dtype == torch.float32 else {}
    torch.testing.assert_close(soft, want[3].cpu(), **tol)
    assert torch.equal(greedy[0].cpu(), argmax)


def _experts(hidden: int, inter: int, n: int, dtype: torch.dtype) -> ExpertWeights:
    ex = ExpertWeights(hidden, inter, list(range(n))).to(dtype).to(DEVICE)
    g = torch.Generator().manual_seed(hidden + inter)
    with torch.no_grad():
        ex.gate_up_proj.copy_(torch.randn(ex.gate_up_proj.shape, generator=g) * 0.1)
        ex.down_proj.copy_(torch.randn(ex.down_proj.shape, generator=g) * 0.1)
    return ex


def _fp8_experts(ref: ExpertWeights, compute: quant.Fp8Compute) -> quant.Fp8ExpertWeights:
    hidden, inter = ref.down_proj.shape[1:]
    with torch.device("meta"):
        ex = quant.Fp8ExpertWeights(hidden, inter, ref.expert_ids, compute, DEVICE)
    ex = ex.to_empty(device=DEVICE)
    quant.quantize_into_(ex.gate_up_proj, ex.gate_up_proj_scale, ref.gate_up_proj.data)
    quant.quantize_into_(ex.down_proj, ex.down_proj_scale, ref.down_proj.data)
    return ex


COUNTS = {
    "zero-count-experts": [5, 0, 17, 1, 0, 33, 2, 9],
    "one-expert-takes-all": [0, 0, 0, 67, 0, 0, 0, 0],
    "no-rows": [0] * 8,
}


def _batch(counts: list[int], hidden: int, dtype: torch.dtype) -> ExpertBatch:
    x = torch.randn(sum(counts), hidden, generator=torch.Generator().manual_seed(sum(counts)))
    return ExpertBatch(x.to(dtype).to(DEVICE), torch.tensor(counts, device=DEVICE))


def _runs(batch: ExpertBatch) -> list[tuple[int, int]]:
    return [(i, int(n)) for i, n in enumerate(batch.counts.tolist())]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("counts", COUNTS)
def test_fused_moe_matches_reference_experts(counts, dtype):
    ex = _experts(64, 48, 8, dtype)
    batch = _batch(COUNTS[counts], 64, dtype)
    want = expert_runs(batch.x, _runs(batch), ex)
    ex.kernel = "triton"
    got = ex(batch)
    assert got.shape == want.shape and got.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    else:  # bf16: the kernel rounds where torch rounds (projections, gelu, product); sums in another order
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fused_moe_fp8_w8a8_matches_emulation(dtype):
    """W8A8 in the kernel (fp8 x fp8 dots, scales in the epilogue) against the emulation's fp32 arithmetic, and both
    near the unquantized experts (e4m3 keeps 3 mantissa bits)."""
    ref = _experts(64, 48, 8, dtype)
    ex = _fp8_experts(ref, "emulated")
    batch = _batch(COUNTS["zero-count-experts"], 64, dtype)
    emulated = ex(batch)
    ex.kernel = "triton"
    got = ex(batch)
    if dtype == torch.float32:
        torch.testing.assert_close(got, emulated, rtol=1e-5, atol=1e-6)
    else:
        torch.testing.assert_close(got, emulated)
    full = expert_runs(batch.x, _runs(batch), ref).float()
    assert float((got.float() - full).norm() / full.norm()) < 0.08


def test_fused_moe_fp8_weight_only_matches_dequantized_weights():
    ref = _experts(64, 48, 8, torch.float32)
    ex = _fp8_experts(ref, "emulated")
    batch = _batch(COUNTS["zero-count-experts"], 64, torch.float32)
    got = fused_moe.expert_mlp(batch.x, batch.counts, ex.gate_up_proj, ex.down_proj, ex.gate_up_proj_scale,
                               ex.down_proj_scale, quantize=None)
    dequantized = _experts(64, 48, 8, torch.float32)
    with torch.no_grad():
        dequantized.gate_up_proj.copy_(quant.dequantize(ex.gate_up_proj, ex.gate_up_proj_scale, torch.float32))
        dequantized.down_proj.copy_(quant.dequantize(ex.down_proj, ex.down_proj_scale, torch.float32))
    torch.testing.assert_close(got, expert_runs(batch.x, _runs(batch), dequantized), rtol=1e-5, atol=1e-6)


def test_fp8_linear_through_the_kernel_matches_emulation():
    """A dense FP8 layer through the grouped kernel (one group), W8A8 and weight-only."""
    g = torch.Generator().manual_seed(3)
    w, s = quant.quantize_weight(torch.randn(80, 64, generator=g) * 0.1)
    x = torch.randn(13, 64, generator=g)
    w, s, x = w.to(DEVICE), s.to(DEVICE), x.to(DEVICE)
    torch.testing.assert_close(quant.fp8_linear(x, w, s, "w8a8", "triton"), quant.fp8_linear(x, w, s, "emulated",
                                                                                          "emulated"))
    torch.testing.assert_close(quant.fp8_linear(x, w, s, "weight_only", "triton"), x @ (w.float() * s[:, None]).t(),
                               rtol=1e-5, atol=1e-6)


def test_quantize_kernel_is_bit_identical_to_torch():
    """Per-token FP8 quantization in one kernel against the torch ops: the same scales and the same e4m3 bits,
    across magnitudes (a zero row, values in e4m3's subnormal range, roundings that carry into the exponent)."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(45, 300, generator=g) * torch.logspace(-3, 3, 45)[:, None]
    x[3] = 0
    x[7, :5] = torch.tensor([1.0, 127.6 / 448, -0.999, 2.0 ** -8, 3 * 2.0 ** -10])  # row amax 1: scale 1/448
    for dtype in (torch.float32, torch.bfloat16):
        xs = x.to(dtype).to(DEVICE)
        q, s = quantize.quantize_rows(xs)
        q_ref, s_ref = quant.quantize_rows(xs.cpu())
        assert torch.equal(s.cpu(), s_ref)
        assert torch.equal(q.cpu().view(torch.uint8), q_ref.view(torch.uint8))


def test_fast_runner_with_both_kernels_gives_the_torch_runners_tokens():
    """Engine steps of the fast path with the Triton sampler and MoE chosen: the same tokens as with torch."""
    from dgserve.engine.engine import Engine, EngineConfig
    from dgserve.engine.request import CanvasEvent, GenerationRequest
    from dgserve.model.generation_config import SamplingParams

    tiny = load("tiny-random", device=DEVICE)
    out = {}
    for kernel in ("torch", "triton"):
        engine = Engine(tiny.model, tiny.generation, None, EngineConfig(
            execution="fast", kv_cache_memory=8 << 20, sampler_kernel=kernel, moe_kernel=kernel, cuda_graphs=False))
        assert engine.runner.sampler_kernel == engine.runner.moe_kernel == kernel
        for i in range(2):
            engine.add_request(GenerationRequest(prompt_ids=list(range(5, 12 + 5 * i)), max_tokens=20, seed=i,
                                                 sampling=SamplingParams(max_denoising_steps=2),
                                                 request_id=f"r{i}", ignore_eos=True))
        tokens: dict[str, list[int]] = {}
        while engine.has_work():
            for ev in engine.step():
                if isinstance(ev, CanvasEvent):
                    tokens.setdefault(ev.request_id, []).extend(ev.token_ids)
        out[kernel] = tokens
    assert out["triton"] == out["torch"] and all(len(t) == 20 for t in out["torch"].values())


def test_triton_choice_where_it_cannot_run_is_a_clear_error():
    with pytest.raises(ValueError, match="moe_kernel: triton"):
        kernels.resolve("triton", "moe", torch.device("meta"))
    assert kernels.resolve("auto", "sampler", torch.device("cpu")) == "torch"
