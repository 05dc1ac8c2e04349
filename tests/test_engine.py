"""The continuous-batching engine: batch invariance, memory budget, prefix cache, cancellation."""

from __future__ import annotations

import asyncio

import pytest
import torch
from recording import RecordingEngine

from dgserve.engine.engine import Engine, EngineConfig
from dgserve.engine.loop import AsyncEngine
from dgserve.engine.request import CanvasEvent, FinalEvent, GenerationRequest
from dgserve.engine.single import generate_single
from dgserve.model.checkpoint import load
from dgserve.model.generation_config import SamplingParams

SAMPLING = SamplingParams(max_denoising_steps=6)


@pytest.fixture(scope="module")
def tiny():
    return load("tiny-random")


def _requests(n: int, seed: int = 0, prompt_max: int = 60) -> list[GenerationRequest]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        plen = int(torch.randint(3, prompt_max, (1,), generator=g))
        out.append(GenerationRequest(
            prompt_ids=torch.randint(6, 512, (plen,), generator=g).tolist(),
            max_tokens=int(torch.randint(10, 90, (1,), generator=g)), seed=1000 + i, sampling=SAMPLING,
            request_id=f"r{i}", ignore_eos=True))
    return out


def _drive(engine: Engine, requests: list[GenerationRequest], stagger: int = 0, on_step=None):
    tokens: dict[str, list[int]] = {}
    finals: dict[str, FinalEvent] = {}
    pending = list(requests)
    step = 0
    while pending or engine.has_work():
        if pending and (stagger == 0 or step % stagger == 0):
            for r in pending[: (len(pending) if stagger == 0 else 1)]:
                engine.add_request(r)
            pending = [] if stagger == 0 else pending[1:]
        for ev in engine.step():
            if isinstance(ev, CanvasEvent):
                tokens.setdefault(ev.request_id, []).extend(ev.token_ids)
            elif isinstance(ev, FinalEvent):
                finals[ev.request_id] = ev
        if on_step is not None:
            on_step(engine)
        step += 1
        assert step < 100_000
    return tokens, finals


