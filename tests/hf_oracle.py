"""Test-only: build random-weight reference checkpoints with transformers' DiffusionGemma.

transformers is the oracle here and only here; dgserve itself never imports it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

TINY_VISION = dict(model_type="gemma4_vision", hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                   num_attention_heads=2, num_key_value_heads=2, head_dim=8, position_embedding_size=16)


@dataclass
class OracleSpec:
    name: str
    text: dict[str, Any]
    canvas: int
    steps: int = 6
    confident: bool = False  # scale the output so logits saturate: adaptive stopping fires
    eos: int = 1
    gen: dict[str, Any] = field(default_factory=dict)


SPECS = {
    # GQA sliding layers (4 heads / 2 kv), K=V full layers with 1 kv head and a larger head_dim
    "gqa-kv1": OracleSpec("gqa-kv1", dict(
        vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, global_head_dim=32, num_global_key_value_heads=1, sliding_window=6,
        num_experts=4, top_k_experts=2, moe_intermediate_size=24,
        layer_types=["sliding_attention", "full_attention", "full_attention"]), canvas=8),
    # default 5:1 pattern, full layers without a separate kv-head count, top-1 routing, longer canvas
    "pattern-6": OracleSpec("pattern-6", dict(
        vocab_size=256, hidden_size=48, intermediate_size=64, num_hidden_layers=6, num_attention_heads=2,
        num_key_value_heads=1, head_dim=24, global_head_dim=48, sliding_window=10,
        num_experts=6, top_k_experts=1, moe_intermediate_size=16), canvas=16, steps=5),
    # saturated logits: adaptive stopping (confidence branch) triggers after a varying number of steps
    "confident": OracleSpec("confident", dict(
        vocab_size=200, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, head_dim=16, global_head_dim=16, num_global_key_value_heads=2, sliding_window=5,
        num_experts=4, top_k_experts=2, moe_intermediate_size=16,
        layer_types=["sliding_attention", "full_attention"]), canvas=8, steps=12, confident=True,
        gen=dict(stability_threshold=0, confidence_threshold=1.5)),
}


def build_reference(spec: OracleSpec, seed: int = 0):
    from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion

    cfg = DiffusionGemmaConfig(text_config=dict(spec.text), vision_config=dict(TINY_VISION),
                               canvas_length=spec.canvas)
    torch.manual_seed(seed)
    model = DiffusionGemmaForBlockDiffusion(cfg).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        # perturb every parameter so norms, scales and scalars all matter
        for name, p in model.named_parameters():
            if "vision" in name:
                continue
            if p.dim() == 1:
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)
            else:
                p.normal_(0.0, 0.1, generator=gen)
        for name, b in model.named_buffers():
            if name.endswith("layer_scalar"):
                b.fill_(0.9 if "encoder" in name else 1.1)
        if spec.confident:
            model.model.decoder.norm.weight.mul_(40.0)
    set_generation(model, spec)
    return model


def set_generation(model, spec: OracleSpec, eos: int | None = None, max_new_tokens: int = 256) -> None:
    from transformers.models.diffusion_gemma.generation_diffusion_gemma import (
        DiffusionGemmaGenerationConfig,
        EntropyBoundSamplerConfig,
    )

    g = dict(max_denoising_steps=spec.steps, sampler_config=EntropyBoundSamplerConfig(entropy_bound=0.1),
             t_min=0.4, t_max=0.8, stability_threshold=1, confidence_threshold=0.005,
             eos_token_id=spec.eos if eos is None else eos, pad_token_id=0, max_new_tokens=max_new_tokens)
    g.update(spec.gen)
    model.generation_config = DiffusionGemmaGenerationConfig(**g)


def save_reference(model, out: Path) -> Path:
    model.save_pretrained(out)
    return out


def hf_generate(model, prompt: list[int], seed: int, max_new_tokens: int) -> list[int]:
    """The reference's generated ids, cut at the first EOS (exclusive) and at max_new_tokens."""
    torch.manual_seed(seed)
    out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens)
    ids = out.sequences[0, len(prompt):].tolist()
    eos = model.generation_config.eos_token_id
    eos_ids = eos if isinstance(eos, list) else [eos]
    for i, t in enumerate(ids):
        if t in eos_ids:
            return ids[:i]
    return ids[:max_new_tokens]
