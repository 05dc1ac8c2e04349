"""The KV cache's default size: what ``EngineConfig(kv_cache_memory=None)`` means, decided in one place.

Enough for ``max_running`` sequences at the model's full context, and never more than ``kv_cache_fraction``
of the device's free memory (on GPU measured after the weights are loaded, on CPU ``MemAvailable``).
"""

from __future__ import annotations

import math

import torch

from dgserve.engine.kv_pages import block_bytes
from dgserve.model.config import ModelConfig

FALLBACK_HOST_MEMORY = 4 << 30  # when /proc/meminfo cannot be read


def free_memory(device: torch.device) -> int:
    """Bytes free on ``device`` now: the CUDA allocator's view on GPU, ``MemAvailable`` on CPU."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return FALLBACK_HOST_MEMORY


def full_context_bytes(config: ModelConfig, max_running: int, block_size: int, prefill_chunk: int,
                       dtype: torch.dtype) -> int:
    """KV bytes that ``max_running`` sequences at the full context need at once (sliding-window layers hold a
    window plus a chunk or canvas each, as ``split_budget`` counts them; it gives the sliding space at most half
    a budget)."""
    t = config.text
    full = math.ceil(t.max_position_embeddings / block_size) * block_bytes(config, "full", block_size, dtype)
    window = t.sliding_window - 1 + max(prefill_chunk, config.canvas_length)
    sliding = (math.ceil(window / block_size) + 1) * block_bytes(config, "sliding", block_size, dtype)
    return max_running * max(full + sliding, 2 * sliding)


def default_kv_budget(config: ModelConfig, *, max_running: int, block_size: int, prefill_chunk: int,
                      fraction: float, dtype: torch.dtype, device: torch.device) -> int:
    """``min(full-context need, fraction x free memory)``: a small model on a laptop takes what it can use,
    not half the machine; a large model on a GPU takes its share of what the weights left."""
    need = full_context_bytes(config, max_running, block_size, prefill_chunk, dtype)
    return min(need, int(free_memory(device) * fraction))
