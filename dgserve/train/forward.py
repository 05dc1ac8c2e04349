"""A differentiable forward pass of DiffusionGemma for training, over dense ``[B, T]`` batches.

``DiffusionGemma.forward`` is inference-only (``torch.inference_mode``, packed segments, a KV cache
object). Training needs gradients through both modes at once, so this module reruns the *same*
``nn.Module``s (attention projections and norms, dense MLP, router, experts, self-conditioning MLP)
with a simpler data path: the prompt prefix is encoded causally and its per-layer K/V are kept as
tensors; the canvas then attends bidirectionally to itself and to those K/V. The attention math,
masks and sliding windows are those of ``dgserve.model.layers.Attention``; ``tests/test_train.py``
checks the two paths agree to 1e-5.

Prefixes of different lengths share a batch by left padding: padded keys are masked out and each
row's RoPE positions start at 0 on its first real token, exactly as if it were a prompt of its own.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dgserve.model.diffusion_gemma import DiffusionGemma
from dgserve.model.layers import Attention, TransformerLayer, rope_cos_sin
from dgserve.model.moe import LocalDispatcher


def enable_training(model: DiffusionGemma) -> DiffusionGemma:
    """Turn on gradients for every parameter (the model is built inference-only) and train mode."""
    for p in model.parameters():
        p.requires_grad_(True)
    return model.train()


@dataclass
class PrefixKV:
    """The encoded prompt prefixes of a batch: what the canvas attends to."""

    keys: list[torch.Tensor]  # per layer [B, kv_heads, P, head_dim] (after k-norm and RoPE)
    values: list[torch.Tensor]  # per layer [B, kv_heads, P, head_dim] (after v-norm)
    lengths: torch.Tensor  # [B] real prefix lengths p_b (row b is left-padded to P)

    def detach(self) -> PrefixKV:
        return PrefixKV([k.detach() for k in self.keys], [v.detach() for v in self.values], self.lengths)


def _rope_tables(model: DiffusionGemma, positions: torch.Tensor, dtype: torch.dtype
                 ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    b, t = positions.shape
    out = {}
    for name, inv in model._inv_freq.items():
        cos, sin = rope_cos_sin(positions.reshape(-1), inv, dtype)
        out[name] = (cos.view(b, t, -1), sin.view(b, t, -1))
    return out


def _qkv(attn: Attention, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Projections of ``h [B, T, H]`` -> q ``[B, heads, T, hd]``, k/v ``[B, kv_heads, T, hd]`` (the inference
    path's own ``Attention.project`` over the flattened batch)."""
    b, t, h_dim = h.shape
    q, k, v = attn.project(h.reshape(b * t, h_dim), cos.reshape(b * t, -1), sin.reshape(b * t, -1))
    return (q.view(b, t, *q.shape[1:]).transpose(1, 2), k.view(b, t, *k.shape[1:]).transpose(1, 2),
            v.view(b, t, *v.shape[1:]).transpose(1, 2))


def _attend(attn: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor
            ) -> torch.Tensor:
    """SDPA with scaling 1.0; query head h reads kv head h // (heads / kv_heads). Returns ``[B, T, heads*hd]``."""
    rep = attn.num_heads // attn.kv_heads
    if rep > 1:
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0)  # [B, heads, T, hd]
    b, _, t, _ = o.shape
    return o.transpose(1, 2).reshape(b, t, attn.num_heads * attn.head_dim)


# Training runs each expert's rows as a plain matmul (torch's grouped kernel has no CPU backward); the combine and
# everything else is the inference MoE's (dgserve.model.moe.run_moe).
TRAINING_DISPATCHER = LocalDispatcher()


def _after_attention(layer: TransformerLayer, x: torch.Tensor, attn_out: torch.Tensor, scalar: torch.Tensor
                     ) -> torch.Tensor:
    """The rest of ``TransformerLayer.forward`` once attention has run: the same modules, dense MLP and MoE."""
    x = x + layer.post_attention_layernorm(layer.self_attn.o_proj(attn_out))
    b, t, h = x.shape
    return layer.feed_forward(x.reshape(b * t, h), TRAINING_DISPATCHER, None, layer.layer).view(b, t, h) * scalar


