"""The fused MoE expert kernel: both projections of every expert's gated gelu-tanh MLP over rows grouped by expert,
in two launches of one grouped GEMM kernel, without a host synchronisation.

Rows arrive sorted by local expert with a device tensor of per-expert counts (``dgserve.model.moe.ExpertBatch``).
Each program of ``_expert_gemm_kernel`` derives its block of ``BM`` rows and their expert from the counts itself
(blocks per expert ``ceil(count / BM)``, a prefix sum over the experts: the alignment vLLM's
``moe_align_block_size`` does in a kernel of its own), so the grid is static (``ceil(rows / BM) + experts`` blocks,
the spare ones exit at once) and an expert without rows costs nothing. The first launch computes the gate and up
projections of a tile together and writes ``gelu_tanh(gate) * up``; the second the down projection. The routing
weights are applied by the dispatcher's fp32 combine, as for the other expert paths.

Weights are bf16/fp32, or FP8 e4m3 with per-(expert, output channel) scales: with FP8 activations (W8A8: rows
quantized per token by the caller's ``quantize``) the tile product is an fp8 x fp8 dot, scaled in the epilogue;
without (weight-only FP8) the weight tile is converted to the activations' dtype in the kernel.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import triton
import triton.language as tl

from dgserve.kernels import dot_in_fp32
from dgserve.kernels.elementwise import gelu_tanh, round_to_bf16

Quantize = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@triton.jit
def _mma(acc, a, b, B_TO_A: tl.constexpr, IEEE: tl.constexpr):
    if IEEE:  # fp32 operands (and the interpreter, whose bf16 dot is broken): exact products, fp32 sums
        return acc + tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    if B_TO_A:  # weight-only FP8: the weight tile in the activations' dtype (exact for e4m3 in bf16)
        b = b.to(a.dtype)
    return tl.dot(a, b, acc)


@triton.jit
def _expert_gemm_kernel(a_ptr, a_scale_ptr, b_ptr, b_scale_ptr, c_ptr, counts_ptr, num_experts, n_out, k_dim,
                        stride_am, stride_be, stride_bn, stride_bse, stride_cm,
                        GATED: tl.constexpr, A_SCALED: tl.constexpr, B_SCALED: tl.constexpr, B_TO_A: tl.constexpr,
                        IEEE: tl.constexpr, OUT_BF16: tl.constexpr, E_P2: tl.constexpr, BM: tl.constexpr,
                        BN: tl.constexpr, BK: tl.constexpr):
    """``c[rows, cols] = a[rows] @ b[expert, cols]^T`` for the block of rows of program 0's index; ``GATED``:
    ``b`` holds gate rows ``[0, n_out)`` and up rows ``[n_out, 2 n_out)`` and ``c = gelu_tanh(gate) * up``."""
    pid_b = tl.program_id(0)
    pid_n = tl.program_id(1)
    # alignment on the device: the expert and the rows of this block, from the per-expert row counts
    e = tl.arange(0, E_P2)
    counts = tl.load(counts_ptr + e, mask=e < num_experts, other=0)
    blocks = (counts + BM - 1) // BM
    expert = tl.sum((tl.cumsum(blocks, 0) <= pid_b).to(tl.int32), 0)  # num_experts: a spare block
    valid = expert < num_experts
    before = e < expert
    row0 = tl.sum(tl.where(before, counts, 0), 0) + (pid_b - tl.sum(tl.where(before, blocks, 0), 0)) * BM
    row_end = tl.sum(tl.where(e <= expert, counts, 0), 0)
    rows = row0 + tl.arange(0, BM)
    rmask = rows < row_end  # a spare block starts past the last row
    cols = pid_n * BN + tl.arange(0, BN)
    cmask = cols < n_out
    ek = tl.minimum(expert, num_experts - 1).to(tl.int64)
    b_base = b_ptr + ek * stride_be
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    acc_up = tl.zeros((BM, BN), dtype=tl.float32)
    k_hi = tl.where(valid, k_dim, 0)  # a spare block runs no iteration
    for k0 in range(0, k_hi, BK):
        ks = k0 + tl.arange(0, BK)
        kmask = ks < k_dim
        a = tl.load(a_ptr + rows[:, None].to(tl.int64) * stride_am + ks[None, :],
                    mask=rmask[:, None] & kmask[None, :], other=0.0)
        bmask = kmask[:, None] & cmask[None, :]
        b = tl.load(b_base + cols[None, :] * stride_bn + ks[:, None], mask=bmask, other=0.0)  # [BK, BN]
        acc = _mma(acc, a, b, B_TO_A, IEEE)
        if GATED:
            bu = tl.load(b_base + (cols[None, :] + n_out) * stride_bn + ks[:, None], mask=bmask, other=0.0)
            acc_up = _mma(acc_up, a, bu, B_TO_A, IEEE)
    if B_SCALED:  # per (expert, output channel)
        scale_base = b_scale_ptr + ek * stride_bse
        acc = acc * tl.load(scale_base + cols, mask=cmask, other=0.0)[None, :]
        if GATED:
            acc_up = acc_up * tl.load(scale_base + n_out + cols, mask=cmask, other=0.0)[None, :]
    if A_SCALED:  # per row (token)
        a_scale = tl.load(a_scale_ptr + rows, mask=rmask, other=0.0)[:, None]
        acc = acc * a_scale
        acc_up = acc_up * a_scale
    if GATED:
        if OUT_BF16:  # torch's order of roundings: bf16 projections, gelu rounded, then the rounded product
            out = round_to_bf16(round_to_bf16(gelu_tanh(round_to_bf16(acc))) * round_to_bf16(acc_up))
        else:
            out = gelu_tanh(acc) * acc_up
    else:
        out = round_to_bf16(acc) if OUT_BF16 else acc
    tl.store(c_ptr + rows[:, None].to(tl.int64) * stride_cm + cols[None, :], out.to(c_ptr.dtype.element_ty),
             mask=rmask[:, None] & cmask[None, :])


def _blocks(rows: int, experts: int, device: torch.device) -> tuple[int, int, int]:
    """(BM, BN, BK): BM follows the mean rows per expert (vLLM's configs do the same by batch size)."""
    if device.type != "cuda":  # the interpreter: few, wide programs
        return 16, 64, 128
    per_expert = rows / max(1, experts)
    bm = 16 if per_expert <= 16 else 32 if per_expert <= 48 else 64
    return bm, 64, 128 if per_expert > 48 else 64


def _gemm(a: torch.Tensor, a_scale: torch.Tensor | None, w: torch.Tensor, w_scale: torch.Tensor | None,
          counts: torch.Tensor, n_out: int, gated: bool, out_dtype: torch.dtype) -> torch.Tensor:
    rows, k_dim = a.shape
    experts = counts.shape[0]
    c = torch.empty(rows, n_out, dtype=out_dtype, device=a.device)
    bm, bn, bk = _blocks(rows, experts, a.device)
    grid = (-(-rows // bm) + experts, -(-n_out // bn))
    ieee = dot_in_fp32(a.device) or a.dtype == torch.float32
    _expert_gemm_kernel[grid](
        a, a_scale if a_scale is not None else a, w, w_scale if w_scale is not None else w, c, counts, experts, n_out,
        k_dim, a.stride(0), w.stride(0), w.stride(1), w_scale.stride(0) if w_scale is not None else 0, c.stride(0),
        GATED=gated, A_SCALED=a_scale is not None, B_SCALED=w_scale is not None,
        B_TO_A=w.dtype != a.dtype, IEEE=ieee, OUT_BF16=out_dtype == torch.bfloat16,
        E_P2=max(2, 1 << (experts - 1).bit_length()), BM=bm, BN=bn, BK=bk)
    return c


def expert_mlp(x: torch.Tensor, counts: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor,
               gate_up_scale: torch.Tensor | None = None, down_scale: torch.Tensor | None = None,
               quantize: Quantize | None = None) -> torch.Tensor:
    """Expert MLPs over ``x [N, H]`` grouped by expert (``counts [E]`` rows each, a device tensor): ``gate_up
    [E, 2I, H]``, ``down [E, H, I]`` (FP8 with ``*_scale [E, 2I]`` / ``[E, H]``). ``quantize`` (W8A8): the per-row
    activation quantizer, applied to ``x`` and to the intermediate. Returns ``[N, H]`` in x's dtype."""
    rows, hidden = x.shape
    if rows == 0:
        return x.new_empty(0, hidden)
    inter = down.shape[-1]
    counts = counts.contiguous()
    a, a_scale = quantize(x) if quantize is not None else (x.contiguous(), None)
    h = _gemm(a, a_scale, gate_up, gate_up_scale, counts, inter, True, x.dtype)
    a, a_scale = quantize(h) if quantize is not None else (h, None)
    return _gemm(a, a_scale, down, down_scale, counts, hidden, False, x.dtype)


def grouped_linear(x: torch.Tensor, counts: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None = None,
                   quantize: Quantize | None = None) -> torch.Tensor:
    """One projection of rows grouped by expert: ``x [N, K]`` against ``weight [E, N_out, K]`` (FP8 with ``scale
    [E, N_out]``); with ``counts = [N]`` and ``E = 1``, a plain (FP8) linear layer. Returns x's dtype."""
    if x.shape[0] == 0:
        return x.new_empty(0, weight.shape[1])
    a, a_scale = quantize(x) if quantize is not None else (x.contiguous(), None)
    return _gemm(a, a_scale, weight, scale, counts.contiguous(), weight.shape[1], False, x.dtype)
