"""DiffusionGemma text-model configuration: a strict pydantic model, named presets, and the
mapping from/to Hugging Face's nested ``config.json`` (``model_type: diffusion_gemma``).

The vision tower's configuration is ``vision_config.py``'s.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

LayerType = Literal["sliding_attention", "full_attention"]


class ConfigError(ValueError):
    """A checkpoint's config.json (or a user-supplied config) cannot describe a supported model."""


class RopeConfig(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)

    rope_type: Literal["default", "proportional"] = "default"
    rope_theta: float = 10_000.0
    partial_rotary_factor: float = 1.0


class TextConfig(BaseModel):
    """The text backbone shared by the encoder and the diffusion decoder."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)

    vocab_size: int = Field(gt=0)
    hidden_size: int = Field(gt=0)
    intermediate_size: int = Field(gt=0)  # dense ("shared expert") MLP width, also the self-conditioning MLP
    num_hidden_layers: int = Field(gt=0)
    num_attention_heads: int = Field(gt=0)
    # sliding-window layers
    num_key_value_heads: int = Field(gt=0)
    head_dim: int = Field(gt=0)
    sliding_window: int = Field(gt=1)
    # full-attention layers (K=V: no v_proj, values are the projected keys)
    global_head_dim: int = Field(gt=0)
    num_global_key_value_heads: int = Field(gt=0)
    layer_types: tuple[LayerType, ...]
    rope_sliding: RopeConfig = RopeConfig()
    rope_full: RopeConfig = RopeConfig(rope_type="proportional", rope_theta=1_000_000.0, partial_rotary_factor=0.25)
    # MoE
    num_experts: int = Field(gt=0)
    top_k_experts: int = Field(gt=0)
    moe_intermediate_size: int = Field(gt=0)
    rms_norm_eps: float = 1e-6
    final_logit_softcapping: float | None = 30.0
    attention_bias: bool = False
    max_position_embeddings: int = 131_072
    pad_token_id: int | None = 0
    eos_token_id: tuple[int, ...] = (1,)
    bos_token_id: int | None = 2
    # "vision": the encoder attends bidirectionally within each image's run of soft tokens (else causal)
    use_bidirectional_attention: Literal["vision"] | None = None

    @model_validator(mode="after")
    def _check(self) -> TextConfig:
        if len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(
                f"layer_types has {len(self.layer_types)} entries but num_hidden_layers is {self.num_hidden_layers}"
            )
        if self.layer_types[-1] != "full_attention":
            raise ValueError("the last layer must be a full_attention layer (as in the reference model)")
        for heads, name in ((self.num_key_value_heads, "num_key_value_heads"),
                            (self.num_global_key_value_heads, "num_global_key_value_heads")):
            if self.num_attention_heads % heads:
                raise ValueError(f"num_attention_heads={self.num_attention_heads} is not a multiple of {name}={heads}")
        if self.top_k_experts > self.num_experts:
            raise ValueError(f"top_k_experts={self.top_k_experts} > num_experts={self.num_experts}")
        return self

    def is_sliding(self, layer: int) -> bool:
        return self.layer_types[layer] == "sliding_attention"

    def layer_head_dim(self, layer: int) -> int:
        return self.head_dim if self.is_sliding(layer) else self.global_head_dim

    def layer_kv_heads(self, layer: int) -> int:
        return self.num_key_value_heads if self.is_sliding(layer) else self.num_global_key_value_heads


class ModelConfig(BaseModel):
    """A DiffusionGemma text model: backbone plus the block-diffusion canvas."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)

    text: TextConfig
    canvas_length: int = Field(gt=0)
    image_token_id: int | None = 258_880
    boi_token_id: int | None = 255_999
    eoi_token_id: int | None = 258_882

    # -- parameter accounting (used by benchmarks and the preset tests) --
    def parameter_counts(self) -> dict[str, int]:
        """Total and active (per token) parameter counts of the text model, tied weights counted once."""
        t = self.text
        h = t.hidden_size
        attn = 0
        for i in range(t.num_hidden_layers):
            hd, kvh = t.layer_head_dim(i), t.layer_kv_heads(i)
            q_o = 2 * h * t.num_attention_heads * hd
            kv = (2 if t.is_sliding(i) else 1) * h * kvh * hd
            attn += q_o + kv
        dense = t.num_hidden_layers * 3 * h * t.intermediate_size
        router = t.num_hidden_layers * (h * t.num_experts + h + t.num_experts)
        expert_one = 3 * h * t.moe_intermediate_size
        experts = t.num_hidden_layers * t.num_experts * expert_one
        embed = t.vocab_size * h
        self_cond = 3 * h * t.intermediate_size
        total = embed + attn + dense + router + experts + self_cond
        active = total - experts + t.num_hidden_layers * t.top_k_experts * expert_one
        return {"total": total, "active": active, "experts": experts, "embedding": embed}

    # -- Hugging Face config.json --
    @classmethod
    def from_hf_dict(cls, raw: dict[str, Any], source: str = "config.json") -> ModelConfig:
        """Parse DiffusionGemma's nested HF config (``model_type: diffusion_gemma`` with ``text_config``)."""
        model_type = raw.get("model_type")
        if model_type != "diffusion_gemma":
            raise ConfigError(
                f"{source}: model_type is {model_type!r}, expected 'diffusion_gemma' "
                "(dgserve serves DiffusionGemma checkpoints only)"
            )
        tc = raw.get("text_config")
        if not isinstance(tc, dict):
            raise ConfigError(f"{source}: missing the nested 'text_config' object")
        try:
            return cls(text=_text_from_hf(tc, source), canvas_length=int(raw.get("canvas_length", 256)),
                       image_token_id=raw.get("image_token_id", 258_880),
                       boi_token_id=raw.get("boi_token_id", 255_999),
                       eoi_token_id=raw.get("eoi_token_id", 258_882))
        except ConfigError:
            raise
        except (ValueError, TypeError, KeyError) as exc:
            raise ConfigError(f"{source}: invalid text_config: {exc}") from exc

    def to_hf_dict(self) -> dict[str, Any]:
        """The config.json that both dgserve and transformers' DiffusionGemmaForBlockDiffusion load."""
        t = self.text
        per_layer = {
            str(i): {"head_dim": t.global_head_dim, "num_key_value_heads": t.num_global_key_value_heads}
            for i in range(t.num_hidden_layers) if not t.is_sliding(i)
        }
        text = {
            "model_type": "diffusion_gemma_text",
            "vocab_size": t.vocab_size, "hidden_size": t.hidden_size, "intermediate_size": t.intermediate_size,
            "num_hidden_layers": t.num_hidden_layers, "num_attention_heads": t.num_attention_heads,
            "num_key_value_heads": t.num_key_value_heads, "head_dim": t.head_dim,
            "sliding_window": t.sliding_window, "layer_types": list(t.layer_types),
            "per_layer_config": per_layer,
            "rope_parameters": {
                "sliding_attention": _rope_to_hf(t.rope_sliding), "full_attention": _rope_to_hf(t.rope_full),
            },
            "num_experts": t.num_experts, "top_k_experts": t.top_k_experts,
            "moe_intermediate_size": t.moe_intermediate_size, "rms_norm_eps": t.rms_norm_eps,
            "final_logit_softcapping": t.final_logit_softcapping,
            "attention_bias": t.attention_bias, "hidden_activation": "gelu_pytorch_tanh",
            "max_position_embeddings": t.max_position_embeddings,
            "pad_token_id": t.pad_token_id, "bos_token_id": t.bos_token_id,
            "eos_token_id": t.eos_token_id[0] if len(t.eos_token_id) == 1 else list(t.eos_token_id),
            "tie_word_embeddings": True, "use_bidirectional_attention": t.use_bidirectional_attention,
        }
        return {
            "architectures": ["DiffusionGemmaForBlockDiffusion"], "model_type": "diffusion_gemma",
            "text_config": text, "canvas_length": self.canvas_length, "tie_word_embeddings": True,
            "image_token_id": self.image_token_id, "boi_token_id": self.boi_token_id,
            "eoi_token_id": self.eoi_token_id,
        }


