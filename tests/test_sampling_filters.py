"""Sampling filters (top_k, top_p, min_p, logit_bias, min_tokens' suppression) and logprobs of a denoising step, in
both execution modes: the filter rules against a sort-based reference, ``top_k: 1`` equal to greedy at a step, a
-100 bias that removes a token, and reported log-probabilities that are the returned tokens' under their step's
distribution. (Neutral settings leave exact mode bit-identical to the reference: test_parity.py.)"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from dgserve.engine import fast_step as fs
from dgserve.engine.engine import Engine, EngineConfig
from dgserve.engine.request import CanvasEvent, FinalEvent, GenerationRequest
from dgserve.engine.sampler import vocab_pass
from dgserve.engine.sampling_filters import RowFilters, filtered_logits, truncate
from dgserve.model.checkpoint import LoadedModel, load
from dgserve.model.generation_config import SamplingParams
from dgserve.train.paths import TINY_DIR

pytestmark = pytest.mark.skipif(not (TINY_DIR / "model.safetensors").is_file(), reason="tiny not trained yet")
SORT = [{"role": "user", "content": "sort 9 1 8 2 7 3"}]  # seed 7: '1 2 3 7 8 9', then EOS


@pytest.fixture(scope="module")
def tiny() -> Iterator[LoadedModel]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield load("tiny")
    finally:
        torch.set_num_threads(before)


def _filters(rows: int, **settings) -> RowFilters:
    return RowFilters.for_canvas(SamplingParams(**settings), rows, settings.pop("suppress", 0), (), torch.device("cpu"))


def _reference_keep(scaled: torch.Tensor, top_k: int, top_p: float, min_p: float) -> torch.Tensor:
    """What each filter keeps, by sorting the whole vocabulary (HF's warpers' definitions)."""
    keep = torch.ones_like(scaled, dtype=torch.bool)
    for r in range(scaled.shape[0]):
        order = scaled[r].argsort(descending=True)
        if top_k:
            keep[r, order[top_k:]] = False
        kept = order[keep[r, order]]
        probs = torch.softmax(scaled[r, kept], -1)
        before = probs.cumsum(-1) - probs
        if top_p < 1.0:
            keep[r, kept[before >= top_p]] = False
        p = torch.softmax(scaled[r], -1)
        keep[r, p < min_p * p.max()] = False
    return keep


@pytest.mark.parametrize(("top_k", "top_p", "min_p"), [(0, 1.0, 0.0), (1, 1.0, 0.0), (5, 1.0, 0.0), (0, 0.5, 0.0),
                                                        (0, 0.9, 0.0), (7, 0.8, 0.0), (0, 1.0, 0.1), (20, 0.95, 0.05)])
def test_truncation_keeps_what_sorting_the_vocabulary_keeps(top_k, top_p, min_p) -> None:
    g = torch.Generator().manual_seed(top_k + int(100 * top_p))
    scaled = torch.randn(16, 300, generator=g) * 3
    got = truncate(scaled, _filters(16, top_k=top_k, top_p=top_p, min_p=min_p)) > float("-inf")
    assert torch.equal(got, _reference_keep(scaled, top_k, top_p, min_p))


def test_logit_bias_and_suppression() -> None:
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]] * 3)
    f = RowFilters.for_canvas(SamplingParams(logit_bias={0: -100.0, 3: 5.0}), 3, 2, (1,), torch.device("cpu"))
    out = filtered_logits(logits, 0.5, f)
    assert out.argmax(-1).tolist() == [3, 3, 3]
    assert torch.isinf(out[:2, 1]).all() and not torch.isinf(out[2, 1])  # id 1 suppressed at positions 0 and 1 only
    assert (torch.softmax(out, -1)[:, 0] < 1e-30).all()  # -100 leaves no probability worth sampling


def _hidden(loaded: LoadedModel, seed: int = 0) -> torch.Tensor:
    """A canvas' final hidden states from a real forward: the prompt, then a random canvas."""
    from dgserve.model.kv import ContiguousKV, Segment

    model, cfg = loaded.model, loaded.config
    kv = ContiguousKV(cfg.text.num_hidden_layers, [cfg.text.is_sliding(i) for i in range(cfg.text.num_hidden_layers)],
                      cfg.text.sliding_window)
    prompt = loaded.tokenizer.encode_chat(SORT)
    with torch.inference_mode():
        model(torch.tensor(prompt), [Segment("encode", 0, len(prompt), 0)], kv)
        g = torch.Generator().manual_seed(seed)
        canvas = torch.randint(0, cfg.text.vocab_size, (cfg.canvas_length,), generator=g)
        return model(canvas, [Segment("denoise", 0, cfg.canvas_length, len(prompt))], kv)


def test_top_k_one_is_greedy_at_that_step_in_both_modes(tiny) -> None:
    hidden = _hidden(tiny)
    c = tiny.config.canvas_length
    with torch.inference_mode():
        greedy = vocab_pass(tiny.model, hidden, 0.6, torch.Generator().manual_seed(0), 8, greedy=True)
        exact = vocab_pass(tiny.model, hidden, 0.6, torch.Generator().manual_seed(1), 8,
                           filters=_filters(c, top_k=1))
        fast = fs.canvas_vocab_pass(tiny.model, hidden, torch.tensor(0.6), torch.rand(c), torch.tensor(False),
                                    _filters(c, top_k=1))
    assert torch.equal(exact.sample, greedy.sample) and torch.equal(fast[0], greedy.sample)
    assert torch.equal(exact.entropy, greedy.entropy)  # acceptance reads the unfiltered distribution: same steps
    assert torch.equal(exact.soft, greedy.soft)


