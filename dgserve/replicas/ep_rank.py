"""One rank of an expert-parallel group as a model replica; W of them, gang-scheduled, form one group.

``EPModelReplica`` is a ``ModelReplica`` (so the router and the ingress treat ranks as replicas: any rank takes
any request, data-parallel attention) whose engine loop steps in lockstep with its gang. ``build_app`` deploys it
with ``GangSchedulingConfig(gang_size=W, PACK, RESTART_GANG)`` when ``replicas.ep_size > 1``. Each replica reads
its rank from the gang context, joins the group through Ray's KV store (rank 0 picks the port and the expert
placement), and serves its own requests. When a rank dies or its group breaks, its requests end with a retryable
error event, ``check_health`` fails, and Serve restarts the whole gang. The load-aware placement uses the expert
counts the previous incarnation published (rank 0 writes them to the KV store as the group runs, keyed by the
Serve application).
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import torch
from ray import serve

from dgserve.cluster import rendezvous
from dgserve.cluster.gang import current_gang
from dgserve.config import ReplicaSlice
from dgserve.engine.engine import Engine
from dgserve.engine.loop import AsyncEngine
from dgserve.model.checkpoint import resolve_source
from dgserve.model.ep_dispatch import EPGroupStats
from dgserve.model.ep_weights import source_config
from dgserve.model.placement import ExpertPlacement
from dgserve.replicas.ep_engine import LockstepBarrier, build_ep_engine
from dgserve.replicas.model_replica import ModelReplica

log = logging.getLogger(__name__)

COUNTS_PUBLISH_S = 10.0
RENDEZVOUS_TIMEOUT_S = 120.0  # the whole gang must start within this


def expert_counts_key(name: str) -> str:
    return f"ep/expert_counts/{name}"


def choose_placement(num_experts: int, world_size: int, policy: str, counts: list[float] | None,
                     num_redundant: int = 0) -> ExpertPlacement:
    """``contiguous``, or ``load_aware`` from observed counts (contiguous until counts exist)."""
    if policy == "contiguous" or not counts or sum(counts) <= 0:
        if policy == "load_aware":
            log.info("no expert counts observed yet: contiguous placement for this start")
        return ExpertPlacement.contiguous(num_experts, world_size)
    if policy != "load_aware":
        raise ValueError(f"unknown placement policy {policy!r} (use 'contiguous' or 'load_aware')")
    return ExpertPlacement.load_aware(counts, world_size, num_redundant=num_redundant)


class EPModelReplica(ModelReplica):
    """A model replica hosting one rank of an EP group (see the module docstring).

    ``torch_threads`` pins this rank's intra-op threads. ``engine_class`` is the rank's engine (a subclass may
    observe it: the tests record every step's logits this way).
    """

    engine_class: type[Engine] = Engine

    def __init__(self, config: ReplicaSlice, *, torch_threads: int | None = None) -> None:
        if torch_threads:
            torch.set_num_threads(torch_threads)
        self._last_publish = 0.0
        super().__init__(config)

    def _start_engine(self) -> AsyncEngine:
        started = time.monotonic()
        cfg = self.config
        gang = current_gang()
        self.rank, self.world_size, self.gang_id = gang.rank, gang.world_size, gang.gang_id
        self.group_name = serve.get_replica_context().app_name  # one key space per application
        device = "cuda:0" if cfg.model.device != "cpu" and torch.cuda.is_available() else "cpu"  # Ray shows one GPU
        path = resolve_source(cfg.model.path, cfg.model.revision)  # a Hugging Face model id: its local snapshot
        payload = None
        if gang.rank == 0:
            counts = rendezvous.kv_get(expert_counts_key(self.group_name)) if cfg.ep_placement == "load_aware" \
                else None
            chosen = choose_placement(source_config(path).text.num_experts, gang.world_size,
                                      cfg.ep_placement, (counts or {}).get("counts"), cfg.ep_num_redundant)
            payload = {"placement": chosen.to_json(), "placement_counts": (counts or {}).get("counts")}
        key = rendezvous.rendezvous_key(gang.gang_id, list(gang.member_replica_ids))
        group, payload = rendezvous.join_group(key, gang.rank, gang.world_size, device=device,
                                               timeout_s=cfg.ep_collective_timeout_s,
                                               rendezvous_timeout_s=RENDEZVOUS_TIMEOUT_S, payload=payload)
        self.placement = ExpertPlacement.from_json(payload["placement"])
        self.placement_counts: list[float] | None = payload.get("placement_counts")  # what load_aware used
        loop = build_ep_engine(path, group, self.placement, dtype=cfg.model.dtype, engine_class=self.engine_class,
                               engine_config=cfg.engine, owns_group=True,
                               on_stats_sync=self._publish_counts if gang.rank == 0 else None,
                               vision=cfg.model.vision)
        self.startup_seconds = time.monotonic() - started
        log.info("EP rank %d/%d of gang %s up in %.1fs", self.rank, self.world_size, self.gang_id,
                 self.startup_seconds)
        return loop

    def expert_counts(self) -> dict[str, list[list[int]]]:
        assert isinstance(self.loop.barrier, LockstepBarrier)
        return self.loop.barrier.expert_counts()

    def rank_info(self) -> dict[str, Any]:
        return {"rank": self.rank, "world_size": self.world_size, "gang_id": self.gang_id, "pid": os.getpid(),
                "startup_seconds": self.startup_seconds, "placement": self.placement.to_json(),
                "placement_counts": self.placement_counts}

    def _publish_counts(self, stats: EPGroupStats) -> None:
        now = time.monotonic()
        if now - self._last_publish < COUNTS_PUBLISH_S:
            return
        self._last_publish = now
        rendezvous.kv_put(expert_counts_key(self.group_name),
                          {"counts": stats.expert_counts.sum(0).tolist(), "imbalance": stats.imbalance})

    def __del__(self) -> None:
        loop = getattr(self, "loop", None)
        if loop is not None:  # a collective in flight may take up to its timeout to give up
            loop.shutdown(timeout_s=self.config.ep_collective_timeout_s + 10)


__all__ = ["EPModelReplica", "choose_placement", "expert_counts_key"]
