"""Placing the W ranks of one EP group on one node, packed, with Ray Serve gang scheduling.

Each rank is a replica of one Serve deployment with ``GangSchedulingConfig(gang_size=W, PACK,
RESTART_GANG)``: Serve reserves the gang's resources in one placement group, starts the W replicas
together, tells each its rank (``serve.get_replica_context().gang_context``), and tears down and
restarts the whole gang when any member fails a health check or dies.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ray.serve.config import GangPlacementStrategy, GangRuntimeFailurePolicy, GangSchedulingConfig


@dataclass(frozen=True)
class GangMember:
    rank: int
    world_size: int
    gang_id: str
    member_replica_ids: tuple[str, ...]


def gang_scheduling_config(world_size: int) -> dict[str, Any]:
    """One EP group = one gang of W replicas, packed on a node, restarted as a whole on any failure (validated
    by Ray's ``GangSchedulingConfig``, returned as the plain JSON a Serve config file holds)."""
    return GangSchedulingConfig(gang_size=world_size, gang_placement_strategy=GangPlacementStrategy.PACK,
                                runtime_failure_policy=GangRuntimeFailurePolicy.RESTART_GANG).model_dump(mode="json")


def current_gang() -> GangMember:
    """This replica's place in its gang; raises when the deployment is not gang-scheduled."""
    from ray import serve

    ctx = serve.get_replica_context().gang_context
    if ctx is None:
        raise RuntimeError("this replica is not part of a gang: deploy EP ranks with "
                           "gang_scheduling_config=gang_scheduling_config(W) (see dgserve.replicas.ep_rank)")
    return GangMember(rank=ctx.rank, world_size=ctx.world_size, gang_id=ctx.gang_id,
                      member_replica_ids=tuple(ctx.member_replica_ids))


__all__ = ["GangMember", "current_gang", "gang_scheduling_config"]
