"""The router's scoring as a pure function, and the ingress backend's failover loop over a scripted handle
(no Ray cluster: the handle is a stand-in that replays what replicas stream or raise)."""

from __future__ import annotations

import asyncio

import pytest
from ray.exceptions import RayActorError

from dgserve.config import DeployConfig
from dgserve.engine.request import CanvasEvent, FinalEvent, GenerationRequest, RequestStats
from dgserve.model.checkpoint import load_metadata
from dgserve.routing.chat_backend import EngineChatBackend
from dgserve.routing.replica_router import ReplicaLoad, ScoringSettings, rank_replicas
from dgserve.routing.serve_client import failover_delay

S = ScoringSettings(overload_canvases=64, affinity_slack=8.0)


def _flat(ranks: list[list[str]]) -> list[str]:
    return [r for rank in ranks for r in rank]


def test_least_loaded_first_then_free_kv_blocks():
    loads = [ReplicaLoad("a", 10, 100, False), ReplicaLoad("b", 2, 100, False), ReplicaLoad("c", 2, 500, False),
             ReplicaLoad("d", 40, 900, False)]
    ranks = rank_replicas(loads, S)
    assert _flat(ranks) == ["c", "b", "a", "d"]
    assert all(len(rank) <= 2 for rank in ranks)  # Serve tries the best few before the rest


def test_prefix_affinity_wins_within_the_slack():
    loads = [ReplicaLoad("idle", 0, 100, False), ReplicaLoad("warm", 6, 100, True)]
    assert rank_replicas(loads, S)[0] == ["warm"]
    assert _flat(rank_replicas(loads, S)) == ["warm", "idle"]


def test_prefix_affinity_yields_to_load():
    too_busy = [ReplicaLoad("idle", 0, 100, False), ReplicaLoad("warm", 9, 100, True)]  # 9 > 0 + slack 8
    assert rank_replicas(too_busy, S)[0][0] == "idle"
    overloaded = [ReplicaLoad("a", 64, 100, False), ReplicaLoad("warm", 64, 100, True)]  # at the overload bound
    assert rank_replicas(overloaded, S)[0][0] == "a"


def test_failed_replicas_go_last_and_never_by_affinity():
    loads = [ReplicaLoad("broken", 0, 900, True, failed=True), ReplicaLoad("busy", 30, 10, False),
             ReplicaLoad("ok", 5, 10, False)]
    assert _flat(rank_replicas(loads, S)) == ["ok", "busy", "broken"]
    assert rank_replicas([ReplicaLoad("broken", 0, 1, False, failed=True)], S) == [["broken"]]  # still an option
    assert rank_replicas([], S) == []


def test_router_prefix_affinity_setting():
    """``router.prefix_affinity: false`` (the Helm value) turns the router's affinity key off; on, the key is the
    prefix cache's key of the prompt's last whole block within ``affinity_prefix_tokens``."""
    from types import SimpleNamespace

    from dgserve.engine.prefix_keys import affinity_key
    from dgserve.routing.replica_router import CanvasRouter

    pending = SimpleNamespace(args=[GenerationRequest(prompt_ids=list(range(40)))])
    router = CanvasRouter.__new__(CanvasRouter)  # only the routing state; Serve's own setup is not needed here
    router.initialize_state(prefix_affinity=True, affinity_prefix_tokens=16, block_size=4)
    assert router._key(pending) == affinity_key(list(range(40)), 4, 16) is not None
    router.initialize_state(prefix_affinity=False, affinity_prefix_tokens=16, block_size=4)
    assert router._key(pending) is None


def test_failover_delay_backs_off_and_caps():
    assert [failover_delay(n, 0.25) for n in range(1, 7)] == [0.0, 0.25, 0.5, 1.0, 2.0, 2.0]
    assert failover_delay(5, 0.0) == 0.0


# -- the failover loop -----------------------------------------------------------------------------------------