def test_batch_invariance_staggered(tiny):
    """16 requests of different prompt lengths, seeds and max_tokens, arriving staggered, give exactly the
    tokens each gives alone, and their logits at every step match the solo run within 1e-5. Prompts are
    prefilled in chunks of 24 here, which the solo run does not do: attention over a chunk plus the cache
    sums in another order than over the whole prompt (measured: up to ~6e-6 in the logits, no flipped
    token); without chunking the match is bitwise (next test)."""
    reqs = _requests(16)
    engine = RecordingEngine(tiny.model, tiny.generation, tiny.tokenizer,
                             EngineConfig(kv_cache_memory=8 << 20, prefill_chunk=24, max_step_tokens=512))
    batched_logits = engine.logits
    tokens, finals = _drive(engine, reqs, stagger=2)
    assert max(engine.canvases_in_forward) > 4  # canvases of several requests really shared forwards
    flips = 0
    for r in reqs:
        solo = generate_single(tiny.model, r.prompt_ids, max_tokens=r.max_tokens, seed=r.seed, sampling=SAMPLING,
                               ignore_eos=True, record_logits=True)
        assert tokens[r.request_id] == solo.token_ids, r.request_id
        assert finals[r.request_id].finish_reason == "length"
        assert len(batched_logits[r.request_id]) == len(solo.step_logits)
        for a, b in zip(batched_logits[r.request_id], solo.step_logits, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
            flips += int((a.argmax(-1) != b.argmax(-1)).sum())
    assert flips == 0


# two threads on a busy 2-core machine take a minute (the threads contend): the slow lane
@pytest.mark.parametrize("threads", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_batch_invariance_is_bitwise_without_chunking(tiny, threads):
    """Prompts prefilled whole (as the reference and ``generate_single`` do), among them prompts of 1-3 and
    5-11 tokens that BLAS rounds differently when packed: every step's logits of every request are bit for
    bit those of its solo run, at one and at two torch threads (dgserve.model.batch_invariance)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        reqs = _requests(13)
        g = torch.Generator().manual_seed(7)
        for i, plen in enumerate((1, 2, 3, 5, 9)):
            reqs.insert(2 * i, GenerationRequest(
                prompt_ids=torch.randint(6, 512, (plen,), generator=g).tolist(), max_tokens=40 + 3 * i,
                seed=2000 + i, sampling=SAMPLING, request_id=f"short{plen}", ignore_eos=True))
        engine = RecordingEngine(tiny.model, tiny.generation, tiny.tokenizer,
                                 EngineConfig(kv_cache_memory=8 << 20, max_step_tokens=1024))
        batched_logits = engine.logits
        tokens, _ = _drive(engine, reqs, stagger=2)
        assert max(engine.canvases_in_forward) > 4
        for r in reqs:
            solo = generate_single(tiny.model, r.prompt_ids, max_tokens=r.max_tokens, seed=r.seed,
                                   sampling=SAMPLING, ignore_eos=True, record_logits=True)
            assert tokens[r.request_id] == solo.token_ids, r.request_id
            assert len(batched_logits[r.request_id]) == len(solo.step_logits)
            for step, (a, b) in enumerate(zip(batched_logits[r.request_id], solo.step_logits, strict=True)):
                assert torch.equal(a, b), (r.request_id, step, float((a - b).abs().max()))
    finally:
        torch.set_num_threads(before)


def test_memory_budget_32_requests_complete(tiny):
    """A KV budget that fits ~4 requests at a time: all 32 complete (queued or preempted), never over budget."""
    reqs = _requests(32, seed=1, prompt_max=40)
    probe = Engine(tiny.model, tiny.generation, None, EngineConfig(kv_cache_memory=1 << 20))
    per_token = probe.pool.bytes_per_token("full")
    per_request = (40 + 3 * tiny.config.canvas_length) * per_token
    budget = int(4 * per_request / 0.5)  # the full space gets at least half the budget
    engine = Engine(tiny.model, tiny.generation, None,
                    EngineConfig(kv_cache_memory=budget, prefill_chunk=32, max_step_tokens=1024, max_running=16))
    capacity = engine.pool.capacity_bytes()
    assert capacity <= budget
    peak = {"running": 0}

    def check(e: Engine) -> None:
        assert e.pool.bytes_used() <= capacity
        peak["running"] = max(peak["running"], len(e.running))

    tokens, finals = _drive(engine, reqs, on_step=check)
    assert len(finals) == 32
    assert all(f.finish_reason == "length" for f in finals.values())
    for r in reqs[:4]:  # spot-check correctness under queueing/preemption
        solo = generate_single(tiny.model, r.prompt_ids, max_tokens=r.max_tokens, seed=r.seed, sampling=SAMPLING,
                               ignore_eos=True)
        assert tokens[r.request_id] == solo.token_ids
    # no leak: once every request is done, the only blocks in use are the prefix cache's own (on by default)
    assert engine.prefix_cache is not None
    assert engine.pool.num_used_blocks("full") == len(engine.prefix_cache)


def test_prefix_cache_prefills_shared_system_prompt_once(tiny):
    system = torch.randint(6, 512, (160,), generator=torch.Generator().manual_seed(5)).tolist()
    # each user turn is at least a block long: the engine always leaves a block of the prompt to compute
    # (a cache hit then gives a cold run's bits, see PrefixCache.match), so all of the system prompt is shared
    user = 18
    reqs = [GenerationRequest(prompt_ids=[*system, *range(10 + user * i, 10 + user * (i + 1))], max_tokens=8,
                              seed=i, sampling=SAMPLING, request_id=f"p{i}", ignore_eos=True) for i in range(8)]
    engine = Engine(tiny.model, tiny.generation, None,
                    EngineConfig(kv_cache_memory=8 << 20, prefill_chunk=256, max_step_tokens=2048))
    engine.add_request(reqs[0])
    while engine.running or engine.waiting:
        engine.step()
        if reqs[0].request_id in engine.running and engine.running[reqs[0].request_id].phase == "denoise":
            break
    before = engine.encoder_tokens
    _, finals = _drive(engine, reqs[1:])
    block = engine.pool.block_size
    shared = (160 // block) * block
    # the 7 later requests prefill only what is past the shared, block-aligned prefix
    commits = sum(tiny.config.canvas_length * (f.stats.canvases - 1) for f in finals.values())
    assert shared == 160
    assert engine.encoder_tokens - before - commits == 7 * (160 + user - shared)
    assert finals["p0"].stats.cached_prompt_tokens == 0
    assert [finals[f"p{i}"].stats.cached_prompt_tokens for i in range(1, 8)] == [shared] * 7
    assert engine.prefix_cache.stats.hit_rate > 0.5


def test_cancel_frees_pages_within_one_step(tiny):
    engine = Engine(tiny.model, tiny.generation, None, EngineConfig(kv_cache_memory=4 << 20,
                                                                      enable_prefix_cache=False))
    r = _requests(1, seed=3)[0]
    r.max_tokens = 500
    engine.add_request(r)
    for _ in range(3):
        engine.step()
    assert engine.pool.num_used_blocks("full") > 0
    events = engine.cancel(r.request_id)
    assert [e.finish_reason for e in events] == ["cancelled"]
    assert engine.pool.num_used_blocks("full") == 0
    assert engine.pool.num_used_blocks("sliding") == 0
    assert not engine.has_work()


def test_async_engine_streams_and_cancels(tiny):
    engine = Engine(tiny.model, tiny.generation, tiny.tokenizer,
                    EngineConfig(kv_cache_memory=4 << 20, enable_prefix_cache=False))
    aeng = AsyncEngine(engine)

    async def main():
        r1 = _requests(1, seed=4)[0]
        events = [ev async for ev in aeng.generate(r1)]
        assert isinstance(events[-1], FinalEvent) and events[-1].finish_reason == "length"
        solo = generate_single(tiny.model, r1.prompt_ids, max_tokens=r1.max_tokens, seed=r1.seed,
                               sampling=SAMPLING, ignore_eos=True)
        assert [t for e in events if isinstance(e, CanvasEvent) for t in e.token_ids] == solo.token_ids
        r2 = _requests(1, seed=5)[0]
        r2.max_tokens = engine.max_tokens_that_fit(r2)  # as long as the cache allows: ~125 canvases
        r2.request_id = "long"
        agen = aeng.generate(r2)
        first = await agen.__anext__()
        assert isinstance(first, CanvasEvent)
        await agen.aclose()  # client went away
        assert await asyncio.to_thread(aeng.drain, 60)  # the worker applies the cancellation between steps
        assert "long" not in engine.running
        assert engine.pool.num_used_blocks("sliding") == engine.pool.num_used_blocks("full") == 0

    try:
        asyncio.run(main())
    finally:
        aeng.shutdown()


def test_queue_filling_after_the_check_gives_a_typed_overloaded_final(tiny, monkeypatch):
    """The queue can fill between generate()'s admission check and the worker thread's add_request: the request
    then ends with a FinalEvent flagged ``overloaded`` (backends answer 429 on the flag, not on the message)."""
    from dgserve.engine.engine import EngineOverloaded
    from dgserve.routing.chat_backend import EngineChatBackend
    from dgserve.routing.ingress_app import OverloadedError

    backend = EngineChatBackend.in_process(tiny, EngineConfig(kv_cache_memory=4 << 20))
    aeng = backend.client

    def full(req: GenerationRequest) -> None:
        raise EngineOverloaded(7)

    monkeypatch.setattr(aeng.engine, "add_request", full)  # generate() checks, then the worker finds it full

    async def main():
        events = [ev async for ev in aeng.generate(_requests(1, seed=6)[0])]
        assert len(events) == 1 and isinstance(events[0], FinalEvent)
        assert events[0].finish_reason == "error" and events[0].overloaded and not events[0].retryable
        with pytest.raises(OverloadedError):
            _ = [ev async for ev in backend.generate(_requests(1, seed=7)[0])]

    try:
        asyncio.run(main())
    finally:
        aeng.shutdown()


def test_stop_string_cuts_committed_text(tiny):
    engine = Engine(tiny.model, tiny.generation, tiny.tokenizer, EngineConfig(kv_cache_memory=4 << 20))
    r = _requests(1, seed=6)[0]
    free = generate_single(tiny.model, r.prompt_ids, max_tokens=r.max_tokens, seed=r.seed, sampling=SAMPLING,
                           ignore_eos=True)
    text = tiny.tokenizer.decode(free.token_ids)
    stop = text[len(text) // 2: len(text) // 2 + 3]
    r.stop = (stop,)
    engine.add_request(r)
    out = ""
    final = None
    while engine.has_work():
        for ev in engine.step():
            if isinstance(ev, CanvasEvent):
                out += ev.text
            elif isinstance(ev, FinalEvent):
                final = ev
    assert final is not None and final.finish_reason == "stop"
    assert out == text[: text.find(stop)]
