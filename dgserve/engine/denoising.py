"""The denoising algorithm as a plug-in over canvas state, shared by both execution modes.

DiffusionGemma's sampler is entropy-bound acceptance (keep the lowest-entropy positions whose entropies sum,
less the largest, to at most a bound; renoise the rest) with adaptive stopping (the argmax canvas unchanged
for ``stability_threshold`` steps and mean entropy below ``confidence_threshold``). :class:`EntropyBound`
states it once over batched tensors (``[..., C]``); the exact path calls it for one canvas with the
request's generator supplying the randomness, the fast path for every canvas of a step at once with
counter-based randomness (``dgserve.engine.counter_rng``). Other algorithms (SGLang's dLLM plug-ins are the
model) would implement the same two methods.
"""

from __future__ import annotations

from typing import Protocol

import torch


class DenoisingAlgorithm(Protocol):
    def accept(self, entropy: torch.Tensor, bound: torch.Tensor | float) -> torch.Tensor:
        """``[..., C]`` bool: which positions keep their sampled token this step."""
        ...

    def stable_run(self, argmax: torch.Tensor, previous: torch.Tensor, run: torch.Tensor,
                   has_previous: torch.Tensor) -> torch.Tensor:
        """The number of consecutive earlier steps whose argmax canvas equals this one."""
        ...

    def stop(self, run: torch.Tensor, entropy: torch.Tensor, threshold: torch.Tensor,
             confidence: torch.Tensor) -> torch.Tensor:
        """``[...]`` bool: the canvas is done before its step budget."""
        ...


class EntropyBound:
    """The reference's algorithm (``EntropyBoundSampler`` with adaptive stopping)."""

    def accept(self, entropy: torch.Tensor, bound: torch.Tensor | float) -> torch.Tensor:
        """Take the k lowest-entropy positions with ``sum(H) - max(H) <= bound`` (ties in sort order)."""
        sorted_entropy, order = torch.sort(entropy, dim=-1, descending=False)
        if isinstance(bound, torch.Tensor):
            bound = bound.unsqueeze(-1)
        selected = torch.cumsum(sorted_entropy, dim=-1) - sorted_entropy <= bound
        return torch.zeros_like(selected).scatter(-1, order, selected)

    def stable_run(self, argmax: torch.Tensor, previous: torch.Tensor, run: torch.Tensor,
                   has_previous: torch.Tensor) -> torch.Tensor:
        """The argmax canvas equals each of the last ``n`` ones exactly when the last ``n`` consecutive pairs
        were equal, so a run length replaces the reference's history of canvases."""
        same = (argmax == previous).all(-1) & has_previous
        return torch.where(same, run + 1, torch.zeros_like(run))

    def stop(self, run: torch.Tensor, entropy: torch.Tensor, threshold: torch.Tensor,
             confidence: torch.Tensor) -> torch.Tensor:
        """``threshold < 0`` disables adaptive stopping; 0 needs no stable history."""
        stable = (threshold == 0) | ((threshold > 0) & (run >= threshold))
        return stable & (threshold >= 0) & (entropy.mean(-1) < confidence)


def schedule_temperature(cur_step: torch.Tensor, max_steps: torch.Tensor, t_min: torch.Tensor,
                         t_delta: torch.Tensor) -> torch.Tensor:
    """The linear schedule ``t_min + (t_max - t_min) * cur_step / max_steps`` in fp32 (``cur_step`` counts the
    steps remaining, N..1), as the reference computes it."""
    return t_min + t_delta * (cur_step.float() / max_steps.float())


def inverse_cdf_sample(probs: torch.Tensor, u: torch.Tensor, block: int = 1024,
                       argmax: torch.Tensor | None = None) -> torch.Tensor:
    """One draw per row of ``probs [R, V]`` from uniforms ``u [R]``: the first index whose cumulative
    probability exceeds ``u * total``. Two levels (block sums, then one block) keep the fp32 cumulative sums
    short and accurate; static shapes, no host synchronisation. A zero-probability pick (possible only at a
    rounding boundary) falls back to the row's argmax (``argmax`` if the caller has it, else computed)."""
    rows, vocab = probs.shape
    block = min(block, vocab)
    pad = (-vocab) % block
    padded = torch.nn.functional.pad(probs, (0, pad)) if pad else probs
    blocks = padded.view(rows, -1, block)  # [R, nb, B]
    block_cdf = blocks.sum(-1).cumsum(-1)  # [R, nb]
    target = (u * block_cdf[:, -1]).unsqueeze(-1)  # [R, 1]
    nb = block_cdf.shape[1]
    b = torch.searchsorted(block_cdf, target, right=True).clamp(max=nb - 1)  # [R, 1]
    before = torch.where(b > 0, block_cdf.gather(1, (b - 1).clamp(min=0)), torch.zeros_like(target))
    within = blocks.gather(1, b.unsqueeze(-1).expand(rows, 1, block)).squeeze(1).cumsum(-1)  # [R, B]
    w = torch.searchsorted(within, target - before, right=True).clamp(max=block - 1)
    pick = (b * block + w).squeeze(-1).clamp(max=vocab - 1)
    ok = probs.gather(1, pick.unsqueeze(-1)).squeeze(-1) > 0
    return torch.where(ok, pick, probs.argmax(-1) if argmax is None else argmax)
