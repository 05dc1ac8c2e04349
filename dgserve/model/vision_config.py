"""Configuration of DiffusionGemma's vision side: the Gemma 4 vision tower (``vision_config`` in the
checkpoint's ``config.json``) and the image preprocessor (the reference Gemma 4 image processor's settings),
each a strict pydantic model parsed from the checkpoint's JSON with errors that name the setting.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from dgserve.model.config import ConfigError

# The soft-token budgets the reference image processor accepts (Gemma4ImageProcessor).
SUPPORTED_SOFT_TOKENS = (70, 140, 280, 560, 1120)
# PIL resampling filters by their integer code (what preprocessor_config.json stores).
RESAMPLE_NAMES = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


class VisionConfig(BaseModel):
    """The Gemma 4 vision tower: patch embedder, bidirectional encoder with 2D RoPE, spatial pooler."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)

    hidden_size: int = Field(gt=0)
    intermediate_size: int = Field(gt=0)
    num_hidden_layers: int = Field(gt=0)
    num_attention_heads: int = Field(gt=0)
    num_key_value_heads: int = Field(gt=0)
    head_dim: int = Field(gt=0)
    rms_norm_eps: float = 1e-6
    rope_theta: float = Field(100.0, gt=0)
    patch_size: int = Field(gt=0)
    pooling_kernel_size: int = Field(gt=0)
    position_embedding_size: int = Field(gt=0)
    use_clipped_linears: bool = False
    standardize: bool = False

    @model_validator(mode="after")
    def _check(self) -> VisionConfig:
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads={self.num_key_value_heads}")
        if self.head_dim % 4:
            # 2D RoPE: half of each head rotates with the x position, half with y, each in pairs
            raise ValueError(f"head_dim={self.head_dim} must be a multiple of 4 (2D rotary embedding)")
        return self

    @property
    def patch_pixels(self) -> int:
        """Input width of the patch embedder: RGB values of one ``patch_size x patch_size`` patch."""
        return 3 * self.patch_size ** 2

    @classmethod
    def from_hf_dict(cls, raw: dict[str, Any], source: str = "config.json") -> VisionConfig:
        """Parse the checkpoint's ``vision_config`` object (``model_type: gemma4_vision``)."""
        where = f"{source}: vision_config"
        if not isinstance(raw, dict):
            raise ConfigError(f"{where}: expected an object, got {raw!r:.100}")
        model_type = raw.get("model_type")
        if model_type != "gemma4_vision":
            raise ConfigError(f"{where}.model_type is {model_type!r}; dgserve supports the Gemma 4 vision tower "
                              "('gemma4_vision') only")
        act = raw.get("hidden_activation", "gelu_pytorch_tanh")
        if act not in ("gelu_pytorch_tanh", "gelu_tanh"):
            raise ConfigError(f"{where}.hidden_activation {act!r} is not supported (expected gelu_pytorch_tanh)")
        rope = raw.get("rope_parameters") or {}
        if not isinstance(rope, dict):
            raise ConfigError(f"{where}.rope_parameters: expected an object, got {rope!r:.100}")
        if rope.get("rope_type", "axial") != "axial":
            raise ConfigError(f"{where}.rope_parameters.rope_type {rope.get('rope_type')!r} is not supported "
                              "(the Gemma 4 vision tower uses 'axial' 2D RoPE)")
        hidden = raw.get("hidden_size", 768)
        proj = raw.get("output_proj_dims")
        if proj is not None and proj != hidden:
            raise ConfigError(f"{where}.output_proj_dims={proj} differs from hidden_size={hidden}: an output "
                              "projection inside the vision tower is not supported")
        heads = raw.get("num_attention_heads", 12)
        try:
            return cls(
                hidden_size=hidden, intermediate_size=raw.get("intermediate_size", 3072),
                num_hidden_layers=raw.get("num_hidden_layers", 16), num_attention_heads=heads,
                num_key_value_heads=raw.get("num_key_value_heads", heads),
                head_dim=raw.get("head_dim") or hidden // heads,
                rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
                rope_theta=float(rope.get("rope_theta", 100.0)),
                patch_size=raw.get("patch_size", 16), pooling_kernel_size=raw.get("pooling_kernel_size", 3),
                position_embedding_size=raw.get("position_embedding_size", 10 * 1024),
                use_clipped_linears=raw.get("use_clipped_linears", False),
                standardize=raw.get("standardize", False),
            )
        except (ValidationError, TypeError, ValueError) as exc:
            raise ConfigError(f"{where}: {_first_error(exc)}") from exc


