"""Constrained denoising of one canvas (JSON output): each step samples positions left to right from the first
undecided one, each under the grammar state of the tokens before it, and accepts a contiguous run of them while the
run's entropies pass the entropy bound (sum minus max, as the unconstrained sampler's); the first position is always
accepted, so a step decides at least one token. Accepted tokens are final (the prefix stays valid), the rest of the
canvas is renoised, and a canvas ends when every position is decided or the grammar is complete (the remaining
positions are EOS). Exact mode only: the grammar is evaluated on the host between positions; fast-mode engines run
constrained requests through the exact path (docs/architecture.md, "JSON output").

Entropy here is the masked, filtered distribution's: tokens the grammar forces (a brace, a key) have none, so
structure is accepted in long runs while free text goes a few tokens per step.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from dgserve.engine.grammar import Matcher
from dgserve.engine.sampler import random_canvas, token_entropy
from dgserve.engine.sampling_filters import RowFilters, filtered_logits, top_logprobs
from dgserve.model.diffusion_gemma import DiffusionGemma
from dgserve.model.generation_config import SamplingParams


@dataclass
class ConstrainedCanvas:
    tokens: torch.Tensor  # [C] decided positions, then noise
    fixed: int = 0  # positions decided (a prefix)
    logprobs: list[float] = field(default_factory=list)  # of the decided tokens, with logprobs
    top: list[tuple[list[int], list[float]]] = field(default_factory=list)

    @property
    def done(self) -> bool:
        return self.fixed == self.tokens.shape[0]


def constrained_step(model: DiffusionGemma, hidden: torch.Tensor, canvas: ConstrainedCanvas, temp: float,
                     params: SamplingParams, gen: torch.Generator, matcher: Matcher, filters: RowFilters,
                     fill_id: int, logprobs: bool = False) -> int:
    """Decide a run of positions of ``canvas`` from ``hidden [C, H]`` (this step's decoder output); returns how
    many. ``filters`` holds one row per canvas position; ``fill_id`` fills the positions after a complete output."""
    c, vocab = canvas.tokens.shape[0], model.config.text.vocab_size
    run_sum, run_max, decided = 0.0, 0.0, 0
    while canvas.fixed < c:
        k = canvas.fixed
        allowed = matcher.allowed().to(hidden.device)
        if not bool(allowed.any()):
            raise RuntimeError("the grammar allows no token after the output so far")
        logits = filtered_logits(model.logits(hidden[k:k + 1]), temp, filters.rows(k, k + 1), allowed[None])
        entropy = float(token_entropy(logits)[0])
        if decided and run_sum + entropy - max(run_max, entropy) > params.entropy_bound:
            break
        if params.greedy:
            token = int(logits.argmax(-1)[0])
        else:
            probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
            token = int(torch.multinomial(probs.to(gen.device), 1, generator=gen)[0, 0])
        if not matcher.accept(token):
            raise RuntimeError(f"the grammar refused token {token}, which its own mask allowed")
        if logprobs:
            logp = torch.log_softmax(logits, dim=-1)
            canvas.logprobs.append(float(logp[0, token]))
            ids, values = top_logprobs(logp)
            canvas.top.append((ids[0].tolist(), values[0].tolist()))
        canvas.tokens[k] = token
        canvas.fixed += 1
        decided += 1
        run_sum, run_max = run_sum + entropy, max(run_max, entropy)
        if matcher.done:  # complete (the stop token was accepted): the rest of the canvas is EOS
            canvas.tokens[canvas.fixed:] = fill_id
            if logprobs:
                canvas.logprobs.extend([0.0] * (c - canvas.fixed))
                canvas.top.extend([([fill_id], [0.0])] * (c - canvas.fixed))
            canvas.fixed = c
    if not canvas.done:
        canvas.tokens[canvas.fixed:] = random_canvas(c - canvas.fixed, vocab, gen, canvas.tokens.device)
    return decided
