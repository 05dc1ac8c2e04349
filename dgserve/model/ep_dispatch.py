"""Expert-parallel MoE dispatch over a ``torch.distributed`` process group.

``ExpertParallelDispatcher`` implements :class:`dgserve.model.moe.MoEDispatcher`: ``dispatch`` sends each
(token, k) row to a rank holding its expert (an explicit :class:`ExpertPlacement`), where the rows are
computed grouped by local expert; ``combine`` brings them back and combines them with the router weights in
fp32. Per layer: an ``all_to_all_single`` of per-(rank, local expert) counts, one of the rows (and, on CPU,
one of their segment tags), one back.
Every rank must call it for every layer of every forward, also with zero tokens (mismatched
collectives hang or time out). It also records routing counts, per-rank load and timings.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from dgserve.model.batch_invariance import segment_runs_pay_off
from dgserve.model.moe import (
    DispatcherBase,
    ExpertBatch,
    ExpertWeights,
    combine_rows,
    expert_counts,
    segment_of_rows,
    solo_sort_order,
)
from dgserve.model.placement import ExpertPlacement

log = logging.getLogger(__name__)


@dataclass
class EPGroupStats:
    """Group-wide MoE figures, as of the last :meth:`ExpertParallelDispatcher.sync_stats`."""

    expert_counts: torch.Tensor  # [L, E] rows routed to each (global) expert, all ranks together
    rank_load: torch.Tensor  # [L, W] rows each rank computed

    @property
    def imbalance(self) -> float:
        """max/mean of per-rank rows over all layers (1.0 = balanced)."""
        loads = self.rank_load.sum(0).double()
        mean = float(loads.mean())
        return float(loads.max()) / mean if mean > 0 else 1.0

    @property
    def layer_imbalance(self) -> float:
        """Mean over layers of max/mean rank rows in that layer (what each layer's all-to-all waits on)."""
        loads = self.rank_load.double()
        mean = loads.mean(1)
        ok = mean > 0
        if not bool(ok.any()):
            return 1.0
        return float((loads.max(1).values[ok] / mean[ok]).mean())


@dataclass
class _EPContext:
    perm: torch.Tensor  # [T*K]: sent row j is (token, k) row perm[j]
    order: torch.Tensor  # received rows in expert order: computed row j is received row order[j]
    send_splits: list[int]
    recv_splits: list[int]
    top_k_weights: torch.Tensor
    dtype: torch.dtype
    dispatched_at: float


class ExpertParallelDispatcher(DispatcherBase):
    """MoE dispatch across the ranks of an EP group (see the module docstring).

    ``placement`` must be the same on every rank; this rank's model holds exactly
    ``placement.owned_experts(rank)`` (checked per call). Where an expert has several replicas, a
    row goes to this rank's own copy if it has one, else to replica ``(token + rank) mod copies``
    (on CPU ``(segment + rank) mod copies``, keeping a segment's rows of an expert together):
    deterministic, and spreading a hot expert's rows over its copies.
    """

    collective = True  # every rank calls it for every layer of every forward

    def __init__(self, placement: ExpertPlacement, rank: int, num_layers: int,
                 group: dist.ProcessGroup | None = None, device: torch.device | str = "cpu",
                 timing: bool = False, segment_runs: bool = True) -> None:
        self.placement = placement
        self.rank = rank
        self.world = placement.world_size
        self.group = group
        self.device = torch.device(device)
        self.num_layers = num_layers
        # phase timings on CUDA synchronise the stream six times per layer: only for benchmarks that ask
        self.timing = timing
        # CPU exact mode: each segment's rows of an expert in a matmul of their own (see LocalDispatcher)
        self.segment_runs = segment_runs
        if group is not None or dist.is_initialized():
            actual = dist.get_world_size(group)
            if actual != self.world:
                raise ValueError(f"placement is for {self.world} ranks but the process group has {actual}")
        num_e = placement.num_experts
        self.owned = placement.owned_experts(rank)
        self.max_local = max(len(placement.owned_experts(r)) for r in range(self.world))
        max_copies = max(len(r) for r in placement.replicas)
        replica_rank = torch.full((num_e, max_copies), -1, dtype=torch.long)
        copies = torch.empty(num_e, dtype=torch.long)
        own_copy = torch.full((num_e,), -1, dtype=torch.long)
        local_index = torch.full((self.world, num_e), -1, dtype=torch.long)
        for e, ranks in enumerate(placement.replicas):
            copies[e] = len(ranks)
            for i, r in enumerate(ranks):
                replica_rank[e, i] = r
                if r == rank:
                    own_copy[e] = i
        for r in range(self.world):
            for i, e in enumerate(placement.owned_experts(r)):
                local_index[r, e] = i
        self._replica_rank = replica_rank.to(self.device)
        self._copies = copies.to(self.device)
        self._own_copy = own_copy.to(self.device)
        self._local_index = local_index.to(self.device)
        self.reset_stats()

    # -- the MoEDispatcher interface --------------------------------------------------------------
    def dispatch(self, layer: int, x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                 experts: ExpertWeights, segment_lengths: list[int] | None = None
                 ) -> tuple[ExpertBatch, _EPContext]:
        assert experts.expert_ids == self.owned, (
            f"rank {self.rank} layer {layer} holds experts {experts.expert_ids}, placement says {self.owned}")
        w, lmax = self.world, self.max_local
        num_tokens, k = top_k_index.shape
        hidden = x.shape[1]
        t0 = self._now()
        flat_expert = top_k_index.reshape(-1)  # [T*K] global expert ids
        token = torch.arange(num_tokens, device=x.device).repeat_interleave(k)  # [T*K]
        # on CPU, rows carry their segment so that each segment's rows of an expert get a matmul of their own
        # (batch invariance, see segment_runs_pay_off); the same choice on every rank of a group
        invariant = self.segment_runs and segment_runs_pay_off(x.device)
        lengths = segment_lengths if segment_lengths is not None else [num_tokens]
        tag = segment_of_rows(lengths, k, x.device) if invariant else None  # [T*K]
        copies = self._copies[flat_expert]
        own = self._own_copy[flat_expert]
        # spread a replicated expert's rows over its copies by token; on CPU by segment, so that all rows of
        # a segment for one expert stay together
        spread = token if tag is None else tag
        choice = torch.where(own >= 0, own, (spread + self.rank) % copies)
        dest = self._replica_rank[flat_expert, choice]  # [T*K] destination rank
        key = dest * lmax + self._local_index[dest, flat_expert]  # (rank, local expert) bucket
        if tag is None:
            perm = torch.argsort(key, stable=True)
        else:  # within a bucket: segment by segment, each in the order of a dispatch of that segment alone
            base = solo_sort_order(flat_expert, lengths, k)
            perm = base.index_select(0, torch.argsort(key.index_select(0, base), stable=True))
        send_counts = expert_counts(key, w * lmax)  # [W*Lmax]
        recv_counts = torch.empty_like(send_counts)
        self._routed[layer] += expert_counts(flat_expert, self.placement.num_experts)
        t1 = self._now()
        dist.all_to_all_single(recv_counts, send_counts, group=self.group)
        send_splits = send_counts.view(w, lmax).sum(1).tolist()
        recv_matrix = recv_counts.view(w, lmax)  # [source rank, my local expert]
        recv_splits = recv_matrix.sum(1).tolist()
        send_x = x.index_select(0, token.index_select(0, perm))  # [T*K, H], bucket order
        recv_x = x.new_empty(sum(recv_splits), hidden)
        dist.all_to_all_single(recv_x, send_x, recv_splits, send_splits, group=self.group)
        if tag is not None:
            recv_tag = tag.new_empty(recv_x.shape[0])
            dist.all_to_all_single(recv_tag, tag.index_select(0, perm), recv_splits, send_splits, group=self.group)
        t2 = self._now()
        # received rows are source-major, local-expert-minor: regroup by local expert; on CPU run each
        # (local expert, source rank, segment) as a matmul of its own, so that a segment's expert outputs
        # do not depend on the rows other segments or other ranks send along (batch invariance)
        local_of_row = torch.arange(lmax, device=x.device).repeat(w).repeat_interleave(recv_counts)
        order = torch.argsort(local_of_row, stable=True)
        runs = None
        if order.numel() and tag is not None:
            source_of_row = torch.arange(w, device=x.device).repeat_interleave(lmax).repeat_interleave(recv_counts)
            num_tags = int(recv_tag.max()) + 1
            run_key = ((local_of_row * w + source_of_row) * num_tags + recv_tag).index_select(0, order)
            run_ids, run_counts = torch.unique_consecutive(run_key, return_counts=True)
            runs = list(zip((run_ids // (w * num_tags)).tolist(), run_counts.tolist(), strict=True))
        batch = ExpertBatch(recv_x.index_select(0, order), recv_matrix.sum(0)[:len(self.owned)], runs)
        self._rank_rows[layer] += int(recv_x.shape[0])
        remote_out = sum(n for r, n in enumerate(send_splits) if r != self.rank)
        remote_in = sum(n for r, n in enumerate(recv_splits) if r != self.rank)
        self.rows_sent_remote += remote_out
        self.bytes_sent += (remote_out + remote_in) * hidden * x.element_size()  # dispatch out + combine out
        self.a2a_seconds += t2 - t1
        self.other_seconds += t1 - t0
        ctx = _EPContext(perm, order, send_splits, recv_splits, top_k_weights, x.dtype, self._now())
        return batch, ctx

    def combine(self, layer: int, y: torch.Tensor, ctx: _EPContext) -> torch.Tensor:
        t3 = self._now()
        self.expert_seconds += t3 - ctx.dispatched_at
        grouped = torch.empty_like(y)
        grouped[ctx.order] = y  # back to the received (source-major) order
        back = y.new_empty(ctx.perm.shape[0], y.shape[1])
        dist.all_to_all_single(back, grouped, ctx.send_splits, ctx.recv_splits, group=self.group)
        t4 = self._now()
        out = combine_rows(back, ctx.perm, ctx.top_k_weights, ctx.dtype)
        self.a2a_seconds += t4 - t3
        self.other_seconds += self._now() - t4
        self.calls += 1
        return out

    def empty_forward(self, experts_per_layer: list[ExpertWeights], hidden: int, top_k: int,
                      dtype: torch.dtype) -> None:
        """Take part in every layer's collectives with zero tokens (a rank without work this step)."""
        x = torch.empty(0, hidden, dtype=dtype, device=self.device)
        index = torch.empty(0, top_k, dtype=torch.long, device=self.device)
        weights = torch.empty(0, top_k, dtype=torch.float32, device=self.device)
        for layer, experts in enumerate(experts_per_layer):
            self(layer, x, index, weights, experts)
        self.empty_forwards += 1

    # -- observability ----------------------------------------------------------------------------
    def reset_stats(self) -> None:
        self._routed = torch.zeros(self.num_layers, self.placement.num_experts, dtype=torch.long,
                                   device=self.device)  # rows this rank routed to each expert
        self._rank_rows = [0] * self.num_layers  # rows this rank computed, per layer
        self.a2a_seconds = 0.0
        self.expert_seconds = 0.0
        self.other_seconds = 0.0
        self.calls = 0
        self.empty_forwards = 0
        self.rows_sent_remote = 0
        self.bytes_sent = 0  # dispatch + combine, rows that leave this rank
        self.group_stats: EPGroupStats | None = None

    def local_expert_counts(self) -> torch.Tensor:
        """``[L, E]`` rows this rank's tokens routed to each expert (cumulative)."""
        return self._routed.cpu()

    def sync_stats(self) -> EPGroupStats:
        """COLLECTIVE (every rank, same step): sum routing counts and gather per-rank loads."""
        num_l, num_e, w = self.num_layers, self.placement.num_experts, self.world
        loads = torch.zeros(num_l, w, dtype=torch.long, device=self.device)
        loads[:, self.rank] = torch.tensor(self._rank_rows, dtype=torch.long, device=self.device)
        buf = torch.cat([self._routed.reshape(-1), loads.reshape(-1)])
        dist.all_reduce(buf, group=self.group)
        buf = buf.cpu()
        self.group_stats = EPGroupStats(expert_counts=buf[:num_l * num_e].view(num_l, num_e),
                                        rank_load=buf[num_l * num_e:].view(num_l, w))
        return self.group_stats

    def stats(self) -> dict[str, float | int]:
        """Flat figures for engine stats (group-wide ones as of the last ``sync_stats``)."""
        moe = self.a2a_seconds + self.expert_seconds + self.other_seconds
        out: dict[str, float | int] = {
            "ep_rank": self.rank, "ep_world_size": self.world, "ep_local_experts": len(self.owned),
            "ep_moe_calls": self.calls, "ep_empty_forwards": self.empty_forwards,
            "ep_all_to_all_seconds": round(self.a2a_seconds, 6),
            "ep_expert_compute_seconds": round(self.expert_seconds, 6),
            "ep_dispatch_other_seconds": round(self.other_seconds, 6),
            "ep_all_to_all_fraction": round(self.a2a_seconds / moe, 4) if moe > 0 else 0.0,
            "ep_rows_computed": sum(self._rank_rows), "ep_rows_sent_remote": self.rows_sent_remote,
            "ep_bytes_sent": self.bytes_sent,
        }
        g = self.group_stats
        if g is not None:
            loads = g.rank_load.sum(0).tolist()
            out["ep_imbalance"] = round(g.imbalance, 4)
            out["ep_layer_imbalance"] = round(g.layer_imbalance, 4)
            for r, n in enumerate(loads):
                out[f"ep_rank_load_{r}"] = int(n)
        return out

    def _now(self) -> float:
        if not self.timing:
            return 0.0
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()


__all__ = ["EPGroupStats", "ExpertParallelDispatcher"]
