"""Throughput-based autoscaling of the model deployment.

Replicas report what they produce (committed tokens/s) against what they could (``CapacityEstimator``: tokens/s
at saturation, learned online) and their queued/active canvases through ``record_autoscaling_stats``;
``ThroughputAutoscalingPolicy`` (a class-based Ray Serve policy) sizes the deployment so that demand fits
capacity x target utilization. ``autoscaling_config`` turns the deploy settings into Serve's config.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from dgserve.replicas.capacity import (  # the replica-side half: what replicas report, and how
    CANVAS_TOKENS,
    REPORTED_STATS,
    STAT_ACTIVE,
    STAT_CAPACITY,
    STAT_QUEUED,
    STAT_TOKENS_PER_S,
)

if TYPE_CHECKING:
    from ray.serve.config import AutoscalingContext

    from dgserve.config import AutoscalingSettings

log = logging.getLogger(__name__)

POLICY_IMPORT_PATH = "dgserve.routing.autoscaling:ThroughputAutoscalingPolicy"

# --------------------------------------------------------------------------------------------------------------
# Controller side: the policy
# --------------------------------------------------------------------------------------------------------------


def _window_mean(series: Iterable[Any], now: float | None, window_s: float) -> float | None:
    points = [(p.timestamp, p.value) for p in series]
    if not points:
        return None
    if now is None:
        now = max(t for t, _ in points)
    recent = [v for t, v in points if t >= now - window_s]
    if not recent:  # the window is shorter than the push interval: the latest point is the best we have
        recent = [max(points)[1]]
    return sum(recent) / len(recent)


@dataclass(frozen=True)
class _Reading:
    """Per-replica stats, smoothed over the policy's window, of the replicas that reported all of them."""

    values: dict[str, dict[Any, float]]  # stat -> replica -> value
    replicas: frozenset[Any]


