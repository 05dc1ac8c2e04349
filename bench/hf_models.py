"""transformers models with the dims of a dgserve preset, for the side-by-side CPU benchmarks.

- ``reference_diffusion``: transformers' ``DiffusionGemmaForBlockDiffusion`` (random weights, a tiny
  vision tower it insists on) saved with ``save_pretrained`` and loaded back by dgserve, so both
  sides run the very same weights and the same ``generation_config.json`` sampler settings.
- ``gemma4_causal_lm``: transformers' ``Gemma4ForCausalLM`` with the same text dims (K=V full layers,
  dense MLP + MoE in every layer, softcapping): the autoregressive sibling on the same backbone.

transformers is imported here only; dgserve itself never imports it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from dgserve.model.checkpoint import LoadedModel, load
from dgserve.model.config import ModelConfig, RopeConfig
from dgserve.model.generation_config import SamplingParams

# The smallest vision tower transformers' DiffusionGemmaConfig accepts (dgserve ignores it).
TINY_VISION = dict(model_type="gemma4_vision", hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                   num_attention_heads=2, num_key_value_heads=2, head_dim=8, position_embedding_size=16)


def unused_token_id(config: ModelConfig) -> int:
    """An EOS id no model output can take (one past the vocabulary): fixed-length outputs."""
    return config.text.vocab_size


def _rope(r: RopeConfig) -> dict[str, Any]:
    out: dict[str, Any] = {"rope_type": r.rope_type, "rope_theta": r.rope_theta}
    if r.partial_rotary_factor != 1.0:
        out["partial_rotary_factor"] = r.partial_rotary_factor
    return out


def set_reference_sampling(model: Any, sampling: SamplingParams, eos: int, max_new_tokens: int = 256) -> None:
    from transformers.models.diffusion_gemma.generation_diffusion_gemma import (
        DiffusionGemmaGenerationConfig,
        EntropyBoundSamplerConfig,
    )

    model.generation_config = DiffusionGemmaGenerationConfig(
        max_denoising_steps=sampling.max_denoising_steps,
        sampler_config=EntropyBoundSamplerConfig(entropy_bound=sampling.entropy_bound),
        t_min=sampling.t_min, t_max=sampling.t_max, stability_threshold=sampling.stability_threshold,
        confidence_threshold=sampling.confidence_threshold, eos_token_id=eos, pad_token_id=0,
        max_new_tokens=max_new_tokens)


def reference_diffusion(config: ModelConfig, sampling: SamplingParams, out_dir: Path,
                        seed: int = 0) -> tuple[Any, LoadedModel]:
    """Build transformers' DiffusionGemma with ``config``'s text dims and its own random initialisation,
    save it to ``out_dir`` and load it with dgserve. EOS is set to an id no output can take."""
    from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion

    text = dict(config.to_hf_dict()["text_config"])
    text.pop("model_type")
    hf_config = DiffusionGemmaConfig(text_config=text, vision_config=dict(TINY_VISION),
                                     canvas_length=config.canvas_length)
    torch.manual_seed(seed)
    ref = DiffusionGemmaForBlockDiffusion(hf_config).eval()
    set_reference_sampling(ref, sampling, unused_token_id(config))
    ref.save_pretrained(out_dir)
    lm = load(out_dir)
    assert lm.generation.sampling == sampling, (lm.generation.sampling, sampling)
    return ref, lm


def gemma4_causal_lm(config: ModelConfig, seed: int = 0) -> Any:
    """transformers' Gemma 4 causal LM with ``config``'s text dims (random weights)."""
    from transformers import Gemma4ForCausalLM, Gemma4TextConfig

    t = config.text
    hf_config = Gemma4TextConfig(
        vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
        num_hidden_layers=t.num_hidden_layers, num_attention_heads=t.num_attention_heads,
        num_key_value_heads=t.num_key_value_heads, head_dim=t.head_dim, global_head_dim=t.global_head_dim,
        num_global_key_value_heads=t.num_global_key_value_heads, attention_k_eq_v=True, enable_moe_block=True,
        num_experts=t.num_experts, top_k_experts=t.top_k_experts, moe_intermediate_size=t.moe_intermediate_size,
        layer_types=list(t.layer_types), sliding_window=t.sliding_window,
        final_logit_softcapping=t.final_logit_softcapping, hidden_size_per_layer_input=0,
        rope_parameters={"sliding_attention": _rope(t.rope_sliding), "full_attention": _rope(t.rope_full)},
        max_position_embeddings=t.max_position_embeddings, rms_norm_eps=t.rms_norm_eps,
        pad_token_id=0, eos_token_id=None, bos_token_id=t.bos_token_id)
    torch.manual_seed(seed)
    return Gemma4ForCausalLM(hf_config).eval()


__all__ = ["TINY_VISION", "gemma4_causal_lm", "reference_diffusion", "set_reference_sampling", "unused_token_id"]
