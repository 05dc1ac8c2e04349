"""The diffusion sampler's settings as a checkpoint defines them (generation_config.json)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

GREEDY_SEED = 0  # the renoising seed of a greedy request that gives none


class SamplingParams(BaseModel):
    """The reference sampler's knobs (names as in DiffusionGemma's generation_config.json)."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)

    max_denoising_steps: int = Field(48, ge=1, le=1024)
    entropy_bound: float = Field(0.1, gt=0.0)
    t_max: float = Field(0.8, ge=0.0)
    t_min: float = Field(0.4, ge=0.0)
    stability_threshold: int | None = Field(1, ge=0)  # None disables adaptive stopping
    confidence_threshold: float | None = Field(0.005, gt=0.0)
    # Greedy denoising (the API's temperature 0): each step's sample is the argmax, with no sampling draw.
    # Acceptance entropies still come from the t_max -> t_min schedule (so a canvas takes as many steps as
    # usual), and rejected positions are still renoised with random tokens; an unseeded greedy request uses
    # GREEDY_SEED for those draws, so its output is deterministic.
    greedy: bool = False

    @model_validator(mode="after")
    def _check(self) -> SamplingParams:
        if self.t_max <= self.t_min:
            raise ValueError(f"t_max ({self.t_max}) must be greater than t_min ({self.t_min})")
        return self
