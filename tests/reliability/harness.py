"""Plain helpers of the reliability suites (imported as ``reliability.harness``; fixtures live in conftest.py):
the CI/full size switch, deploying and removing Serve apps on the session's local Ray, finding replica
actors, percentiles, and recording measured figures.

Every suite runs a reduced size by default (CI); ``DGSERVE_RELIABILITY_FULL=1`` selects the full size.
``DGSERVE_RELIABILITY_REPORT=path.jsonl`` appends each suite's figures to that file (RELIABILITY.md's source).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator
from typing import Any

FULL = os.environ.get("DGSERVE_RELIABILITY_FULL", "") not in ("", "0", "false")
MODEL = "tiny-random"


def size(ci: Any, full: Any) -> Any:
    """The CI-size value, or the full-size one under DGSERVE_RELIABILITY_FULL=1."""
    return full if FULL else ci


def record(suite: str, **figures: Any) -> None:
    """Print a suite's measured figures (shown with -s / on failure) and append them to the report file."""
    line = {"suite": suite, "size": "full" if FULL else "ci", "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
            **figures}
    print(f"\n[reliability] {json.dumps(line)}")
    path = os.environ.get("DGSERVE_RELIABILITY_REPORT")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(line) + "\n")


def deploy_config(name: str, route: str, overrides: dict) -> dict:
    base: dict = {"name": name, "route_prefix": route, "model": {"path": MODEL},
                  "replicas": {"num_replicas": 1, "num_cpus": 0.25}, "engine": {"kv_cache_memory": 16 << 20}}
    for k, v in overrides.items():
        base[k] = {**base.get(k, {}), **v} if isinstance(v, dict) else v
    return base


def deploy(serve_http: str, name: str, route: str, overrides: dict) -> str:
    """Run a dgserve app on the session's Serve; returns its base URL."""
    from ray import serve

    from dgserve.config import DeployConfig
    from dgserve.routing.app import build_app

    config = DeployConfig.from_args(deploy_config(name, route, overrides))
    serve.run(build_app(config), name=name, route_prefix=route)
    return serve_http + route


def delete_app(name: str) -> None:
    from ray import serve

    with contextlib.suppress(Exception):
        serve.delete(name, _blocking=True)


def replica_actors(app_name: str) -> list:
    import ray

    actors = []
    for entry in ray.util.list_named_actors(all_namespaces=True):
        if f"SERVE_REPLICA::{app_name}#ModelReplica" in entry["name"]:
            with contextlib.suppress(ValueError):  # died in between
                actors.append(ray.get_actor(entry["name"], namespace=entry["namespace"]))
    return actors


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100]); with few samples p99 is the maximum."""
    assert values
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))
    return ordered[int(rank) - 1]


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """Run in-process torch work on one thread, as Ray gives a fractional-CPU replica: on a busy 2-core machine
    two spinning intra-op threads make a tiny model's forward ~30x slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
