"""Sampling noise drawn ahead of time gives exactly what torch.multinomial gives, and leaves the generator where
multinomial leaves it; the engine's prefetching changes no token."""

from __future__ import annotations

import pytest
import torch

from dgserve.engine.engine import Engine, EngineConfig
from dgserve.engine.request import CanvasEvent, GenerationRequest
from dgserve.engine.sampling_noise import NoisePrefetcher, draw_noise, sample_with_noise
from dgserve.model.checkpoint import load
from dgserve.model.generation_config import SamplingParams


@pytest.mark.parametrize(("rows", "vocab"), [(1, 7), (16, 512), (64, 32768)])
def test_noise_then_argmax_is_multinomial(rows, vocab):
    logits = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(rows)) * 0.3
    probs = torch.softmax(logits, dim=-1)
    g_ref, g_pre = torch.Generator().manual_seed(11), torch.Generator().manual_seed(11)
    for _ in range(3):  # consecutive steps: the streams stay in step
        expected = torch.multinomial(probs, 1, generator=g_ref).squeeze(-1)
        assert torch.equal(sample_with_noise(probs, draw_noise((rows, vocab), g_pre)), expected)
        assert torch.equal(g_ref.get_state(), g_pre.get_state())


def test_noise_drawn_whole_equals_noise_drawn_in_row_chunks():
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    whole = draw_noise((24, 1000), g1)
    chunks = torch.cat([draw_noise((n, 1000), g2) for n in (5, 11, 8)])
    assert torch.equal(whole, chunks)


def test_prefetcher_budget_and_release():
    pre = NoisePrefetcher(budget_bytes=2 * 8 * 100 * 4)
    gens = [torch.Generator().manual_seed(i) for i in range(3)]
    futs = [pre.submit((8, 100), g) for g in gens]
    assert futs[0] is not None and futs[1] is not None and futs[2] is None  # over the budget: draw inline
    assert pre.take(futs[0]).shape == (8, 100)
    pre.release(futs[1])
    pre.release(futs[1])  # idempotent
    assert pre._in_flight == 0
    assert pre.submit((8, 100), gens[2]) is not None
    pre.shutdown()


def _run(lm, prefetch: bool) -> dict[str, list[int]]:
    engine = Engine(lm.model, lm.generation, lm.tokenizer,
                    EngineConfig(kv_cache_memory=8 << 20,
                                                 sampling_noise_prefetch_bytes=(1 << 20) if prefetch else 0))
    assert (engine._noise is not None) == prefetch
    sampling = SamplingParams(max_denoising_steps=6)
    out: dict[str, list[int]] = {}
    reqs = [GenerationRequest(prompt_ids=list(range(5 + i, 20 + 2 * i)), max_tokens=70 + 13 * i, seed=40 + i,
                              sampling=sampling, ignore_eos=True, request_id=f"r{i}") for i in range(4)]
    engine.add_request(reqs[0])
    engine.add_request(reqs[1])
    step = 0
    while engine.has_work():
        for ev in engine.step():
            if isinstance(ev, CanvasEvent):
                out.setdefault(ev.request_id, []).extend(ev.token_ids)
        step += 1
        if step == 3:
            engine.add_request(reqs[2])
            engine.add_request(reqs[3])
        if step == 5:
            engine.cancel("r3")  # a request cancelled mid-canvas: its pending noise is dropped
    assert engine._noise is None or engine._noise._in_flight == 0
    return out


def test_engine_with_prefetched_noise_gives_the_same_tokens():
    lm = load("tiny-random")
    with_prefetch, without = _run(lm, True), _run(lm, False)
    assert with_prefetch == without
    assert len(with_prefetch["r0"]) == 70 and len(with_prefetch["r2"]) == 96