def test_step_logprobs_are_the_samples_under_the_filtered_distribution(tiny) -> None:
    hidden = _hidden(tiny, seed=3)
    c = tiny.config.canvas_length
    f = _filters(c, top_p=0.9, logit_bias={5: 2.0})
    with torch.inference_mode():
        vp = vocab_pass(tiny.model, hidden, 0.7, torch.Generator().manual_seed(2), 8, filters=f, logprobs=True)
        logp = torch.log_softmax(filtered_logits(tiny.model.logits(hidden), 0.7, f), -1)
        fast = fs.canvas_vocab_pass(tiny.model, hidden, torch.tensor(0.7), torch.rand(c), torch.tensor(False), f,
                                    logprobs=True)
    torch.testing.assert_close(vp.logprob, logp.gather(1, vp.sample[:, None]).squeeze(1))
    assert (vp.logprob > float("-inf")).all()  # never a token the filters removed
    torch.testing.assert_close(vp.top_logprobs, logp.topk(20, -1).values)
    torch.testing.assert_close(fast[4], logp.gather(1, fast[0][:, None]).squeeze(1), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(fast[5], logp.gather(1, fast[1][:, None]).squeeze(1), atol=1e-4, rtol=1e-4)


def _run(loaded: LoadedModel, execution: str, **request) -> tuple[list[CanvasEvent], FinalEvent]:
    engine = Engine(loaded.model, loaded.generation, loaded.tokenizer,
                    EngineConfig(execution=execution, kv_cache_memory=8 << 20))
    prompt = loaded.tokenizer.encode_chat(request.pop("messages", SORT))
    engine.add_request(GenerationRequest(prompt, request_id="r", sampling=request.pop(
        "sampling", loaded.generation.sampling), **request))
    events = engine.run_until_done()
    final = events[-1]
    assert isinstance(final, FinalEvent) and final.finish_reason in ("stop", "length")
    return [e for e in events if isinstance(e, CanvasEvent)], final


@pytest.mark.parametrize("execution", ["exact", "fast"])
def test_a_bias_of_minus_100_removes_a_token(tiny, execution) -> None:
    canvases, _ = _run(tiny, execution, seed=7, max_tokens=32)
    ids = [t for e in canvases for t in e.token_ids]
    assert ids, "the unbiased run returned nothing"
    banned = max(set(ids), key=ids.count)
    biased = tiny.generation.sampling.model_copy(update={"logit_bias": {banned: -100.0}})
    canvases, _ = _run(tiny, execution, seed=7, max_tokens=32, sampling=biased)
    assert banned not in [t for e in canvases for t in e.token_ids]


def test_the_single_request_loop_applies_the_filters_too(tiny) -> None:
    """``dgserve generate`` runs generate_single: the request's filters reach its denoising steps."""
    from dgserve.engine.single import generate_single

    prompt = tiny.tokenizer.encode_chat(SORT)
    plain = generate_single(tiny.model, prompt, max_tokens=32, seed=7, sampling=tiny.generation.sampling,
                            eos_token_ids=tiny.generation.eos_token_ids)
    banned = max(set(plain.token_ids), key=plain.token_ids.count)
    biased = tiny.generation.sampling.model_copy(update={"logit_bias": {banned: -100.0}})
    result = generate_single(tiny.model, prompt, max_tokens=32, seed=7, sampling=biased,
                             eos_token_ids=tiny.generation.eos_token_ids)
    assert banned not in result.token_ids


@pytest.mark.parametrize("execution", ["exact", "fast"])
def test_min_tokens_keeps_eos_out(tiny, execution) -> None:
    _, final = _run(tiny, execution, seed=7, max_tokens=64)
    assert final.stats.completion_tokens < 10  # '1 2 3 7 8 9' then EOS
    _, final = _run(tiny, execution, seed=7, max_tokens=64, min_tokens=10)
    assert final.stats.completion_tokens >= 10


@pytest.mark.parametrize("execution", ["exact", "fast"])
def test_logprobs_of_greedy_tokens_are_their_steps_top_choice(tiny, execution) -> None:
    """Greedy denoising samples the argmax at every step, so each returned token is the most likely token of the
    step that accepted it: the reported log-probability is that step's top-1, and all are log-probabilities."""
    greedy = tiny.generation.sampling.model_copy(update={"greedy": True})
    canvases, _ = _run(tiny, execution, seed=3, max_tokens=64, sampling=greedy, logprobs=5,
                       messages=[{"role": "user", "content": "Write a story about a king."}])
    n = 0
    for e in canvases:
        assert e.logprobs is not None and e.top_logprobs is not None
        assert len(e.logprobs) == len(e.token_ids) == len(e.top_logprobs)
        for token, lp, top in zip(e.token_ids, e.logprobs, e.top_logprobs, strict=True):
            assert len(top) == 5 and lp <= 0.0
            assert [v for _, v in top] == sorted((v for _, v in top), reverse=True)
            assert top[0][0] == token and top[0][1] == pytest.approx(lp, abs=1e-5)
            assert sum(torch.tensor([v for _, v in top]).exp()) <= 1.0 + 1e-4
            n += 1
    assert n >= 10
