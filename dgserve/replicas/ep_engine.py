"""One expert-parallel rank's engine, stepped in lockstep with the other ranks of its group.

Each rank runs its own :class:`dgserve.engine.engine.Engine` (data-parallel attention: its own
requests, its own KV pages) over a model holding the dense weights and its share of the experts,
with an :class:`ExpertParallelDispatcher`. MoE layers are collectives, so every rank must run a
forward at the same time: before each step the ranks all-reduce a (has work, stop) flag on the CPU
control group; if any rank has work, all step, and a rank whose engine has nothing to run (or whose
``Engine.step()`` ends without a forward, e.g. when everything it planned was preempted) takes part
with an *empty forward*: each layer's dispatcher is called with zero tokens, which is exactly the
collective sequence of a real forward (counts + rows + results per layer) at no model cost; no
attention, KV or scratch sequence is involved. With no work anywhere, ranks poll the flag every
``idle_poll_s`` together. Any exception in a step or a collective (a peer died, or a collective
timed out under the group's timeout) fails this rank for good: every request gets an error
``FinalEvent`` (the layer above retries elsewhere), the process group is torn down so the peers fail
fast too, and ``check_health`` raises so Serve restarts the whole gang.

``LockstepEngine`` has the interface of :class:`dgserve.engine.engine.AsyncEngine`
(``generate``, ``stats``, ``shutdown``), so the serving layer can use either.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import torch
import torch.distributed as dist

from dgserve.cluster.process_group import EPGroup
from dgserve.engine.engine import Engine, EngineConfig, EngineOverloaded
from dgserve.engine.request import Event, FinalEvent, GenerationRequest, RequestStats
from dgserve.model.checkpoint import resolve_dtype
from dgserve.model.ep_dispatch import EPGroupStats, ExpertParallelDispatcher
from dgserve.model.ep_weights import load_rank_share, source_config
from dgserve.model.placement import ExpertPlacement
from dgserve.model.vision_checkpoint import VisionMode

log = logging.getLogger(__name__)


class EPGroupFailed(RuntimeError):
    """This rank's EP group broke (a peer died, a collective timed out, or a step failed)."""


