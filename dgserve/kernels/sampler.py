"""The fused denoising sampler: everything the fast path's sampler needs from a canvas' ``[C, V]`` logits, in three
Triton kernels that never write a ``[C, V]`` tensor of their own.

1. ``_stats_kernel`` (one program per row and vocabulary chunk): one read of the chunk computes its online softmax
   statistics (max, sum of exponentials, the entropy's sum of ``exp(x - max) * (x - max)``), its argmax, and the
   same max and sum over the logits rounded to the model dtype (the self-conditioning softmax's input).
2. ``_finish_kernel`` (one program per row): combines the chunks' statistics into the entropy and the argmax, finds
   the chunk the row's uniform falls in from the chunks' probability masses (the first level of the inverse CDF,
   as ``dgserve.engine.denoising.inverse_cdf_sample`` does with blocks of the same size), and reads that one chunk
   again for the token within it.
3. ``_soft_embed_kernel``: the soft embeddings ``softmax(logits) @ E`` as a tiled matmul whose left operand is
   computed from the logits tile by tile (split over the vocabulary), so probabilities never reach memory.

The logit transform of ``DiffusionGemma.logits`` (tanh softcapping in fp32) and the temperature are applied in the
kernels, on the raw LM-head output in the model dtype. :func:`vocab_pass` is the entry point.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dgserve.kernels import dot_in_fp32
from dgserve.kernels.elementwise import round_to_bf16, tanh

CHUNK = 1024  # inverse_cdf_sample's block: the same two-level structure, so the same draws
_ROUND = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


@triton.jit
def _scaled(x, cap, temp, HAS_CAP: tl.constexpr):
    """``DiffusionGemma.logits``' softcapping, then the temperature, in fp32 (the torch path's order)."""
    x = x.to(tl.float32)
    if HAS_CAP:
        x = tanh(x / cap) * cap
    return x / temp


@triton.jit
def _rounded(x, ROUND: tl.constexpr):
    if ROUND == 1:
        x = round_to_bf16(x)
    elif ROUND == 2:
        x = x.to(tl.float16).to(tl.float32)
    return x


@triton.jit
def _stats_kernel(logits_ptr, stride_row, temp_ptr, m_ptr, s_ptr, w_ptr, i_ptr, mr_ptr, sr_ptr, vocab, chunk, nchunk,
                  cap, HAS_CAP: tl.constexpr, ROUND: tl.constexpr, CHUNK_P2: tl.constexpr, PER_PROGRAM: tl.constexpr):
    """Statistics of ``PER_PROGRAM`` consecutive chunks of one row, a ``[PER_PROGRAM, CHUNK_P2]`` tile."""
    row = tl.program_id(0)
    cs = tl.program_id(1) * PER_PROGRAM + tl.arange(0, PER_PROGRAM)  # chunk ids
    j = tl.arange(0, CHUNK_P2)
    offs = cs[:, None] * chunk + j[None, :]
    ok = (j[None, :] < chunk) & (offs < vocab)
    raw = tl.load(logits_ptr + row * stride_row + offs, mask=ok, other=0.0)
    x = tl.where(ok, _scaled(raw, cap, tl.load(temp_ptr), HAS_CAP), float("-inf"))
    m = tl.max(x, 1)
    d = tl.where(ok, x - m[:, None], 0.0)
    e = tl.where(ok, tl.exp(d), 0.0)
    out = row * nchunk + cs
    here = cs < nchunk
    tl.store(m_ptr + out, m, mask=here)
    tl.store(s_ptr + out, tl.sum(e, 1), mask=here)
    tl.store(w_ptr + out, tl.sum(e * d, 1), mask=here)
    tl.store(i_ptr + out, (cs * chunk + tl.argmax(x, 1)).to(tl.int32), mask=here)  # ties: the first, as torch
    if ROUND != 0:
        xr = tl.where(ok, _rounded(x, ROUND), float("-inf"))
        mr = tl.max(xr, 1)
        tl.store(mr_ptr + out, mr, mask=here)
        tl.store(sr_ptr + out, tl.sum(tl.where(ok, tl.exp(xr - mr[:, None]), 0.0), 1), mask=here)


@triton.jit
def _finish_kernel(logits_ptr, stride_row, temp_ptr, u_ptr, m_ptr, s_ptr, w_ptr, i_ptr, mr_ptr, sr_ptr, sample_ptr,
                   argmax_ptr, entropy_ptr, soft_a_ptr, soft_b_ptr, vocab, chunk, nchunk, cap,
                   HAS_CAP: tl.constexpr, ROUND: tl.constexpr, CHUNK_P2: tl.constexpr, NCHUNK_P2: tl.constexpr):
    row = tl.program_id(0)
    j = tl.arange(0, NCHUNK_P2)
    okj = j < nchunk
    base = row * nchunk
    m = tl.load(m_ptr + base + j, mask=okj, other=float("-inf"))
    s = tl.load(s_ptr + base + j, mask=okj, other=0.0)
    w = tl.load(w_ptr + base + j, mask=okj, other=0.0)
    idx = tl.load(i_ptr + base + j, mask=okj, other=2147483647)
    big_m = tl.max(m, 0)
    f = tl.where(okj, tl.exp(m - big_m), 0.0)
    big_s = tl.sum(s * f, 0)
    # sum over the row of exp(x - M) * (x - M), from each chunk's sums around its own max
    big_w = tl.sum(tl.where(okj, f * (w + (m - big_m) * s), 0.0), 0)
    log_s = tl.log(big_s)
    tl.store(entropy_ptr + row, log_s - big_w / big_s)
    amax = tl.min(tl.where(okj & (m == big_m), idx, 2147483647), 0)
    tl.store(argmax_ptr + row, amax.to(tl.int64))

    # inverse CDF, level one: the chunk whose cumulative mass first exceeds u * total
    mass = s * f / big_s
    cdf = tl.cumsum(mass, 0)
    total = tl.sum(tl.where(j == nchunk - 1, cdf, 0.0), 0)
    target = tl.load(u_ptr + row) * total
    b = tl.minimum(tl.sum(((cdf <= target) & okj).to(tl.int32), 0), nchunk - 1)
    before = tl.sum(tl.where(j == b - 1, cdf, 0.0), 0)
    # level two: the token within that chunk (the chunk's padding has probability 0, as torch's zero padding)
    k = tl.arange(0, CHUNK_P2)
    offs = b * chunk + k
    ok = (k < chunk) & (offs < vocab)
    raw = tl.load(logits_ptr + row * stride_row + offs, mask=ok, other=0.0)
    p = tl.where(ok, tl.exp(_scaled(raw, cap, tl.load(temp_ptr), HAS_CAP) - big_m - log_s), 0.0)
    within = tl.cumsum(p, 0)
    pos = tl.minimum(tl.sum(((within <= target - before) & (k < chunk)).to(tl.int32), 0), chunk - 1)
    pick = tl.minimum(b * chunk + pos, vocab - 1)
    p_pick = tl.sum(tl.where(offs == pick, p, 0.0), 0)
    # a zero-probability pick (a rounding boundary) falls back to the argmax, as the torch path does
    tl.store(sample_ptr + row, tl.where(p_pick > 0, pick, amax).to(tl.int64))

    # the softmax the soft embeddings use: of the logits rounded to the model dtype (fp32 models: the same one)
    if ROUND != 0:
        mr = tl.load(mr_ptr + base + j, mask=okj, other=float("-inf"))
        sr = tl.load(sr_ptr + base + j, mask=okj, other=0.0)
        big_mr = tl.max(mr, 0)
        tl.store(soft_a_ptr + row, big_mr)
        tl.store(soft_b_ptr + row, tl.sum(sr * tl.where(okj, tl.exp(mr - big_mr), 0.0), 0))
    else:
        tl.store(soft_a_ptr + row, big_m)
        tl.store(soft_b_ptr + row, log_s)


@triton.jit
def _soft_embed_kernel(logits_ptr, stride_row, temp_ptr, a_ptr, b_ptr, emb_ptr, stride_emb, out_ptr, rows, vocab,
                       hidden, cap, k_per_split, HAS_CAP: tl.constexpr, ROUND: tl.constexpr, IEEE: tl.constexpr,
                       BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    r = pid_m * BM + tl.arange(0, BM)
    n = pid_n * BN + tl.arange(0, BN)
    rmask = r < rows
    nmask = n < hidden
    temp = tl.load(temp_ptr)
    a = tl.load(a_ptr + r, mask=rmask, other=0.0)[:, None]
    b = tl.load(b_ptr + r, mask=rmask, other=1.0)[:, None]
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    k_lo = pid_k * k_per_split
    k_hi = tl.minimum(vocab, k_lo + k_per_split)
    for k0 in range(k_lo, k_hi, BK):
        k = k0 + tl.arange(0, BK)
        kmask = k < k_hi
        lmask = rmask[:, None] & kmask[None, :]
        x = _scaled(tl.load(logits_ptr + r[:, None] * stride_row + k[None, :], mask=lmask, other=0.0), cap, temp,
                    HAS_CAP)
        # a, b: the row's max and log-sum (fp32 models: exp(log_softmax)), or the max and sum of the logits rounded
        # to the model dtype (torch.softmax of them)
        p = tl.exp(x - a - b) if ROUND == 0 else tl.exp(_rounded(x, ROUND) - a) / b
        p = tl.where(lmask, p, 0.0)
        if ROUND == 1:
            p = round_to_bf16(p)
        p = p.to(emb_ptr.dtype.element_ty)  # torch: probs.to(embedding dtype) @ E
        e = tl.load(emb_ptr + k[:, None] * stride_emb + n[None, :], mask=kmask[:, None] & nmask[None, :], other=0.0)
        if IEEE:
            acc += tl.dot(p.to(tl.float32), e.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(p, e)
    tl.store(out_ptr + pid_k * rows * hidden + r[:, None] * hidden + n[None, :], acc,
             mask=rmask[:, None] & nmask[None, :])


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _soft_blocks(rows: int, hidden: int, device: torch.device) -> tuple[int, int, int]:
    if device.type != "cuda":  # the interpreter: few, wide programs
        return 16, min(64, _next_pow2(hidden)), 8192
    return 64, 128, 64


def vocab_pass(hidden: torch.Tensor, embedding: torch.Tensor, embed_scale: float, softcap: float | None,
               temp: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One canvas: ``hidden [C, H]`` (model dtype) against the tied ``embedding [V, H]``, temperature ``temp`` (a
    one-element fp32 tensor), uniforms ``u [C]``. Returns (sample, argmax, entropy, soft ``[C, H]``), what
    ``dgserve.engine.fast_step.canvas_vocab_pass`` returns without its greedy switch."""
    device = hidden.device
    logits = torch.nn.functional.linear(hidden, embedding)  # [C, V] in the model dtype: the one vocab-sized tensor
    rows, vocab = logits.shape
    chunk = min(CHUNK, vocab)
    nchunk = -(-vocab // chunk)
    rnd = _ROUND[embedding.dtype]
    temp = temp.reshape(1).to(torch.float32)
    u = u.to(torch.float32).contiguous()
    part = torch.empty(5 if rnd else 3, rows, nchunk, dtype=torch.float32, device=device)
    mr, sr = (part[3], part[4]) if rnd else (part[0], part[0])  # fp32 models: unused
    idx = torch.empty(rows, nchunk, dtype=torch.int32, device=device)
    cap = float(softcap) if softcap else 1.0
    chunk_p2 = _next_pow2(chunk)
    per_program = 1 if device.type == "cuda" else 32  # the interpreter's cost is per program
    _stats_kernel[(rows, -(-nchunk // per_program))](
        logits, logits.stride(0), temp, part[0], part[1], part[2], idx, mr, sr, vocab, chunk, nchunk, cap,
        HAS_CAP=bool(softcap), ROUND=rnd, CHUNK_P2=chunk_p2, PER_PROGRAM=per_program)
    sample = torch.empty(rows, dtype=torch.long, device=device)
    argmax = torch.empty(rows, dtype=torch.long, device=device)
    entropy = torch.empty(rows, dtype=torch.float32, device=device)
    soft_a = torch.empty(rows, dtype=torch.float32, device=device)
    soft_b = torch.empty(rows, dtype=torch.float32, device=device)
    _finish_kernel[(rows,)](logits, logits.stride(0), temp, u, part[0], part[1], part[2], idx, mr, sr, sample, argmax,
                            entropy, soft_a, soft_b, vocab, chunk, nchunk, cap, HAS_CAP=bool(softcap), ROUND=rnd,
                            CHUNK_P2=chunk_p2, NCHUNK_P2=max(2, _next_pow2(nchunk)))
    soft = soft_embeddings(logits, temp, soft_a, soft_b, embedding, cap, bool(softcap), rnd)
    return sample, argmax, entropy, soft.to(embedding.dtype) * embed_scale


def soft_embeddings(logits: torch.Tensor, temp: torch.Tensor, soft_a: torch.Tensor, soft_b: torch.Tensor,
                    embedding: torch.Tensor, cap: float, has_cap: bool, rnd: int) -> torch.Tensor:
    """``softmax(logits) @ E`` ``[C, H]`` fp32 (unscaled), the softmax rebuilt tile by tile from the row statistics."""
    rows, vocab = logits.shape
    hidden = embedding.shape[1]
    device = logits.device
    bm, bn, bk = _soft_blocks(rows, hidden, device)
    tiles = -(-rows // bm) * -(-hidden // bn)
    # split the vocabulary so that a one-canvas pass still fills the GPU (the partial sums add up in fp32 below)
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
    split = max(1, min(-(-2 * sms // tiles), vocab // (16 * bk)))
    k_per_split = -(-vocab // (split * bk)) * bk
    split = -(-vocab // k_per_split)
    out = torch.empty(split, rows, hidden, dtype=torch.float32, device=device)
    _soft_embed_kernel[(-(-rows // bm), -(-hidden // bn), split)](
        logits, logits.stride(0), temp, soft_a, soft_b, embedding, embedding.stride(0), out, rows, vocab, hidden, cap,
        k_per_split, HAS_CAP=has_cap, ROUND=rnd, IEEE=dot_in_fp32(device) or embedding.dtype == torch.float32,
        BM=bm, BN=bn, BK=bk)
    return out[0] if split == 1 else out.sum(0)
