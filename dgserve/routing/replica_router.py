"""The canvas-sharding request router: a custom Ray Serve ``RequestRouter``.

Replicas are scored by the diffusion work they hold (active + queued canvases, reported through
``record_routing_stats``, plus what this router sent them since that report) and by prefix affinity: a
request whose prompt prefix a replica recently served goes there, so the prefix cache hits, unless that
replica is overloaded or far busier than the least loaded one. Ranks of an expert-parallel gang are
separate replicas, so balancing by load also keeps the ranks of a gang in step; a rank whose group has
failed is tried last until Serve restarts the gang.
"""

from __future__ import annotations

import collections
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from dgserve.engine.prefix_keys import affinity_key
from dgserve.engine.prompt_images import key_ids
from dgserve.engine.request import GenerationRequest


@dataclass(frozen=True)
class ReplicaLoad:
    replica: str
    canvases: float  # active + queued canvases: max(reported by the replica, outstanding from this router)
    free_kv_blocks: int
    holds_prefix: bool
    failed: bool = False  # the replica reports a broken expert-parallel group: tried last, until Serve replaces it


@dataclass(frozen=True)
class ScoringSettings:
    overload_canvases: int = 64
    affinity_slack: float = 8.0  # affinity wins unless its replica has this many more canvases than the least


def rank_replicas(loads: Sequence[ReplicaLoad], settings: ScoringSettings,
                  tie_break: Callable[[str], object] | None = None) -> list[list[str]]:
    """Pure scoring: returns ranks of replica ids, most preferred first. Replicas equal in failure, load and free
    KV are ordered by ``tie_break(replica id)`` (the id itself by default); the router passes a random key, so
    equally loaded replicas share the traffic instead of the same two always coming first."""
    if not loads:
        return []
    key = tie_break or (lambda rid: rid)
    by_load = sorted(loads, key=lambda r: (r.failed, r.canvases, -r.free_kv_blocks, key(r.replica)))
    least = by_load[0].canvases
    affine = [r for r in by_load if r.holds_prefix and not r.failed and r.canvases < settings.overload_canvases
              and r.canvases <= least + settings.affinity_slack]
    ranks: list[list[str]] = []
    if affine:
        ranks.append([affine[0].replica])
    rest = [r.replica for r in by_load if not ranks or r.replica != ranks[0][0]]
    # least loaded first; split so Serve tries the best few before the others
    ranks.extend([rest[i:i + 2] for i in range(0, len(rest), 2)])
    return ranks


class CanvasRouter(RequestRouter):
    def initialize_state(self, prefix_affinity: bool = True, overload_canvases: int = 64,
                         affinity_prefix_tokens: int = 256, block_size: int = 16, affinity_slack: float = 8.0,
                         **_: object) -> None:
        self._prefix_affinity = prefix_affinity
        self._settings = ScoringSettings(overload_canvases=overload_canvases, affinity_slack=affinity_slack)
        self._prefix_tokens = affinity_prefix_tokens
        self._block_size = block_size
        self._inflight: dict[str, int] = collections.defaultdict(int)  # outstanding requests sent by this router
        self._local_affinity: collections.OrderedDict[str, str] = collections.OrderedDict()
        self._rng = random.Random()

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        key = self._key(pending_request)
        loads = []
        for r in candidate_replicas:
            rid = r.replica_id.unique_id
            stats = r.routing_stats or {}
            loads.append(ReplicaLoad(
                replica=rid,
                canvases=max(float(stats.get("active_canvases", 0)) + float(stats.get("waiting", 0)),
                             float(self._inflight.get(rid, 0))),
                free_kv_blocks=int(stats.get("free_kv_blocks", 0)),
                holds_prefix=key is not None and (key in stats.get("prefix_keys", ())
                                                  or self._local_affinity.get(key) == rid),
                failed=bool(stats.get("failed", False)),
            ))
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        ranks = rank_replicas(loads, self._settings, tie_break=lambda _: self._rng.random())
        return [[by_id[i] for i in rank] for rank in ranks]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result) -> None:
        rid = replica_id.unique_id
        self._inflight[rid] += 1
        key = self._key(pending_request)
        if key is not None:
            self._local_affinity[key] = rid
            self._local_affinity.move_to_end(key)
            while len(self._local_affinity) > 4096:
                self._local_affinity.popitem(last=False)

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        rid = replica_id.unique_id
        self._inflight[rid] = max(0, self._inflight[rid] - 1)

    def _key(self, pending_request: PendingRequest | None) -> str | None:
        if not self._prefix_affinity or pending_request is None or not pending_request.args:
            return None
        req = pending_request.args[0]
        if not isinstance(req, GenerationRequest):
            return None
        return affinity_key(key_ids(req.prompt_ids, req.images), self._block_size, self._prefix_tokens)
