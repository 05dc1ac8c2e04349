"""One expert-parallel rank's engine, stepped in lockstep with the other ranks of its group.

Each rank runs its own :class:`dgserve.engine.engine.Engine` (data-parallel attention: its own
requests, its own KV pages) over a model holding the dense weights and its share of the experts,
with an :class:`ExpertParallelDispatcher`, driven by the same :class:`dgserve.engine.loop.AsyncEngine`
as a single-process replica, with a :class:`LockstepBarrier` plugged in. MoE layers are collectives,
so every rank must run a forward at the same time: before each step the ranks all-reduce a (has work,
stop) flag on the CPU control group; if any rank has work, all step, and a rank whose engine has
nothing to run (or whose ``Engine.step()`` ends without a forward, e.g. when everything it planned
was preempted) takes part with an *empty forward*: each layer's dispatcher is called with zero
tokens, which is exactly the collective sequence of a real forward (counts + rows + results per
layer) at no model cost; no attention, KV or scratch sequence is involved. With no work anywhere,
ranks poll the flag every ``idle_poll_s`` together. Any exception in a step or a collective (a peer
died, or a collective timed out under the group's timeout) ends the loop for good: every request
gets a retryable error ``FinalEvent`` (the layer above retries elsewhere), the process group is torn
down so the peers fail fast too, and ``check_health`` raises so Serve restarts the whole gang.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

from dgserve.cluster.process_group import EPGroup
from dgserve.engine.engine import Engine, EngineConfig
from dgserve.engine.loop import AsyncEngine
from dgserve.engine.request import Event
from dgserve.model.checkpoint import resolve_dtype
from dgserve.model.ep_dispatch import EPGroupStats, ExpertParallelDispatcher
from dgserve.model.ep_weights import load_rank_share, source_config
from dgserve.model.placement import ExpertPlacement
from dgserve.model.vision_checkpoint import VisionMode

log = logging.getLogger(__name__)


class LockstepBarrier:
    """The ``StepBarrier`` of one EP rank: agrees on every step with its peers over the group's CPU control
    group and joins the MoE collectives with an empty forward when its engine runs none."""

    def __init__(self, dispatcher: ExpertParallelDispatcher, group: EPGroup, experts: list, *,
                 idle_poll_s: float = 0.01, stats_sync_every: int = 16, owns_group: bool = False,
                 on_stats_sync: Callable[[EPGroupStats], None] | None = None) -> None:
        self.label = f"EP rank {group.rank}"
        self.shutdown_message = "the EP group shut down"
        self.idle_poll_s = idle_poll_s
        self.dispatcher = dispatcher
        self.group = group
        self.stats_sync_every = max(1, stats_sync_every)
        self.owns_group = owns_group
        self.on_stats_sync = on_stats_sync
        self.steps = 0
        self.empty_forwards = 0
        self.idle_polls = 0
        self.step_seconds = 0.0
        self._experts = experts
        self._flags = torch.zeros(2, dtype=torch.int32)  # [any rank has work, any rank is stopping]

    def agree(self, has_work: bool, stopping: bool) -> tuple[bool, bool]:
        self._flags[0] = int(has_work)
        self._flags[1] = int(stopping)
        dist.all_reduce(self._flags, op=dist.ReduceOp.MAX, group=self.group.control)
        return bool(self._flags[0]), bool(self._flags[1])

    def on_idle(self) -> None:
        self.idle_polls += 1

    def step(self, engine: Engine) -> list[Event]:
        started = time.perf_counter()
        forwards = engine.forwards
        events = engine.step() if engine.has_work() else []
        if engine.forwards == forwards:  # no forward ran here: join the collectives empty
            cfg = engine.model.config.text
            self.dispatcher.empty_forward(self._experts, cfg.hidden_size, cfg.top_k_experts, engine.model.dtype)
            self.empty_forwards += 1
        self.steps += 1
        synced = self.dispatcher.sync_stats() if self.steps % self.stats_sync_every == 0 else None
        self.step_seconds += time.perf_counter() - started
        if synced is not None and self.on_stats_sync is not None:
            try:
                self.on_stats_sync(synced)
            except Exception:  # observability must never break serving
                log.warning("on_stats_sync callback failed", exc_info=True)
        return events

    def stats(self) -> dict[str, float | int]:
        return {**self.dispatcher.stats(), "ep_steps": self.steps, "ep_rank_empty_forwards": self.empty_forwards,
                "ep_idle_polls": self.idle_polls, "ep_step_seconds": round(self.step_seconds, 6)}

    def expert_counts(self) -> dict[str, list[list[int]]]:
        """Per layer, per expert token rows: routed by this rank (live) and by the whole group (as of the
        last stats sync, every ``stats_sync_every`` steps)."""
        group = self.dispatcher.group_stats
        return {"local": self.dispatcher.local_expert_counts().tolist(),
                "group": group.expert_counts.tolist() if group is not None else []}

    def close(self) -> None:
        if self.owns_group:
            self.group.destroy()


def build_ep_engine(model: str | Path, group: EPGroup, placement: ExpertPlacement | None = None, *,
                    engine_class: type[Engine] = Engine,
                    dtype: str | torch.dtype = torch.float32, engine_config: EngineConfig | None = None,
                    seed: int = 0, idle_poll_s: float = 0.01, stats_sync_every: int = 16, timing: bool = False,
                    owns_group: bool = False,
                    on_stats_sync: Callable[[EPGroupStats], None] | None = None,
                    vision: VisionMode = "auto") -> AsyncEngine:
    """This rank's model share (dense + owned experts; the vision tower, dense, on every rank) + EP dispatcher + an
    engine loop with a lockstep barrier.

    ``model``: checkpoint directory (experts slice-read) or preset name. ``placement``: the same on
    every rank (default contiguous). ``group``: from :func:`dgserve.cluster.process_group.init_ep_group`
    or :func:`dgserve.cluster.rendezvous.join_group`.
    """
    config = source_config(model)
    t = config.text
    placement = placement or ExpertPlacement.contiguous(t.num_experts, group.world_size)
    if placement.num_experts != t.num_experts or placement.world_size != group.world_size:
        raise ValueError(f"placement is for {placement.num_experts} experts on {placement.world_size} ranks; "
                         f"the model has {t.num_experts} experts and the group {group.world_size} ranks")
    owned = placement.owned_experts(group.rank)
    loaded = load_rank_share(model, owned, dtype=resolve_dtype(dtype), device=group.device, seed=seed, vision=vision)
    dispatcher = ExpertParallelDispatcher(placement, group.rank, t.num_hidden_layers, group=group.group,
                                          device=group.device, timing=timing)
    loaded.model.dispatcher = dispatcher
    engine = engine_class(loaded.model, loaded.generation, loaded.tokenizer, engine_config, vision=loaded.vision)
    log.info("EP rank %d/%d: %d experts %s", group.rank, group.world_size, len(owned), _ranges(owned))
    barrier = LockstepBarrier(dispatcher, group, [layer.experts for layer in loaded.model.layers],
                              idle_poll_s=idle_poll_s, stats_sync_every=stats_sync_every, owns_group=owns_group,
                              on_stats_sync=on_stats_sync)
    return AsyncEngine(engine, barrier, request_id_prefix=f"ep{group.rank}-req-")


def _ranges(ids: list[int]) -> str:
    parts, start = [], None
    for i, e in enumerate(ids):
        if start is None:
            start = e
        if i + 1 == len(ids) or ids[i + 1] != e + 1:
            parts.append(f"{start}" if start == e else f"{start}-{e}")
            start = None
    return ",".join(parts)


__all__ = ["LockstepBarrier", "build_ep_engine"]
