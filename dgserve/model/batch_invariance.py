"""What it takes for a request's result not to depend on its batch-mates, on this device.

A packed forward computes every linear layer over the rows of all its segments in one matmul. CPU BLAS
rounds a row the same way in any call of at least a dozen rows, wherever the row sits in it, but takes
other code paths for fewer rows (measured with MKL: 1-3 rows at one thread; 1-3, 5-7 and 9-11 rows at two,
where the rows are split unevenly between threads). So on CPU:

- the MoE gives each segment's rows of an expert a matmul of their own, in the order a forward of that
  segment alone would use (``dgserve.model.moe``, ``dgserve.model.ep_dispatch``);
- a prompt segment shorter than :func:`short_row_limit` runs in a forward of its own, as it would alone.

Then every request computes bit for bit what it computes alone (and what the reference computes). CUDA
GEMMs choose their tiling and split-K by the row count, so there rows round differently between batch sizes
whatever is done here; dispatchers keep one grouped kernel per expert and no forward is split.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

PROBE_ROWS = 64  # row counts probed; the reference call has twice as many


def segment_runs_pay_off(device: torch.device) -> bool:
    """Whether a segment's rows of an expert get a matmul of their own on ``device`` (CPU: yes)."""
    return device.type == "cpu"


def short_row_limit(device: torch.device, dtype: torch.dtype) -> int:
    """Fewest rows from which a CPU matmul rounds each row as in any larger call, at the current torch thread
    count (probed once per thread count and dtype); 0 on other devices (nothing to gain there)."""
    if device.type != "cpu":
        return 0
    return _probe(torch.get_num_threads(), dtype)


@functools.cache
def _probe(threads: int, dtype: torch.dtype) -> int:
    del threads  # part of the cache key: BLAS splits work between threads differently
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(256, 256, generator=g).to(dtype)
    x = torch.randn(2 * PROBE_ROWS, 256, generator=g).to(dtype)
    reference = F.linear(x, weight)
    limit = 0
    for rows in range(1, PROBE_ROWS + 1):
        if not (torch.equal(F.linear(x[:rows], weight), reference[:rows])
                and torch.equal(F.linear(x[-rows:], weight), reference[-rows:])):
            limit = rows + 1
    return limit
