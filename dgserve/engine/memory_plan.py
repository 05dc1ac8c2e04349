"""Where a device's memory goes when the engine runs a model, and how many canvases fit: a pure function of the
model config, dtype, device memory and engine config (nothing is allocated), used to size the KV cache on GPU and
to answer "does 64 canvases fit an H100?" before buying the hour.

The parts: weights (bf16, or FP8 where ``quantization`` says so: ``dgserve.model.quantization.weight_bytes``); a
reserve for the CUDA context, cuBLAS workspaces and allocator slack; the fast path's
device-resident canvas state (``dgserve.engine.fast_step.CanvasState``); the activations of the largest step
(the bigger of attention and MoE at the largest row bucket, plus the sampler's one-canvas vocabulary working set);
and the KV pages, which get the rest. A sequence's KV at ``context_tokens`` (full layers keep every position,
sliding layers a window plus a canvas) divides that rest into the number of canvases that fit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from dgserve.engine.kv_pages import block_bytes
from dgserve.model.canvas_batch import sliding_blocks
from dgserve.model.config import ModelConfig
from dgserve.model.quantization import Quantization, weight_bytes

GIB = 1 << 30


@dataclass(frozen=True)
class MemoryPlan:
    device_bytes: int
    weight_bytes: int
    reserve_bytes: int  # CUDA context, library workspaces, allocator fragmentation
    canvas_state_bytes: int
    step_workspace_bytes: int  # peak activations of one step at ``step_rows`` canvases
    step_rows: int
    kv_budget_bytes: int  # what is left for KV pages
    kv_bytes_per_sequence: int  # one sequence at ``context_tokens``
    context_tokens: int
    max_canvases: int  # sequences, each with a canvas in flight, whose KV fits the budget

    def describe(self) -> str:
        gib = [f"{name} {value / GIB:.1f} GiB" for name, value in (
            ("weights", self.weight_bytes), ("reserve", self.reserve_bytes), ("canvas state", self.canvas_state_bytes),
            (f"step workspace ({self.step_rows} canvases)", self.step_workspace_bytes), ("KV", self.kv_budget_bytes))]
        return (f"{self.device_bytes / GIB:.1f} GiB: " + ", ".join(gib)
                + f"; {self.max_canvases} canvases fit at {self.context_tokens} tokens of context each "
                f"({self.kv_bytes_per_sequence / 2**20:.0f} MiB of KV per sequence)")


def _elt(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def step_workspace_bytes(config: ModelConfig, dtype: torch.dtype, rows: int, context_tokens: int,
                         block_size: int = 16, quantization: Quantization = "none") -> int:
    """Peak activation bytes of one fast step over ``rows`` canvases (an upper estimate: the live tensors of the
    largest phase of a layer, plus the residual stream and the sampler's per-canvas vocabulary pass). FP8 adds the
    per-token quantization of the expert rows: an fp32 temporary and the e4m3 copy."""
    t = config.text
    e = _elt(dtype)
    c, h = config.canvas_length, t.hidden_size
    tokens = rows * c
    residual = 4 * tokens * h * e  # x, the attention / feed-forward output, norms in flight
    attention = 0
    for kind in set(t.layer_types):
        layer = t.layer_types.index(kind)
        kvh, hd = t.layer_kv_heads(layer), t.layer_head_dim(layer)
        group = t.num_attention_heads // kvh
        prefix = sliding_blocks(t.sliding_window, block_size) * block_size if kind == "sliding_attention" else \
            block_size * 2 ** math.ceil(math.log2(max(1, math.ceil(context_tokens / block_size))))
        keys = 2 * rows * (prefix + c) * kvh * hd * e  # gathered K and V (with the row's own)
        q_and_out = 3 * tokens * t.num_attention_heads * hd * e  # q, folded q, output
        mask = rows * group * c * (prefix + c) * (1 + e)  # the bool mask and the additive one in the model's dtype
        attention = max(attention, keys + q_and_out + mask)
    rows_k = tokens * t.top_k_experts
    moe = rows_k * (2 * h * e + 3 * t.moe_intermediate_size * e + 2 * h * 4) + tokens * 3 * t.intermediate_size * e
    if quantization == "fp8":
        moe += rows_k * h * (4 + 1)
    vocab = c * t.vocab_size * (4 * 4 + 2 * e)  # logits, log-probs, probs, block sums; a bf16 softmax input
    sampler_out = rows * c * (h * e + 3 * 8)
    return residual + max(attention, moe) + vocab + sampler_out


def memory_plan(config: ModelConfig, dtype: torch.dtype, device_bytes: int, *, max_running: int = 64,
                block_size: int = 16, context_tokens: int = 4096, row_bucket: int = 64,
                reserve_fraction: float = 0.03, reserve_min_bytes: int = 2 * GIB,
                quantization: Quantization = "none") -> MemoryPlan:
    """Plan one device (a single-GPU replica; an expert-parallel rank would count its share of the experts).
    ``quantization``: ``fp8`` counts FP8 weights (one byte per quantized element, fp32 scales per channel) and the
    activation quantization's temporaries."""
    t = config.text
    e = _elt(dtype)
    weights = weight_bytes(config, dtype, quantization)
    reserve = max(reserve_min_bytes, int(device_bytes * reserve_fraction))
    slots = 2 * max_running + 1
    c = config.canvas_length
    state = slots * c * (t.hidden_size * e + 2 * 8) + slots * 8
    rows = min(max_running, row_bucket)
    workspace = step_workspace_bytes(config, dtype, rows, context_tokens, block_size, quantization)
    kv_budget = max(0, device_bytes - weights - reserve - state - workspace)
    full_per_seq = math.ceil((context_tokens + c) / block_size) * block_bytes(config, "full", block_size, dtype)
    sliding_per_seq = (sliding_blocks(t.sliding_window, block_size) + math.ceil(c / block_size) + 1) * \
        block_bytes(config, "sliding", block_size, dtype)
    per_seq = full_per_seq + sliding_per_seq
    return MemoryPlan(device_bytes=device_bytes, weight_bytes=weights, reserve_bytes=reserve,
                      canvas_state_bytes=state, step_workspace_bytes=workspace, step_rows=rows,
                      kv_budget_bytes=kv_budget, kv_bytes_per_sequence=per_seq, context_tokens=context_tokens,
                      max_canvases=kv_budget // per_seq if per_seq else 0)
