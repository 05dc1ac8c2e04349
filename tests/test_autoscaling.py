"""Throughput autoscaling: the policy on hand-built ``AutoscalingContext``s, the policy under Serve's own
wrappers (delays, gang alignment, class instantiation from the import path), the config builder, and the
replica-side capacity estimator."""

from __future__ import annotations

import math

import pytest
from ray.serve._private.common import DeploymentID, ReplicaID, TimeStampedValue
from ray.serve.config import AutoscalingConfig, AutoscalingContext

from dgserve.config import AutoscalingSettings
from dgserve.replicas.capacity import (
    STAT_ACTIVE,
    STAT_CAPACITY,
    STAT_QUEUED,
    STAT_TOKENS_PER_S,
    CapacityEstimator,
    engine_occupancy,
    queued_canvases,
)
from dgserve.routing.autoscaling import (
    POLICY_IMPORT_PATH,
    ThroughputAutoscalingPolicy,
    autoscaling_config,
    validated_autoscaling_config,
)

DEP = DeploymentID(name="ModelReplica", app_name="dgserve")
NOW = 1_000_000.0


def rid(i: int) -> ReplicaID:
    return ReplicaID(unique_id=f"r{i}", deployment_id=DEP)


def stats(tokens_per_s: float, capacity: float = 1000.0, queued: float = 0.0, active: float = 4.0) -> dict:
    return {STAT_TOKENS_PER_S: tokens_per_s, STAT_CAPACITY: capacity, STAT_QUEUED: queued, STAT_ACTIVE: active}


def ctx(per_replica: list[dict] | None, *, target: int | None = None, current: int | None = None,
        min_replicas: int = 1, max_replicas: int = 16, total_requests: float = 0.0,
        raw: dict | None = None, config: AutoscalingConfig | None = None,
        policy_state: dict | None = None) -> AutoscalingContext:
    """A real AutoscalingContext; ``per_replica`` stats become ``aggregated_metrics`` (metric -> replica ->
    value), as Serve's controller builds them from ``record_autoscaling_stats``."""
    n = len(per_replica) if per_replica is not None else (current or 0)
    current = n if current is None else current
    replicas = [rid(i) for i in range(current)]
    agg = None
    if per_replica is not None:
        agg = {}
        for i, s in enumerate(per_replica):
            for k, v in s.items():
                agg.setdefault(k, {})[rid(i)] = v
    return AutoscalingContext(
        deployment_id=DEP, deployment_name=DEP.name, app_name=DEP.app_name,
        current_num_replicas=current, target_num_replicas=current if target is None else target,
        running_replicas=replicas, total_num_requests=total_requests, total_queued_requests=0.0,
        aggregated_metrics=agg, raw_metrics=raw, capacity_adjusted_min_replicas=min_replicas,
        capacity_adjusted_max_replicas=max_replicas, policy_state=policy_state or {}, last_scale_up_time=None,
        last_scale_down_time=None, current_time=NOW,
        config=config or AutoscalingConfig(min_replicas=min_replicas, max_replicas=max(1, max_replicas)))


POLICY = ThroughputAutoscalingPolicy(target_utilization=0.7, smoothing_window_s=30.0, queue_drain_s=10.0)


# -- the policy on hand-built contexts ---------------------------------------------------------------------------


def test_ramp_up_counts_queued_work():
    # 2 replicas nearly saturated, 10 canvases queued each: 1800 + 20 * 256 / 10 = 2312 tok/s -> 2312 / 700 -> 4
    desired, state = POLICY(ctx([stats(900, queued=10), stats(900, queued=10)]))
    assert desired == 4
    assert state["dgserve_demand_tokens_per_s"] == pytest.approx(2312)
    assert state["dgserve_reason"] == "throughput"
    # without the queue, the same output rate needs only 3
    assert POLICY(ctx([stats(900), stats(900)]))[0] == 3