def _rope_to_hf(r: RopeConfig) -> dict[str, Any]:
    out: dict[str, Any] = {"rope_type": r.rope_type, "rope_theta": r.rope_theta}
    if r.partial_rotary_factor != 1.0:
        out["partial_rotary_factor"] = r.partial_rotary_factor
    return out


def _rope_from_hf(raw: Any, default: RopeConfig, where: str) -> RopeConfig:
    if raw is None:
        return default
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected an object, got {raw!r}")
    rope_type = raw.get("rope_type", "default")
    if rope_type not in ("default", "proportional"):
        raise ConfigError(f"{where}: unsupported rope_type {rope_type!r} (dgserve supports default, proportional)")
    if raw.get("factor", 1.0) != 1.0:
        raise ConfigError(f"{where}: RoPE scaling factor {raw['factor']} is not supported")
    return RopeConfig(rope_type=rope_type, rope_theta=float(raw.get("rope_theta", default.rope_theta)),
                      partial_rotary_factor=float(raw.get("partial_rotary_factor", 1.0)))


def _text_from_hf(tc: dict[str, Any], source: str) -> TextConfig:
    where = f"{source}: text_config"
    tmt = tc.get("model_type", "diffusion_gemma_text")
    if tmt != "diffusion_gemma_text":
        raise ConfigError(f"{where}.model_type is {tmt!r}, expected 'diffusion_gemma_text'")
    act = tc.get("hidden_activation", "gelu_pytorch_tanh")
    if act not in ("gelu_pytorch_tanh", "gelu_tanh"):
        raise ConfigError(f"{where}.hidden_activation {act!r} is not supported (expected gelu_pytorch_tanh)")
    if tc.get("use_bidirectional_attention") == "all":
        raise ConfigError(f"{where}.use_bidirectional_attention='all' (a bidirectional encoder) is not supported")
    for key in ("num_experts", "top_k_experts", "moe_intermediate_size"):
        if tc.get(key) is None:
            raise ConfigError(f"{where}.{key} is missing: DiffusionGemma layers always have a MoE block")
    n_layers = int(tc.get("num_hidden_layers", 30))
    layer_types = tc.get("layer_types")
    if layer_types is None:
        layer_types = ["sliding_attention" if (i + 1) % 6 else "full_attention" for i in range(n_layers)]
    layer_types = list(layer_types)
    if layer_types and layer_types[-1] != "full_attention":
        layer_types[-1] = "full_attention"  # the reference forces this too
    head_dim = int(tc.get("head_dim", 256))
    kv_heads = int(tc.get("num_key_value_heads", 4))
    global_head_dim = int(tc.get("global_head_dim", 512))
    global_kv = tc.get("num_global_key_value_heads")
    global_kv = int(global_kv) if global_kv is not None else kv_heads
    per_layer = tc.get("per_layer_config")
    if per_layer is not None:
        # Saved form: full layers use the base dims unless overridden here (transformers stores only
        # the overrides that differ, so an empty dict means "same dims as the sliding layers").
        global_head_dim, global_kv = head_dim, kv_heads
        full_dims = set()
        for idx, over in per_layer.items():
            i = int(idx)
            if not 0 <= i < n_layers:
                raise ConfigError(f"{where}.per_layer_config has layer {i} out of range")
            if layer_types[i] != "full_attention" or set(over) - {"head_dim", "num_key_value_heads"}:
                raise ConfigError(f"{where}.per_layer_config[{idx}] = {over}: only full-attention layers may "
                                  "override head_dim / num_key_value_heads")
            full_dims.add((int(over.get("head_dim", head_dim)), int(over.get("num_key_value_heads", kv_heads))))
        if len(full_dims) > 1:
            raise ConfigError(f"{where}.per_layer_config: full-attention layers disagree on dims {full_dims}")
        if full_dims:
            global_head_dim, global_kv = full_dims.pop()
    rope = tc.get("rope_parameters") or {}
    eos = tc.get("eos_token_id", 1)
    eos_t = tuple(int(e) for e in (eos if isinstance(eos, list) else [eos])) if eos is not None else ()
    softcap = tc.get("final_logit_softcapping", 30.0)
    return TextConfig(
        vocab_size=int(tc.get("vocab_size", 262_144)), hidden_size=int(tc.get("hidden_size", 2304)),
        intermediate_size=int(tc.get("intermediate_size", 9216)), num_hidden_layers=n_layers,
        num_attention_heads=int(tc.get("num_attention_heads", 8)), num_key_value_heads=kv_heads,
        head_dim=head_dim, sliding_window=int(tc.get("sliding_window", 512)),
        global_head_dim=global_head_dim, num_global_key_value_heads=global_kv,
        layer_types=tuple(layer_types),
        rope_sliding=_rope_from_hf(rope.get("sliding_attention"), RopeConfig(), f"{where}.rope_parameters"),
        rope_full=_rope_from_hf(
            rope.get("full_attention"),
            RopeConfig(rope_type="proportional", rope_theta=1_000_000.0, partial_rotary_factor=0.25),
            f"{where}.rope_parameters"),
        num_experts=int(tc["num_experts"]), top_k_experts=int(tc["top_k_experts"]),
        moe_intermediate_size=int(tc["moe_intermediate_size"]),
        rms_norm_eps=float(tc.get("rms_norm_eps", 1e-6)),
        final_logit_softcapping=float(softcap) if softcap is not None else None,
        attention_bias=bool(tc.get("attention_bias", False)),
        max_position_embeddings=int(tc.get("max_position_embeddings", 131_072)),
        pad_token_id=tc.get("pad_token_id", 0), eos_token_id=eos_t, bos_token_id=tc.get("bos_token_id", 2),
        use_bidirectional_attention=tc.get("use_bidirectional_attention"),
    )


