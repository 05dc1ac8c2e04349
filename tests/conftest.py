"""Shared fixtures: reference checkpoints written once per session."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

import dgserve  # noqa: F401  (pins MKL's code path before any matmul: dgserve.model.batch_invariance)

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


@pytest.fixture(scope="session")
def reference_checkpoints(tmp_path_factory):
    """name -> (transformers model, checkpoint dir) for every spec in hf_oracle.SPECS."""
    import hf_oracle

    root = tmp_path_factory.mktemp("reference")
    out = {}
    for name, spec in hf_oracle.SPECS.items():
        model = hf_oracle.build_reference(spec)
        out[name] = (model, hf_oracle.save_reference(model, root / name))
    return out


@pytest.fixture(scope="session")
def vision_reference(tmp_path_factory):
    """(transformers model, checkpoint dir) of the image-and-text spec hf_oracle.VISION_SPECS["vision"]."""
    import hf_oracle

    spec = hf_oracle.VISION_SPECS["vision"]
    model = hf_oracle.build_reference(spec)
    return model, hf_oracle.save_reference(model, tmp_path_factory.mktemp("reference") / spec.name, spec)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for every integration test (light settings for a 2-core machine)."""
    import ray

    from dgserve.cluster.local_ray import start_local_ray

    port = _free_port()
    start_local_ray(num_cpus=4, object_store_bytes=128 << 20, metrics_export_port=port)
    ray.dgserve_metrics_port = port  # for tests that scrape Ray's metrics endpoint
    yield ray
    try:
        from ray import serve

        serve.shutdown()
    finally:
        ray.shutdown()


@pytest.fixture(scope="session")
def serve_http(ray_session):
    """Serve's HTTP proxy on a free loopback port; returns the base URL."""
    from ray import serve

    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    return f"http://127.0.0.1:{port}"