def test_steady_state_holds():
    # 3 x 700 tok/s at capacity 1000 and target 0.7: exactly on target -> stays at 3
    assert POLICY(ctx([stats(700)] * 3))[0] == 3
    assert POLICY(ctx([stats(650)] * 3))[0] == 3


def test_ramp_down():
    assert POLICY(ctx([stats(100)] * 4))[0] == 1
    assert POLICY(ctx([stats(500)] * 4))[0] == 3  # 2000 / 700 -> 3
    # an idle deployment with min_replicas 1 keeps one
    assert POLICY(ctx([stats(0, active=0)] * 2))[0] == 1


def test_capacity_is_the_mean_of_replica_estimates():
    # capacities 800 and 1200 -> 1000; 2 x 1050 tok/s -> 2100 / 700 = 3
    assert POLICY(ctx([stats(1050, capacity=800), stats(1050, capacity=1200)]))[0] == 3


def test_noisy_metrics_are_smoothed_over_the_window():
    def series(values: list[float], start: float) -> list[TimeStampedValue]:
        return [TimeStampedValue(NOW - start + i * 2.0, v) for i, v in enumerate(values)]

    noisy = [300, 1100, 250, 1150, 700, 700, 400, 1000, 800, 600]  # mean 700 over the last 20 s
    raw = {
        # a burst 60 s ago lies outside the 30 s window and must not count
        STAT_TOKENS_PER_S: {rid(i): series([5000] * 3, 64) + series(noisy, 20) for i in range(3)},
        STAT_CAPACITY: {rid(i): series([1000] * 10, 20) for i in range(3)},
        STAT_QUEUED: {rid(i): series([0] * 10, 20) for i in range(3)},
        STAT_ACTIVE: {rid(i): series([4] * 10, 20) for i in range(3)},
    }
    # aggregated_metrics say something else (a bad mean); the raw series win
    c = ctx([stats(5000)] * 3, raw=raw)
    assert POLICY(c)[0] == 3
    # each noisy sample on its own would swing between 2 and 5 replicas
    swings = {math.ceil(3 * v / 700) for v in noisy}
    assert min(swings) <= 2 and max(swings) >= 5


def test_missing_metrics_take_no_action():
    assert POLICY(ctx(None, current=3, target=3)) == (3, {"dgserve_reason": "no metrics"})
    assert POLICY(ctx([], current=2, target=2))[0] == 2
    # a stat missing everywhere -> nobody reports all of them
    partial_keys = [{STAT_TOKENS_PER_S: 5000.0, STAT_CAPACITY: 1000.0}] * 2
    assert POLICY(ctx(partial_keys, target=2))[0] == 2
    # capacity not positive -> unusable
    assert POLICY(ctx([stats(5000, capacity=0)] * 2, target=2))[0] == 2
    # a target Serve already raised is kept, not reset to the running count
    assert POLICY(ctx(None, current=2, target=4))[0] == 4


def test_some_replicas_missing_never_scales_down():
    # 1 of 3 running replicas reported (the others just started): low load must not shrink the deployment
    c = ctx([stats(50)], current=3, target=3)
    desired, state = POLICY(c)
    assert desired == 3 and state["dgserve_reason"] == "partial metrics"
    # but high load on the reporting one still scales up
    assert POLICY(ctx([stats(1000, queued=100)], current=3, target=3))[0] == 6  # 3560 / 700


def test_bounds():
    assert POLICY(ctx([stats(1000, queued=100)] * 4, max_replicas=6))[0] == 6
    assert POLICY(ctx([stats(10)] * 4, min_replicas=2))[0] == 2
    narrowed = ThroughputAutoscalingPolicy(min_replicas=3, max_replicas=5)
    assert narrowed(ctx([stats(10)] * 4))[0] == 3
    assert narrowed(ctx([stats(1000, queued=100)] * 4))[0] == 5


