"""The DiffusionGemma text model: one set of layer weights run in two modes over a packed batch.

- encode segments (prompt prefill, committing an accepted canvas): causal, append K/V to the cache;
- denoise segments (canvases): bidirectional over the canvas + read-only cached prefix, with the
  self-conditioning MLP on the input embeddings; their final hidden states feed the tied LM head.

The LM head is applied separately (``logits``) so callers can work through canvases in chunks and
never hold a ``[batch x canvas, vocab]`` tensor.
"""

from __future__ import annotations

import torch
from torch import nn

from dgserve.model.batch_invariance import short_row_limit
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

    @torch.inference_mode()
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
        rope = {name: rope_cos_sin(positions, inv, x.dtype) for name, inv in self._inv_freq.items()}
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

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Tied LM head + final softcapping, in fp32: ``[n, H] -> [n, V]``."""
        out = torch.nn.functional.linear(hidden, self.embed_tokens.weight).float()
        cap = self.config.text.final_logit_softcapping
        if cap is not None:
            out = torch.tanh(out / cap) * cap
        return out

    @torch.inference_mode()
    def soft_embeddings(self, probs: torch.Tensor) -> torch.Tensor:
        """Self-conditioning input: ``softmax(previous logits) @ E x sqrt(H)``, ``[n, V] fp32 -> [n, H]``."""
        w = self.embed_tokens.weight
        return (probs.to(w.dtype) @ w) * self.embed_scale(w.dtype)


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
