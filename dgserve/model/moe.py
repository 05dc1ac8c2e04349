"""MoE token dispatch: the swappable part of the expert layer.

The router and the packed expert weights live in the model; *where* each token's expert MLPs run
is the dispatcher's business. ``LocalDispatcher`` runs every expert on this device; the
expert-parallel dispatcher (same interface) sends tokens to the ranks owning their experts.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from dgserve.model.batch_invariance import segment_runs_pay_off


class ExpertWeights(nn.Module):
    """Packed expert MLPs of one layer, ``gate_up_proj [E, 2I, H]`` and ``down_proj [E, H, I]``.

    ``expert_ids`` lists which global experts this module holds (all of them on a single device; a
    rank's share under expert parallelism), in the order of the first dimension.
    """

    def __init__(self, hidden: int, intermediate: int, expert_ids: list[int]) -> None:
        super().__init__()
        self.expert_ids = list(expert_ids)
        n = len(expert_ids)
        self.gate_up_proj = nn.Parameter(torch.empty(n, 2 * intermediate, hidden), requires_grad=False)
        self.down_proj = nn.Parameter(torch.empty(n, hidden, intermediate), requires_grad=False)

    def run_expert(self, local_index: int, x: torch.Tensor) -> torch.Tensor:
        """One expert's gated gelu-tanh MLP on ``x [n, H]``."""
        gate, up = F.linear(x, self.gate_up_proj[local_index]).chunk(2, dim=-1)  # [n, I] each
        return F.linear(F.gelu(gate, approximate="tanh") * up, self.down_proj[local_index])  # [n, H]


class MoEDispatcher(Protocol):
    """Computes ``sum_k weight[t, k] * expert_{index[t, k]}(x[t])`` for every token ``t``.

    ``collective``: every rank of a group must make the same calls, so the model may not add a forward
    of its own accord (it then never splits a packed batch)."""

    collective: bool

    def __call__(
        self, layer: int, x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
        experts: ExpertWeights, segment_lengths: list[int] | None = None,
    ) -> torch.Tensor:
        """x ``[T, H]``, top_k_index ``[T, K]`` (global expert ids), top_k_weights ``[T, K]`` fp32.
        Returns ``[T, H]`` in x's dtype; the weighted combination is accumulated in fp32.

        ``segment_lengths`` splits the T tokens into the packed forward's segments (in order). A
        dispatcher that keeps each segment's rows of an expert in a matmul of their own makes a
        segment's result independent of what else is in the batch (see :func:`expert_runs`)."""
        ...


def expert_mlp_grouped(
    x: torch.Tensor, token_of_row: torch.Tensor, expert_of_row: torch.Tensor, experts: ExpertWeights,
    num_local: int,
) -> torch.Tensor:
    """Row ``r`` is token ``x[token_of_row[r]]`` through local expert ``expert_of_row[r]``.

    Rows are grouped by expert so each expert runs one matmul; returns ``[N, H]`` in x's dtype.
    """
    n_rows = token_of_row.shape[0]
    out = x.new_empty(n_rows, x.shape[1])
    if n_rows == 0:
        return out
    order = torch.argsort(expert_of_row, stable=True)
    counts = torch.bincount(expert_of_row, minlength=num_local).tolist()
    sorted_x = x.index_select(0, token_of_row.index_select(0, order))
    results = []
    start = 0
    for local, n in enumerate(counts):
        if n:
            results.append(experts.run_expert(local, sorted_x[start:start + n]))
        start += n
    out.index_copy_(0, order, torch.cat(results))
    return out


def grouped_expert_mlp(sorted_x: torch.Tensor, counts: torch.Tensor, experts: ExpertWeights) -> torch.Tensor:
    """Expert MLPs over rows already grouped by local expert (``counts[e]`` rows each): one grouped
    matmul per projection where torch supports it, a loop over experts otherwise."""
    if sorted_x.shape[0] == 0:
        return sorted_x.new_empty(0, sorted_x.shape[1])
    if hasattr(F, "grouped_mm"):
        offs = torch.cumsum(counts, dim=0, dtype=torch.int32)
        try:
            gate_up = F.grouped_mm(sorted_x, experts.gate_up_proj.transpose(-2, -1), offs=offs)
            gate, up = gate_up.chunk(2, dim=-1)
            return F.grouped_mm(F.gelu(gate, approximate="tanh") * up, experts.down_proj.transpose(-2, -1), offs=offs)
        except RuntimeError:
            pass  # unsupported dtype/layout/device for the grouped kernel: loop instead
    return expert_runs(sorted_x, [(local, int(n)) for local, n in enumerate(counts.tolist())], experts)


def segment_of_rows(segment_lengths: list[int], k: int, device: torch.device) -> torch.Tensor:
    """``[T*K]``: the segment of each (token, k) row of a packed forward (rows token-major, as dispatched)."""
    lengths = torch.tensor(segment_lengths, device=device) * k
    return torch.repeat_interleave(torch.arange(len(segment_lengths), device=device), lengths)


def solo_sort_order(flat_expert: torch.Tensor, segment_lengths: list[int], k: int) -> torch.Tensor:
    """A permutation of the ``T*K`` (token, k) rows: segment after segment, each segment's rows in the order
    ``torch.sort`` puts its expert ids in when the segment is dispatched alone (as the reference does).

    Within one matmul, the row's position matters too (with 2 threads, BLAS splits a few rows unevenly
    between threads), so a stable re-sort of this order by expert gives every segment's rows of an expert
    the same positions as in the segment's own forward."""
    parts, start = [], 0
    for n in segment_lengths:
        rows = n * k
        parts.append(torch.sort(flat_expert[start:start + rows])[1] + start)
        start += rows
    return torch.cat(parts) if parts else flat_expert.new_empty(0)


def expert_runs(sorted_x: torch.Tensor, runs: list[tuple[int, int]], experts: ExpertWeights) -> torch.Tensor:
    """Consecutive runs of ``sorted_x``: run ``(local, n)`` is ``n`` rows through local expert ``local``,
    each run one matmul per projection.

    This is what makes a batched forward batch-invariant on CPU: BLAS rounds a row differently when only a
    handful of rows share the call, so a segment whose rows of an expert get a call of their own, of the
    size and order of when it runs alone, gets bit-identical expert outputs whatever its batch-mates are
    (``dgserve.model.batch_invariance``)."""
    if sorted_x.shape[0] == 0:
        return sorted_x.new_empty(0, sorted_x.shape[1])
    out, start = [], 0
    for local, n in runs:
        if n:
            out.append(experts.run_expert(local, sorted_x[start:start + n]))
        start += n
    return torch.cat(out)


class LocalDispatcher:
    """All experts on this device: rows sorted by expert, grouped matmuls, weighted combination
    summed over the top-k in fp32 (the reference's grouped path, so results match it bit for bit
    where the kernels agree)."""

    collective = False

    def __init__(self) -> None:
        self.last_counts: dict[int, torch.Tensor] = {}  # layer -> tokens per expert of the last call
        self._totals: dict[int, torch.Tensor] = {}  # layer -> tokens per expert since the last drain (on device)

    def drain_counts(self) -> dict[int, list[int]]:
        """Tokens routed to each expert, per layer, since the previous drain (for metrics)."""
        totals, self._totals = self._totals, {}
        return {layer: t.tolist() for layer, t in totals.items()}

    def __call__(
        self, layer: int, x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
        experts: ExpertWeights, segment_lengths: list[int] | None = None,
    ) -> torch.Tensor:
        num_tokens, k = top_k_index.shape
        num_local = len(experts.expert_ids)
        flat_expert = top_k_index.reshape(-1)  # [T*K]
        if segment_lengths is None or len(segment_lengths) <= 1 or not segment_runs_pay_off(x.device):
            sorted_expert, perm = torch.sort(flat_expert)
            counts = torch.bincount(sorted_expert, minlength=num_local)
            y = grouped_expert_mlp(x[perm // k], counts, experts)  # [T*K, H], sorted order
        else:
            # one matmul per (expert, segment), each segment's rows in the order of a forward of that
            # segment alone: its expert outputs are then bit-identical to that forward, whatever else is packed
            num_seg = len(segment_lengths)
            base = solo_sort_order(flat_expert, segment_lengths, k)
            # base lists the rows segment by segment, so the segment of base[j] is the segment of row j
            key = flat_expert.index_select(0, base) * num_seg + segment_of_rows(segment_lengths, k, x.device)
            perm = base.index_select(0, torch.argsort(key, stable=True))
            per_pair = torch.bincount(key, minlength=num_local * num_seg)
            counts = per_pair.view(num_local, num_seg).sum(1)
            runs = [(i // num_seg, n) for i, n in enumerate(per_pair.tolist()) if n]
            y = expert_runs(x[perm // k], runs, experts)
        self.last_counts[layer] = counts
        prev = self._totals.get(layer)
        self._totals[layer] = counts if prev is None else prev + counts
        weighted = y * top_k_weights.reshape(-1)[perm].unsqueeze(-1)
        inv = torch.empty_like(perm)
        inv[perm] = torch.arange(perm.shape[0], device=perm.device)
        return weighted[inv].view(num_tokens, k, x.shape[1]).float().sum(dim=1).to(x.dtype)
