"""The scheduler as a pure function: no model, no KV tensors."""

from __future__ import annotations

from dgserve.engine.scheduler import SchedulerLimits, SeqView, schedule

LIMITS = SchedulerLimits(max_step_tokens=256, max_running=8, canvas=32, prefill_chunk=64)


def _waiting(rid: str, arrival: int, prompt: int, blocks: int) -> SeqView:
    return SeqView(rid, arrival, "waiting", tokens_to_prefill=prompt, need_blocks=blocks)


def test_admission_respects_memory_and_order():
    waiting = [_waiting("a", 0, 40, 5), _waiting("b", 1, 40, 5), _waiting("c", 2, 10, 1)]
    plan = schedule([], waiting, free_blocks=9, limits=LIMITS)
    assert plan.admit == ("a",)  # b does not fit; c must not overtake b (head-of-line)
    assert plan.free_blocks_after == 4


def test_prefill_is_chunked_and_budgeted():
    waiting = [_waiting("big", 0, 1000, 10)]
    plan = schedule([], waiting, free_blocks=100, limits=LIMITS)
    assert [(w.request_id, w.kind, w.length) for w in plan.work] == [("big", "prefill", 64)]
    running = [SeqView("big", 0, "prefill", tokens_to_prefill=936, held_blocks=10),
               SeqView("d1", 1, "denoise", held_blocks=2), SeqView("d2", 2, "denoise", held_blocks=2)]
    plan = schedule(running, [], free_blocks=100, limits=LIMITS)
    kinds = [(w.kind, w.length) for w in plan.work]
    assert kinds == [("denoise", 32), ("denoise", 32), ("prefill", 64)]  # a long prompt cannot stall denoising
    assert plan.num_tokens <= LIMITS.max_step_tokens


def test_commit_preempts_newest_when_memory_runs_out():
    running = [SeqView("old", 0, "commit", need_blocks=3, held_blocks=4),
               SeqView("mid", 1, "denoise", held_blocks=2),
               SeqView("new", 2, "denoise", held_blocks=5)]
    plan = schedule(running, [_waiting("w", 3, 10, 1)], free_blocks=1, limits=LIMITS)
    assert plan.preempt == ("new",)
    assert ("old", "commit") in [(w.request_id, w.kind) for w in plan.work]
    assert "new" not in [w.request_id for w in plan.work]
    assert plan.admit == ()  # nothing is admitted in a step that had to preempt


def test_newest_needing_memory_preempts_itself_not_older():
    running = [SeqView("old", 0, "denoise", held_blocks=4), SeqView("new", 1, "commit", need_blocks=3, held_blocks=2)]
    plan = schedule(running, [], free_blocks=0, limits=LIMITS)
    assert plan.preempt == ("new",)
    assert [w.request_id for w in plan.work] == ["old"]


def test_retired_requests_free_slots_for_admission_every_step():
    running = [SeqView(f"r{i}", i, "denoise", held_blocks=1) for i in range(8)]
    plan = schedule(running, [_waiting("w", 9, 10, 1)], free_blocks=10, limits=LIMITS)
    assert plan.admit == ()  # max_running reached
    plan = schedule(running[:7], [_waiting("w", 9, 10, 1)], free_blocks=10, limits=LIMITS)
    assert plan.admit == ("w",)  # one retired: admitted in the very next step


def test_fairness_no_canvas_starves_when_budget_is_short():
    limits = SchedulerLimits(max_step_tokens=64, max_running=8, canvas=32, prefill_chunk=64)
    last = {f"r{i}": -1 for i in range(6)}
    served = {k: 0 for k in last}
    for step in range(30):
        running = [SeqView(k, int(k[1:]), "denoise", last_served=v) for k, v in last.items()]
        plan = schedule(running, [], free_blocks=10, limits=limits)
        assert len(plan.work) == 2
        for w in plan.work:
            last[w.request_id] = step
            served[w.request_id] += 1
    assert min(served.values()) >= 9 and max(served.values()) <= 11


def test_waiting_head_is_not_starved_by_a_stream_of_small_requests():
    # the head needs more memory than is free; later small requests must wait behind it
    for step in range(5):
        waiting = [_waiting("head", 0, 200, 20)] + [_waiting(f"s{step}{i}", 10 + i, 5, 1) for i in range(3)]
        plan = schedule([], waiting, free_blocks=10, limits=LIMITS)
        assert plan.admit == ()
    plan = schedule([], [_waiting("head", 0, 200, 20)], free_blocks=20, limits=LIMITS)
    assert plan.admit == ("head",)
