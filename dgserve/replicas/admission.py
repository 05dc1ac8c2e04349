"""How many requests a replica takes before it answers 429 (when ``engine.max_waiting`` is left unset): its running
batch plus a queue sized so that the last request in it would wait at most ``QUEUE_WAIT_SHARE`` of the request
timeout, at the throughput this replica has measured (``CapacityEstimator``) and the request length it has seen.

A request beyond that would spend its time budget waiting; a 429 with Retry-After lets the client (or the load
balancer in front) go elsewhere at once. The bound stays below the replica's ``max_ongoing_requests``, so Serve
never parks the excess in its own unbounded queue instead of delivering it here to be refused.
"""

from __future__ import annotations

import math

from dgserve.replicas.capacity import CapacityEstimator

QUEUE_WAIT_SHARE = 0.1  # of the request timeout: the longest a request should wait for its turn (60 s of 600 s)
SERVE_HEADROOM = 0.75  # the bound's ceiling, as a share of max_ongoing_requests (the rest carries the refusals)
_MEAN_WEIGHT = 0.1  # weight of each finished request in the running mean of request length


class QueueBound:
    """Counts the replica's in-flight requests and refuses those over the bound. One event loop: no locking."""

    def __init__(self, capacity: CapacityEstimator, *, max_running: int, request_timeout_s: float | None,
                 max_ongoing_requests: int, tokens_prior: int) -> None:
        self.capacity = capacity
        self.max_running = max_running
        self.request_timeout_s = request_timeout_s
        self.ceiling = max(1, math.floor(max_ongoing_requests * SERVE_HEADROOM))
        self.mean_tokens = float(max(1, tokens_prior))  # generated positions per request, until measured
        self.in_flight = 0
        self.refused = 0

    def limit(self) -> int | None:
        """In-flight requests admitted at most (None: no bound, the request timeout is off)."""
        if self.request_timeout_s is None:
            return None
        wait_s = self.request_timeout_s * QUEUE_WAIT_SHARE
        queued = math.floor(self.capacity.capacity_tokens_per_s * wait_s / self.mean_tokens)
        return min(self.ceiling, self.max_running + max(1, queued))

    def try_admit(self) -> bool:
        limit = self.limit()
        if limit is not None and self.in_flight >= limit:
            self.refused += 1
            return False
        self.in_flight += 1
        return True

    def release(self, generated_tokens: int | None = None) -> None:
        """A request admitted by ``try_admit`` ended; ``generated_tokens``: its length, if it finished."""
        assert self.in_flight > 0, "release without admission"
        self.in_flight -= 1
        if generated_tokens is not None and generated_tokens > 0:
            self.mean_tokens += _MEAN_WEIGHT * (generated_tokens - self.mean_tokens)

    def retry_after_s(self) -> float:
        """About when a slot frees: one request's worth of work at the measured throughput."""
        return self.mean_tokens / self.capacity.capacity_tokens_per_s
