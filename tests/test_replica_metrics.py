"""ReplicaMetrics: the catalogue, and how engine events and stats map onto metrics (recording fakes; the real
``ray.serve.metrics`` classes are built too, which needs no running Ray)."""

from __future__ import annotations

from collections import defaultdict
from typing import ClassVar

import pytest

from dgserve.engine.request import FinalEvent, RequestStats
from dgserve.replicas.metrics import METRIC_NAMES, ReplicaMetrics


class FakeMetric:
    registry: ClassVar[dict[str, FakeMetric]] = {}

    def __init__(self, name: str, description: str = "", tag_keys: tuple[str, ...] = (),
                 boundaries: list[float] | None = None) -> None:
        assert name not in self.registry, f"{name} built twice"
        assert isinstance(tag_keys, tuple) and description
        self.name, self.tag_keys, self.boundaries = name, tag_keys, boundaries
        self.default_tags: dict[str, str] = {}
        self.values: dict[tuple, float] = defaultdict(float)
        self.observations: list[float] = []
        self.registry[name] = self

    def set_default_tags(self, tags: dict[str, str]) -> None:
        self.default_tags = dict(tags)

    def _key(self, tags: dict[str, str] | None) -> tuple:
        full = {**self.default_tags, **(tags or {})}
        assert set(full) == set(self.tag_keys), (self.name, full, self.tag_keys)
        return tuple(sorted(full.items()))

    def inc(self, value: float = 1.0, tags: dict[str, str] | None = None) -> None:
        assert value > 0, "Ray counters refuse non-positive increments"
        self.values[self._key(tags)] += value

    def set(self, value: float, tags: dict[str, str] | None = None) -> None:
        self.values[self._key(tags)] = value

    def observe(self, value: float, tags: dict[str, str] | None = None) -> None:
        self._key(tags)
        self.observations.append(value)


@pytest.fixture
def rm():
    FakeMetric.registry = {}
    metrics = ReplicaMetrics("tiny", metric_types={"counter": FakeMetric, "gauge": FakeMetric,
                                                   "histogram": FakeMetric})
    return metrics, FakeMetric.registry


def val(reg, name, **tags):
    return reg[name].values.get(tuple(sorted({"model": "tiny", **tags}.items())))


def test_catalogue_is_complete_and_well_formed(rm):
    _, reg = rm
    assert set(reg) == set(METRIC_NAMES)
    for name, spec in METRIC_NAMES.items():
        assert name.startswith("dgserve_") and spec.labels[0] == "model"
        assert reg[name].tag_keys == spec.labels
        if spec.kind == "histogram":
            assert list(spec.boundaries) == sorted(spec.boundaries) and spec.boundaries[0] > 0
        assert not set(spec.labels) & {"deployment", "replica", "application", "route"}  # Serve's own


def test_on_final(rm):
    metrics, reg = rm
    stats = RequestStats(prompt_tokens=12, new_tokens=300, canvases=2, denoise_steps=25, seconds=1.5,
                         time_to_first_canvas=0.4, steps_per_canvas=[13, 12])
    metrics.on_final(FinalEvent("r1", "length", stats))
    metrics.on_final(FinalEvent("r2", "error", RequestStats(), error="boom"))
    assert val(reg, "dgserve_requests", status="length") == 1
    assert val(reg, "dgserve_requests", status="error") == 1
    assert val(reg, "dgserve_generated_tokens") == 300 and val(reg, "dgserve_prompt_tokens") == 12
    assert val(reg, "dgserve_canvases") == 2
    assert reg["dgserve_steps_per_canvas"].observations == [13, 12]
    assert reg["dgserve_tokens_per_forward"].observations == [12.0]
    assert reg["dgserve_time_to_first_canvas_seconds"].observations == [0.4]
    assert reg["dgserve_request_latency_seconds"].observations == [1.5]  # the empty error request adds nothing