def _pattern(n_layers: int, every: int = 6) -> tuple[LayerType, ...]:
    types: list[LayerType] = ["sliding_attention" if (i + 1) % every else "full_attention" for i in range(n_layers)]
    types[-1] = "full_attention"
    return tuple(types)


# The published google/diffusiongemma-26B-A4B-it text dims (Gemma 4 26B-A4B backbone). These give
# 25.2B total / 3.8B active parameters (see ModelConfig.parameter_counts and tests/test_config.py).
DIFFUSIONGEMMA_26B_A4B = ModelConfig(
    text=TextConfig(
        vocab_size=262_144, hidden_size=2816, intermediate_size=2112, num_hidden_layers=30,
        num_attention_heads=16, num_key_value_heads=8, head_dim=256, sliding_window=1024,
        global_head_dim=512, num_global_key_value_heads=2, layer_types=_pattern(30),
        num_experts=128, top_k_experts=8, moe_intermediate_size=704, eos_token_id=(1, 106),
    ),
    canvas_length=256,
)

# A few-MB random model for tests and the CLI until a trained tiny model ships.
TINY_RANDOM = ModelConfig(
    text=TextConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=16,
        global_head_dim=32, num_global_key_value_heads=1,
        layer_types=("sliding_attention", "full_attention", "sliding_attention", "full_attention"),
        num_experts=8, top_k_experts=2, moe_intermediate_size=32, max_position_embeddings=4096,
    ),
    canvas_length=32,
)

# ~90M parameters: the CPU benchmark size of the engine issue (vocab 32,768, hidden 512, 8 layers,
# dense width 1,024, 16 experts top-4 of width 256, canvas 64).
BENCH_CPU = ModelConfig(
    text=TextConfig(
        vocab_size=32_768, hidden_size=512, intermediate_size=1024, num_hidden_layers=8,
        num_attention_heads=8, num_key_value_heads=4, head_dim=64, sliding_window=512,
        global_head_dim=128, num_global_key_value_heads=2, layer_types=_pattern(8, every=4),
        num_experts=16, top_k_experts=4, moe_intermediate_size=256, max_position_embeddings=32_768,
    ),
    canvas_length=64,
)

PRESETS: dict[str, ModelConfig] = {
    "diffusiongemma-26b-a4b": DIFFUSIONGEMMA_26B_A4B,
    "tiny-random": TINY_RANDOM,
    "bench-cpu": BENCH_CPU,
}


def human_params(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


__all__ = ["PRESETS", "ConfigError", "LayerType", "ModelConfig", "RopeConfig", "TextConfig", "human_params"]