def encode_prefix(model: DiffusionGemma, tokens: torch.Tensor, lengths: torch.Tensor) -> PrefixKV:
    """Causal encoder pass over left-padded prefixes ``tokens [B, P]`` (row b's last ``lengths[b]``
    entries are real). Returns every layer's K/V; the encoder's output hidden states are not needed."""
    cfg = model.config.text
    _b, p = tokens.shape
    device = tokens.device
    pad = (p - lengths)[:, None]  # [B, 1]
    col = torch.arange(p, device=device)[None, :]
    positions = (col - pad).clamp(min=0)  # [B, P]
    valid = col >= pad  # [B, P]
    x = model.embed(tokens)
    rope = _rope_tables(model, positions, x.dtype)
    q_pos, k_pos = positions[:, :, None], positions[:, None, :]
    causal = (k_pos <= q_pos) & valid[:, None, :]
    eye = torch.eye(p, dtype=torch.bool, device=device)[None]  # padded query rows: attend to themselves
    full_mask = (causal | eye)[:, None]  # [B, 1, P, P]
    sliding_mask = ((causal & (k_pos > q_pos - cfg.sliding_window)) | eye)[:, None]
    keys, values = [], []
    for i, layer in enumerate(model.layers):
        attn = layer.self_attn
        cos, sin = rope["sliding_attention" if attn.sliding else "full_attention"]
        q, k, v = _qkv(attn, layer.input_layernorm(x), cos, sin)
        keys.append(k)
        values.append(v)
        if i == len(model.layers) - 1:
            break  # the last layer's output is never read: only its K/V matter
        out = _attend(attn, q, k, v, sliding_mask if attn.sliding else full_mask)
        x = _after_attention(layer, x, out, layer.encoder_layer_scalar)
    return PrefixKV(keys, values, lengths)


def denoise(model: DiffusionGemma, canvas: torch.Tensor, prefix: PrefixKV, soft: torch.Tensor | None = None
            ) -> torch.Tensor:
    """Decoder pass over ``canvas [B, C]``: bidirectional over the canvas, reading the prefix K/V
    (sliding layers: its last ``window - 1`` positions), self-conditioning on ``soft [B, C, H]``
    (None = zeros, the first step). Returns final-normed hidden states ``[B, C, H]``."""
    cfg = model.config.text
    b, c = canvas.shape
    device = canvas.device
    p = prefix.keys[0].shape[2]
    lengths = prefix.lengths[:, None]
    positions = lengths + torch.arange(c, device=device)[None, :]  # [B, C]
    x = model.self_conditioning(model.embed(canvas), soft)
    rope = _rope_tables(model, positions, x.dtype)
    k_pos = torch.arange(p, device=device)[None, :] - (p - lengths)  # prefix positions, < 0 = padding
    canvas_keys = torch.ones(b, c, dtype=torch.bool, device=device)
    full_mask = torch.cat([k_pos >= 0, canvas_keys], dim=1)[:, None, None, :]  # [B, 1, 1, P + C]
    sliding_mask = torch.cat([(k_pos >= 0) & (k_pos >= lengths - (cfg.sliding_window - 1)), canvas_keys],
                             dim=1)[:, None, None, :]
    for i, layer in enumerate(model.layers):
        attn = layer.self_attn
        cos, sin = rope["sliding_attention" if attn.sliding else "full_attention"]
        q, k, v = _qkv(attn, layer.input_layernorm(x), cos, sin)
        k = torch.cat([prefix.keys[i], k], dim=2)
        v = torch.cat([prefix.values[i], v], dim=2)
        out = _attend(attn, q, k, v, sliding_mask if attn.sliding else full_mask)
        x = _after_attention(layer, x, out, layer.layer_scalar)
    return model.norm(x)


def lm_logits(model: DiffusionGemma, hidden: torch.Tensor) -> torch.Tensor:
    """Tied LM head + final softcapping in fp32 (``DiffusionGemma.logits`` with gradients)."""
    out = F.linear(hidden, model.embed_tokens.weight).float()
    cap = model.config.text.final_logit_softcapping
    return torch.tanh(out / cap) * cap if cap is not None else out


def soft_embeddings(model: DiffusionGemma, probs: torch.Tensor) -> torch.Tensor:
    """Self-conditioning input ``probs @ E x sqrt(H)`` (``DiffusionGemma.soft_embeddings`` with gradients)."""
    w = model.embed_tokens.weight
    return (probs.to(w.dtype) @ w) * model.embed_scale(w.dtype)
