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
    # a vision tower whose weights are perturbed too (None: TINY_VISION with its initial weights, unused)
    vision: dict[str, Any] | None = None
    processor: dict[str, Any] = field(default_factory=dict)  # Gemma4ImageProcessor settings (vision specs)
    special_ids: dict[str, int] = field(default_factory=dict)  # image_token_id / boi_token_id / eoi_token_id


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


# Image-and-text: a vision tower with GQA, clipped linears and standardisation, images of up to 70 soft tokens
# (longer than the sliding window, so the bidirectional image mask reaches past it), image ids inside the vocab.
VISION_SPECS = {
    "vision": OracleSpec("vision", dict(
        vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, global_head_dim=32, num_global_key_value_heads=1, sliding_window=24,
        num_experts=4, top_k_experts=2, moe_intermediate_size=24, use_bidirectional_attention="vision",
        layer_types=["sliding_attention", "full_attention", "full_attention"]), canvas=8,
        vision=dict(model_type="gemma4_vision", hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=8, position_embedding_size=160,
                    patch_size=4, pooling_kernel_size=2, standardize=True, use_clipped_linears=True),
        processor=dict(patch_size=4, pooling_kernel_size=2, max_soft_tokens=70),
        special_ids=dict(image_token_id=5, boi_token_id=6, eoi_token_id=7)),
}


def build_reference(spec: OracleSpec, seed: int = 0):
    from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion

    cfg = DiffusionGemmaConfig(text_config=dict(spec.text), vision_config=dict(spec.vision or TINY_VISION),
                               canvas_length=spec.canvas, **spec.special_ids)
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
        if spec.vision is not None:
            _perturb_vision(model, torch.Generator().manual_seed(seed + 2))
    set_generation(model, spec)
    return model


def _perturb_vision(model, gen: torch.Generator) -> None:
    """Random vision weights (own generator: the text weights stay those of the text-only specs), finite clip
    bounds that clamp some activations, a non-trivial standardisation."""
    for name, t in model.state_dict(keep_vars=True).items():
        if "vision" not in name:
            continue
        if name.endswith(("input_min", "output_min")):
            t.fill_(-2.5)
        elif name.endswith(("input_max", "output_max")):
            t.fill_(2.5)
        elif t.dim() <= 1:
            t.add_(torch.randn(t.shape, generator=gen) * 0.1)
        else:
            t.normal_(0.0, 0.2, generator=gen)


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


VISION_SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>", "<image>",
                         "<start_of_image>", "<end_of_image>"]  # ids 0-7: the vision spec's image/boi/eoi are 5/6/7
# Gemma's turn format (dgserve's test template) with image parts: one <image> placeholder per image, which the
# server expands to <start_of_image> <image> x n <end_of_image>, as the reference processor does.
VISION_CHAT_TEMPLATE = r"""{{ bos_token }}
{%- for message in messages -%}
    {{ '<start_of_turn>' ~ ('model' if message['role'] == 'assistant' else message['role']) ~ '\n' }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- else -%}
        {%- for part in message['content'] -%}
            {%- if part['type'] == 'image' -%}{{ image_token }}{%- else -%}{{ part['text'] | trim }}{%- endif -%}
        {%- endfor -%}
    {%- endif -%}
    {{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}
"""


def save_reference(model, out: Path, spec: OracleSpec | None = None) -> Path:
    model.save_pretrained(out)
    if spec is not None and spec.processor:
        reference_image_processor(spec).save_pretrained(out)
        write_vision_tokenizer(out, spec.text["vocab_size"])
    return out


def write_vision_tokenizer(out: Path, vocab_size: int) -> None:
    """A byte-level BPE tokenizer of exactly ``vocab_size`` ids whose special tokens sit at the spec's ids."""
    from dgserve.model.tokenizer_build import TINY_CORPUS, train_byte_level_bpe, write_tokenizer_dir

    tok = train_byte_level_bpe(TINY_CORPUS.split("\n\n"), vocab_size, VISION_SPECIAL_TOKENS)
    assert tok.get_vocab_size() == vocab_size, tok.get_vocab_size()
    write_tokenizer_dir(tok, out, VISION_CHAT_TEMPLATE, image="<image>")


def reference_image_processor(spec: OracleSpec):
    """transformers' Gemma 4 image processor (PIL backend: torchvision does not import beside the CPU torch)."""
    from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil

    return Gemma4ImageProcessorPil(**spec.processor)


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
