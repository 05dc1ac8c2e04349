"""Rendezvous of an EP group through Ray, without fixed ports.

Rank 0 binds a ``TCPStore`` on a port the OS picks and publishes ``host:port`` (plus any payload,
e.g. the expert placement it chose) in Ray's GCS key-value store under a key unique to this gang
incarnation; the other ranks poll that key, connect, and everyone initialises the process group.
The key names the gang id and its member replica ids, so a restarted gang never reads a stale
address. Rank 0 deletes the key once the group is up.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from typing import Any

import ray
from ray.experimental import internal_kv

from dgserve.cluster.process_group import DEFAULT_TIMEOUT_S, EPGroup, create_store, init_ep_group

log = logging.getLogger(__name__)

KV_NAMESPACE = "dgserve"


class RendezvousTimeout(TimeoutError):
    """Rank 0 of the group never published its address (it failed to start, or was placed elsewhere)."""


def rendezvous_key(group_id: str, members: list[str] | tuple[str, ...] = ()) -> str:
    digest = hashlib.sha1("\n".join(members).encode()).hexdigest()[:12] if members else "0"
    return f"ep/rdzv/{group_id}/{digest}"


def kv_put(key: str, value: dict[str, Any]) -> None:
    internal_kv._internal_kv_put(key, json.dumps(value), overwrite=True, namespace=KV_NAMESPACE)


def kv_get(key: str) -> dict[str, Any] | None:
    raw = internal_kv._internal_kv_get(key, namespace=KV_NAMESPACE)
    return None if raw is None else json.loads(raw)


def kv_delete(key: str) -> None:
    internal_kv._internal_kv_del(key, namespace=KV_NAMESPACE)


def wait_for(key: str, timeout_s: float, poll_s: float = 0.05) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while (value := kv_get(key)) is None:
        if time.monotonic() > deadline:
            raise RendezvousTimeout(f"no EP rendezvous record under {key!r} after {timeout_s:.0f}s "
                                    "(did rank 0 of the group start?)")
        time.sleep(poll_s)
    return value


def node_address() -> str:
    return ray.util.get_node_ip_address()


def join_group(key: str, rank: int, world_size: int, *, device: str = "cpu", backend: str | None = None,
               timeout_s: float = DEFAULT_TIMEOUT_S, rendezvous_timeout_s: float = 120.0,
               payload: dict[str, Any] | None = None, node_id: str | None = None) -> tuple[EPGroup, dict[str, Any]]:
    """Form the EP group. Rank 0 passes ``payload`` (JSON-able); every rank gets it back.

    Also checks that all ranks run on one node (the group is meant for one NVLink domain; PACK is
    best effort) and logs a warning when they do not.
    """
    if rank == 0:
        host = node_address()
        store = create_store(host, 0, world_size, port=0, timeout_s=rendezvous_timeout_s)
        record = {"host": host, "port": store.port, "payload": payload or {}}
        kv_put(key, record)
        log.info("EP rendezvous %s published at %s:%d", key, host, store.port)
    else:
        record = wait_for(key, rendezvous_timeout_s)
        store = create_store(record["host"], rank, world_size, port=int(record["port"]),
                             timeout_s=rendezvous_timeout_s)
    store.set(f"node/{rank}", node_id or ray.get_runtime_context().get_node_id())
    group = init_ep_group(rank, world_size, store, device=device, backend=backend, timeout_s=timeout_s)
    if rank == 0:
        nodes = {store.get(f"node/{r}").decode() for r in range(world_size)}
        if len(nodes) > 1:
            log.warning("EP group %s spans %d nodes: all-to-all will cross the network (PACK is best effort)",
                        key, len(nodes))
        kv_delete(key)
    return group, record["payload"]


__all__ = ["KV_NAMESPACE", "RendezvousTimeout", "join_group", "kv_delete", "kv_get", "kv_put", "node_address",
           "rendezvous_key", "wait_for"]
