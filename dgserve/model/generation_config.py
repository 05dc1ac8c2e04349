"""The diffusion sampler's settings as a checkpoint defines them (generation_config.json)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator


class SamplingParams(BaseModel):
    """The reference sampler's knobs (names as in DiffusionGemma's generation_config.json)."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)

    max_denoising_steps: int = Field(48, ge=1, le=1024)
    entropy_bound: float = Field(0.1, gt=0.0)
    t_max: float = Field(0.8, ge=0.0)
    t_min: float = Field(0.4, ge=0.0)
    stability_threshold: int | None = Field(1, ge=0)  # None disables adaptive stopping
    confidence_threshold: float | None = Field(0.005, gt=0.0)

    @model_validator(mode="after")
    def _check(self) -> SamplingParams:
        if self.t_max <= self.t_min:
            raise ValueError(f"t_max ({self.t_max}) must be greater than t_min ({self.t_min})")
        return self
