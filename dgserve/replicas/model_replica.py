"""``ModelReplica``: the Ray Serve deployment that owns one model instance and its engine.

It streams engine events for each request, and reports its load to the request router
(``record_routing_stats``) and the autoscaler (``record_autoscaling_stats``). The class is plain Python
(the deployment decorator is applied in ``dgserve.routing.app``); one rank of an expert-parallel gang is
the subclass ``dgserve.replicas.ep_rank.EPModelReplica``.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import time
from collections.abc import AsyncIterator

import torch

from dgserve.config import ReplicaSlice
from dgserve.engine.engine import Engine
from dgserve.engine.loop import AsyncEngine
from dgserve.engine.prefix_keys import affinity_key
from dgserve.engine.prompt_images import key_ids
from dgserve.engine.request import CanvasEvent, EngineOverloaded, Event, FinalEvent, GenerationRequest
from dgserve.model.checkpoint import load
from dgserve.replicas.admission import QueueBound
from dgserve.replicas.capacity import CapacityEstimator

log = logging.getLogger(__name__)

# Prompt prefixes this replica served recently, reported for the router's prefix affinity.
RECENT_PREFIXES = 512


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class ModelReplica:
    """One model instance and its engine loop. Subclasses change how the engine is built (``_start_engine``)."""

    def __init__(self, config: ReplicaSlice) -> None:
        started = time.perf_counter()
        self.config = config
        self.loop: AsyncEngine = self._start_engine()
        self.engine = self.loop.engine
        self._recent: collections.OrderedDict[str, None] = collections.OrderedDict()
        self.capacity = CapacityEstimator(config.capacity_prior_tokens_per_s, max_canvases=config.engine.max_running)
        # with engine.max_waiting unset, the replica bounds its queue itself (a set max_waiting is the engine's)
        self.admission = QueueBound(self.capacity, max_running=config.engine.max_running,
                                    request_timeout_s=config.request_timeout_s,
                                    max_ongoing_requests=config.max_ongoing_requests,
                                    tokens_prior=self.engine.canvas) if config.engine.max_waiting is None else None
        self.metrics = _maybe_metrics(config.model.model_id)
        log.info("replica ready: %s in %.1fs", config.model.path, time.perf_counter() - started)

    def _start_engine(self) -> AsyncEngine:
        device = resolve_device(self.config.model.device)
        loaded = load(self.config.model.path, dtype=self.config.model.dtype, device=device,
                      revision=self.config.model.revision, vision=self.config.model.vision,
                      quantization=self.config.model.quantization, fp8_emulation=self.config.model.fp8_emulation)
        return AsyncEngine(Engine(loaded.model, loaded.generation, loaded.tokenizer, self.config.engine,
                                  vision=loaded.vision))

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Event]:
        key = None
        if self.config.prefix_affinity:
            # the images among the prompt's first tokens count, as the engine's prefix cache keys them
            key = affinity_key(key_ids(request.prompt_ids, request.images), self.engine.pool.block_size,
                               self.config.affinity_prefix_tokens)
        if key is not None:
            self._recent[key] = None
            self._recent.move_to_end(key)
            while len(self._recent) > RECENT_PREFIXES:
                self._recent.popitem(last=False)
        admission = self.admission
        if admission is not None and not admission.try_admit():
            raise EngineOverloaded(message=f"the replica's queue is full ({admission.in_flight} requests in flight, "
                                   f"what it serves within its wait budget); retry in about "
                                   f"{admission.retry_after_s():.1f} s")
        generated = None
        try:
            async for ev in self.loop.generate(request):
                if isinstance(ev, CanvasEvent):
                    self.capacity.add_tokens(len(ev.token_ids))
                elif isinstance(ev, FinalEvent):
                    generated = ev.stats.new_tokens
                    if self.metrics is not None:
                        self.metrics.on_final(ev)
                yield ev
        finally:
            if admission is not None:
                admission.release(generated)

    def record_routing_stats(self) -> dict:
        """Load report for the CanvasRouter (Serve calls it every ROUTING_STATS_PERIOD_S); also refreshes the
        engine gauges, so they update whether or not autoscaling is on."""
        st = self.loop.stats()
        if self.metrics is not None:
            self.metrics.on_engine_stats(st)
            # throughput vs capacity gauges, also when autoscaling (which asks for them too) is off
            self.metrics.on_autoscaling_stats(self.capacity.autoscaling_stats(st))
            if not self.engine.model.dispatcher.collective:  # EP ranks report group-wide counts themselves
                counts = self.engine.model.drain_expert_counts()
                if counts:
                    self.metrics.on_expert_counts(counts, 1.0)  # one device: no rank imbalance
        return {
            "active_canvases": st["active_canvases"], "running": st["running"], "waiting": st["waiting"],
            "free_kv_blocks": st["kv_blocks_free"], "kv_blocks_used": st["kv_blocks_used"],
            "prefix_keys": list(self._recent),
            "failed": not self.loop.alive(),  # e.g. an EP rank whose group broke: refuses work until restarted
        }

    def record_autoscaling_stats(self) -> dict:
        out = self.capacity.autoscaling_stats(self.loop.stats())
        if self.metrics is not None:
            self.metrics.on_autoscaling_stats(out)
        return out

    def engine_stats(self) -> dict:
        return self.loop.stats()

    async def drain(self, timeout_s: float = 60.0) -> bool:
        """Wait until every request sent here so far has finished or been cancelled, its pages freed (False if
        ``timeout_s`` passed first); ``engine_stats`` is current afterwards."""
        return await asyncio.to_thread(self.loop.drain, timeout_s)

    def process_stats(self) -> dict:
        """This replica's process id and resident memory (bytes; 0 where /proc is unavailable)."""
        return {"pid": os.getpid(), "rss_bytes": _rss_bytes()}

    def check_health(self) -> None:
        self.loop.check_health()

    def __del__(self) -> None:
        loop = getattr(self, "loop", None)
        if loop is not None:
            loop.shutdown()


def _rss_bytes() -> int:
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
    except (OSError, StopIteration, ValueError):
        return 0


def _maybe_metrics(model_id: str):
    try:
        from dgserve.replicas.metrics import ReplicaMetrics
    except ImportError:
        return None
    try:
        return ReplicaMetrics(model_id)
    except Exception:  # metrics must never take a replica down
        log.exception("metrics unavailable")
        return None
