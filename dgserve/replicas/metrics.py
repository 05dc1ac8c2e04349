"""Prometheus metrics of a model replica, recorded through ``ray.serve.metrics``.

``METRIC_NAMES`` is the one catalogue of dgserve's metrics (name -> kind, description, labels): the replica
records exactly these, and the Grafana dashboards (``dgserve.deploy.dashboards``) may query only these.
Ray exports them on its metrics port with a ``ray_`` prefix (``exported_names`` gives the series names).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from dgserve.engine.request import FinalEvent

log = logging.getLogger(__name__)

MetricKind = Literal["counter", "gauge", "histogram"]

# Ray (2.60) prefixes every application metric with ``ray_``; a counter is exported as ``<name>_total``
# (whether or not the name already ends in ``_total``), a histogram as ``_bucket``/``_sum``/``_count``.
# Ray Serve adds ``deployment``, ``replica`` and ``application`` labels inside a replica, and Ray adds
# ``SessionName``, ``NodeAddress``, ``WorkerId``, ``Component`` and ``Version``.
EXPORT_PREFIX = "ray_"
SERVE_LABELS = ("deployment", "replica", "application")


@dataclass(frozen=True)
class MetricSpec:
    kind: MetricKind
    description: str
    labels: tuple[str, ...]
    boundaries: tuple[float, ...] = ()  # histogram bucket upper bounds (Ray wants them > 0)


_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0, 60.0, 120.0, 300.0)
_STEP_BUCKETS = (1, 2, 4, 6, 8, 10, 12, 14, 16, 20, 24, 32, 48, 64, 96, 128)
_TPF_BUCKETS = (0.5, 1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 128, 256)
_IMAGE_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 32)
_VISION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

METRIC_NAMES: dict[str, MetricSpec] = {
    # Requests
    "dgserve_requests": MetricSpec(
        "counter", "Requests by outcome: the engine's finish reason (stop, length, cancelled, error) or the "
        "HTTP status of a request refused before the engine (429, 503, ...).", ("model", "status")),
    "dgserve_rejected_requests": MetricSpec(
        "counter", "Requests refused before reaching an engine, by HTTP status (429: overloaded or over the "
        "per-key limit). Also counted in dgserve_requests.", ("model", "status_code")),
    "dgserve_failovers": MetricSpec(
        "counter", "Requests resubmitted to another replica after theirs died mid-stream.", ("model",)),
    "dgserve_prompt_tokens": MetricSpec("counter", "Prompt tokens of finished requests.", ("model",)),
    "dgserve_generated_tokens": MetricSpec(
        "counter", "New tokens committed to clients (up to EOS/stop), of finished requests.", ("model",)),
    "dgserve_canvases": MetricSpec("counter", "Canvases committed, of finished requests.", ("model",)),
    "dgserve_steps_per_canvas": MetricSpec(
        "histogram", "Denoising steps (decoder forwards) one canvas took before it was committed.", ("model",),
        _STEP_BUCKETS),
    "dgserve_tokens_per_forward": MetricSpec(
        "histogram", "Per request: committed new tokens per denoising forward (the diffusion speed-up; "
        "an autoregressive model has 1).", ("model",), _TPF_BUCKETS),
    "dgserve_time_to_first_canvas_seconds": MetricSpec(
        "histogram", "Time from admission to the first committed canvas.", ("model",), _LATENCY_BUCKETS),
    "dgserve_request_latency_seconds": MetricSpec(
        "histogram", "End-to-end engine time of a finished request.", ("model",), _LATENCY_BUCKETS),
    "dgserve_images": MetricSpec("counter", "Images in the prompts of finished requests.", ("model",)),
    "dgserve_images_per_request": MetricSpec(
        "histogram", "Images in one request's prompt, of finished requests that had any.", ("model",),
        _IMAGE_BUCKETS),
    "dgserve_vision_encoder_seconds": MetricSpec(
        "histogram", "Vision encoder time spent on one request's images (its share of the batched runs), of "
        "finished requests that had any.", ("model",), _VISION_BUCKETS),
    # Engine state (sampled from Engine.stats())
    "dgserve_replica_up": MetricSpec("gauge", "1 while a replica of this model is alive.", ("model",)),
    "dgserve_queue_depth": MetricSpec("gauge", "Requests waiting for admission to the engine.", ("model",)),
    "dgserve_running_requests": MetricSpec("gauge", "Requests admitted to the engine.", ("model",)),
    "dgserve_active_canvases": MetricSpec("gauge", "Canvases being denoised.", ("model",)),
    "dgserve_canvases_per_forward": MetricSpec(
        "gauge", "Batch occupancy: mean canvases per decoder forward over the engine's recent steps.", ("model",)),
    "dgserve_batch_tokens_per_forward": MetricSpec(
        "gauge", "Mean tokens (prefill, canvas and commit) processed per engine forward, recent steps.",
        ("model",)),
    "dgserve_forwards": MetricSpec("counter", "Engine steps (batched forwards).", ("model",)),
    "dgserve_kv_pages": MetricSpec("gauge", "KV-cache pages (full-attention pool) by state: used, free.",
                                   ("model", "state")),
    "dgserve_kv_cache_bytes": MetricSpec("gauge", "KV-cache bytes by state: used, capacity.", ("model", "state")),
    "dgserve_prefix_cache_hit_rate": MetricSpec(
        "gauge", "Fraction of looked-up prompt tokens served from the prefix cache.", ("model",)),
    # Autoscaling signals (what the replica reports through record_autoscaling_stats)
    "dgserve_throughput_tokens_per_s": MetricSpec(
        "gauge", "Committed tokens per second of this replica, recent window.", ("model",)),
    "dgserve_capacity_tokens_per_s": MetricSpec(
        "gauge", "Tokens per second this replica sustains at saturation, learned online.", ("model",)),
    # Expert parallelism
    "dgserve_expert_tokens": MetricSpec(
        "counter", "Tokens routed to each expert, per MoE layer (EP ranks report their local counts).",
        ("model", "layer", "expert")),
    "dgserve_expert_rank_imbalance": MetricSpec(
        "gauge", "EP load imbalance: max over ranks of routed tokens / mean over ranks (1 = balanced).",
        ("model",)),
}


def exported_names(name: str) -> tuple[str, ...]:
    """The Prometheus series names Ray exports for catalogue entry ``name``."""
    spec = METRIC_NAMES[name]
    base = EXPORT_PREFIX + name
    if spec.kind == "counter":
        return (base if base.endswith("_total") else base + "_total",)
    if spec.kind == "histogram":
        return (base + "_bucket", base + "_sum", base + "_count")
    return (base,)


def all_exported_names() -> frozenset[str]:
    return frozenset(n for name in METRIC_NAMES for n in exported_names(name))


def _serve_metric_types() -> dict[MetricKind, Callable[..., Any]]:
    from ray.serve import metrics

    return {"counter": metrics.Counter, "gauge": metrics.Gauge, "histogram": metrics.Histogram}


def _build(kinds: Mapping[MetricKind, Callable[..., Any]], name: str, spec: MetricSpec) -> Any:
    if spec.kind == "histogram":
        return kinds["histogram"](name, description=spec.description, boundaries=list(spec.boundaries),
                                  tag_keys=spec.labels)
    return kinds[spec.kind](name, description=spec.description, tag_keys=spec.labels)


class ReplicaMetrics:
    """A replica's metrics: one object per process, fed by the replica's engine events and stats (and by the
    ingress, for rejections and failovers; a process that never calls ``on_engine_stats`` is not counted
    as a replica).

    ``metric_types`` maps kind -> metric class (default: ``ray.serve.metrics`` Counter/Gauge/Histogram);
    tests pass recording fakes. Every method is cheap and never raises into the serving path.
    """

    def __init__(self, model_id: str, *, metric_types: Mapping[MetricKind, Callable[..., Any]] | None = None) -> None:
        self.model_id = model_id
        kinds = metric_types or _serve_metric_types()
        self._m: dict[str, Any] = {}
        for name, spec in METRIC_NAMES.items():
            m = _build(kinds, name, spec)
            m.set_default_tags({"model": model_id})
            self._m[name] = m
        self._last_forwards: int | None = None

    # -- recording helpers ------------------------------------------------------------------------------------

    def _inc(self, name: str, value: float = 1.0, **tags: str) -> None:
        if value > 0:  # Ray counters refuse non-positive increments
            self._m[name].inc(value, tags=tags or None)

    def _set(self, name: str, value: float, **tags: str) -> None:
        if math.isfinite(value):
            self._m[name].set(value, tags=tags or None)

    def _observe(self, name: str, value: float) -> None:
        if math.isfinite(value):
            self._m[name].observe(value)

    # -- the API the replica and the ingress call -------------------------------------------------------------

    def on_final(self, final: FinalEvent) -> None:
        """A request finished (any reason): count it and record its per-request histograms."""
        try:
            s = final.stats
            self._inc("dgserve_requests", status=final.finish_reason)
            self._inc("dgserve_prompt_tokens", s.prompt_tokens)
            self._inc("dgserve_generated_tokens", s.new_tokens)
            self._inc("dgserve_canvases", s.canvases)
            for steps in s.steps_per_canvas:
                self._observe("dgserve_steps_per_canvas", steps)
            if s.denoise_steps:
                self._observe("dgserve_tokens_per_forward", s.tokens_per_forward)
            if s.time_to_first_canvas is not None:
                self._observe("dgserve_time_to_first_canvas_seconds", s.time_to_first_canvas)
            if s.seconds > 0:
                self._observe("dgserve_request_latency_seconds", s.seconds)
            if s.images:
                self._inc("dgserve_images", s.images)
                self._observe("dgserve_images_per_request", s.images)
                self._observe("dgserve_vision_encoder_seconds", s.vision_seconds)
        except Exception:  # metrics must never fail a request
            log.exception("recording a finished request's metrics failed")

    def on_engine_stats(self, stats: Mapping[str, float | int]) -> None:
        """Sample ``Engine.stats()``: queue depth, occupancy, KV pages, prefix-cache hit rate, forwards."""
        try:
            self._set("dgserve_replica_up", 1.0)  # only engine owners call this, not the ingress
            for key, name in (("waiting", "dgserve_queue_depth"), ("running", "dgserve_running_requests"),
                              ("active_canvases", "dgserve_active_canvases"),
                              ("canvases_per_forward", "dgserve_canvases_per_forward"),
                              ("tokens_per_forward", "dgserve_batch_tokens_per_forward"),
                              ("prefix_cache_hit_rate", "dgserve_prefix_cache_hit_rate")):
                if key in stats:
                    self._set(name, float(stats[key]))
            for key, state in (("kv_blocks_used", "used"), ("kv_blocks_free", "free")):
                if key in stats:
                    self._set("dgserve_kv_pages", float(stats[key]), state=state)
            for key, state in (("kv_bytes_used", "used"), ("kv_bytes_capacity", "capacity")):
                if key in stats:
                    self._set("dgserve_kv_cache_bytes", float(stats[key]), state=state)
            if "forwards" in stats:
                # Engine.stats() carries a cumulative count; the counter takes increments.
                forwards = int(stats["forwards"])
                if self._last_forwards is not None and forwards >= self._last_forwards:
                    self._inc("dgserve_forwards", forwards - self._last_forwards)
                elif self._last_forwards is None:
                    self._inc("dgserve_forwards", forwards)
                self._last_forwards = forwards
        except Exception:
            log.exception("recording engine stats failed")

    def on_autoscaling_stats(self, stats: Mapping[str, float]) -> None:
        """Export what the replica reports to the autoscaler (``record_autoscaling_stats``) as gauges."""
        try:
            if "tokens_per_s" in stats:
                self._set("dgserve_throughput_tokens_per_s", float(stats["tokens_per_s"]))
            if "capacity_tokens_per_s" in stats:
                self._set("dgserve_capacity_tokens_per_s", float(stats["capacity_tokens_per_s"]))
        except Exception:
            log.exception("recording autoscaling stats failed")

    def on_expert_counts(self, counts: Mapping[int, Iterable[int]], imbalance: float) -> None:
        """Tokens routed per expert since the previous call (``layer -> [count per expert]``), and the EP
        rank imbalance (max/mean routed tokens over ranks) of the same interval."""
        try:
            for layer, per_expert in counts.items():
                for expert, n in enumerate(per_expert):
                    self._inc("dgserve_expert_tokens", float(n), layer=str(layer), expert=str(expert))
            self._set("dgserve_expert_rank_imbalance", float(imbalance))
        except Exception:
            log.exception("recording expert counts failed")

    def on_rejected(self, status: int) -> None:
        """A request refused before the engine (429 overloaded / over the key's limit, 503, ...)."""
        self._inc("dgserve_requests", status=str(status))
        self._inc("dgserve_rejected_requests", status_code=str(status))

    def on_failover(self) -> None:
        self._inc("dgserve_failovers")
