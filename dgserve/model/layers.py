"""DiffusionGemma building blocks: RMSNorm, RoPE, attention over packed segments, dense MLP,
router + experts, the transformer layer, and the self-conditioning MLP.

Every module works on a packed ``[T, H]`` batch (tokens of several segments end to end); only
attention looks at segment boundaries. Module and parameter names follow the Hugging Face
checkpoint layout so loading is a name-for-name copy.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dgserve.model.canvas_batch import AttnLayout
from dgserve.model.config import RopeConfig, TextConfig
from dgserve.model.kv import KVView, Segment
from dgserve.model.moe import ExpertWeights, MoEDispatcher, run_moe


class RMSNorm(nn.Module):
    """Gemma 4 RMSNorm: computed in fp32, ``x * (mean(x^2) + eps)^-1/2 * weight`` (no ``1 +``)."""

    def __init__(self, dim: int, eps: float, with_scale: bool = True) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False) if with_scale else None

    def forward(self, x: torch.Tensor, fused: bool = False) -> torch.Tensor:
        """``fused`` (the fast path): one ``rms_norm`` in x's dtype, which in bf16 rounds once more than the
        reference (after the normalisation, before the weight). Otherwise the reference's rounding: in fp32,
        then cast (torch's rms_norm computes exactly ``x * pow(mean(x^2) + eps, -0.5) * weight`` in fp32, bit
        for bit, as the parity tests check)."""
        if fused or x.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        weight = self.weight.float() if self.weight is not None else None
        return F.rms_norm(x.float(), (x.shape[-1],), weight, self.eps).type_as(x)


def rope_inv_freq(head_dim: int, rope: RopeConfig) -> torch.Tensor:
    """Inverse frequencies ``[head_dim // 2]`` for one layer type.

    default: all pairs rotate. proportional (full-attention layers): the first
    ``partial_rotary_factor * head_dim / 2`` pairs rotate with exponents over the whole head_dim, the
    rest get frequency 0 (cos 1, sin 0: position-free).
    """
    if rope.rope_type == "proportional":
        angles = int(rope.partial_rotary_factor * head_dim // 2)
        exps = torch.arange(0, 2 * angles, 2, dtype=torch.int64, device="cpu").float() / head_dim
        rotated = 1.0 / (rope.rope_theta ** exps)
        return torch.cat([rotated, torch.zeros(head_dim // 2 - angles, device="cpu")])
    if rope.partial_rotary_factor != 1.0:
        raise ValueError("default RoPE with partial_rotary_factor != 1 is not supported")
    return 1.0 / (rope.rope_theta ** (torch.arange(0, head_dim, 2, dtype=torch.float, device="cpu") / head_dim))


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    freqs = positions.float()[:, None] * inv_freq.to(positions.device)[None, :]  # [T, hd/2]
    emb = torch.cat([freqs, freqs], dim=-1)  # [T, hd]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x ``[T, heads, hd]``; rotate-half convention (pairs i and i + hd/2)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


@dataclass
class ForwardContext:
    """What one packed forward needs besides the hidden states."""

    segments: list[Segment]
    kv: KVView
    positions: torch.Tensor  # [T] absolute positions
    rope: dict[str, tuple[torch.Tensor, torch.Tensor]]  # layer type -> (cos, sin) [T, hd]
    dispatcher: MoEDispatcher


class Attention(nn.Module):
    """Gemma 4 attention: q/k RMSNorm, scale-free v-norm, RoPE, scaling 1.0, GQA.

    Full-attention layers have no v_proj: values are the projected keys (before k-norm and RoPE).
    Encode segments: causal (sliding layers: the last ``window`` positions including self; with
    ``use_bidirectional_attention="vision"`` also every token of the same image) and append their K/V to the
    cache. Denoise segments: bidirectional over the canvas plus read-only attention to
    the cached prefix (sliding layers: its last ``window - 1`` positions).
    """

    def __init__(self, cfg: TextConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.sliding = cfg.is_sliding(layer)
        self.window = cfg.sliding_window
        self.bidirectional_images = cfg.use_bidirectional_attention == "vision"
        self.num_heads = cfg.num_attention_heads
        self.head_dim = cfg.layer_head_dim(layer)
        self.kv_heads = cfg.layer_kv_heads(layer)
        h, bias = cfg.hidden_size, cfg.attention_bias
        self.q_proj = nn.Linear(h, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(h, self.kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(h, self.kv_heads * self.head_dim, bias=bias) if self.sliding else None
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, h, bias=bias)
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.v_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps, with_scale=False)

    @property
    def layer_type(self) -> str:
        return "sliding_attention" if self.sliding else "full_attention"

    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, fused: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``x [T, H]`` -> q ``[T, heads, hd]``, k/v ``[T, kv_heads, hd]`` (normed, RoPE on q and k)."""
        t = x.shape[0]
        q = apply_rope(self.q_norm(self.q_proj(x).view(t, self.num_heads, self.head_dim), fused), cos, sin)
        k_raw = self.k_proj(x).view(t, self.kv_heads, self.head_dim)
        v_raw = self.v_proj(x).view(t, self.kv_heads, self.head_dim) if self.v_proj is not None else k_raw
        return q, apply_rope(self.k_norm(k_raw, fused), cos, sin), self.v_norm(v_raw, fused)

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        t = x.shape[0]
        cos, sin = ctx.rope[self.layer_type]
        q, k, v = self.project(x, cos, sin)

        out = torch.empty_like(q)
        offset = 0
        for seg in ctx.segments:
            sl = slice(offset, offset + seg.length)
            offset += seg.length
            out[sl] = self._segment(seg, q[sl], k[sl], v[sl], ctx.kv)
        return self.o_proj(out.view(t, self.num_heads * self.head_dim))

    def _segment(self, seg: Segment, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv: KVView
                 ) -> torch.Tensor:
        start = max(0, seg.position - (self.window - 1)) if self.sliding else 0
        if start < seg.position:
            k_old, v_old = kv.read(self.layer, seg.seq, start, seg.position)
            keys, values = torch.cat([k_old, k]), torch.cat([v_old, v])
        else:
            keys, values = k, v
        mask = None
        if seg.kind == "encode":
            kv.write(self.layer, seg.seq, seg.position, k, v)
            q_pos = torch.arange(seg.position, seg.position + seg.length, device=q.device)[:, None]
            k_pos = torch.arange(start, seg.position + seg.length, device=q.device)[None, :]
            mask = k_pos <= q_pos
            if self.sliding:
                mask &= k_pos > q_pos - self.window
            if self.bidirectional_images:
                # the reference's block overlay: any two soft tokens of one image see each other (also past the
                # sliding window); a segment holds whole images, so the overlay never reaches into the cache
                for a, b in seg.image_spans:
                    mask |= (q_pos >= a) & (q_pos < b) & (k_pos >= a) & (k_pos < b)
        # [1, heads, n, hd] layout for SDPA; GQA maps query head h to kv head h // (heads / kv_heads)
        o = F.scaled_dot_product_attention(
            q.transpose(0, 1)[None], keys.transpose(0, 1)[None], values.transpose(0, 1)[None],
            attn_mask=mask, scale=1.0, enable_gqa=self.kv_heads != self.num_heads,
        )
        return o[0].transpose(0, 1)

    def forward_rows(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layout: AttnLayout,
                     k_pages: torch.Tensor, v_pages: torch.Tensor) -> torch.Tensor:
        """The fast path: ``x [S, C, H]`` rows (``dgserve.model.canvas_batch``), one attention call over every
        row's gathered prefix plus its own tokens. K/V are written first through the layout's slot mapping
        (rows that keep none write to scratch slots), then the prefix is gathered; a row never reads its own
        slots through the gather (its positions lie at or past its prefix length)."""
        s, c, _ = x.shape
        hd, kvh, group = self.head_dim, self.kv_heads, self.num_heads // self.kv_heads
        q, k, v = self.project(x.reshape(s * c, -1), cos, sin, fused=True)  # [S*C, heads | kv_heads, hd]
        k_pages.index_copy_(0, layout.write, k.to(k_pages.dtype))
        v_pages.index_copy_(0, layout.write, v.to(v_pages.dtype))
        p = layout.gather.shape[1]
        idx = layout.gather.reshape(-1)
        keys = torch.cat([k_pages.index_select(0, idx).view(s, p, kvh, hd), k.view(s, c, kvh, hd).to(k_pages.dtype)], 1)
        values = torch.cat([v_pages.index_select(0, idx).view(s, p, kvh, hd), v.view(s, c, kvh, hd).to(v_pages.dtype)],
                           1)
        # query head h reads KV head h // group: fold each KV head's query heads into the query rows
        qf = q.view(s, c, kvh, group, hd).permute(0, 2, 3, 1, 4).reshape(s, kvh, group * c, hd)
        o = F.scaled_dot_product_attention(qf, keys.transpose(1, 2), values.transpose(1, 2),
                                           attn_mask=layout.mask, scale=1.0)  # [S, kv_heads, group*C, hd]
        o = o.view(s, kvh, group, c, hd).permute(0, 3, 1, 2, 4).reshape(s, c, self.num_heads * hd)
        return self.o_proj(o)


class DenseMLP(nn.Module):
    """Gated gelu-tanh MLP (the dense "shared expert"; also the self-conditioning MLP's shape)."""

    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))


