"""Which rank of an expert-parallel group holds which MoE experts: an explicit, serialisable map.

``ExpertPlacement.contiguous`` splits experts into equal runs (rank r holds E/W consecutive experts);
``ExpertPlacement.load_aware`` balances observed per-expert token counts the way DeepSeek's EPLB does:
replicate the hottest experts into spare slots (each replica then carries a share of its load),
then pack the slots onto ranks heaviest first, each to the least-loaded rank that still has room.
One placement covers every layer (the model loads one list of expert ids per rank).
"""

from __future__ import annotations

import heapq
import json
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ExpertPlacement:
    """``replicas[e]``: the ranks holding expert ``e`` (at least one; sorted, no duplicates)."""

    num_experts: int
    world_size: int
    replicas: tuple[tuple[int, ...], ...]

    def __post_init__(self) -> None:
        if self.world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {self.world_size}")
        if len(self.replicas) != self.num_experts:
            raise ValueError(f"placement lists {len(self.replicas)} experts, expected {self.num_experts}")
        for e, ranks in enumerate(self.replicas):
            if not ranks:
                raise ValueError(f"expert {e} is placed on no rank")
            if len(set(ranks)) != len(ranks) or any(not 0 <= r < self.world_size for r in ranks):
                raise ValueError(f"expert {e}: invalid ranks {ranks} for world_size {self.world_size}")
        for r in range(self.world_size):
            if not self.owned_experts(r):
                raise ValueError(f"rank {r} holds no expert; use a smaller group or more experts")

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def contiguous(cls, num_experts: int, world_size: int) -> ExpertPlacement:
        """Rank r holds experts ``[r*E/W, (r+1)*E/W)`` (the first ``E mod W`` ranks one more when uneven)."""
        if num_experts < world_size:
            raise ValueError(f"cannot place {num_experts} experts on {world_size} ranks (fewer experts than ranks)")
        base, extra = divmod(num_experts, world_size)
        replicas: list[tuple[int, ...]] = []
        for r in range(world_size):
            replicas.extend((r,) for _ in range(base + (r < extra)))
        return cls(num_experts, world_size, tuple(replicas))

    @classmethod
    def load_aware(cls, expert_load: Sequence[float] | torch.Tensor, world_size: int,
                   num_redundant: int = 0) -> ExpertPlacement:
        """Greedy EPLB-style placement from observed per-expert token counts ``[E]`` (summed over layers).

        ``num_redundant`` extra slots hold replicas of the hottest experts (each time the expert
        with the highest load per replica gets one more replica, on a rank that does not hold it yet).
        Every rank gets the same number of slots, ``(E + num_redundant) / W``, so per-rank memory stays equal.
        """
        load = [float(x) for x in (expert_load.tolist() if isinstance(expert_load, torch.Tensor) else expert_load)]
        num_experts = len(load)
        slots_total = num_experts + num_redundant
        if num_redundant < 0:
            raise ValueError("num_redundant must be >= 0")
        if slots_total % world_size:
            raise ValueError(f"num_experts + num_redundant = {slots_total} must be a multiple of world_size "
                             f"{world_size} so every rank holds the same number of experts")
        if num_experts < world_size:
            raise ValueError(f"cannot place {num_experts} experts on {world_size} ranks (fewer experts than ranks)")
        per_rank = slots_total // world_size
        if num_redundant and max(load) <= 0:
            num_redundant = 0  # nothing observed: replicas would be arbitrary; stay at one copy each
            per_rank = -(-num_experts // world_size)
        # 1) replicas: repeatedly give one more copy to the expert with the largest load per copy
        copies = [1] * num_experts
        heap = [(-load[e], e) for e in range(num_experts)]
        heapq.heapify(heap)
        for _ in range(num_redundant):
            while True:
                _, e = heapq.heappop(heap)
                if copies[e] < world_size:
                    break  # a rank holds at most one copy of an expert
            copies[e] += 1
            heapq.heappush(heap, (-load[e] / copies[e], e))
        # 2) pack the slots heaviest first onto the least-loaded rank with room that lacks that expert
        slots = sorted(((load[e] / copies[e], e) for e in range(num_experts) for _ in range(copies[e])),
                       key=lambda s: (-s[0], s[1]))
        rank_load = [0.0] * world_size
        rank_slots = [0] * world_size
        replicas: list[list[int]] = [[] for _ in range(num_experts)]
        for slot_load, e in slots:
            candidates = [r for r in range(world_size) if rank_slots[r] < per_rank and r not in replicas[e]]
            if not candidates:  # only when uneven leftovers remain: any rank lacking the expert
                candidates = [r for r in range(world_size) if r not in replicas[e]]
            r = min(candidates, key=lambda r: (rank_load[r], rank_slots[r], r))
            replicas[e].append(r)
            rank_load[r] += slot_load
            rank_slots[r] += 1
        return cls(num_experts, world_size, tuple(tuple(sorted(r)) for r in replicas))

    # -- queries ----------------------------------------------------------------------------------
    def owned_experts(self, rank: int) -> list[int]:
        """Global ids of the experts rank ``rank`` holds, ascending (its local expert order)."""
        return [e for e, ranks in enumerate(self.replicas) if rank in ranks]

    def rank_load(self, expert_load: Sequence[float] | torch.Tensor) -> list[float]:
        """Expected rows per rank when each expert's load is split evenly over its replicas."""
        load = expert_load.tolist() if isinstance(expert_load, torch.Tensor) else list(expert_load)
        out = [0.0] * self.world_size
        for e, ranks in enumerate(self.replicas):
            for r in ranks:
                out[r] += float(load[e]) / len(ranks)
        return out

    def imbalance(self, expert_load: Sequence[float] | torch.Tensor) -> float:
        """max/mean of ``rank_load`` (1.0 = perfectly balanced)."""
        loads = self.rank_load(expert_load)
        mean = sum(loads) / len(loads)
        return max(loads) / mean if mean > 0 else 1.0

    # -- serialisation (rank 0 publishes the placement with the rendezvous address) ---------------
    def to_json(self) -> str:
        return json.dumps({"num_experts": self.num_experts, "world_size": self.world_size,
                           "replicas": [list(r) for r in self.replicas]})

    @classmethod
    def from_json(cls, text: str) -> ExpertPlacement:
        raw = json.loads(text)
        return cls(int(raw["num_experts"]), int(raw["world_size"]),
                   tuple(tuple(int(r) for r in ranks) for ranks in raw["replicas"]))


__all__ = ["ExpertPlacement"]
