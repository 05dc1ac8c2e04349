"""A replica's view of its own throughput: tokens/s produced vs tokens/s at saturation, learned online,
reported through ``record_autoscaling_stats`` to ``dgserve.routing.autoscaling``'s policy."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass

# Keys of the dict a replica returns from ``record_autoscaling_stats``.
STAT_TOKENS_PER_S = "tokens_per_s"
STAT_CAPACITY = "capacity_tokens_per_s"
STAT_QUEUED = "queued_canvases"
STAT_ACTIVE = "active_canvases"
REPORTED_STATS = (STAT_TOKENS_PER_S, STAT_CAPACITY, STAT_QUEUED, STAT_ACTIVE)

CANVAS_TOKENS = 256  # DiffusionGemma's canvas length: the most tokens one queued canvas turns into


@dataclass(frozen=True)
class _Window:
    tokens_per_s: float
    occupancy: float | None  # mean of the occupancy samples, None if there were none


def engine_occupancy(stats: Mapping[str, float | int], max_canvases: int) -> float:
    """How busy an engine is, 0..1, from ``Engine.stats()``: requests waiting for admission mean it is full
    (by its batch or its KV memory); otherwise the share of its canvas batch in use."""
    if stats.get("waiting", 0) > 0:
        return 1.0
    return min(1.0, float(stats.get("active_canvases", 0)) / max(1, max_canvases))


def queued_canvases(stats: Mapping[str, float | int]) -> int:
    """Canvases waiting for a decoder slot: one per request waiting for admission, and one per admitted
    request between canvases (prefill or commit)."""
    running = int(stats.get("running", 0))
    active = int(stats.get("active_canvases", 0))
    return int(stats.get("waiting", 0)) + max(0, running - active)


class CapacityEstimator:
    """Tokens/s one replica sustains at saturation, learned from what it actually produced.

    Time is cut into windows of ``window_s``; a window whose mean occupancy is at least ``saturation``
    measured capacity, and the estimate is the best such window among the last ``history`` windows. Until
    one has been seen the estimate is ``prior_tokens_per_s``; when saturated windows age out the last
    estimate stays. Any window's throughput is a lower bound, so the estimate is never below it.
    Not thread-safe: call it from the replica's event loop.
    """

    def __init__(self, prior_tokens_per_s: float, *, max_canvases: int, window_s: float = 10.0,
                 history: int = 30, saturation: float = 0.8, clock: Callable[[], float] = time.monotonic) -> None:
        if prior_tokens_per_s <= 0:
            raise ValueError(f"prior_tokens_per_s must be > 0, got {prior_tokens_per_s}")
        if window_s <= 0 or history < 1 or not 0 < saturation <= 1:
            raise ValueError("window_s > 0, history >= 1 and 0 < saturation <= 1 are required")
        self.prior_tokens_per_s = float(prior_tokens_per_s)
        self.max_canvases = max_canvases
        self.window_s = window_s
        self.saturation = saturation
        self._clock = clock
        self._windows: deque[_Window] = deque(maxlen=history)
        self._estimate = self.prior_tokens_per_s
        self._start: float | None = None
        self._tokens = 0
        self._occ_sum = 0.0
        self._occ_n = 0

    def _roll(self, now: float) -> None:
        if self._start is None:
            self._start = now
            return
        elapsed = now - self._start
        if elapsed < self.window_s:
            return
        occ = self._occ_sum / self._occ_n if self._occ_n else None
        self._windows.append(_Window(self._tokens / elapsed, occ))
        sat = [w.tokens_per_s for w in self._windows if w.occupancy is not None and w.occupancy >= self.saturation]
        if sat:
            self._estimate = max(sat)
        self._start, self._tokens, self._occ_sum, self._occ_n = now, 0, 0.0, 0

    def add_tokens(self, n: int, now: float | None = None) -> None:
        """``n`` tokens committed (call it per committed canvas)."""
        self._roll(self._clock() if now is None else now)
        self._tokens += n

    def sample_occupancy(self, occupancy: float, now: float | None = None) -> None:
        """One occupancy sample in 0..1 (see ``engine_occupancy``); call it at a steady rate."""
        self._roll(self._clock() if now is None else now)
        self._occ_sum += min(1.0, max(0.0, occupancy))
        self._occ_n += 1

    @property
    def tokens_per_s(self) -> float:
        """Throughput of the last complete window (0 before the first)."""
        return self._windows[-1].tokens_per_s if self._windows else 0.0

    @property
    def capacity_tokens_per_s(self) -> float:
        best_seen = max((w.tokens_per_s for w in self._windows), default=0.0)
        return max(self._estimate, best_seen)

    def autoscaling_stats(self, engine_stats: Mapping[str, float | int], now: float | None = None) -> dict[str, float]:
        """The dict for the replica's ``record_autoscaling_stats``; samples the engine's occupancy too."""
        self.sample_occupancy(engine_occupancy(engine_stats, self.max_canvases), now)
        return {
            STAT_TOKENS_PER_S: self.tokens_per_s,
            STAT_CAPACITY: self.capacity_tokens_per_s,
            STAT_QUEUED: float(queued_canvases(engine_stats)),
            STAT_ACTIVE: float(engine_stats.get("active_canvases", 0)),
        }
