"""The DiffusionGemma text model: one set of layer weights run in two modes over a packed batch.

- encode segments (prompt prefill, committing an accepted canvas): causal, append K/V to the cache;
- denoise segments (canvases): bidirectional over the canvas + read-only cached prefix, with the
  self-conditioning MLP on the input embeddings; their final hidden states feed the tied LM head.

Two execution paths over the same modules: ``forward`` (exact mode: packed segments of any length, a Python
loop over segments in attention, bit-identical to the reference on CPU) and ``forward_canvases`` (fast mode:
``[S, C]`` rows of static shape, one attention call per layer, no host synchronisation; see
``dgserve.model.canvas_batch``). The LM head is applied separately (``logits``) so callers can work through
canvases in chunks and never hold a ``[batch x canvas, vocab]`` tensor. Neither path turns on
``torch.inference_mode`` itself: the engine does, the training loop does not.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from dgserve.model.batch_invariance import short_row_limit
from dgserve.model.canvas_batch import CanvasBatch
from dgserve.model.config import ModelConfig
from dgserve.model.kv import KVView, Segment
from dgserve.model.layers import (
    ForwardContext,
    RMSNorm,
    SelfConditioning,
    TransformerLayer,
    rope_cos_sin,
    rope_inv_freq,
)
from dgserve.model.moe import LocalDispatcher, MoEDispatcher


class DiffusionGemma(nn.Module):
    def __init__(self, config: ModelConfig, expert_ids: list[int] | None = None,
                 dispatcher: MoEDispatcher | None = None) -> None:
        super().__init__()
        self.config = config
        t = config.text
        self.embed_tokens = nn.Embedding(t.vocab_size, t.hidden_size)
        self.embed_tokens.weight.requires_grad_(False)
        self.layers = nn.ModuleList(TransformerLayer(t, i, expert_ids) for i in range(t.num_hidden_layers))
        self.norm = RMSNorm(t.hidden_size, t.rms_norm_eps)
        self.self_conditioning = SelfConditioning(t)
        self.dispatcher: MoEDispatcher = dispatcher if dispatcher is not None else LocalDispatcher()
        # prefill short whole prompts in forwards of their own (CPU batch invariance; never with a collective
        # dispatcher, whose ranks must all run the same forwards)
        self.isolate_short_prompts = True
        self._inv_freq = {
            "sliding_attention": rope_inv_freq(t.head_dim, t.rope_sliding),
            "full_attention": rope_inv_freq(t.global_head_dim, t.rope_full),
        }
        self._packed_shapes = frozenset(self.packed_linear_shapes())
        self._inv_freq_on: dict[torch.device, dict[str, torch.Tensor]] = {}  # device copies, made once
        self._embed_scale_values: dict[torch.dtype, float] = {}
        # the fast path's per-layer forward; FastRunner puts a torch.compile'd one here (one graph per layer type)
        self.compiled_layer_rows: Callable[..., torch.Tensor] | None = None
        # built for inference: no autograd graph unless training asks (dgserve.train.forward.enable_training)
        self.requires_grad_(False)

    def to_empty(self, *, device: torch.device | str | None, recurse: bool = True) -> DiffusionGemma:
        super().to_empty(device=device, recurse=recurse)
        self.reset_expert_counts()  # counters are not in the checkpoint: start them at zero, not at garbage
        return self

    def reset_expert_counts(self) -> None:
        for layer in self.layers:
            layer.experts.routed.zero_()

    def drain_expert_counts(self) -> dict[int, list[int]]:
        """Rows routed to each of this model's experts, per layer, since the previous drain (for metrics; reads
        the device counters, so call it off the hot path)."""
        out = {}
        for i, layer in enumerate(self.layers):
            snapshot = layer.experts.routed.clone()
            layer.experts.routed.sub_(snapshot)  # what a concurrent forward adds meanwhile is kept
            counts = snapshot.tolist()
            if any(counts):
                out[i] = counts
        return out

    def inv_freq(self, device: torch.device) -> dict[str, torch.Tensor]:
        """RoPE inverse frequencies per layer type on ``device`` (fp32, copied there once)."""
        tables = self._inv_freq_on.get(device)
        if tables is None:
            tables = {name: inv.to(device) for name, inv in self._inv_freq.items()}
            self._inv_freq_on[device] = tables
        return tables

    def packed_linear_shapes(self) -> set[tuple[int, int]]:
        """``(in, out)`` of every linear layer a prompt's rows go through in a packed matmul (attention, dense
        MLP, router; experts run per segment and self-conditioning only on canvases)."""
        return {(m.in_features, m.out_features) for m in self.layers.modules() if isinstance(m, nn.Linear)}

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    def embed_scale(self, dtype: torch.dtype) -> torch.Tensor:
        # sqrt(hidden) rounded to the weight dtype first, as the reference does
        return torch.tensor(self.config.text.hidden_size ** 0.5).to(self.dtype).to(dtype)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(tokens) * self.embed_scale(self.dtype)

    def forward(self, tokens: torch.Tensor, segments: list[Segment], kv: KVView,
                soft: torch.Tensor | None = None, image_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Run one packed batch.

        tokens ``[T]``; segments partition T in order; soft ``[T_denoise, H]``: the previous step's soft
        embeddings for the denoise tokens in segment order (None = all zeros, i.e. first steps).
        image_embeds ``[sum of image_spans, H]``: the vision tower's features replacing the embeddings of the
        encode segments' image spans, in segment and span order.
        Returns the final-normed hidden states of the denoise tokens ``[T_denoise, H]``.

        On CPU, whole prompts shorter than :func:`short_row_limit` tokens are prefilled first, each in a
        forward of its own, as when they run alone (``dgserve.model.batch_invariance``): packed with other
        work they would be rounded differently. (A longer prompt's chunks and prefix-cache tails are rounded
        as the whole prompt is, in any call of at least that many rows.)
        """
        assert sum(s.length for s in segments) == tokens.shape[0]
        if len(segments) > 1 and self.isolate_short_prompts and not self.dispatcher.collective:
            limit = short_row_limit(tokens.device, self.dtype, self._packed_shapes)
            if any(_short_prompt(s, limit) for s in segments):
                return self._forward_short_alone(tokens, segments, kv, soft, limit, image_embeds)
        return self._forward_packed(tokens, segments, kv, soft, image_embeds)

    def _forward_short_alone(self, tokens: torch.Tensor, segments: list[Segment], kv: KVView,
                             soft: torch.Tensor | None, limit: int, image_embeds: torch.Tensor | None
                             ) -> torch.Tensor:
        rest_tokens, rest_segments, rest_images, start, image_start = [], [], [], 0, 0
        for seg in segments:
            piece = tokens[start:start + seg.length]
            start += seg.length
            images = None
            if seg.image_spans:
                assert image_embeds is not None, "image spans without image embeddings"
                images = image_embeds[image_start:image_start + seg.image_tokens]
                image_start += seg.image_tokens
            if _short_prompt(seg, limit):
                self._forward_packed(piece, [seg], kv, None, images)  # encode: writes the cache, returns nothing
            else:
                rest_tokens.append(piece)
                rest_segments.append(seg)
                if images is not None:
                    rest_images.append(images)
        if not rest_segments:
            return torch.empty(0, self.config.text.hidden_size, dtype=self.dtype, device=tokens.device)
        return self._forward_packed(torch.cat(rest_tokens), rest_segments, kv, soft,
                                    torch.cat(rest_images) if rest_images else None)

    def _forward_packed(self, tokens: torch.Tensor, segments: list[Segment], kv: KVView,
                        soft: torch.Tensor | None, image_embeds: torch.Tensor | None = None) -> torch.Tensor:
        device = tokens.device
        is_denoise = torch.cat([
            torch.full((s.length,), s.kind == "denoise", dtype=torch.bool, device=device) for s in segments
        ])
        positions = torch.cat([
            torch.arange(s.position, s.position + s.length, device=device) for s in segments
        ])
        x = self.embed(tokens)  # [T, H]
        if image_embeds is not None:
            x[_image_rows(segments, device)] = image_embeds.to(x.dtype)  # the image placeholders' embeddings
        kinds = {s.kind for s in segments}
        if "denoise" in kinds:
            x[is_denoise] = self.self_conditioning(x[is_denoise], soft)
        rope = {name: rope_cos_sin(positions, inv, x.dtype) for name, inv in self.inv_freq(device).items()}
        ctx = ForwardContext(segments=segments, kv=kv, positions=positions, rope=rope, dispatcher=self.dispatcher)
        for layer in self.layers:
            if kinds == {"denoise"}:
                scalar = layer.layer_scalar
            elif kinds == {"encode"}:
                scalar = layer.encoder_layer_scalar
            else:
                scalar = torch.where(is_denoise[:, None], layer.layer_scalar, layer.encoder_layer_scalar)
            x = layer(x, ctx, scalar)
        if "denoise" not in kinds:
            return x.new_empty(0, x.shape[1])
        return self.norm(x[is_denoise])

    def forward_canvases(self, batch: CanvasBatch, k_pages: list[torch.Tensor], v_pages: list[torch.Tensor]
                         ) -> torch.Tensor:
        """The fast path: ``[S, C]`` rows (``dgserve.model.canvas_batch``) over the paged KV ``k_pages[layer]`` /
        ``v_pages[layer]`` (``[slots, kv_heads, head_dim]`` each). Returns the final-normed hidden states of
        every row ``[S, C, H]`` (the caller reads the denoise rows). Encode rows write their K/V; nothing
        reads a tensor's value on the host."""
        x = self.embed_tokens(batch.tokens) * self.embed_scale_value()  # [S, C, H]
        denoise = batch.denoise[:, None, None]  # [S, 1, 1]
        # self-conditioning on every row (zeros for rows without a previous step: exactly the plain embedding)
        x = torch.where(denoise, self.self_conditioning(x, batch.soft, fused=True), x)
        flat = batch.positions.reshape(-1)
        rope = {name: rope_cos_sin(flat, inv, x.dtype) for name, inv in self.inv_freq(x.device).items()}
        collective = self.dispatcher.collective
        for i, layer in enumerate(self.layers):
            kind = layer.self_attn.layer_type
            cos, sin = rope[kind]
            scalar = torch.where(denoise, layer.layer_scalar, layer.encoder_layer_scalar)
            forward = self.compiled_layer_rows or TransformerLayer.forward_rows
            x = forward(layer, x, cos, sin, batch.layouts[kind], k_pages[i], v_pages[i], scalar, self.dispatcher,
                        i if collective else -1)
        return self.norm(x, fused=True)

    def embed_scale_value(self) -> float:
        """``embed_scale`` as a Python number (the same rounded value; no tensor built per call)."""
        value = self._embed_scale_values.get(self.dtype)
        if value is None:
            value = self._embed_scale_values[self.dtype] = float(self.embed_scale(self.dtype))
        return value

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Tied LM head + final softcapping, in fp32: ``[n, H] -> [n, V]``."""
        out = torch.nn.functional.linear(hidden, self.embed_tokens.weight).float()
        cap = self.config.text.final_logit_softcapping
        if cap is not None:
            out = torch.tanh(out / cap) * cap
        return out

    def soft_embeddings(self, probs: torch.Tensor) -> torch.Tensor:
        """Self-conditioning input: ``softmax(previous logits) @ E x sqrt(H)``, ``[n, V] fp32 -> [n, H]``."""
        w = self.embed_tokens.weight
        # the scale as a number, not a (CPU) tensor: the same product, and nothing to copy to the device
        return (probs.to(w.dtype) @ w) * self.embed_scale_value()


def _image_rows(segments: list[Segment], device: torch.device) -> torch.Tensor:
    """Rows of the packed batch holding image soft tokens, in segment and span order."""
    rows, offset = [], 0
    for seg in segments:
        rows.extend(torch.arange(offset + a - seg.position, offset + b - seg.position) for a, b in seg.image_spans)
        offset += seg.length
    return torch.cat(rows).to(device) if rows else torch.empty(0, dtype=torch.long, device=device)


def _short_prompt(seg: Segment, limit: int) -> bool:
    """A whole prompt (prefill from position 0) short enough that BLAS rounds it differently when packed."""
    return seg.kind == "encode" and seg.position == 0 and seg.length < limit