class ThroughputAutoscalingPolicy:
    """Ray Serve autoscaling policy: desired replicas = ceil(demand / (capacity x target_utilization)).

    Demand is the replicas' committed tokens/s plus their queued canvases turned into the token rate that
    drains them within ``queue_drain_s``; capacity is the mean reported per-replica capacity. Per-replica
    stats are averaged over the last ``smoothing_window_s`` (``raw_metrics``; ``aggregated_metrics`` when the
    raw series are absent). The count is rounded up to whole gangs of ``gang_size`` replicas, limited to
    ``max_step`` gangs away from ``ctx.target_num_replicas`` if set, and clamped to the bounds (Serve's
    capacity-adjusted min/max, narrowed by ``min_replicas``/``max_replicas`` if given). Upscale/downscale
    delays and hysteresis are Serve's (the wrapper Serve puts around every policy).

    No replica reporting -> no action (the current target), except that queued requests with no replica at
    all ask for one gang (scale from zero). Some replicas not reporting -> no scale-down. With
    ``min_replicas`` 0, no demand and nothing queued or running -> 0.
    """

    def __init__(self, target_utilization: float = 0.7, smoothing_window_s: float = 30.0, gang_size: int = 1,
                 queue_drain_s: float = 10.0, tokens_per_canvas: int = CANVAS_TOKENS,
                 min_replicas: int | None = None, max_replicas: int | None = None,
                 max_step: int | None = None) -> None:
        if not 0 < target_utilization <= 1:
            raise ValueError(f"target_utilization must be in (0, 1], got {target_utilization}")
        if smoothing_window_s <= 0 or queue_drain_s <= 0 or gang_size < 1 or tokens_per_canvas < 1:
            raise ValueError("smoothing_window_s > 0, queue_drain_s > 0, gang_size >= 1, tokens_per_canvas >= 1")
        if max_step is not None and max_step < 1:
            raise ValueError(f"max_step must be >= 1 gang, got {max_step}")
        self.target_utilization = target_utilization
        self.smoothing_window_s = smoothing_window_s
        self.gang_size = gang_size
        self.queue_drain_s = queue_drain_s
        self.tokens_per_canvas = tokens_per_canvas
        self.min_replicas = min_replicas
        self.max_replicas = max_replicas
        self.max_step = max_step

    # -- reading the replicas' stats ----------------------------------------------------------------------------

    def _read(self, ctx: AutoscalingContext) -> _Reading:
        raw = ctx.raw_metrics or {}
        agg = ctx.aggregated_metrics or {}
        running = set(ctx.running_replicas or ())
        values: dict[str, dict[Any, float]] = {}
        for stat in REPORTED_STATS:
            per: dict[Any, float] = {}
            if raw.get(stat):
                for rid, series in raw[stat].items():
                    v = _window_mean(series, ctx.current_time, self.smoothing_window_s)
                    if v is not None:
                        per[rid] = v
            else:
                per = {rid: float(v) for rid, v in agg.get(stat, {}).items()}
            values[stat] = {rid: v for rid, v in per.items()
                            if math.isfinite(v) and (not running or rid in running)}
        reporting = frozenset.intersection(*(frozenset(values[s]) for s in REPORTED_STATS))
        # A replica whose capacity is not positive has not told us anything usable.
        reporting = frozenset(r for r in reporting if values[STAT_CAPACITY][r] > 0)
        return _Reading(values, reporting)

    # -- the decision ---------------------------------------------------------------------------------------------

    def _bounds(self, ctx: AutoscalingContext) -> tuple[int, int]:
        g = self.gang_size
        lo = ctx.capacity_adjusted_min_replicas
        hi = ctx.capacity_adjusted_max_replicas
        if self.min_replicas is not None:
            lo = max(lo, self.min_replicas)
        if self.max_replicas is not None:
            hi = min(hi, self.max_replicas)
        lo = math.ceil(lo / g) * g
        hi = max(lo, (hi // g) * g) if hi >= g else hi
        return lo, hi

    def _round_to_gang(self, n: int) -> int:
        return math.ceil(n / self.gang_size) * self.gang_size if n > 0 else 0

    def __call__(self, ctx: AutoscalingContext) -> tuple[int, dict[str, Any]]:
        target = ctx.target_num_replicas
        reading = self._read(ctx)
        state: dict[str, Any] = {}

        if not reading.replicas:
            if ctx.current_num_replicas == 0 and (ctx.total_num_requests or 0) > 0:
                # Scale from zero: requests wait at the handle for a replica, they are not refused.
                desired = max(self._round_to_gang(1), target)
                state["dgserve_reason"] = "cold start"
            else:
                desired = target
                state["dgserve_reason"] = "no metrics"
            lo, hi = self._bounds(ctx)
            return min(max(desired, lo), max(hi, lo)), state

        v = reading.values
        reps = reading.replicas
        produced = sum(v[STAT_TOKENS_PER_S][r] for r in reps)
        queued = sum(v[STAT_QUEUED][r] for r in reps)
        active = sum(v[STAT_ACTIVE][r] for r in reps)
        capacity = sum(v[STAT_CAPACITY][r] for r in reps) / len(reps)
        demand = max(0.0, produced) + max(0.0, queued) * self.tokens_per_canvas / self.queue_drain_s

        desired = math.ceil(demand / (capacity * self.target_utilization) - 1e-9)
        busy = queued > 0 or active > 0 or (ctx.total_num_requests or 0) > 0
        if desired <= 0 and busy:
            desired = 1  # work in flight keeps one unit even when the smoothed rate says zero
        partial = len(reps) < ctx.current_num_replicas
        if partial:
            desired = max(desired, target)  # unreported replicas may carry load: do not scale down on a guess
        desired = self._round_to_gang(desired)
        if self.max_step is not None:
            step = self.max_step * self.gang_size
            desired = min(max(desired, target - step), target + step)
        lo, hi = self._bounds(ctx)
        desired = min(max(desired, lo), max(hi, lo))

        state.update({
            "dgserve_reason": "partial metrics" if partial else "throughput",
            "dgserve_demand_tokens_per_s": round(demand, 3),
            "dgserve_capacity_tokens_per_s": round(capacity, 3),
            "dgserve_reporting_replicas": len(reps),
        })
        log.debug("autoscaling %s: demand %.1f tok/s, capacity %.1f tok/s/replica, %d -> %d",
                  ctx.deployment_name, demand, capacity, target, desired)
        return desired, state


# --------------------------------------------------------------------------------------------------------------
# Deploy side: Serve's autoscaling config
# --------------------------------------------------------------------------------------------------------------


def autoscaling_config(settings: AutoscalingSettings, gang_size: int = 1) -> dict[str, Any]:
    """Serve ``autoscaling_config`` (plain JSON types: usable in ``@serve.deployment`` options and in a Serve
    config file) for the model deployment.

    ``settings`` count model instances; ``gang_size`` is how many Serve replicas make one instance (the EP
    world size with gang scheduling, 1 when one replica holds a whole EP group), so Serve's bounds are
    multiplied by it and the policy rounds to whole gangs.
    """
    if gang_size < 1:
        raise ValueError(f"gang_size must be >= 1, got {gang_size}")
    policy_kwargs = {
        "target_utilization": settings.target_utilization,
        "smoothing_window_s": settings.smoothing_window_s,
        "gang_size": gang_size,
    }
    return {
        "min_replicas": settings.min_replicas * gang_size,
        "max_replicas": settings.max_replicas * gang_size,
        "upscale_delay_s": settings.upscale_delay_s,
        "downscale_delay_s": settings.downscale_delay_s,
        "metrics_interval_s": settings.metrics_interval_s,
        # Serve keeps this much of each replica's stats history; the policy averages over the window.
        "look_back_period_s": max(settings.smoothing_window_s, 2 * settings.metrics_interval_s),
        "policy": {"policy_function": POLICY_IMPORT_PATH, "policy_kwargs": policy_kwargs},
    }


def validated_autoscaling_config(settings: AutoscalingSettings, gang_size: int = 1) -> Any:
    """``autoscaling_config`` as a validated ``ray.serve.config.AutoscalingConfig`` (imports the policy)."""
    from ray.serve.config import AutoscalingConfig

    with warnings.catch_warnings():
        # metrics_interval_s is "deprecated" in favour of env vars, yet Ray 2.60 still uses it for the push
        # and record intervals of replica stats; keep setting it, quietly.
        warnings.simplefilter("ignore", DeprecationWarning)
        return AutoscalingConfig(**autoscaling_config(settings, gang_size))
