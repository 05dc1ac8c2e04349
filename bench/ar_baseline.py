"""Autoregressive baseline on dgserve's own backbone: the encoder used as a causal LM.

Prefill the prompts with ``encode`` segments, then greedy-decode one token per sequence per forward
(B one-token ``encode`` segments packed into one batch). Same weights, attention, MoE dispatch and
KV cache as the diffusion path, so tokens/s compared with diffusion decoding isolate the decoding
algorithm. Works on CPU and GPU; used by ``bench/gpu_suite.py``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from dgserve.model.diffusion_gemma import DiffusionGemma
from dgserve.model.kv import ContiguousKV, Segment
from dgserve.model.layers import ForwardContext, rope_cos_sin


def _no_sync() -> None:
    return None


def device_sync(device: torch.device) -> Callable[[], None]:
    """A barrier for wall-clock timing: ``torch.cuda.synchronize`` on CUDA, a no-op on CPU."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return _no_sync


@torch.inference_mode()
def encode_last_hidden(model: DiffusionGemma, tokens: torch.Tensor, segments: list[Segment],
                       kv: ContiguousKV) -> torch.Tensor:
    """Run encode-only segments (appending their K/V) and return the final-normed hidden state of
    each segment's last token, ``[len(segments), H]``.

    ``DiffusionGemma.forward`` returns hidden states only for denoise tokens (the diffusion path never
    needs encoder outputs), so this replicates its loop for the all-encode case and keeps the last
    hidden state of each segment, the next-token predictor a causal LM needs. Keep it in step with
    ``DiffusionGemma.forward``; the model module is deliberately left untouched for the baseline.
    """
    assert all(s.kind == "encode" for s in segments)
    assert sum(s.length for s in segments) == tokens.shape[0]
    device = tokens.device
    positions = torch.cat([torch.arange(s.position, s.position + s.length, device=device) for s in segments])
    x = model.embed(tokens)  # [T, H]
    rope = {name: rope_cos_sin(positions, inv, x.dtype) for name, inv in model._inv_freq.items()}
    ctx = ForwardContext(segments=segments, kv=kv, positions=positions, rope=rope, dispatcher=model.dispatcher)
    for layer in model.layers:
        x = layer(x, ctx, layer.encoder_layer_scalar)
    ends = torch.tensor([s.length for s in segments], device=device).cumsum(0) - 1  # [B] last token rows
    return model.norm(x.index_select(0, ends))


def greedy_next(model: DiffusionGemma, hidden: torch.Tensor) -> torch.Tensor:
    """Argmax of the tied LM head (softcapped, fp32): ``[B, H] -> [B]``."""
    return model.logits(hidden).argmax(dim=-1)


@dataclass
class ARResult:
    batch: int
    prompt_tokens: int  # per sequence
    new_tokens: int  # per sequence (fewer than asked when a deadline cut the run short)
    prefill_s: float
    decode_s: float
    wall_s: float  # prefill + decode
    token_ids: list[list[int]] = field(repr=False, default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        """Aggregate new tokens over the whole generation's wall time (prefill included)."""
        return self.batch * self.new_tokens / self.wall_s

    @property
    def ms_per_token_step(self) -> float:
        """Wall time of one decode forward (one new token per sequence)."""
        steps = max(1, self.new_tokens - 1)
        return 1000.0 * self.decode_s / steps


def new_kv(model: DiffusionGemma) -> ContiguousKV:
    t = model.config.text
    return ContiguousKV(t.num_hidden_layers, [t.is_sliding(i) for i in range(t.num_hidden_layers)],
                        t.sliding_window)


@torch.inference_mode()
def generate_ar(model: DiffusionGemma, prompts: list[list[int]], max_new_tokens: int,
                deadline: float | None = None) -> ARResult:
    """Greedy AR decoding of ``max_new_tokens`` per prompt, all prompts packed in each forward.

    The prefill forward yields the first new token; each of the remaining ``max_new_tokens - 1``
    forwards encodes the previous token of every sequence (writing its K/V) and yields the next.
    ``deadline`` (a ``time.perf_counter`` value): stop early once it passes.
    """
    if not prompts or any(not p for p in prompts):
        raise ValueError("generate_ar needs at least one prompt, each with at least one token")
    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be >= 1")
    device = model.device
    sync = device_sync(device)
    kv = new_kv(model)
    batch = len(prompts)
    lengths = [len(p) for p in prompts]
    sync()
    start = time.perf_counter()
    flat = torch.tensor([t for p in prompts for t in p], dtype=torch.long, device=device)
    segments = [Segment("encode", b, n, 0) for b, n in enumerate(lengths)]
    nxt = greedy_next(model, encode_last_hidden(model, flat, segments, kv))  # [B]
    kv.trim()
    produced = [nxt]
    sync()
    prefill_end = time.perf_counter()
    for _ in range(max_new_tokens - 1):
        if deadline is not None and time.perf_counter() > deadline:
            break
        segments = [Segment("encode", b, 1, lengths[b]) for b in range(batch)]
        nxt = greedy_next(model, encode_last_hidden(model, nxt, segments, kv))
        kv.trim()
        lengths = [n + 1 for n in lengths]
        produced.append(nxt)
    sync()
    end = time.perf_counter()
    ids = torch.stack(produced, dim=1).tolist()  # [B, new]
    return ARResult(batch=batch, prompt_tokens=len(prompts[0]), new_tokens=len(produced),
                    prefill_s=prefill_end - start, decode_s=end - prefill_end, wall_s=end - start, token_ids=ids)


__all__ = ["ARResult", "device_sync", "encode_last_hidden", "generate_ar", "greedy_next", "new_kv"]
