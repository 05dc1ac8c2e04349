"""Starting or joining Ray: an embedded local cluster for laptops and tests, or an existing cluster."""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)

# Light settings for small machines: no worker prestart, no usage stats, a small object store.
LIGHT_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_enable_worker_prestart": "0",
             "RAY_prestart_worker_first_driver": "0"}


def start_local_ray(num_cpus: int | None = None, object_store_bytes: int = 256 << 20,
                    metrics_export_port: int | None = None) -> None:
    import ray

    for k, v in LIGHT_ENV.items():
        os.environ.setdefault(k, v)
    if ray.is_initialized():
        return
    kwargs: dict = {"include_dashboard": False, "object_store_memory": object_store_bytes,
                    "num_cpus": num_cpus or max(4, os.cpu_count() or 1)}
    if metrics_export_port is not None:
        kwargs["_metrics_export_port"] = metrics_export_port
    ray.init(**kwargs)


def connect_ray(address: str) -> None:
    import ray

    if ray.is_initialized():
        return
    ray.init(address=address)
