"""Counter-based random numbers for the fast path: a pure function of (seed, canvas, step, stream, position).

The exact path consumes each request's ``torch.Generator`` in the reference's order, which ties the tokens to
that generator's sequential state. The fast path instead hashes counters: no generator state to carry, the same
numbers on CPU and GPU, in any batch, inside a compiled graph or a CUDA graph, and after a failover (the seed
and the canvas index are all a continuation needs). The hash is Chris Wellons' ``lowbias32``, computed in int64
arithmetic that never overflows (32-bit products are split into 16-bit halves), so it is exact on every device.
"""

from __future__ import annotations

import torch

MASK32 = 0xFFFFFFFF
# streams: which use of the randomness a number is for
INITIAL_CANVAS = 1
SAMPLE = 2
RENOISE = 3


def _mul32(x: torch.Tensor, m: int) -> torch.Tensor:
    """``(x * m) mod 2**32`` for ``0 <= x < 2**32`` without leaving int64's range."""
    lo, hi = m & 0xFFFF, m >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & MASK32


def hash32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 over int64 tensors holding 32-bit values."""
    x = x & MASK32
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def stream_keys(seed_lo: torch.Tensor, seed_hi: torch.Tensor, canvas_index: torch.Tensor, step: torch.Tensor,
                stream: int) -> torch.Tensor:
    """``[S]`` 32-bit keys, one per row, from the seed's low and high 32 bits and the canvas / step counters
    (int tensors; 32-bit values may arrive sign-extended from int32 storage)."""
    key = hash32(seed_lo.long() & MASK32)
    key = hash32(key ^ (seed_hi.long() & MASK32))
    key = hash32(key ^ canvas_index.long())
    key = hash32(key ^ step.long())
    return hash32(key ^ stream)


def position_bits(keys: torch.Tensor, length: int) -> torch.Tensor:
    """``[S, length]`` 32-bit values: each row's key hashed with each position."""
    pos = torch.arange(length, device=keys.device, dtype=torch.long)
    return hash32(keys[:, None] ^ _mul32(pos[None, :] + 1, 0x9E3779B9))


def uniforms(keys: torch.Tensor, length: int) -> torch.Tensor:
    """``[S, length]`` float32 uniforms in (0, 1): 24 random bits, centred in their interval."""
    bits = position_bits(keys, length) >> 8
    return (bits.to(torch.float32) + 0.5) * (1.0 / (1 << 24))


def randint(keys: torch.Tensor, length: int, high: int) -> torch.Tensor:
    """``[S, length]`` integers in ``[0, high)`` (``high <= 2**31``), by multiply-shift of 32 random bits."""
    assert 0 < high <= 1 << 31
    bits = position_bits(keys, length)  # < 2**32
    # bits * high < 2**63 for high <= 2**31: split to stay exact: (bits >> 16) * high + ((bits & 0xFFFF) * high >> 16)
    return (((bits >> 16) * high) + (((bits & 0xFFFF) * high) >> 16)) >> 16
