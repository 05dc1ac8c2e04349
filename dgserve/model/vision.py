"""DiffusionGemma's vision side in plain PyTorch: the Gemma 4 vision tower (patch embedder, bidirectional
encoder with 2D RoPE, spatial pooler) and the multimodal projector into the text model's embedding space.

Images run as a batch in the reference processor's layout: each image's patches padded to the processor's
``max_patches`` (position ``(-1, -1)`` marks padding, which no real patch attends to), so each image computes
what the reference computes for it, whatever else is in the batch. Parameter names follow the checkpoint
(``model.encoder.vision_tower.*``, ``model.encoder.embed_vision.*``) so loading is name-for-name.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dgserve.model.layers import RMSNorm
from dgserve.model.vision_config import VisionConfig


class ClippableLinear(nn.Module):
    """A bias-free linear layer whose input and output may be clamped to checkpoint-given bounds
    (``use_clipped_linears``: scalar buffers ``input_min``/``input_max``/``output_min``/``output_max``)."""

    def __init__(self, in_features: int, out_features: int, clipped: bool) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, out_features, bias=False)
        self.clipped = clipped
        if clipped:
            for name, bound in (("input_min", -1), ("input_max", 1), ("output_min", -1), ("output_max", 1)):
                self.register_buffer(name, torch.tensor(bound * float("inf")))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.clipped:
            x = torch.clamp(x, self.input_min, self.input_max)
        x = self.linear(x)
        if self.clipped:
            x = torch.clamp(x, self.output_min, self.output_max)
        return x


def axial_rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """2D RoPE tables ``[B, P, head_dim]``: the first half of a head rotates with the patch's x, the second
    half with its y, each as an ordinary rotate-half RoPE over ``head_dim / 2`` channels."""
    spatial = head_dim // 2
    inv_freq = 1.0 / (theta ** (torch.arange(0, spatial, 2, dtype=torch.float, device="cpu") / spatial))
    freqs = positions[..., None].float() * inv_freq.to(positions.device)  # [B, P, 2, hd/4]
    cos, sin = freqs.cos(), freqs.sin()
    # layout x-x-y-y: each half is [f, f] for rotate-half within the half
    cos = torch.cat([cos[:, :, 0], cos[:, :, 0], cos[:, :, 1], cos[:, :, 1]], dim=-1)
    sin = torch.cat([sin[:, :, 0], sin[:, :, 0], sin[:, :, 1], sin[:, :, 1]], dim=-1)
    return cos.to(dtype), sin.to(dtype)


def apply_axial_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x ``[B, P, heads, hd]``; rotate each half of the head with its own axis' angles."""
    half = x.shape[-1] // 2
    parts = []
    for axis in range(2):
        xs = x[..., axis * half:(axis + 1) * half]
        c = cos[..., axis * half:(axis + 1) * half].unsqueeze(2)
        s = sin[..., axis * half:(axis + 1) * half].unsqueeze(2)
        rotated = torch.cat([-xs[..., half // 2:], xs[..., :half // 2]], dim=-1)
        parts.append(xs * c + rotated * s)
    return torch.cat(parts, dim=-1)


class VisionAttention(nn.Module):
    """Bidirectional attention over one image's patches: q/k RMSNorm, scale-free v-norm, 2D RoPE,
    scaling 1.0, GQA; padding patches are never attended to."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.num_heads, self.kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        h, clip = cfg.hidden_size, cfg.use_clipped_linears
        self.q_proj = ClippableLinear(h, self.num_heads * self.head_dim, clip)
        self.k_proj = ClippableLinear(h, self.kv_heads * self.head_dim, clip)
        self.v_proj = ClippableLinear(h, self.kv_heads * self.head_dim, clip)
        self.o_proj = ClippableLinear(self.num_heads * self.head_dim, h, clip)
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.v_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps, with_scale=False)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], key_mask: torch.Tensor | None
                ) -> torch.Tensor:
        b, p, _ = x.shape
        cos, sin = rope
        q = apply_axial_rope(self.q_norm(self.q_proj(x).view(b, p, self.num_heads, self.head_dim)), cos, sin)
        k = apply_axial_rope(self.k_norm(self.k_proj(x).view(b, p, self.kv_heads, self.head_dim)), cos, sin)
        v = self.v_norm(self.v_proj(x).view(b, p, self.kv_heads, self.head_dim))
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, heads, P, hd]
        if key_mask is not None and self.kv_heads != self.num_heads:
            # with a mask the reference repeats the kv heads rather than using SDPA's GQA path
            k = k.repeat_interleave(self.num_heads // self.kv_heads, dim=1)
            v = v.repeat_interleave(self.num_heads // self.kv_heads, dim=1)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask, scale=1.0,
                                           enable_gqa=key_mask is None and self.kv_heads != self.num_heads)
        return self.o_proj(o.transpose(1, 2).reshape(b, p, self.num_heads * self.head_dim))


class VisionMLP(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        h, i, clip = cfg.hidden_size, cfg.intermediate_size, cfg.use_clipped_linears
        self.gate_proj = ClippableLinear(h, i, clip)
        self.up_proj = ClippableLinear(h, i, clip)
        self.down_proj = ClippableLinear(i, h, clip)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))


class VisionEncoderLayer(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        h, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.self_attn = VisionAttention(cfg)
        self.mlp = VisionMLP(cfg)
        self.input_layernorm = RMSNorm(h, eps)
        self.post_attention_layernorm = RMSNorm(h, eps)
        self.pre_feedforward_layernorm = RMSNorm(h, eps)
        self.post_feedforward_layernorm = RMSNorm(h, eps)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], key_mask: torch.Tensor | None
                ) -> torch.Tensor:
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), rope, key_mask))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class VisionEncoder(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(VisionEncoderLayer(cfg) for _ in range(cfg.num_hidden_layers))


class PatchEmbedder(nn.Module):
    """Pixels in [0, 1] -> ``2 (x - 0.5)`` -> linear, plus learned x and y position embeddings."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.input_proj = nn.Linear(cfg.patch_pixels, cfg.hidden_size, bias=False)
        self.position_embedding_table = nn.Parameter(
            torch.ones(2, cfg.position_embedding_size, cfg.hidden_size), requires_grad=False)

    def forward(self, pixel_values: torch.Tensor, positions: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        x = self.input_proj((2 * (pixel_values - 0.5)).to(self.input_proj.weight.dtype))  # [B, P, H]
        clamped = positions.clamp(min=0)  # padding (-1) looks up row 0, then is zeroed
        pos = (F.embedding(clamped[..., 0], self.position_embedding_table[0])
               + F.embedding(clamped[..., 1], self.position_embedding_table[1]))
        return x + torch.where(padding.unsqueeze(-1), 0.0, pos)


class VisionModel(nn.Module):
    """The Gemma 4 vision tower; ``forward`` returns the pooled soft tokens of every image, concatenated."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.config = cfg
        self.patch_embedder = PatchEmbedder(cfg)
        self.encoder = VisionEncoder(cfg)
        if cfg.standardize:
            self.register_buffer("std_bias", torch.zeros(cfg.hidden_size))
            self.register_buffer("std_scale", torch.ones(cfg.hidden_size))

    def forward(self, pixel_values: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """pixel_values ``[B, P, 3 p^2]`` in [0, 1], positions ``[B, P, 2]`` (x, y; ``-1`` = padding).
        Returns ``[sum of soft tokens, H_vision]``: each image's tokens in row-major order of its pooled grid."""
        cfg = self.config
        k = cfg.pooling_kernel_size
        padding = (positions == -1).all(dim=-1)  # [B, P]
        x = self.patch_embedder(pixel_values, positions, padding)
        key_mask = None
        if bool(padding.any()):
            key_mask = ~padding[:, None, None, :]  # [B, 1, 1, P]: every query sees the image's real patches
        rope = axial_rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta, x.dtype)
        for layer in self.encoder.layers:
            x = layer(x, rope, key_mask)
        pooled, valid = _pool(x.masked_fill(padding.unsqueeze(-1), 0.0), positions, pixel_values.shape[1] // k ** 2, k)
        pooled = pooled.float() * cfg.hidden_size ** 0.5  # fp32: the scaling can leave the fp16 range
        out = pooled[valid]
        if cfg.standardize:
            out = (out - self.std_bias.float()) * self.std_scale.float()
        return out.to(x.dtype)


def _pool(x: torch.Tensor, positions: torch.Tensor, length: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Average each ``k x k`` block of patches: ``[B, P, H] -> [B, length, H]`` plus the mask of pooled slots
    holding a real block. Computed as the reference does (a one-hot matmul in fp32) for the same rounding."""
    if x.shape[1] == length:
        return x, torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
    clamped = positions.clamp(min=0)
    max_x = clamped[..., 0].max(dim=-1, keepdim=True)[0] + 1
    kernel = torch.div(clamped, k, rounding_mode="floor")
    kernel = kernel[..., 0] + (max_x // k) * kernel[..., 1]  # [B, P] pooled slot of each patch
    weights = F.one_hot(kernel.long(), length).float() / k ** 2  # [B, P, length]
    out = weights.transpose(1, 2) @ x.float()
    valid = torch.logical_not((weights == 0).all(dim=1))
    return out.to(x.dtype), valid


class MultimodalEmbedder(nn.Module):
    """Soft tokens -> text embedding space: scale-free RMSNorm, then a linear projection."""

    def __init__(self, cfg: VisionConfig, text_hidden: int) -> None:
        super().__init__()
        self.embedding_pre_projection_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, with_scale=False)
        self.embedding_projection = nn.Linear(cfg.hidden_size, text_hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embedding_projection(self.embedding_pre_projection_norm(x))


class VisionTower(nn.Module):
    """Everything between pixels and the text model: ``vision_tower`` (the encoder) and ``embed_vision``
    (the projector), named as under the checkpoint's ``model.encoder.``."""

    def __init__(self, cfg: VisionConfig, text_hidden: int) -> None:
        super().__init__()
        self.config = cfg
        self.vision_tower = VisionModel(cfg)
        self.embed_vision = MultimodalEmbedder(cfg, text_hidden)

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_vision.embedding_projection.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embed_vision.embedding_projection.weight.device

    @torch.inference_mode()
    def forward(self, pixel_values: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """``[B, P, 3 p^2]``, ``[B, P, 2]`` -> image features ``[sum of soft tokens, H_text]`` (images in order)."""
        return self.embed_vision(self.vision_tower(pixel_values, positions))


__all__ = ["ClippableLinear", "MultimodalEmbedder", "VisionModel", "VisionTower"]