class Router(nn.Module):
    """Scale-free RMSNorm, x ``scale`` x hidden^-0.5, softmax (fp32) over experts, top-k,
    renormalised, x ``per_expert_scale``."""

    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.top_k = cfg.top_k_experts
        self.root_size = cfg.hidden_size ** -0.5
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, with_scale=False)
        self.proj = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)
        self.scale = nn.Parameter(torch.ones(cfg.hidden_size), requires_grad=False)
        self.per_expert_scale = nn.Parameter(torch.ones(cfg.num_experts), requires_grad=False)

    def forward(self, x: torch.Tensor, fused: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        scores = self.proj(self.norm(x, fused) * self.scale * self.root_size)  # [T, E]
        probs = F.softmax(scores, dim=-1, dtype=torch.float32)
        weights, index = torch.topk(probs, k=self.top_k, dim=-1)  # [T, K]
        weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights * self.per_expert_scale[index], index


class TransformerLayer(nn.Module):
    """Attention, then the dense MLP and the MoE in parallel (each with its own norms), summed,
    post-norm, residual, times a per-mode ``layer_scalar``."""

    def __init__(self, cfg: TextConfig, layer: int, expert_ids: list[int] | None = None) -> None:
        super().__init__()
        h, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.layer = layer
        self.self_attn = Attention(cfg, layer)
        self.mlp = DenseMLP(h, cfg.intermediate_size)
        self.router = Router(cfg)
        self.experts = ExpertWeights(h, cfg.moe_intermediate_size,
                                     list(range(cfg.num_experts)) if expert_ids is None else expert_ids)
        self.input_layernorm = RMSNorm(h, eps)
        self.post_attention_layernorm = RMSNorm(h, eps)
        self.pre_feedforward_layernorm = RMSNorm(h, eps)
        self.post_feedforward_layernorm = RMSNorm(h, eps)
        self.post_feedforward_layernorm_1 = RMSNorm(h, eps)
        self.pre_feedforward_layernorm_2 = RMSNorm(h, eps)
        self.post_feedforward_layernorm_2 = RMSNorm(h, eps)
        # The checkpoint stores one scalar for the decoder and one for the encoder (buffers are not tied).
        self.register_buffer("layer_scalar", torch.ones(1))  # decoder (denoise) mode
        self.register_buffer("encoder_layer_scalar", torch.ones(1))  # encoder mode

    def forward(self, x: torch.Tensor, ctx: ForwardContext, scalar: torch.Tensor) -> torch.Tensor:
        residual = x
        x = residual + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), ctx))
        return self.feed_forward(x, ctx.dispatcher, [seg.length for seg in ctx.segments], self.layer) * scalar

    def feed_forward(self, x: torch.Tensor, dispatcher: MoEDispatcher, segment_lengths: list[int] | None,
                     layer: int, fused: bool = False) -> torch.Tensor:
        """``x + post_norm(dense MLP + MoE)`` over ``[T, H]`` tokens (both execution modes)."""
        dense = self.post_feedforward_layernorm_1(self.mlp(self.pre_feedforward_layernorm(x, fused)), fused)
        weights, index = self.router(x, fused)
        moe = run_moe(dispatcher, layer, self.pre_feedforward_layernorm_2(x, fused), index, weights, self.experts,
                      segment_lengths)
        return x + self.post_feedforward_layernorm(dense + self.post_feedforward_layernorm_2(moe, fused), fused)

    def forward_rows(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layout: AttnLayout,
                     k_pages: torch.Tensor, v_pages: torch.Tensor, scalar: torch.Tensor,
                     dispatcher: MoEDispatcher, layer: int = -1) -> torch.Tensor:
        """The fast path over ``[S, C, H]`` rows; ``scalar [S, 1, 1]`` is each row's mode's layer scalar.
        Nothing here reads the layer's own index (``layer`` is passed only for an expert-parallel dispatcher's
        statistics), so one compiled graph serves every layer of a type."""
        s, c, h = x.shape
        x = x + self.post_attention_layernorm(
            self.self_attn.forward_rows(self.input_layernorm(x, True), cos, sin, layout, k_pages, v_pages), True)
        return self.feed_forward(x.view(s * c, h), dispatcher, None, layer, fused=True).view(s, c, h) * scalar


class SelfConditioning(nn.Module):
    """Adds an MLP of the previous step's soft embeddings to the canvas embeddings, then a scale-free
    RMSNorm (applied at every step, also the first, where the soft embeddings are zeros)."""

    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.pre_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, with_scale=False)
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, embeds: torch.Tensor, soft: torch.Tensor | None, fused: bool = False) -> torch.Tensor:
        if soft is not None:
            n = self.pre_norm(soft, fused)
            embeds = embeds + self.down_proj(F.gelu(self.gate_proj(n), approximate="tanh") * self.up_proj(n))
        # soft is None: the MLP of a zero signal is exactly zero (no biases), so it is skipped
        return self.post_norm(embeds, fused)