class LockstepEngine:
    """Drives one rank's ``Engine`` in lockstep with its peers (see the module docstring).

    As in ``AsyncEngine``, the asyncio side never waits for a step: requests and cancellations go
    through a thread-safe inbox that the driver drains between steps, and ``stats()`` reads a
    snapshot the driver refreshes after each step.
    """

    def __init__(self, engine: Engine, dispatcher: ExpertParallelDispatcher, group: EPGroup, *,
                 idle_poll_s: float = 0.01, stats_sync_every: int = 16, owns_group: bool = False,
                 on_stats_sync: Callable[[EPGroupStats], None] | None = None) -> None:
        self.engine = engine
        self.dispatcher = dispatcher
        self.group = group
        self.idle_poll_s = idle_poll_s
        self.stats_sync_every = max(1, stats_sync_every)
        self.owns_group = owns_group
        self.on_stats_sync = on_stats_sync
        self.failed: str | None = None
        self.steps = 0  # group steps this rank took part in (equal on every rank)
        self.empty_forwards = 0
        self.idle_polls = 0
        self.step_seconds = 0.0
        self._experts = [layer.experts for layer in engine.model.layers]
        self._inbox: queue.SimpleQueue[tuple[str, GenerationRequest | str]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._queues: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue[Event]]] = {}
        self._stopping = False
        self._counter = itertools.count(1)
        self._snapshot: dict[str, float | int] = {}
        self._snapshot_at = 0.0
        self._refresh_snapshot()
        self._thread = threading.Thread(target=self._run, name=f"dgserve-ep-rank{group.rank}", daemon=True)
        self._thread.start()

    # -- the driver thread ------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._loop()
        except Exception as exc:
            log.exception("EP rank %d failed", self.group.rank)
            self._fail(f"EP rank {self.group.rank} failed: {type(exc).__name__}: {exc}")
            if self.owns_group:
                self.group.destroy()  # peers blocked in a collective with us fail now, not at their timeout
        else:
            self._fail("the EP group shut down")
            if self.owns_group:
                self.group.destroy()

    def _drain_inbox(self) -> list[Event]:
        events: list[Event] = []
        while True:
            try:
                kind, item = self._inbox.get_nowait()
            except queue.Empty:
                return events
            if kind == "add":
                assert isinstance(item, GenerationRequest)
                try:
                    self.engine.add_request(item)
                except (ValueError, EngineOverloaded) as exc:
                    events.append(FinalEvent(item.request_id, "error", RequestStats(), str(exc),
                                             overloaded=isinstance(exc, EngineOverloaded)))
            else:
                events.extend(self.engine.cancel(str(item)))

    def _loop(self) -> None:
        flags = torch.zeros(2, dtype=torch.int32)  # [any rank has work, any rank is stopping]
        cfg = self.engine.model.config.text
        while True:
            events = self._drain_inbox()
            if not (self._stopping or self.engine.has_work() or events):
                self._wake.wait(self.idle_poll_s)
                self._wake.clear()
                events.extend(self._drain_inbox())
            for ev in events:
                self._deliver(ev)
            flags[0] = int(self.engine.has_work())
            flags[1] = int(self._stopping)
            dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.group.control)
            if flags[1]:
                return
            if not flags[0]:
                self.idle_polls += 1
                if time.monotonic() - self._snapshot_at > 0.5:
                    self._refresh_snapshot()
                continue
            started = time.perf_counter()
            forwards = self.engine.forwards
            events = self.engine.step() if self.engine.has_work() else []
            if self.engine.forwards == forwards:  # no forward ran here: join the collectives empty
                self.dispatcher.empty_forward(self._experts, cfg.hidden_size, cfg.top_k_experts,
                                              self.engine.model.dtype)
                self.empty_forwards += 1
            self.steps += 1
            synced = self.dispatcher.sync_stats() if self.steps % self.stats_sync_every == 0 else None
            self.step_seconds += time.perf_counter() - started
            for ev in events:
                self._deliver(ev)
            self._refresh_snapshot()
            if synced is not None and self.on_stats_sync is not None:
                try:
                    self.on_stats_sync(synced)
                except Exception:  # observability must never break serving
                    log.warning("on_stats_sync callback failed", exc_info=True)

    def _refresh_snapshot(self) -> None:
        snap = dict(self.engine.stats())
        snap.update(self.dispatcher.stats())
        self._snapshot = snap
        self._snapshot_at = time.monotonic()

    def _fail(self, message: str) -> None:
        if self.failed is None:
            self.failed = message  # set before the sweep: generate() re-checks it after registering
        finals: list[Event] = []
        for rid in list(self._queues):
            try:
                cancelled = self.engine.cancel(rid)
            except Exception:  # engine state may be inconsistent after a failed step
                cancelled = []
            stats = next((e.stats for e in cancelled if isinstance(e, FinalEvent)), RequestStats())
            finals.append(FinalEvent(rid, "error", stats, message, retryable=True))
        self.engine.waiting.clear()
        for ev in finals:
            self._deliver(ev)
        with contextlib.suppress(Exception):
            self._refresh_snapshot()

    def _deliver(self, ev: Event) -> None:
        target = self._queues.get(ev.request_id)
        if target is not None:
            loop, q = target
            with contextlib.suppress(RuntimeError):  # the consumer's loop may be closed
                loop.call_soon_threadsafe(q.put_nowait, ev)

    # -- the AsyncEngine interface ----------------------------------------------------------------
    async def generate(self, request: GenerationRequest) -> AsyncIterator[Event]:
        """Raises ValueError / EngineOverloaded before the first event; then yields events up to one
        FinalEvent (``error`` when the group fails: the caller may retry on another group)."""
        if not request.request_id:
            request.request_id = f"ep{self.group.rank}-req-{next(self._counter)}"
        rid = request.request_id
        if self.failed is None:
            check = getattr(self.engine, "check_request", None)
            if check is not None:
                check(request)
        q: asyncio.Queue[Event] = asyncio.Queue()
        self._queues[rid] = (asyncio.get_running_loop(), q)
        finished = False
        try:
            if self.failed is not None:
                finished = True
                yield FinalEvent(rid, "error", RequestStats(prompt_tokens=len(request.prompt_ids)), self.failed,
                                 retryable=True)
                return
            self._inbox.put(("add", request))
            self._wake.set()
            while True:
                ev = await q.get()
                finished = isinstance(ev, FinalEvent)
                yield ev
                if finished:
                    return
        finally:
            self._queues.pop(rid, None)
            if not finished and self.failed is None:
                self._inbox.put(("cancel", rid))
                self._wake.set()

    def stats(self) -> dict[str, float | int]:
        out = dict(self._snapshot)
        out.update({"ep_steps": self.steps, "ep_rank_empty_forwards": self.empty_forwards,
                    "ep_idle_polls": self.idle_polls, "ep_step_seconds": round(self.step_seconds, 6),
                    "ep_failed": int(self.failed is not None)})
        return out

    def expert_counts(self) -> dict[str, list[list[int]]]:
        """Per layer, per expert token rows: routed by this rank (live) and by the whole group (as of the
        last stats sync, every ``stats_sync_every`` steps)."""
        group = self.dispatcher.group_stats
        return {"local": self.dispatcher.local_expert_counts().tolist(),
                "group": group.expert_counts.tolist() if group is not None else []}

    def check_health(self) -> None:
        if self.failed is not None:
            raise EPGroupFailed(self.failed)
        if not self._thread.is_alive():
            raise EPGroupFailed("the EP driver thread is not running")

    def shutdown(self) -> None:
        """Stop this rank; the stop flag stops the peers at the same step."""
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout=self.group.timeout_s + 10)


def build_ep_engine(model: str | Path, group: EPGroup, placement: ExpertPlacement | None = None, *,
                    dtype: str | torch.dtype = torch.float32, engine_config: EngineConfig | None = None,
                    seed: int = 0, idle_poll_s: float = 0.01, stats_sync_every: int = 16, timing: bool = True,
                    owns_group: bool = False,
                    on_stats_sync: Callable[[EPGroupStats], None] | None = None,
                    vision: VisionMode = "auto") -> LockstepEngine:
    """This rank's model share (dense + owned experts; the vision tower, dense, on every rank) + EP dispatcher + a
    lockstep-driven engine.

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
    engine = Engine(loaded.model, loaded.generation, loaded.tokenizer, engine_config, vision=loaded.vision)
    log.info("EP rank %d/%d: %d experts %s", group.rank, group.world_size, len(owned), _ranges(owned))
    return LockstepEngine(engine, dispatcher, group, idle_poll_s=idle_poll_s, stats_sync_every=stats_sync_every,
                          owns_group=owns_group, on_stats_sync=on_stats_sync)


def _ranges(ids: list[int]) -> str:
    parts, start = [], None
    for i, e in enumerate(ids):
        if start is None:
            start = e
        if i + 1 == len(ids) or ids[i + 1] != e + 1:
            parts.append(f"{start}" if start == e else f"{start}-{e}")
            start = None
    return ",".join(parts)


__all__ = ["EPGroupFailed", "LockstepEngine", "build_ep_engine"]
