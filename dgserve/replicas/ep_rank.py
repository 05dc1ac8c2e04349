"""One EP rank as a Ray Serve replica; W of them, gang-scheduled, form one expert-parallel group.

``ep_rank_deployment(W, ...)`` returns a Serve deployment of :class:`EPRankReplica` with
``num_replicas=W`` and ``GangSchedulingConfig(gang_size=W, PACK, RESTART_GANG)``. Each replica reads
its rank from the gang context, joins the group through Ray's KV store (rank 0 picks the port and
the expert placement), and serves its own requests with a lockstep engine; any rank can take any
request (data-parallel attention), so the ordinary Serve router spreads requests over the ranks.
When a rank dies or its group breaks, its requests end with an error event and ``check_health``
fails, and Serve restarts the whole gang. The load-aware placement uses the expert counts the
previous incarnation published (rank 0 writes them to the KV store as the group runs).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import torch
from ray import serve

from dgserve.cluster import rendezvous
from dgserve.cluster.gang import current_gang, gang_scheduling_config, rank_actor_options
from dgserve.engine.engine import EngineConfig
from dgserve.engine.request import Event, FinalEvent, GenerationRequest
from dgserve.model.ep_dispatch import EPGroupStats
from dgserve.model.ep_weights import source_config
from dgserve.model.placement import ExpertPlacement
from dgserve.model.vision_checkpoint import VisionMode
from dgserve.replicas.ep_engine import LockstepEngine, build_ep_engine

log = logging.getLogger(__name__)

COUNTS_PUBLISH_S = 10.0


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


class EPRankReplica:
    """A Serve replica hosting one rank of an EP group (deploy with :func:`ep_rank_deployment`)."""

    def __init__(self, model: str, *, dtype: str = "float32", placement: str = "contiguous", num_redundant: int = 0,
                 engine_config: dict[str, Any] | None = None, collective_timeout_s: float = 60.0,
                 rendezvous_timeout_s: float = 120.0, group_name: str = "ep", seed: int = 0,
                 record_logits_dir: str | None = None, torch_threads: int | None = None,
                 vision: VisionMode = "auto") -> None:
        started = time.monotonic()
        if torch_threads:
            torch.set_num_threads(torch_threads)
        gang = current_gang()
        self.rank, self.world_size, self.gang_id = gang.rank, gang.world_size, gang.gang_id
        self.group_name = group_name
        device = "cuda:0" if torch.cuda.is_available() else "cpu"  # Ray shows a rank only its own GPU
        payload = None
        if gang.rank == 0:
            config = source_config(model)
            counts = rendezvous.kv_get(expert_counts_key(group_name)) if placement == "load_aware" else None
            chosen = choose_placement(config.text.num_experts, gang.world_size, placement,
                                      (counts or {}).get("counts"), num_redundant)
            payload = {"placement": chosen.to_json(), "placement_counts": (counts or {}).get("counts")}
        key = rendezvous.rendezvous_key(gang.gang_id, list(gang.member_replica_ids))
        group, payload = rendezvous.join_group(key, gang.rank, gang.world_size, device=device,
                                               timeout_s=collective_timeout_s,
                                               rendezvous_timeout_s=rendezvous_timeout_s, payload=payload)
        self.placement = ExpertPlacement.from_json(payload["placement"])
        self.placement_counts: list[float] | None = payload.get("placement_counts")  # what load_aware used
        self._last_publish = 0.0
        self.engine: LockstepEngine = build_ep_engine(
            model, group, self.placement, dtype=dtype, seed=seed,
            engine_config=EngineConfig(**engine_config) if engine_config else None, owns_group=True,
            on_stats_sync=self._publish_counts if gang.rank == 0 else None, vision=vision)
        self._recorded: dict[str, list[torch.Tensor]] = {}
        self._record_dir = Path(record_logits_dir) if record_logits_dir else None
        if self._record_dir is not None:  # tests: every denoising step's logits, saved per request at its end
            model_ = self.engine.engine.model
            self.engine.engine.on_denoise = \
                lambda rid, step, h: self._recorded.setdefault(rid, []).append(model_.logits(h).cpu())
        self.startup_seconds = time.monotonic() - started
        log.info("EP rank %d/%d of gang %s up in %.1fs", self.rank, self.world_size, self.gang_id,
                 self.startup_seconds)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Event]:
        async for ev in self.engine.generate(request):
            if self._record_dir is not None and isinstance(ev, FinalEvent):
                torch.save(self._recorded.pop(ev.request_id, []), self._record_dir / f"{ev.request_id}.pt")
            yield ev

    def stats(self) -> dict[str, float | int]:
        return self.engine.stats()

    def expert_counts(self) -> dict[str, list[list[int]]]:
        return self.engine.expert_counts()

    def check_health(self) -> None:
        self.engine.check_health()

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
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()


def ep_rank_deployment(world_size: int, *, name: str = "EPRank", device: str = "cpu", num_cpus: float = 1.0,
                       health_check_period_s: float = 2.0, health_check_timeout_s: float = 10.0,
                       **options: Any) -> serve.Deployment:
    """A gang-scheduled deployment of W :class:`EPRankReplica` (one EP group; bind it with the replica's
    constructor arguments). Extra ``options`` go to ``Deployment.options`` (e.g. ``max_ongoing_requests``)."""
    return serve.deployment(EPRankReplica).options(
        name=name, num_replicas=world_size, gang_scheduling_config=gang_scheduling_config(world_size),
        ray_actor_options=rank_actor_options(device, num_cpus), health_check_period_s=health_check_period_s,
        health_check_timeout_s=health_check_timeout_s, **options)


__all__ = ["EPRankReplica", "choose_placement", "ep_rank_deployment", "expert_counts_key"]