class ImageProcessorConfig(BaseModel):
    """The reference Gemma 4 image processor's settings: aspect-preserving resize to a patch budget,
    rescale (and optional normalisation), patching into ``patch_size`` squares."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)

    patch_size: int = Field(16, gt=0)
    pooling_kernel_size: int = Field(3, gt=0)
    max_soft_tokens: int = 280
    do_resize: bool = True
    resample: int = 3  # PIL's BICUBIC
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = False
    image_mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    image_std: tuple[float, float, float] = (1.0, 1.0, 1.0)

    @model_validator(mode="after")
    def _check(self) -> ImageProcessorConfig:
        if self.max_soft_tokens not in SUPPORTED_SOFT_TOKENS:
            raise ValueError(f"max_soft_tokens must be one of {SUPPORTED_SOFT_TOKENS}, got {self.max_soft_tokens}")
        if self.resample not in RESAMPLE_NAMES:
            raise ValueError(f"resample={self.resample} is not a PIL resampling filter ({RESAMPLE_NAMES})")
        if self.do_normalize and any(s == 0 for s in self.image_std):
            raise ValueError(f"image_std {self.image_std} has a zero entry")
        return self

    @property
    def max_patches(self) -> int:
        return self.max_soft_tokens * self.pooling_kernel_size ** 2

    @classmethod
    def for_vision(cls, vision: VisionConfig, **overrides: Any) -> ImageProcessorConfig:
        """The reference defaults, with the patch and pooling sizes of ``vision``."""
        return cls(patch_size=vision.patch_size, pooling_kernel_size=vision.pooling_kernel_size, **overrides)

    @classmethod
    def from_hf_dict(cls, raw: dict[str, Any], vision: VisionConfig, source: str) -> ImageProcessorConfig:
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: expected an object, got {raw!r:.100}")
        kind = raw.get("image_processor_type", "Gemma4ImageProcessor")
        if kind not in ("Gemma4ImageProcessor", "Gemma4ImageProcessorPil", "Gemma4ImageProcessorFast"):
            raise ConfigError(f"{source}: image_processor_type {kind!r} is not supported (expected "
                              "Gemma4ImageProcessor)")
        if raw.get("do_convert_rgb", True) is not True:
            raise ConfigError(f"{source}: do_convert_rgb must be true (the vision tower takes RGB patches)")
        known = set(cls.model_fields)
        values = {k: v for k, v in raw.items() if k in known}
        for key in ("image_mean", "image_std"):
            if key in values:
                value = values[key]
                if isinstance(value, int | float):
                    value = [value] * 3
                if not isinstance(value, list) or len(value) != 3:
                    raise ConfigError(f"{source}: {key} must be a number or a list of 3 numbers, got {value!r}")
                values[key] = tuple(float(x) for x in value)
        if "rescale_factor" in values and isinstance(values["rescale_factor"], int):
            values["rescale_factor"] = float(values["rescale_factor"])
        try:
            config = cls(**values)
        except ValidationError as exc:
            raise ConfigError(f"{source}: {_first_error(exc)}") from exc
        for name in ("patch_size", "pooling_kernel_size"):
            if getattr(config, name) != getattr(vision, name):
                raise ConfigError(f"{source}: {name}={getattr(config, name)} but the vision tower's config.json "
                                  f"says {getattr(vision, name)}")
        return config


def _first_error(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        return f"{loc}: {err['msg']}" if loc else err["msg"]
    return str(exc)


__all__ = ["SUPPORTED_SOFT_TOKENS", "ImageProcessorConfig", "VisionConfig"]
