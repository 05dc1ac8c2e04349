"""The diffusion sampler's settings as a checkpoint defines them (generation_config.json)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

GREEDY_SEED = 0  # the renoising seed of a greedy request that gives none
# top_k is at most this, and top_p's nucleus is taken among this many most likely tokens of each position (a fixed
# candidate set keeps the fast path's step free of data-dependent shapes; both execution modes use the same rule)
TOP_CANDIDATES = 1024
MAX_LOGIT_BIAS = 64  # logit_bias entries per request (fixed-size per-row fields in the fast path's step input)


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
    # Sampling filters, applied to each denoising step's distribution before it is sampled (and argmaxed):
    # logit_bias is added to the logits, then temperature, then top_k, top_p (over the top_k tokens, renormalised),
    # min_p (relative to the most likely token). Neutral values leave the sampler bit-identical to the reference.
    top_k: int = Field(0, ge=0, le=TOP_CANDIDATES)  # 0: off
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    logit_bias: dict[int, float] | None = Field(None, max_length=MAX_LOGIT_BIAS)

    @property
    def filtered(self) -> bool:
        """Any filter is on (the step then takes the filtered path)."""
        return bool(self.top_k or self.top_p < 1.0 or self.min_p > 0.0 or self.logit_bias)

    @model_validator(mode="after")
    def _check(self) -> SamplingParams:
        if self.t_max <= self.t_min:
            raise ValueError(f"t_max ({self.t_max}) must be greater than t_min ({self.t_min})")
        return self
