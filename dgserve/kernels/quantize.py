"""Dynamic per-token FP8 quantization of activations in one Triton kernel: each row's absolute maximum, its scale
(``amax / 448``), and the row divided by it, rounded to e4m3, in one read of the row (the torch version,
``dgserve.model.quantization.quantize_rows``, is nine kernels when it is not compiled). Bit-identical to it: the
division is correctly rounded (``div_rn``) and the rounding to e4m3 is to nearest even.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dgserve.kernels.elementwise import round_to_e4m3

FP8_MAX = 448.0
TINY = 1e-12  # as dgserve.model.quantization: an all-zero row keeps a finite scale


@triton.jit
def _quantize_rows_kernel(x_ptr, q_ptr, s_ptr, rows, k_dim, stride_x, stride_q, ROWS: tl.constexpr,
                          BLOCK: tl.constexpr):
    r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    k = tl.arange(0, BLOCK)
    mask = (r < rows)[:, None] & (k < k_dim)[None, :]
    x = tl.load(x_ptr + r[:, None].to(tl.int64) * stride_x + k[None, :], mask=mask, other=0.0).to(tl.float32)
    scale = tl.maximum(tl.max(tl.abs(x), 1), TINY) / FP8_MAX
    q = tl.minimum(tl.maximum(tl.math.div_rn(x, scale[:, None]), -FP8_MAX), FP8_MAX)
    tl.store(q_ptr + r[:, None].to(tl.int64) * stride_q + k[None, :], round_to_e4m3(q).to(tl.float8e4nv), mask=mask)
    tl.store(s_ptr + r, scale, mask=r < rows)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [T, K]`` -> e4m3 ``[T, K]`` and fp32 scales ``[T, 1]``."""
    rows, k_dim = x.shape
    q = torch.empty(rows, k_dim, dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty(rows, 1, dtype=torch.float32, device=x.device)
    if rows == 0:
        return q, scale
    x = x if x.stride(-1) == 1 else x.contiguous()
    block = 1 << max(4, (k_dim - 1).bit_length())
    per_program = max(1, min(16, 8192 // block))  # a few rows per program when they are short
    _quantize_rows_kernel[(-(-rows // per_program),)](x, q, scale, rows, k_dim, x.stride(0), q.stride(0),
                                                      ROWS=per_program, BLOCK=block)
    return q, scale
