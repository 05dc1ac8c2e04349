"""``AsyncEngine``: drives an ``Engine`` from a worker thread and streams each request's events to asyncio.

The asyncio side never waits for a step: requests and cancellations go through a thread-safe inbox that the
worker applies between steps, and ``stats()`` reads a snapshot the worker refreshes. With a ``StepBarrier``
(expert parallelism: every rank of a group must run each forward together) the worker agrees with its peers
before each step, and any failure ends the loop for good; without one, a failed step fails its requests and the
loop goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator
from typing import Protocol

from dgserve.engine.engine import Engine
from dgserve.engine.request import EngineOverloaded, Event, FinalEvent, GenerationRequest, InvalidRequest, RequestStats

log = logging.getLogger(__name__)

IDLE_WAIT_S = 0.5  # an idle worker wakes at once for new work; this only bounds how stale stats() gets
STALLED_POLL_S = 0.01  # how often a worker whose step found nothing to run tries again without news


class StepBarrier(Protocol):
    """Steps taken in lockstep with peers (``dgserve.replicas.ep_engine.LockstepBarrier``)."""

    label: str  # names this participant in failure messages ("EP rank 1")
    shutdown_message: str  # what in-flight requests are told when the group stops
    idle_poll_s: float  # how often an idle participant asks its peers whether anyone has work

    def agree(self, has_work: bool, stopping: bool) -> tuple[bool, bool]:
        """(some peer has work, some peer is stopping), the same answer on every peer."""

    def step(self, engine: Engine) -> list[Event]:
        """One group step: ``engine.step()``, or a forward with no tokens when this engine runs none."""

    def on_idle(self) -> None:
        """No peer had work this round."""

    def stats(self) -> dict[str, float | int]: ...

    def close(self) -> None:
        """The loop has ended (stopped or failed): release the group, so that peers fail now, not at a timeout."""


class EngineFailed(RuntimeError):
    """The loop has stopped for good (a lockstep group broke, or the worker thread died)."""


class AsyncEngine:
    """Runs ``engine`` on a worker thread (see the module docstring); ``generate()`` streams one request."""

    def __init__(self, engine: Engine, barrier: StepBarrier | None = None, *, request_id_prefix: str = "req-") -> None:
        self.engine = engine
        self.barrier = barrier
        self.failed: str | None = None  # why the loop ended; then every request is refused, retryably
        self.steps = 0  # steps this loop ran (with a barrier: group steps, equal on every peer)
        self._label = barrier.label if barrier is not None else "engine"
        self._idle_wait_s = barrier.idle_poll_s if barrier is not None else IDLE_WAIT_S
        self._queues: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue[Event]]] = {}
        self._counter = itertools.count(1)
        self._prefix = request_id_prefix
        self._stopping = False
        self._wake = threading.Event()
        # inbox and progress, under one condition: drain() waits until what was posted before it is applied
        self._state = threading.Condition()
        self._inbox: deque[tuple[str, GenerationRequest | str]] = deque()
        self._posted = 0
        self._applied = 0
        self._busy = False
        self._snapshot: dict[str, float | int] = {}
        self._snapshot_at = 0.0
        self._snapshot_applied = 0
        self._refresh_snapshot()
        self._thread = threading.Thread(target=self._run, name=f"dgserve-{self._label.replace(' ', '-')}",
                                        daemon=True)
        self._thread.start()

    # -- the asyncio side -------------------------------------------------------------------------------------
    async def generate(self, request: GenerationRequest) -> AsyncIterator[Event]:
        """Raises ``InvalidRequest`` / ``EngineOverloaded`` before the first event; then yields events up to one
        FinalEvent (``error`` and ``retryable`` when the loop has failed: the caller may retry elsewhere)."""
        if not request.request_id:
            request.request_id = f"{self._prefix}{next(self._counter)}"
        rid = request.request_id
        if self.failed is None:
            self.engine.check_request(request)  # plain reads: a refusal never waits for a step
        q: asyncio.Queue[Event] = asyncio.Queue()
        self._queues[rid] = (asyncio.get_running_loop(), q)
        finished = False
        try:
            if self.failed is not None:  # checked after registering: the failure sweep may have run before
                finished = True
                yield FinalEvent(rid, "error", RequestStats(prompt_tokens=len(request.prompt_ids)), self.failed,
                                 retryable=True)
                return
            self._post("add", request)
            while True:
                ev = await q.get()
                finished = isinstance(ev, FinalEvent)
                yield ev
                if finished:
                    return
        finally:
            self._queues.pop(rid, None)
            if not finished:
                self.cancel(rid)

    def cancel(self, request_id: str) -> None:
        """Stop a request and free its pages (applied by the worker before its next step)."""
        if self.failed is None:
            self._post("cancel", request_id)

    def drain(self, timeout_s: float | None = None) -> bool:
        """Block until everything posted so far (requests, cancellations) is applied and no request is waiting
        or running; False if ``timeout_s`` passed first. A failed loop counts as drained."""
        with self._state:
            target = self._posted
            return self._state.wait_for(
                lambda: self.failed is not None or (self._applied >= target and not self._busy), timeout_s)

    def stats(self) -> dict[str, float | int]:
        """The engine's stats (and the barrier's) as of the last step, inbox change or idle poll (at most ~0.5 s
        old; current once ``drain()`` has returned True)."""
        out = dict(self._snapshot)
        if self.barrier is not None:
            out["ep_failed"] = int(self.failed is not None)
        return out

    def alive(self) -> bool:
        return self.failed is None and self._thread.is_alive()

    async def ready(self) -> bool:
        return self.alive()

    def check_health(self) -> None:
        """Raise ``EngineFailed`` when the loop can no longer serve (Serve then restarts the replica or gang)."""
        if self.failed is not None:
            raise EngineFailed(self.failed)
        if not self._thread.is_alive():
            raise EngineFailed(f"the {self._label} worker thread is not running")

    def shutdown(self, timeout_s: float = 10.0) -> None:
        """Stop the worker (with a barrier, the peers stop at the same step); in-flight requests end with a
        retryable error event."""
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout=timeout_s)

    # -- the worker thread ------------------------------------------------------------------------------------
    def _post(self, kind: str, item: GenerationRequest | str) -> None:
        with self._state:
            self._inbox.append((kind, item))
            self._posted += 1
        self._wake.set()

    def _run(self) -> None:
        try:
            self._loop()
        except Exception as exc:
            log.exception("%s failed", self._label)
            reason = f"{self._label} failed: {type(exc).__name__}: {exc}"
        else:
            reason = self.barrier.shutdown_message if self.barrier is not None else "the engine shut down"
        self._fail_for_good(reason)
        if self.barrier is not None:
            self.barrier.close()

    def _loop(self) -> None:
        while True:
            events = self._apply_inbox()
            if not (self._stopping or self.engine.has_work() or events):
                self._wake.wait(self._idle_wait_s)
                self._wake.clear()
                events.extend(self._apply_inbox())
            self._deliver(events)
            if self.barrier is None:
                if self._stopping:
                    return
                if not self.engine.has_work():
                    self._idle()
                    continue
                forwards = self.engine.forwards
                events = self._step_recovering()
                if self.engine.forwards == forwards and not events:
                    # nothing could run (the queue waits for memory): wait for news instead of spinning
                    self._wake.wait(STALLED_POLL_S)
                    self._wake.clear()
            else:
                go, stop = self.barrier.agree(self.engine.has_work(), self._stopping)
                if stop:
                    return
                if not go:
                    self.barrier.on_idle()
                    self._idle()
                    continue
                events = self.barrier.step(self.engine)  # a failure here ends the loop: the group is broken
            self.steps += 1
            self._refresh_snapshot()
            self._deliver(events)
            self._publish_progress()

    def _apply_inbox(self) -> list[Event]:
        with self._state:
            items = list(self._inbox)
            self._inbox.clear()
            applied = self._posted
        events: list[Event] = []
        for kind, item in items:
            if kind == "add":
                assert isinstance(item, GenerationRequest)
                try:
                    self.engine.add_request(item)
                except (InvalidRequest, EngineOverloaded) as exc:  # e.g. the queue filled after generate()'s check
                    events.append(FinalEvent(item.request_id, "error", RequestStats(), str(exc),
                                             overloaded=isinstance(exc, EngineOverloaded)))
            else:
                events.extend(self.engine.cancel(str(item)))
        with self._state:
            self._applied = applied
            self._busy = self.engine.has_work()
        return events

    def _step_recovering(self) -> list[Event]:
        try:
            return self.engine.step()
        except Exception as exc:  # a failed step must not hang every request: fail them all, keep serving
            log.exception("engine step failed")
            return list(self.engine.fail_all(f"engine step failed: {exc}"))

    def _idle(self) -> None:
        if self._applied != self._snapshot_applied or time.monotonic() - self._snapshot_at > IDLE_WAIT_S:
            self._refresh_snapshot()  # before drain() waiters wake: they may read stats() next
        self._publish_progress()

    def _publish_progress(self) -> None:
        with self._state:
            self._busy = self.engine.has_work()
            self._state.notify_all()

    def _refresh_snapshot(self) -> None:
        snap = dict(self.engine.stats())
        if self.barrier is not None:
            snap.update(self.barrier.stats())
        self._snapshot = snap
        self._snapshot_at = time.monotonic()
        self._snapshot_applied = self._applied

    def _deliver(self, events: list[Event]) -> None:
        for ev in events:
            target = self._queues.get(ev.request_id)
            if target is not None:
                loop, q = target
                with contextlib.suppress(RuntimeError):  # the consumer's loop may be closed
                    loop.call_soon_threadsafe(q.put_nowait, ev)

    def _fail_for_good(self, reason: str) -> None:
        """Every request ends with a retryable error event, and later ones are refused the same way."""
        if self.failed is None:
            self.failed = reason  # set before the sweep: generate() re-checks it after registering
        try:
            finals = {ev.request_id: ev for ev in self.engine.fail_all(reason)}
        except Exception:  # the engine's state may be inconsistent after a failed step
            log.warning("could not free the failed engine's requests", exc_info=True)
            finals = {}
        events: list[Event] = []
        for rid in list(self._queues):
            stats = finals[rid].stats if rid in finals else RequestStats()
            events.append(FinalEvent(rid, "error", stats, reason, retryable=True))
        self._deliver(events)
        with contextlib.suppress(Exception):
            self._refresh_snapshot()
        with self._state:
            self._state.notify_all()


__all__ = ["AsyncEngine", "EngineFailed", "StepBarrier"]