def test_gang_rounding():
    gangs = ThroughputAutoscalingPolicy(target_utilization=0.7, gang_size=4)
    # each rank reports; 8 ranks at 700 -> 8 ranks (2 gangs)
    assert gangs(ctx([stats(700)] * 8, min_replicas=4, max_replicas=16))[0] == 8
    # a bit more -> 9 ranks wanted -> rounded up to 12 (3 gangs)
    assert gangs(ctx([stats(790)] * 8, min_replicas=4, max_replicas=16))[0] == 12
    # low load -> one gang, never a partial one
    assert gangs(ctx([stats(100)] * 8, min_replicas=4, max_replicas=16))[0] == 4
    # max not a multiple of the gang: whole gangs only
    assert gangs(ctx([stats(1000, queued=100)] * 8, min_replicas=4, max_replicas=14))[0] == 12


def test_max_step_limits_each_decision():
    stepped = ThroughputAutoscalingPolicy(gang_size=2, max_step=1)
    assert stepped(ctx([stats(1000, queued=100)] * 2, target=2, max_replicas=20))[0] == 4
    assert stepped(ctx([stats(0, active=0)] * 8, target=8, max_replicas=20))[0] == 6


def test_scale_to_zero_and_back():
    idle = [stats(0, active=0)] * 1
    assert POLICY(ctx(idle, min_replicas=0))[0] == 0
    # queued or running work keeps one replica even when the smoothed rate is 0
    assert POLICY(ctx([stats(0, queued=1, active=0)], min_replicas=0))[0] == 1
    assert POLICY(ctx([stats(0, active=2)], min_replicas=0))[0] == 1
    assert POLICY(ctx(idle, min_replicas=0, total_requests=1))[0] == 1
    # from zero: no replica reports, requests wait at the handle -> one unit (a gang with EP)
    assert POLICY(ctx(None, current=0, target=0, min_replicas=0, total_requests=3)) == (1, {"dgserve_reason":
                                                                                             "cold start"})
    assert ThroughputAutoscalingPolicy(gang_size=4)(
        ctx(None, current=0, target=0, min_replicas=0, total_requests=3))[0] == 4
    assert POLICY(ctx(None, current=0, target=0, min_replicas=0))[0] == 0


def test_bad_kwargs():
    for kw in ({"target_utilization": 0}, {"target_utilization": 1.5}, {"gang_size": 0}, {"max_step": 0},
               {"smoothing_window_s": 0}):
        with pytest.raises(ValueError):
            ThroughputAutoscalingPolicy(**kw)


# -- under Serve's wrappers, from the import path ----------------------------------------------------------------


def test_class_policy_through_serve_machinery():
    from ray.serve._private.autoscaling_state import _resolve_policy_callable
    from ray.serve._private.gang_scheduling_autoscaling_policy import GangSchedulingAutoscalingPolicy
    from ray.serve.autoscaling_policy import _apply_autoscaling_config

    settings = AutoscalingSettings(min_replicas=1, max_replicas=4, upscale_delay_s=0.0, downscale_delay_s=60.0)
    config = validated_autoscaling_config(settings, gang_size=2)
    instance = _resolve_policy_callable(config.policy)  # Serve instantiates the class with policy_kwargs
    assert isinstance(instance, ThroughputAutoscalingPolicy) and instance.gang_size == 2
    policy = GangSchedulingAutoscalingPolicy(_apply_autoscaling_config(instance), 2)

    # up: no upscale delay -> immediately 4 (rounded to gangs)
    up = ctx([stats(900, queued=5)] * 2, config=config, min_replicas=2, max_replicas=8)
    desired, state = policy(up)
    assert desired == 4 and state["dgserve_reason"] == "throughput"
    # down: Serve's 60 s downscale delay holds the target on the first decision
    down = ctx([stats(50)] * 4, target=4, config=config, min_replicas=2, max_replicas=8, policy_state=state)
    desired, _ = policy(down)
    assert desired == 4
    # missing metrics: no action through the wrappers too
    assert policy(ctx(None, current=4, target=4, config=config, min_replicas=2, max_replicas=8))[0] == 4


