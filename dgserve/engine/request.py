"""What a caller asks the engine for, and what the engine streams back.

``SamplingParams`` is the per-request diffusion sampler setting (defaults from the checkpoint's
generation_config.json); ``GenerationRequest`` is one request; events are what
``AsyncEngine.generate`` yields: committed canvases, optional provisional drafts, and one final event.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from dgserve.engine.grammar import JsonConstraint
from dgserve.model.generation_config import GREEDY_SEED, SamplingParams
from dgserve.model.image_processing import ProcessedImage

FinishReason = Literal["stop", "length", "cancelled", "error"]
__all__ = ["SamplingParams"]  # re-exported: requests carry it


@dataclass(frozen=True)
class PromptImage:
    """An image of the prompt: its preprocessed pixels, and the prompt position of its first soft token (its
    ``num_soft_tokens`` image-token placeholders follow)."""

    start: int
    image: ProcessedImage

    @property
    def end(self) -> int:
        return self.start + self.image.num_soft_tokens


class InvalidRequest(ValueError):
    """The engine refuses the request as given (the caller's fault: a 400, never retried elsewhere)."""


class PromptTooLong(InvalidRequest):
    """The prompt, with its committed tokens and one canvas, cannot fit in the KV cache."""


class MaxTokensTooLarge(InvalidRequest):
    """The prompt fits, but not with max_tokens (in whole canvases): the request could not finish even alone."""


class EngineOverloaded(RuntimeError):
    """The engine (or the deployment in front of it) cannot queue the request now; retry later (a 429)."""

    def __init__(self, waiting: int | None = None, message: str | None = None) -> None:
        super().__init__(message or f"engine queue is full ({waiting} waiting)")
        self.waiting = waiting


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    max_tokens: int = 256
    seed: int | None = None
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    draft_every: int = 0  # >0: emit a provisional DraftEvent every k denoising steps
    request_id: str = ""
    # Failover: tokens already committed by an earlier replica, and the sampler's RNG state at that
    # canvas boundary, so that a seeded request continues the same random stream.
    committed_ids: list[int] = field(default_factory=list)
    rng_state: bytes | None = None
    images: tuple[PromptImage, ...] = ()  # in prompt order; the vision tower encodes them at prefill
    # max_tokens is the server's default, not the client's: an engine whose KV cache cannot hold prompt +
    # max_tokens lowers it to what fits instead of refusing the request
    fit_max_tokens: bool = False
    min_tokens: int = 0  # EOS and pad ids are not sampled before this many completion tokens; stop strings wait too
    logprobs: int | None = None  # report each returned token's log-probability and this many alternatives (<= 20)
    include_stop_str: bool = False  # a stop string that ends the text is part of it
    skip_special_tokens: bool = True  # special tokens (other than EOS and pad ids) are left out of the text
    constraint: JsonConstraint | None = None  # the output must be this JSON (constrained denoising)

    def __post_init__(self) -> None:
        if self.seed is None and self.sampling.greedy:
            # greedy denoising still renoises with random tokens: a fixed seed makes it deterministic
            self.seed = GREEDY_SEED


@dataclass
class RequestStats:
    prompt_tokens: int = 0
    new_tokens: int = 0  # ids generated (positions: pad ids included)
    completion_tokens: int = 0  # of those, the ids that are text (pad ids excluded): what the API's usage reports
    canvases: int = 0
    denoise_steps: int = 0  # decoder forward passes over this request's canvases
    seconds: float = 0.0
    time_to_first_canvas: float | None = None
    cached_prompt_tokens: int = 0  # prompt tokens served from the prefix cache
    steps_per_canvas: list[int] = field(default_factory=list)
    images: int = 0  # images in the prompt
    vision_seconds: float = 0.0  # vision encoder time spent on them (its share of batched runs)

    @property
    def tokens_per_forward(self) -> float:
        return self.new_tokens / self.denoise_steps if self.denoise_steps else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict[str, float | int | None]:
        return {
            "prompt_tokens": self.prompt_tokens, "new_tokens": self.new_tokens,
            "completion_tokens": self.completion_tokens, "canvases": self.canvases,
            "denoise_steps": self.denoise_steps, "tokens_per_forward": round(self.tokens_per_forward, 4),
            "seconds": round(self.seconds, 4), "tokens_per_second": round(self.tokens_per_second, 2),
            "time_to_first_canvas": None if self.time_to_first_canvas is None
            else round(self.time_to_first_canvas, 4),
            "cached_prompt_tokens": self.cached_prompt_tokens, "images": self.images,
            "vision_seconds": round(self.vision_seconds, 4),
        }


@dataclass
class CanvasEvent:
    """A committed canvas: these tokens are final."""

    request_id: str
    token_ids: list[int]  # new committed tokens (EOS and anything after it removed; cut at max_tokens/stop)
    text: str  # text delta for these tokens
    canvas_index: int
    rng_state: bytes | None = None  # sampler RNG state after this canvas (for failover)
    # of token_ids, those that are text (pad ids excluded; None: all of them): what the API's usage counts
    completion_tokens: int | None = None
    # with GenerationRequest.logprobs: the text ids of token_ids (pad ids left out), each one's log-probability under
    # the distribution of the denoising step that accepted it, and that step's most likely (id, log-probability) pairs
    logprob_token_ids: list[int] | None = None
    logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None

    def __post_init__(self) -> None:
        if self.completion_tokens is None:
            self.completion_tokens = len(self.token_ids)


@dataclass
class DraftEvent:
    """A provisional snapshot of the canvas being denoised: NOT committed text, may change entirely."""

    request_id: str
    token_ids: list[int]
    text: str
    step: int


@dataclass
class FinalEvent:
    request_id: str
    finish_reason: FinishReason
    stats: RequestStats
    error: str | None = None
    # the failure was the server's (a failed expert-parallel group, a dying replica), not the request's: the
    # caller may resubmit the prompt + committed tokens elsewhere
    retryable: bool = False
    # refused at admission because the engine's queue was full (nothing was generated): answer 429
    overloaded: bool = False


Event = CanvasEvent | DraftEvent | FinalEvent
