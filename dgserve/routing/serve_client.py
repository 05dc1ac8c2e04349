"""An engine client over the ``ModelReplica`` deployment handle, with mid-request failover.

A request's state that matters is its committed token ids and the sampler's RNG state at the last canvas
boundary (carried by every ``CanvasEvent``). If the replica serving a stream dies, becomes unreachable, or ends
the request with a retryable error (its expert-parallel group failed), the request is resubmitted (through the
router, so to another replica) with prompt + committed tokens and that RNG state: the stream continues with no
error, no duplicated and no lost text. Bounded retries, then an error event. Errors the replica raises for the
request itself come back as the engine's typed errors (``InvalidRequest``, ``EngineOverloaded``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncIterator, Callable

from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, ReplicaUnavailableError

from dgserve.engine.request import (
    CanvasEvent,
    EngineOverloaded,
    Event,
    FinalEvent,
    GenerationRequest,
    InvalidRequest,
    RequestStats,
)

log = logging.getLogger(__name__)

_REPLICA_GONE = (RayActorError, ReplicaUnavailableError)


class ServeEngineClient:
    """``generate`` / ``ready`` of an in-process engine, served by the replicas behind ``handle``."""

    def __init__(self, handle, *, max_failovers: int, failover_backoff_s: float,
                 on_failover: Callable[[], None] | None = None) -> None:
        self._handle = handle.options(stream=True, method_name="generate")
        self._stats_handle = handle.options(method_name="engine_stats")
        self._max_failovers = max_failovers
        self._backoff_s = failover_backoff_s
        self._on_failover = on_failover

    async def ready(self) -> bool:
        try:
            await self._stats_handle.remote()
            return True
        except Exception:  # no replica answers yet
            return False

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Event]:
        committed: list[int] = list(request.committed_ids)
        completion_tokens = 0  # of the ids committed in this call, those that are text (see CanvasEvent)
        rng_state = request.rng_state
        failovers = 0
        while True:
            attempt = dataclasses.replace(request, committed_ids=list(committed), rng_state=rng_state,
                                          max_tokens=request.max_tokens - (len(committed)
                                                                           - len(request.committed_ids)))
            try:
                async for ev in self._call(attempt):
                    if isinstance(ev, FinalEvent):
                        if ev.finish_reason == "error" and ev.retryable:
                            # the replica's side failed (its expert-parallel group broke): not this request's fault
                            raise _RetryableFailure(ev.error or "replica failed")
                        ev.stats.new_tokens = len(committed) - len(request.committed_ids)
                        ev.stats.completion_tokens = completion_tokens
                        ev.stats.prompt_tokens = len(request.prompt_ids)
                        yield ev
                        return
                    if isinstance(ev, CanvasEvent):
                        committed.extend(ev.token_ids)
                        completion_tokens += ev.completion_tokens or 0
                        rng_state = ev.rng_state
                    yield ev
                # a stream that ends without a final event: the replica went away mid-stream
                raise ReplicaUnavailableError("stream ended without a final event")
            except (*_REPLICA_GONE, _RetryableFailure) as exc:
                failovers += 1
                if failovers > self._max_failovers:
                    yield FinalEvent(request.request_id, "error", RequestStats(prompt_tokens=len(request.prompt_ids)),
                                     f"replica failed {failovers} times; last: {type(exc).__name__}: {exc}")
                    return
                delay = failover_delay(failovers, self._backoff_s)
                log.warning("request %s: replica lost after %d committed tokens (%s: %s); resubmitting in %.2f s",
                            request.request_id, len(committed), type(exc).__name__, exc, delay)
                if self._on_failover is not None:
                    self._on_failover()
                await asyncio.sleep(delay)
            except BackPressureError as exc:
                raise EngineOverloaded(message=f"the model deployment's queue is full: {exc}") from exc
            except Exception as exc:
                cause = getattr(exc, "cause", None)  # what the replica raised, wrapped by Ray
                if isinstance(cause, InvalidRequest | EngineOverloaded):
                    raise cause from exc
                raise


    def _call(self, attempt: GenerationRequest):
        """The handle call of one attempt, under an internal request id of its own. A call made while serving a
        request inherits that request's internal id, and Serve's router keys the requests it is routing by it: two
        calls for one API request at once (its choices: a batch of prompts, n > 1) would collide, and the second
        would never be routed. The public request id stays, so the logs still tie them to the API request."""
        from ray.serve import context
        from ray.serve._private.utils import generate_request_id

        current = context._get_serve_request_context()
        token = context._serve_request_context.set(
            dataclasses.replace(current, _internal_request_id=generate_request_id()))
        try:
            return self._handle.remote(attempt)
        finally:
            context._serve_request_context.reset(token)


class _RetryableFailure(Exception):
    """A replica ended a request with a retryable error event (see ``FinalEvent.retryable``)."""


def failover_delay(failovers: int, backoff_s: float, cap_s: float = 2.0) -> float:
    """Wait before the ``failovers``-th resubmission: none for the first (another replica is usually up),
    then ``backoff_s`` doubling up to ``cap_s`` (the replacement of a whole expert-parallel gang takes
    seconds; resubmitting at once would only hit the failed group's surviving ranks again)."""
    if failovers <= 1 or backoff_s <= 0:
        return 0.0
    return min(cap_s, backoff_s * 2 ** (failovers - 2))
