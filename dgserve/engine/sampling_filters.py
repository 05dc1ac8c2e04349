"""Per-request filters on a denoising step's distribution (``logit_bias``, ``top_k``, ``top_p``, ``min_p``, and
``min_tokens``' suppression of EOS and padding) and the log-probabilities reported for returned tokens.

Every function works on rows of positions with per-row settings and static shapes, so the exact path calls it for
a chunk of one canvas and the fast path for a whole canvas inside its compiled, graph-captured step. The order is
vLLM's and transformers': bias on the raw logits, temperature, top_k, top_p over the top_k tokens (renormalised),
min_p relative to the most likely token. The nucleus is taken among the ``TOP_CANDIDATES`` most likely tokens (a
fixed-size ``topk`` instead of a sort over the vocabulary), so top_p never keeps more than that many tokens.

Which distribution the entropy-bound acceptance reads is ``ACCEPTANCE_ENTROPY`` (measured on the ``tiny`` task,
docs/architecture.md "Sampling filters"): the unfiltered, temperature-scaled one, so a filter changes what is
sampled but not how many positions a step accepts, and ``top_k: 1`` is exactly greedy denoising.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from dgserve.model.generation_config import MAX_LOGIT_BIAS, TOP_CANDIDATES, SamplingParams

ACCEPTANCE_ENTROPY: Literal["unfiltered", "filtered"] = "unfiltered"
TOP_LOGPROBS = 20  # the most alternatives a request may ask for (OpenAI's limit); computed once for all
NEG_INF = float("-inf")


@dataclass
class RowFilters:
    """Per-row filter settings (one row = one canvas position); ``bias_ids`` rows padded with id 0 and value 0."""

    top_k: torch.Tensor  # [R] long, 0: off
    top_p: torch.Tensor  # [R] fp32, 1: off
    min_p: torch.Tensor  # [R] fp32, 0: off
    bias_ids: torch.Tensor  # [R, B] long
    bias_values: torch.Tensor  # [R, B] fp32
    suppress: torch.Tensor  # [R] bool: the suppressed ids (EOS, pad) are forbidden at this position (min_tokens)
    suppress_ids: torch.Tensor  # [E] long, the same for every row

    @classmethod
    def for_canvas(cls, params: SamplingParams, positions: int, suppress_before: int,
                   suppress_ids: tuple[int, ...], device: torch.device) -> RowFilters:
        """One request's settings for ``positions`` rows (canvas positions 0..positions-1); positions below
        ``suppress_before`` may not be EOS or padding."""
        ids, values = bias_table(params)
        r = positions
        return cls(
            top_k=torch.full((r,), params.top_k, dtype=torch.long, device=device),
            top_p=torch.full((r,), params.top_p, dtype=torch.float32, device=device),
            min_p=torch.full((r,), params.min_p, dtype=torch.float32, device=device),
            bias_ids=torch.tensor(ids, dtype=torch.long, device=device).expand(r, -1),
            bias_values=torch.tensor(values, dtype=torch.float32, device=device).expand(r, -1),
            suppress=torch.arange(r, device=device) < (suppress_before if suppress_ids else 0),
            suppress_ids=torch.tensor(suppress_ids or (0,), dtype=torch.long, device=device),
        )

    def rows(self, start: int, stop: int) -> RowFilters:
        """The settings of rows ``[start, stop)`` (a chunk of the exact path)."""
        return RowFilters(self.top_k[start:stop], self.top_p[start:stop], self.min_p[start:stop],
                          self.bias_ids[start:stop], self.bias_values[start:stop], self.suppress[start:stop],
                          self.suppress_ids)


def bias_table(params: SamplingParams, width: int = MAX_LOGIT_BIAS) -> tuple[list[int], list[float]]:
    """``logit_bias`` as ``width`` (id, value) pairs, padded with (0, 0.0): adding 0 changes no logit."""
    items = sorted((params.logit_bias or {}).items())
    assert len(items) <= width, "SamplingParams caps logit_bias at MAX_LOGIT_BIAS entries"
    ids = [t for t, _ in items] + [0] * (width - len(items))
    values = [float(v) for _, v in items] + [0.0] * (width - len(items))
    return ids, values


def adjust_logits(logits: torch.Tensor, f: RowFilters) -> torch.Tensor:
    """``logits [R, V]`` (fp32, before temperature) plus the bias, with the suppressed ids at -inf where a row
    suppresses them."""
    out = logits.scatter_add(1, f.bias_ids, f.bias_values)
    ids = f.suppress_ids.expand(out.shape[0], -1)
    blocked = torch.where(f.suppress[:, None], torch.full_like(out.gather(1, ids), NEG_INF), out.gather(1, ids))
    return out.scatter(1, ids, blocked)


def truncate(scaled: torch.Tensor, f: RowFilters) -> torch.Tensor:
    """``scaled [R, V]`` (temperature-scaled logits) with what top_k, top_p and min_p remove at -inf."""
    k = min(TOP_CANDIDATES, scaled.shape[-1])
    cand = scaled.topk(k, dim=-1).values  # [R, k] descending
    neg = torch.full_like(cand[:, 0], NEG_INF)
    top_k = f.top_k.clamp(max=k)
    on_k = top_k > 0
    thr_k = torch.where(on_k, cand.gather(1, (top_k.clamp(min=1) - 1)[:, None]).squeeze(1), neg)
    # top_p over the top_k candidates renormalised among themselves (or the whole vocabulary without top_k)
    kept = torch.arange(k, device=scaled.device)[None, :] < torch.where(on_k, top_k, k)[:, None]
    cand_k = torch.where(kept, cand, torch.full_like(cand, NEG_INF))
    norm = torch.where(on_k, cand_k.logsumexp(-1), scaled.logsumexp(-1))
    probs = (cand_k - norm[:, None]).exp()
    before = probs.cumsum(-1) - probs  # mass of the more likely candidates
    n_keep = (before < f.top_p[:, None]).sum(-1).clamp(min=1, max=k)
    thr_p = torch.where(f.top_p < 1.0, cand.gather(1, (n_keep - 1)[:, None]).squeeze(1), neg)
    # min_p: p >= min_p * p_max, i.e. a scaled logit >= the largest + log(min_p)
    thr_m = torch.where(f.min_p > 0, cand[:, 0] + f.min_p.clamp(min=1e-38).log(), neg)
    threshold = torch.maximum(torch.maximum(thr_k, thr_p), thr_m)
    return scaled.masked_fill(scaled < threshold[:, None], NEG_INF)


def filtered_logits(logits: torch.Tensor, temp: torch.Tensor | float, f: RowFilters,
                    allowed: torch.Tensor | None = None) -> torch.Tensor:
    """The distribution a filtered step samples from, as logits: bias and suppression, temperature, truncation;
    ``allowed [R, V]`` bool (a grammar's mask) removes the rest."""
    adjusted = adjust_logits(logits, f)
    if allowed is not None:
        adjusted = adjusted.masked_fill(~allowed, NEG_INF)
    return truncate(adjusted / temp, f)


def top_logprobs(logp: torch.Tensor, n: int = TOP_LOGPROBS) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``n`` most likely ids of each row of ``logp [R, V]`` and their log-probabilities (ties: lower id first)."""
    values, ids = logp.topk(min(n, logp.shape[-1]), dim=-1)
    return ids, values


@dataclass
class AcceptedLogprobs:
    """Per position of a canvas (any leading dims ``[..., C]``): the token the last step that accepted the position
    kept, its log-probability and that step's top alternatives. ``token`` is -1 where no step accepted yet."""

    token: torch.Tensor  # [..., C] long
    logprob: torch.Tensor  # [..., C] fp32
    top_ids: torch.Tensor  # [..., C, N] long
    top_logprobs: torch.Tensor  # [..., C, N] fp32

    @classmethod
    def empty(cls, shape: tuple[int, ...], device: torch.device, n: int = TOP_LOGPROBS) -> AcceptedLogprobs:
        return cls(torch.full(shape, -1, dtype=torch.long, device=device),
                   torch.zeros(shape, dtype=torch.float32, device=device),
                   torch.zeros((*shape, n), dtype=torch.long, device=device),
                   torch.zeros((*shape, n), dtype=torch.float32, device=device))

    def accept(self, accepted: torch.Tensor, sample: torch.Tensor, logprob: torch.Tensor, top_ids: torch.Tensor,
               top_lps: torch.Tensor) -> AcceptedLogprobs:
        """The state after a step that kept ``sample`` where ``accepted``."""
        a3 = accepted[..., None]
        return AcceptedLogprobs(torch.where(accepted, sample, self.token), torch.where(accepted, logprob, self.logprob),
                                torch.where(a3, top_ids, self.top_ids), torch.where(a3, top_lps, self.top_logprobs))

    def report(self, committed: torch.Tensor, final_logprob: torch.Tensor, final_top_ids: torch.Tensor,
               final_top_lps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Log-probabilities of the ``committed`` tokens (the final step's argmax): from the step that last accepted
        the position when it accepted that same token, else from the final step (whose argmax it is)."""
        same = self.token == committed
        s3 = same[..., None]
        return (torch.where(same, self.logprob, final_logprob), torch.where(s3, self.top_ids, final_top_ids),
                torch.where(s3, self.top_logprobs, final_top_lps))
