"""Step scheduling as a pure function: given what every request needs next and what memory and the
per-step token budget allow, decide this forward's work.

Order of priority inside one step: commits of finished canvases (they unblock the next canvas),
denoising canvases (least recently served first, so nobody starves when the budget is short),
prefill chunks of admitted requests (oldest first), then admission of waiting requests in arrival
order (head-of-line: a large request at the head is never overtaken, so it cannot starve).
When a commit or prefill chunk does not fit in memory, the newest running requests are preempted
(their pages freed; they resume later by recomputing their committed tokens).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

Phase = Literal["waiting", "prefill", "denoise", "commit"]
WorkKind = Literal["prefill", "denoise", "commit"]


@dataclass(frozen=True)
class SeqView:
    """The scheduler's view of one request."""

    request_id: str
    arrival: int  # lower = older
    phase: Phase
    tokens_to_prefill: int = 0  # waiting/prefill: tokens not yet in the cache
    need_blocks: int = 0  # KV blocks its next write (prefill chunk / commit / admission reservation) needs
    held_blocks: int = 0  # KV blocks it holds (freed if preempted)
    last_served: int = -1  # step index of its last denoise
    next_chunk: int = 0  # waiting/prefill: length of its next prefill chunk (fixed boundaries; never split)


@dataclass(frozen=True)
class SchedulerLimits:
    max_step_tokens: int  # tokens of one forward (all segments)
    max_running: int  # requests holding KV at once
    canvas: int
    prefill_chunk: int


@dataclass(frozen=True)
class Work:
    request_id: str
    kind: WorkKind
    length: int


@dataclass(frozen=True)
class StepPlan:
    work: tuple[Work, ...] = ()
    admit: tuple[str, ...] = ()  # waiting requests admitted this step (their first prefill chunk is in work)
    preempt: tuple[str, ...] = ()  # running requests whose pages are freed this step
    free_blocks_after: int = 0

    @property
    def num_tokens(self) -> int:
        return sum(w.length for w in self.work)


@dataclass
class _Budget:
    tokens: int
    blocks: int


def schedule(running: Sequence[SeqView], waiting: Sequence[SeqView], free_blocks: int,
             limits: SchedulerLimits) -> StepPlan:
    """Decide one step. ``running``: requests holding KV; ``waiting``: arrival-ordered queue.

    Admission reserves blocks for the prompt plus one canvas (a waiting view's ``need_blocks``), so
    prefill chunks of running requests need none; a commit needs the blocks of one more canvas.
    """
    budget = _Budget(tokens=limits.max_step_tokens, blocks=free_blocks)
    work: list[Work] = []
    preempted: set[str] = set()
    # newest first: the victims of preemption
    victims = sorted(running, key=lambda v: v.arrival, reverse=True)

    def make_room(for_view: SeqView, blocks: int) -> bool:
        while budget.blocks < blocks:
            victim = next((v for v in victims if v.request_id not in preempted
                           and v.arrival > for_view.arrival), None)
            if victim is None:
                return False
            preempted.add(victim.request_id)
            budget.blocks += victim.held_blocks
        return True

    by_age = sorted(running, key=lambda v: v.arrival)
    # 1. commits
    for v in by_age:
        if v.phase != "commit" or v.request_id in preempted:
            continue
        if budget.tokens < limits.canvas:
            break
        if not make_room(v, v.need_blocks):
            preempted.add(v.request_id)  # it is the newest that needs memory: it waits for others to finish
            budget.blocks += v.held_blocks
            continue
        budget.blocks -= v.need_blocks
        budget.tokens -= limits.canvas
        work.append(Work(v.request_id, "commit", limits.canvas))
    # 2. denoise, least recently served first
    for v in sorted((v for v in running if v.phase == "denoise"), key=lambda v: (v.last_served, v.arrival)):
        if v.request_id in preempted:
            continue
        if budget.tokens < limits.canvas:
            break
        budget.tokens -= limits.canvas
        work.append(Work(v.request_id, "denoise", limits.canvas))
    # 3. prefill chunks of running requests
    for v in by_age:
        if v.phase != "prefill" or v.request_id in preempted or budget.tokens <= 0:
            continue
        n = _chunk(v, limits)
        if n > budget.tokens:
            continue  # chunks are never split: the KV bits must not depend on the load
        need = v.need_blocks
        if not make_room(v, need):
            preempted.add(v.request_id)
            budget.blocks += v.held_blocks
            continue
        budget.blocks -= need
        budget.tokens -= n
        work.append(Work(v.request_id, "prefill", n))
    # 4. admission, strictly in arrival order
    admitted: list[str] = []
    n_running = len(running) - len(preempted)
    if not preempted:
        for v in waiting:
            n = _chunk(v, limits)
            if n_running >= limits.max_running or n > budget.tokens or budget.blocks < v.need_blocks:
                break
            budget.blocks -= v.need_blocks
            budget.tokens -= n
            n_running += 1
            admitted.append(v.request_id)
            work.append(Work(v.request_id, "prefill", n))
    return StepPlan(work=tuple(work), admit=tuple(admitted), preempt=tuple(sorted(preempted)),
                    free_blocks_after=budget.blocks)


def _chunk(v: SeqView, limits: SchedulerLimits) -> int:
    return v.next_chunk if v.next_chunk > 0 else min(v.tokens_to_prefill, limits.prefill_chunk)