class _Script:
    """A stand-in for the ModelReplica handle: attempt i replays ``attempts[i]`` (events, then an optional
    exception), recording each request it was given."""

    def __init__(self, attempts: list[tuple[list, BaseException | None]]) -> None:
        self.attempts = attempts
        self.requests: list[GenerationRequest] = []

    def options(self, **_: object) -> _Script:
        return self

    def remote(self, request: GenerationRequest):
        events, error = self.attempts[len(self.requests)]
        self.requests.append(request)

        async def stream():
            for ev in events:
                yield ev
            if error is not None:
                raise error
        return stream()


def _backend(script: _Script, **router) -> EngineChatBackend:
    cfg = DeployConfig.from_args({"model": {"path": "tiny-random"},
                                  "router": {"failover_backoff_s": 0.01, **router}})
    return EngineChatBackend.over_serve(script, load_metadata("tiny-random"), cfg.ingress_slice())


def _collect(backend: EngineChatBackend, request: GenerationRequest) -> list:
    async def run():
        return [ev async for ev in backend.generate(request)]
    return asyncio.run(run())


def _canvas(ids: list[int], state: bytes, i: int) -> CanvasEvent:
    return CanvasEvent("r", ids, "", i, rng_state=state)


@pytest.mark.parametrize("failure", ["retryable_event", "actor_died"])
def test_failover_resubmits_prompt_committed_tokens_and_rng_state(failure):
    first_end = ([FinalEvent("r", "error", RequestStats(), "EP rank 1 failed: gloo reset", retryable=True)], None) \
        if failure == "retryable_event" else ([], RayActorError())
    script = _Script([
        ([_canvas([5, 6], b"s1", 0), *first_end[0]], first_end[1]),
        ([_canvas([7, 8], b"s2", 1), FinalEvent("r", "length", RequestStats())], None),
    ])
    events = _collect(_backend(script), GenerationRequest(prompt_ids=[1, 2, 3], max_tokens=4, seed=9,
                                                          request_id="r"))
    assert [ev.token_ids for ev in events if isinstance(ev, CanvasEvent)] == [[5, 6], [7, 8]]  # nothing twice
    final = events[-1]
    assert isinstance(final, FinalEvent) and final.finish_reason == "length" and final.stats.new_tokens == 4
    resubmitted = script.requests[1]
    assert resubmitted.prompt_ids == [1, 2, 3] and resubmitted.committed_ids == [5, 6]
    assert resubmitted.rng_state == b"s1" and resubmitted.max_tokens == 2 and resubmitted.seed == 9


def test_a_non_retryable_error_event_is_passed_through_not_retried():
    script = _Script([([FinalEvent("r", "error", RequestStats(), "engine step failed: boom")], None)])
    events = _collect(_backend(script), GenerationRequest(prompt_ids=[1], request_id="r"))
    assert len(script.requests) == 1
    assert events[-1].finish_reason == "error" and events[-1].error == "engine step failed: boom"


def test_failovers_are_bounded_then_an_error_event():
    refuse = ([FinalEvent("r", "error", RequestStats(), "EP group failed", retryable=True)], None)
    script = _Script([refuse] * 4)
    events = _collect(_backend(script, max_failovers=3), GenerationRequest(prompt_ids=[1], request_id="r"))
    assert len(script.requests) == 4  # the first try and 3 resubmissions
    final = events[-1]
    assert isinstance(final, FinalEvent) and final.finish_reason == "error"
    assert "replica failed 4 times" in final.error and "EP group failed" in final.error


def test_equally_loaded_replicas_share_the_traffic_under_a_random_tie_break():
    import random

    loads = [ReplicaLoad(r, 0, 100, False) for r in "abcd"]
    assert rank_replicas(loads, S)[0] == ["a", "b"]  # the pure default: by id
    rng = random.Random(0)
    firsts = {rank_replicas(loads, S, tie_break=lambda _: rng.random())[0][0] for _ in range(200)}
    assert firsts == set("abcd")
    # the tie break never overrides load
    loads[3] = ReplicaLoad("d", 1, 100, False)
    assert all(_flat(rank_replicas(loads, S, tie_break=lambda _: rng.random()))[-1] == "d" for _ in range(50))