def test_on_engine_stats(rm):
    metrics, reg = rm
    stats = {"running": 3, "waiting": 5, "active_canvases": 2, "forwards": 100, "completed": 7,
             "encoder_tokens": 900, "canvases_per_forward": 1.75, "tokens_per_forward": 480.0,
             "kv_blocks_used": 40, "kv_blocks_free": 24, "kv_bytes_used": 4096, "kv_bytes_capacity": 8192,
             "prefix_cache_hit_rate": 0.25}
    assert val(reg, "dgserve_replica_up") is None  # the ingress also builds ReplicaMetrics: not a replica
    metrics.on_engine_stats(stats)
    assert val(reg, "dgserve_replica_up") == 1
    assert val(reg, "dgserve_queue_depth") == 5 and val(reg, "dgserve_running_requests") == 3
    assert val(reg, "dgserve_active_canvases") == 2 and val(reg, "dgserve_canvases_per_forward") == 1.75
    assert val(reg, "dgserve_batch_tokens_per_forward") == 480.0
    assert val(reg, "dgserve_kv_pages", state="used") == 40 and val(reg, "dgserve_kv_pages", state="free") == 24
    assert val(reg, "dgserve_kv_cache_bytes", state="capacity") == 8192
    assert val(reg, "dgserve_prefix_cache_hit_rate") == 0.25
    assert val(reg, "dgserve_forwards") == 100
    metrics.on_engine_stats({**stats, "forwards": 130})
    metrics.on_engine_stats({**stats, "forwards": 130})  # no change: no zero increment
    assert val(reg, "dgserve_forwards") == 130
    metrics.on_engine_stats({"forwards": 5})  # engine restarted: the count went back
    metrics.on_engine_stats({"forwards": 9})
    assert val(reg, "dgserve_forwards") == 134
    metrics.on_engine_stats({"waiting": float("nan")})  # ignored, not raised
    assert val(reg, "dgserve_queue_depth") == 5


def test_rejections_failovers_experts_and_autoscaling_stats(rm):
    metrics, reg = rm
    metrics.on_rejected(429)
    metrics.on_rejected(429)
    metrics.on_failover()
    assert val(reg, "dgserve_requests", status="429") == 2
    assert val(reg, "dgserve_rejected_requests", status_code="429") == 2
    assert val(reg, "dgserve_failovers") == 1
    metrics.on_expert_counts({0: [5, 0, 3], 29: [1, 1, 1]}, imbalance=1.25)
    metrics.on_expert_counts({0: [1, 0, 0]}, imbalance=1.0)
    assert val(reg, "dgserve_expert_tokens", layer="0", expert="0") == 6
    assert val(reg, "dgserve_expert_tokens", layer="0", expert="1") is None  # never routed: no series
    assert val(reg, "dgserve_expert_tokens", layer="29", expert="2") == 1
    assert val(reg, "dgserve_expert_rank_imbalance") == 1.0
    metrics.on_autoscaling_stats({"tokens_per_s": 800.0, "capacity_tokens_per_s": 1000.0, "queued_canvases": 2})
    assert val(reg, "dgserve_throughput_tokens_per_s") == 800 and val(reg, "dgserve_capacity_tokens_per_s") == 1000


def test_real_serve_metrics_without_a_running_ray(caplog):
    from ray.serve import metrics as serve_metrics

    metrics = ReplicaMetrics("tiny")  # ray.serve.metrics objects build (and record nowhere) in a plain process
    real = {"counter": serve_metrics.Counter, "gauge": serve_metrics.Gauge, "histogram": serve_metrics.Histogram}
    assert set(metrics._m) == set(METRIC_NAMES)
    assert all(type(metrics._m[name]) is real[spec.kind] for name, spec in METRIC_NAMES.items())
    with caplog.at_level("ERROR", logger="dgserve.replicas.metrics"):
        metrics.on_final(FinalEvent("r", "stop", RequestStats(new_tokens=5, canvases=1, denoise_steps=4,
                                                              seconds=0.1, time_to_first_canvas=0.1,
                                                              steps_per_canvas=[4])))
        metrics.on_engine_stats({"waiting": 1, "forwards": 3, "kv_blocks_used": 1, "kv_blocks_free": 2})
        metrics.on_expert_counts({0: [1, 2]}, 1.1)
        metrics.on_rejected(503)
        metrics.on_failover()
    # the on_* methods swallow errors (metrics never fail a request) and log them: none may have happened
    assert not [r for r in caplog.records if r.levelname == "ERROR"], caplog.text


def test_image_metrics(rm):
    metrics, reg = rm
    metrics.on_final(FinalEvent("t", "stop", RequestStats(prompt_tokens=5, new_tokens=1)))  # text only
    assert val(reg, "dgserve_images") is None and not reg["dgserve_images_per_request"].observations
    metrics.on_final(FinalEvent("i", "stop", RequestStats(prompt_tokens=90, images=2, vision_seconds=0.03)))
    metrics.on_final(FinalEvent("j", "length", RequestStats(prompt_tokens=50, images=1, vision_seconds=0.01)))
    assert val(reg, "dgserve_images") == 3
    assert reg["dgserve_images_per_request"].observations == [2, 1]
    assert reg["dgserve_vision_encoder_seconds"].observations == [0.03, 0.01]