def test_autoscaling_config_builder():
    s = AutoscalingSettings(min_replicas=1, max_replicas=3, target_utilization=0.6, smoothing_window_s=20.0,
                            upscale_delay_s=5.0, downscale_delay_s=50.0, metrics_interval_s=1.0)
    d = autoscaling_config(s, gang_size=2)
    assert d["min_replicas"] == 2 and d["max_replicas"] == 6
    assert d["upscale_delay_s"] == 5.0 and d["downscale_delay_s"] == 50.0 and d["look_back_period_s"] == 20.0
    assert d["policy"] == {"policy_function": POLICY_IMPORT_PATH, "policy_kwargs": {
        "target_utilization": 0.6, "smoothing_window_s": 20.0, "gang_size": 2}}
    cfg = validated_autoscaling_config(s, gang_size=2)
    assert cfg.max_replicas == 6 and cfg.policy.policy_function == POLICY_IMPORT_PATH
    zero = autoscaling_config(AutoscalingSettings(min_replicas=0, max_replicas=2), 1)
    assert zero["min_replicas"] == 0
    AutoscalingConfig(**zero)
    with pytest.raises(ValueError):
        autoscaling_config(s, gang_size=0)


# -- the replica side: capacity estimate ----------------------------------------------------------------------


def test_capacity_estimator_prior_then_saturated_windows():
    est = CapacityEstimator(500.0, max_canvases=8, window_s=10.0, history=3)
    assert est.capacity_tokens_per_s == 500.0 and est.tokens_per_s == 0.0
    t = 0.0

    def window(tokens: int, occupancy: float) -> None:
        nonlocal t
        for i in range(10):  # 10 samples over 10 s
            est.sample_occupancy(occupancy, now=t + i)
            est.add_tokens(tokens // 10, now=t + i + 0.5)
        t += 10.0
        est.sample_occupancy(occupancy, now=t)  # closes the window

    window(3000, 0.3)  # light load: 300 tok/s says nothing about capacity
    assert est.tokens_per_s == pytest.approx(300.0)
    assert est.capacity_tokens_per_s == 500.0  # prior
    window(9000, 0.95)  # saturated: 900 tok/s
    assert est.capacity_tokens_per_s == pytest.approx(900.0)
    window(7000, 0.9)  # saturated but slower (longer prompts): the max of recent windows stays
    assert est.capacity_tokens_per_s == pytest.approx(900.0)
    window(2000, 0.1)
    window(2000, 0.1)
    window(2000, 0.1)  # saturated windows aged out: the last estimate stays (not back to the prior)
    assert est.capacity_tokens_per_s == pytest.approx(700.0)
    window(12000, 0.5)  # not saturated, but it did 1200 tok/s: a lower bound on capacity
    assert est.capacity_tokens_per_s == pytest.approx(1200.0)


def test_capacity_estimator_stats_from_engine_stats():
    clock = iter([0.0, 5.0, 11.0])
    est = CapacityEstimator(1000.0, max_canvases=4, window_s=10.0, clock=lambda: next(clock))
    engine = {"running": 5, "waiting": 2, "active_canvases": 3}
    assert engine_occupancy(engine, 4) == 1.0  # requests waiting: saturated
    assert engine_occupancy({"waiting": 0, "active_canvases": 1}, 4) == 0.25
    assert queued_canvases(engine) == 2 + (5 - 3)
    light = {"running": 3, "waiting": 0, "active_canvases": 1}
    est.autoscaling_stats(light)
    est.add_tokens(2200)
    out = est.autoscaling_stats(light)
    # a window at occupancy 0.25 produced 200 tok/s: throughput, but the capacity stays at the prior
    assert out == {STAT_TOKENS_PER_S: pytest.approx(200.0), STAT_CAPACITY: 1000.0, STAT_QUEUED: 2.0,
                   STAT_ACTIVE: 1.0}
    assert all(isinstance(v, float) for v in out.values())  # Serve wants int/float values
    with pytest.raises(ValueError):
        CapacityEstimator(0.0, max_canvases=4)
