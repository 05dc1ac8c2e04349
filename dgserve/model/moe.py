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
    """Computes ``sum_k weight[t, k] * expert_{index[t, k]}(x[t])`` for every token ``t``."""

    def __call__(
        self, layer: int, x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
        experts: ExpertWeights,
    ) -> torch.Tensor:
        """x ``[T, H]``, top_k_index ``[T, K]`` (global expert ids), top_k_weights ``[T, K]`` fp32.
        Returns ``[T, H]`` in x's dtype; the weighted combination is accumulated in fp32."""
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
    out, start = [], 0
    for local, n in enumerate(counts.tolist()):
        if n:
            out.append(experts.run_expert(local, sorted_x[start:start + n]))
        start += n
    return torch.cat(out)


class LocalDispatcher:
    """All experts on this device: rows sorted by expert, grouped matmuls, weighted combination
    summed over the top-k in fp32 (the reference's grouped path, so results match it bit for bit
    where the kernels agree)."""

    def __init__(self) -> None:
        self.last_counts: dict[int, torch.Tensor] = {}  # layer -> tokens per expert of the last call
        self._totals: dict[int, torch.Tensor] = {}  # layer -> tokens per expert since the last drain (on device)

    def drain_counts(self) -> dict[int, list[int]]:
        """Tokens routed to each expert, per layer, since the previous drain (for metrics)."""
        totals, self._totals = self._totals, {}
        return {layer: t.tolist() for layer, t in totals.items()}

    def __call__(
        self, layer: int, x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
        experts: ExpertWeights,
    ) -> torch.Tensor:
        num_tokens, k = top_k_index.shape
        flat_expert = top_k_index.reshape(-1)  # [T*K]
        sorted_expert, perm = torch.sort(flat_expert)
        counts = torch.bincount(sorted_expert, minlength=len(experts.expert_ids))
        self.last_counts[layer] = counts
        prev = self._totals.get(layer)
        self._totals[layer] = counts if prev is None else prev + counts
        y = grouped_expert_mlp(x[perm // k], counts, experts)  # [T*K, H], sorted order
        weighted = y * top_k_weights.reshape(-1)[perm].unsqueeze(-1)
        inv = torch.empty_like(perm)
        inv[perm] = torch.arange(perm.shape[0], device=perm.device)
        return weighted[inv].view(num_tokens, k, x.shape[1]).float().sum(dim=1).to(x.dtype)
