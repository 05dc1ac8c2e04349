"""``ModelReplica``: the Ray Serve deployment that owns one model instance and its engine.

It streams engine events for each request, and reports its load to the request router
(``record_routing_stats``) and the autoscaler (``record_autoscaling_stats``). The class is plain Python
(the deployment decorator is applied in ``dgserve.routing.app``), so it can be tested without Serve.
"""

from __future__ import annotations

import collections
import logging
import os
import time
from collections.abc import AsyncIterator

import torch

from dgserve.deploy.config import DeployConfig
from dgserve.engine.engine import AsyncEngine, Engine
from dgserve.engine.prefix_cache import block_keys
from dgserve.engine.prompt_images import key_ids
from dgserve.engine.request import CanvasEvent, Event, FinalEvent, GenerationRequest
from dgserve.model.checkpoint import load
from dgserve.replicas.capacity import CapacityEstimator

log = logging.getLogger(__name__)

# Prompt prefixes this replica served recently, reported for the router's prefix affinity.
RECENT_PREFIXES = 512


def affinity_key(request: GenerationRequest, block_size: int, max_tokens: int) -> str | None:
    """The prefix-cache key of the last complete block within the first ``max_tokens`` prompt tokens (the images
    among them included, as the engine's prefix cache keys them)."""
    keys = block_keys(key_ids(request.prompt_ids, request.images)[:max_tokens], block_size)
    return keys[-1].hex() if keys else None


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class ModelReplica:
    def __init__(self, args: dict) -> None:
        self.config = DeployConfig.from_args(args)
        device = resolve_device(self.config.model.device)
        started = time.perf_counter()
        loaded = load(self.config.model.path, dtype=self.config.model.dtype, device=device,
                      vision=self.config.model.vision)
        engine = Engine(loaded.model, loaded.generation, loaded.tokenizer, self.config.engine, vision=loaded.vision)
        self._setup(engine, AsyncEngine(engine))
        log.info("replica ready: %s on %s in %.1fs", self.config.model.path, device, time.perf_counter() - started)

    def _setup(self, engine: Engine, aengine) -> None:
        """``aengine``: anything with ``generate(request)``, ``stats()``, ``shutdown()`` over ``engine``."""
        self.engine = engine
        self.aengine = aengine
        self._recent: collections.OrderedDict[str, None] = collections.OrderedDict()
        self.capacity = CapacityEstimator(self.config.replicas.capacity_prior_tokens_per_s,
                                          max_canvases=self.config.engine.max_running)
        self.metrics = _maybe_metrics(self.config.model.model_id)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Event]:
        key = affinity_key(request, self.engine.pool.block_size, self.config.router.affinity_prefix_tokens)
        if key is not None:
            self._recent[key] = None
            self._recent.move_to_end(key)
            while len(self._recent) > RECENT_PREFIXES:
                self._recent.popitem(last=False)
        async for ev in self.aengine.generate(request):
            if isinstance(ev, CanvasEvent):
                self.capacity.add_tokens(len(ev.token_ids))
            elif isinstance(ev, FinalEvent) and self.metrics is not None:
                self.metrics.on_final(ev)
            yield ev

    def record_routing_stats(self) -> dict:
        """Load report for the CanvasRouter (Serve calls it every ROUTING_STATS_PERIOD_S); also refreshes the
        engine gauges, so they update whether or not autoscaling is on."""
        st = self.engine.stats()
        if self.metrics is not None:
            self.metrics.on_engine_stats(st)
            # throughput vs capacity gauges, also when autoscaling (which asks for them too) is off
            self.metrics.on_autoscaling_stats(self.capacity.autoscaling_stats(st))
            drain = getattr(self.engine.model.dispatcher, "drain_counts", None)
            if drain is not None:
                counts = drain()
                if counts:
                    self.metrics.on_expert_counts(counts, 1.0)  # one device: no rank imbalance
        return {
            "active_canvases": st["active_canvases"], "running": st["running"], "waiting": st["waiting"],
            "free_kv_blocks": st["kv_blocks_free"], "kv_blocks_used": st["kv_blocks_used"],
            "prefix_keys": list(self._recent),
            "failed": bool(st.get("ep_failed", 0)),  # an EP rank whose group broke: refuses work until restarted
        }

    def record_autoscaling_stats(self) -> dict:
        out = self.capacity.autoscaling_stats(self.engine.stats())
        if self.metrics is not None:
            self.metrics.on_autoscaling_stats(out)
        return out

    def engine_stats(self) -> dict:
        return self.engine.stats()

    def process_stats(self) -> dict:
        """This replica's process id and resident memory (bytes; 0 where /proc is unavailable)."""
        return {"pid": os.getpid(), "rss_bytes": _rss_bytes()}

    def check_health(self) -> None:
        if not self.aengine._thread.is_alive():
            raise RuntimeError("engine worker thread died")


class EPModelReplica(ModelReplica):
    """One rank of an expert-parallel gang: the same API as ModelReplica (so the router and the ingress
    treat ranks as replicas: data-parallel attention, each rank its own requests), with the MoE layers
    exchanging tokens with the other ranks of its gang in lockstep."""

    def __init__(self, args: dict) -> None:
        from dgserve.replicas.ep_rank import EPRankReplica

        self.config = DeployConfig.from_args(args)
        self.rank = EPRankReplica(self.config.model.path, dtype=self.config.model.dtype,
                                  placement=self.config.replicas.ep_placement,
                                  engine_config=self.config.engine.model_dump(), vision=self.config.model.vision)
        self._setup(self.rank.engine.engine, self.rank.engine)

    def check_health(self) -> None:
        self.rank.check_health()

    def __del__(self) -> None:
        aengine = getattr(self, "aengine", None)
        if aengine is not None:
            aengine.shutdown()


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
