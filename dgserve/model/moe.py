"""The MoE layer written once: dispatch -> expert compute -> combine.

The router and the packed expert weights live in the model. A *token dispatcher* decides where each
(token, k) row's expert MLP runs: ``LocalDispatcher`` runs every expert on this device, the expert-parallel
dispatcher (``dgserve.model.ep_dispatch``, same interface) sends rows to the ranks owning their experts and
brings the results back. Only dispatch and combine differ; :func:`run_moe` is the one MoE forward, and
:class:`ExpertWeights` computes whatever rows a dispatcher hands it, in one of two ways:

- *runs* (exact mode on CPU): consecutive runs of rows, one matmul per run, in the order a forward of that
  segment alone would use, which makes a request's result independent of its batch-mates
  (``dgserve.model.batch_invariance``);
- *grouped* (everything else): one grouped matmul per projection with per-expert offsets on the device, no
  host synchronisation (``torch.nn.functional.grouped_mm`` where the device and dtype support it, or with
  ``kernel = "triton"`` the fused MoE kernel of ``dgserve.kernels.fused_moe``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from dgserve.model.batch_invariance import segment_runs_pay_off
from dgserve.model.triton_ops import fused_expert_mlp


@dataclass
class ExpertBatch:
    """Rows handed to the expert MLPs: ``x [N, H]`` grouped by local expert, ``counts[e]`` rows for local
    expert ``e`` (a device tensor); ``runs`` (host side, exact mode) splits the rows further, ``(local expert,
    rows)`` per matmul, or is None for one grouped kernel."""

    x: torch.Tensor
    counts: torch.Tensor
    runs: list[tuple[int, int]] | None = None


class ExpertWeights(nn.Module):
    """Packed expert MLPs of one layer, ``gate_up_proj [E, 2I, H]`` and ``down_proj [E, H, I]``.

    ``expert_ids`` lists which global experts this module holds (all of them on a single device; a
    rank's share under expert parallelism), in the order of the first dimension. ``kernel``: how the grouped path
    runs, ``"torch"`` (``grouped_mm``) or ``"triton"`` (the fast runner sets it from ``engine.moe_kernel``).
    """

    kernel = "torch"

    def __init__(self, hidden: int, intermediate: int, expert_ids: list[int]) -> None:
        super().__init__()
        self.expert_ids = list(expert_ids)
        n = len(expert_ids)
        self.gate_up_proj = nn.Parameter(torch.empty(n, 2 * intermediate, hidden), requires_grad=False)
        self.down_proj = nn.Parameter(torch.empty(n, hidden, intermediate), requires_grad=False)
        # rows routed to each local expert since the last drain (metrics), counted on the device
        self.register_buffer("routed", torch.zeros(n, dtype=torch.long), persistent=False)

    def run_expert(self, local_index: int, x: torch.Tensor) -> torch.Tensor:
        """One expert's gated gelu-tanh MLP on ``x [n, H]``."""
        gate, up = F.linear(x, self.gate_up_proj[local_index]).chunk(2, dim=-1)  # [n, I] each
        return F.linear(F.gelu(gate, approximate="tanh") * up, self.down_proj[local_index])  # [n, H]

    def forward(self, batch: ExpertBatch) -> torch.Tensor:
        """``[N, H]`` expert outputs of the batch's rows, in the batch's order and x's dtype."""
        if batch.runs is not None:
            return expert_runs(batch.x, batch.runs, self)
        if self.kernel == "triton" and batch.x.shape[0]:
            return fused_expert_mlp(batch.x, batch.counts, self)
        return grouped_expert_mlp(batch.x, batch.counts, self)

    def sync_free(self, x: torch.Tensor) -> bool:
        """Whether the grouped path runs rows like ``x`` without reading the expert counts on the host (which a
        CUDA graph could not capture)."""
        return self.kernel == "triton" or grouped_mm_supported(x, self)


def grouped_mm_supported(x: torch.Tensor, experts: ExpertWeights) -> bool:
    """Whether ``F.grouped_mm`` runs the expert projections on this device and dtype: bf16 on CUDA (as torch
    implements it), any float dtype on CPU; every operand's row stride must be a multiple of 16 bytes."""
    if not hasattr(F, "grouped_mm"):
        return False
    if x.device.type == "cuda":
        dtype_ok = x.dtype == torch.bfloat16
    else:
        dtype_ok = x.device.type in ("cpu", "meta") and x.dtype in (torch.float32, torch.bfloat16)
    if not dtype_ok:
        return False
    align = 16 // x.element_size()
    inter = experts.down_proj.shape[-1]
    return x.shape[-1] % align == 0 and inter % align == 0


@torch.library.custom_op("dgserve::grouped_mm_cpu", mutates_args=())
def _grouped_mm_cpu(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """``F.grouped_mm`` on CPU, as one opaque op: an ``mm`` per group, reading the offsets on the host (free on a
    CPU). torch's CPU grouped kernel is ~18x slower with the column-major weights a GPU wants (measured at the
    bench-cpu expert shapes: 26 ms vs 1.4 ms), and its shape function insists on bf16 (the CUDA kernel's rule),
    so ``torch.compile`` could not trace fp32 calls to it either."""
    out = x.new_empty(x.shape[0], w.shape[-1])
    start = 0
    for group, end in enumerate(offs.tolist()):
        if end > start:
            torch.mm(x[start:end], w[group], out=out[start:end])
        start = end
    return out


@_grouped_mm_cpu.register_fake
def _(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], w.shape[-1])


def grouped_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """``F.grouped_mm``; on CPU the opaque per-group op above."""
    if x.device.type == "cpu":
        return _grouped_mm_cpu(x, w, offs)
    return F.grouped_mm(x, w, offs=offs)


def grouped_expert_mlp(sorted_x: torch.Tensor, counts: torch.Tensor, experts: ExpertWeights) -> torch.Tensor:
    """Expert MLPs over rows already grouped by local expert (``counts[e]`` rows each): one grouped
    matmul per projection, offsets on the device (no host sync), where supported; else one matmul per
    expert, which reads the counts on the host."""
    if sorted_x.shape[0] == 0:
        return sorted_x.new_empty(0, sorted_x.shape[1])
    if grouped_mm_supported(sorted_x, experts):
        offs = torch.cumsum(counts, dim=0, dtype=torch.int32)
        gate_up = grouped_mm(sorted_x, experts.gate_up_proj.transpose(-2, -1), offs)
        gate, up = gate_up.chunk(2, dim=-1)
        return grouped_mm(F.gelu(gate, approximate="tanh") * up, experts.down_proj.transpose(-2, -1), offs)
    return expert_runs(sorted_x, [(local, int(n)) for local, n in enumerate(counts.tolist())], experts)


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


def expert_counts(expert_of_row: torch.Tensor, num_experts: int) -> torch.Tensor:
    """``[num_experts]`` rows per expert, without a host sync (``bincount`` sizes its output from the data)."""
    counts = torch.zeros(num_experts, dtype=torch.long, device=expert_of_row.device)
    return counts.scatter_add_(0, expert_of_row, torch.ones_like(expert_of_row))


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


def combine_rows(y: torch.Tensor, perm: torch.Tensor, top_k_weights: torch.Tensor, dtype: torch.dtype
                 ) -> torch.Tensor:
    """The weighted sum over the top-k, in fp32: row ``j`` of ``y [T*K, H]`` is the expert output of (token,
    k) row ``perm[j]``; returns ``[T, H]`` in ``dtype`` (the reference's grouped combine, bit for bit)."""
    num_tokens, k = top_k_weights.shape
    weighted = y * top_k_weights.reshape(-1).index_select(0, perm).unsqueeze(-1)  # fp32
    rows = torch.empty_like(weighted)
    rows[perm] = weighted
    return rows.view(num_tokens, k, y.shape[-1]).float().sum(dim=1).to(dtype)


class MoEDispatcher(Protocol):
    """Moves (token, k) rows to where their experts run and the results back.

    ``collective``: every rank of a group must make the same calls, so the model may not add a forward
    of its own accord (it then never splits a packed batch)."""

    collective: bool

    def dispatch(self, layer: int, x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                 experts: ExpertWeights, segment_lengths: list[int] | None = None) -> tuple[ExpertBatch, Any]:
        """x ``[T, H]``, top_k_index ``[T, K]`` (global expert ids), top_k_weights ``[T, K]`` fp32.
        Returns the rows ``experts`` computes here and a context for :meth:`combine`.

        ``segment_lengths`` splits the T tokens into the packed forward's segments (in order). A dispatcher
        that keeps each segment's rows of an expert in a matmul of their own makes a segment's result
        independent of what else is in the batch (see :func:`expert_runs`); None: one grouped kernel."""
        ...

    def combine(self, layer: int, y: torch.Tensor, ctx: Any) -> torch.Tensor:
        """The expert outputs of :meth:`dispatch`'s rows -> ``[T, H]`` in x's dtype, accumulated in fp32."""
        ...


def run_moe(dispatcher: MoEDispatcher, layer: int, x: torch.Tensor, top_k_index: torch.Tensor,
            top_k_weights: torch.Tensor, experts: ExpertWeights, segment_lengths: list[int] | None = None
            ) -> torch.Tensor:
    """The MoE forward: ``sum_k weight[t, k] * expert_{index[t, k]}(x[t])`` for every token ``t``."""
    batch, ctx = dispatcher.dispatch(layer, x, top_k_index, top_k_weights, experts, segment_lengths)
    return dispatcher.combine(layer, experts(batch), ctx)


class DispatcherBase:
    """What both dispatchers share: calling one runs the whole MoE (:func:`run_moe`)."""

    collective = False

    def __call__(self, layer: int, x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                 experts: ExpertWeights, segment_lengths: list[int] | None = None) -> torch.Tensor:
        return run_moe(self, layer, x, top_k_index, top_k_weights, experts, segment_lengths)  # type: ignore[arg-type]


@dataclass
class _LocalContext:
    perm: torch.Tensor  # [T*K]: grouped row j is (token, k) row perm[j]
    top_k_weights: torch.Tensor
    dtype: torch.dtype


class LocalDispatcher(DispatcherBase):
    """All experts on this device: rows sorted by expert, grouped matmuls, weighted combination
    summed over the top-k in fp32 (the reference's grouped path, so results match it bit for bit
    where the kernels agree).

    ``segment_runs``: on CPU and given segment lengths, one matmul per (expert, segment) (exact mode's batch
    invariance); off, one grouped kernel for everything, without host syncs (the fast path). Routing counts
    accumulate on each layer's :class:`ExpertWeights` (``routed``), on the device."""

    def __init__(self, segment_runs: bool = True) -> None:
        self.segment_runs = segment_runs

    def dispatch(self, layer: int, x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                 experts: ExpertWeights, segment_lengths: list[int] | None = None
                 ) -> tuple[ExpertBatch, _LocalContext]:
        k = top_k_index.shape[1]
        num_local = len(experts.expert_ids)
        flat_expert = top_k_index.reshape(-1)  # [T*K]
        runs = None
        if (not self.segment_runs or segment_lengths is None or len(segment_lengths) <= 1
                or not segment_runs_pay_off(x.device)):
            perm = torch.sort(flat_expert)[1]
            counts = expert_counts(flat_expert, num_local)
            if torch.is_grad_enabled() and (x.requires_grad or experts.gate_up_proj.requires_grad):
                # training: torch's grouped kernel has no backward on CPU; one differentiable matmul per expert
                runs = [(local, int(n)) for local, n in enumerate(counts.tolist())]
        else:
            # one matmul per (expert, segment), each segment's rows in the order of a forward of that
            # segment alone: its expert outputs are then bit-identical to that forward, whatever else is packed
            num_seg = len(segment_lengths)
            base = solo_sort_order(flat_expert, segment_lengths, k)
            # base lists the rows segment by segment, so the segment of base[j] is the segment of row j
            key = flat_expert.index_select(0, base) * num_seg + segment_of_rows(segment_lengths, k, x.device)
            perm = base.index_select(0, torch.argsort(key, stable=True))
            per_pair = expert_counts(key, num_local * num_seg)
            counts = per_pair.view(num_local, num_seg).sum(1)
            runs = [(i // num_seg, n) for i, n in enumerate(per_pair.tolist()) if n]
        experts.routed.add_(counts)  # for metrics: DiffusionGemma.drain_expert_counts
        batch = ExpertBatch(x.index_select(0, perm // k), counts, runs)
        return batch, _LocalContext(perm, top_k_weights, x.dtype)

    def combine(self, layer: int, y: torch.Tensor, ctx: _LocalContext) -> torch.Tensor:
        return combine_rows(y, ctx.perm, ctx.top_k_weights, ctx.dtype)
