"""What it takes for a request's result not to depend on its batch-mates, on this device.

A packed forward computes every linear layer over the rows of all its segments in one matmul. CPU BLAS
rounds a row the same way in any call of at least a few rows, wherever the row sits in it, but takes other
code paths for fewer rows. So on CPU:

- the MoE gives each segment's rows of an expert a matmul of their own, in the order a forward of that
  segment alone would use (``dgserve.model.moe``, ``dgserve.model.ep_dispatch``);
- a prompt segment shorter than :func:`short_row_limit` runs in a forward of its own, as it would alone.

Then every request computes bit for bit what it computes alone (and what the reference computes). How many
rows are "a few" depends on the BLAS code path, which MKL picks by CPU model (AVX-512 kernels on Intel, AVX2
on AMD, with different small-row thresholds). ``dgserve/__init__.py`` therefore pins MKL to its AVX2 path
(``MKL_CBWR=AVX2``, MKL's conditional numerical reproducibility: the same code and the same results on any
x86 CPU with AVX2), and the limit is probed at the model's own matmul shapes, not at one stand-in shape.

CUDA GEMMs choose their tiling and split-K by the row count, so there rows round differently between batch
sizes whatever is done here; dispatchers keep one grouped kernel per expert and no forward is split.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable

import torch
import torch.nn.functional as F

PROBE_ROWS = 64  # row counts probed; the reference call has more than twice as many
PINNED_MKL_PATH = "AVX2"


def blas_path() -> str | None:
    """The MKL code path results are pinned to (``MKL_CBWR``), or None when it is left to MKL."""
    return os.environ.get("MKL_CBWR") or None


def segment_runs_pay_off(device: torch.device) -> bool:
    """Whether a segment's rows of an expert get a matmul of their own on ``device`` (CPU: yes)."""
    return device.type == "cpu"


def short_row_limit(device: torch.device, dtype: torch.dtype, shapes: Iterable[tuple[int, int]]) -> int:
    """Fewest rows from which a CPU matmul of each ``(in_features, out_features)`` shape in ``shapes`` rounds
    every row as in any larger call, at the current torch thread count (probed once per thread count, dtype
    and shape); 0 on other devices (nothing to gain there)."""
    if device.type != "cpu":
        return 0
    threads = torch.get_num_threads()
    return max((_probe(threads, dtype, k, n) for k, n in sorted(set(shapes))), default=0)


@functools.cache
def _probe(threads: int, dtype: torch.dtype, in_features: int, out_features: int) -> int:
    del threads  # part of the cache key: BLAS splits work between threads differently
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(out_features, in_features, generator=g).to(dtype)
    total = 2 * PROBE_ROWS + 9
    x = torch.randn(total, in_features, generator=g).to(dtype)
    reference = F.linear(x, weight)
    limit = 0
    for rows in range(1, PROBE_ROWS + 1):
        # first, an odd offset and last rows of the long call: a row's position in a call can matter too
        for start in (0, PROBE_ROWS // 2 + 1, total - rows):
            if not torch.equal(F.linear(x[start:start + rows], weight), reference[start:start + rows]):
                limit = rows + 1
                break
    return limit
