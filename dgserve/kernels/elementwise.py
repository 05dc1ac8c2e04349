"""Elementwise helpers shared by the Triton kernels, written so that Triton's CPU interpreter (the tests) computes
what a GPU computes: tanh without libdevice (the interpreter has none), the tanh-approximated gelu, and
round-to-nearest-even from fp32 to bf16 (a GPU's ``x.to(tl.bfloat16)`` rounds to nearest even, the interpreter
truncates; rounding first with integer ops gives the same bits on both).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def tanh(y):
    """tanh to a few ulp: expm1 by Kahan's trick, tanh(a) = expm1(2a) / (expm1(2a) + 2), saturating past
    |y| = 10 (tanh(10) rounds to 1 in fp32)."""
    a = tl.minimum(tl.abs(y), 10.0)
    x = 2.0 * a
    v = tl.exp(x)
    em1 = tl.where(v == 1.0, x, (v - 1.0) * (x / tl.log(v)))
    t = em1 / (em1 + 2.0)
    return tl.where(y < 0, -t, t)


@triton.jit
def gelu_tanh(x):
    """``F.gelu(x, approximate="tanh")`` in fp32, in torch's order of operations."""
    inner = 0.7978845608028654 * (x + 0.044715 * (x * x * x))
    return 0.5 * x * (1.0 + tanh(inner))


@triton.jit
def round_to_bf16(x):
    """fp32 ``x`` rounded to the nearest bf16 value (ties to even), still as fp32; finite inputs."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def round_to_e4m3(v):
    """fp32 ``v`` (``|v| <= 448``) rounded to the nearest float8 e4m3 value (ties to even), still as fp32. The
    interpreter's conversion to fp8 mishandles a rounding that carries into the exponent (127.6 became 64); after
    this the conversion is exact on both. Normal values keep 3 mantissa bits; below 2^-6 the grid is 2^-9, reached
    by adding and subtracting 1.5 * 2^14 (whose fp32 ulp is 2^-9)."""
    bits = v.to(tl.uint32, bitcast=True)
    normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) & 0xFFF00000).to(tl.float32, bitcast=True)
    subnormal = (v + 24576.0) - 24576.0
    return tl.where(tl.abs(v) < 0.015625, subnormal, normal)
