"""Image prompts in the continuous-batching engine: one vision run per step over the images of all its prefill
chunks, chunks that never cut an image, prefix-cache keys that carry the image, equality with solo runs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from recording import RecordingEngine
from test_vision_generate import IDS, image_prompt, images

from dgserve.engine.engine import Engine, EngineConfig
from dgserve.engine.prompt_images import chunk_end, key_ids
from dgserve.engine.request import CanvasEvent, FinalEvent, GenerationRequest, PromptImage
from dgserve.engine.single import generate_single
from dgserve.model.checkpoint import load
from dgserve.model.generation_config import SamplingParams

SAMPLING = SamplingParams(max_denoising_steps=5)


@pytest.fixture(scope="module")
def loaded(vision_reference):
    return load(vision_reference[1])


def picture(seed: int, size: tuple[int, int] = (40, 40)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def request(loaded, rid: str, pictures: list[Image.Image], seed: int, max_tokens: int = 20) -> GenerationRequest:
    prompt, placed = image_prompt(loaded, pictures, seed)
    return GenerationRequest(prompt_ids=prompt, images=tuple(placed), max_tokens=max_tokens, seed=seed,
                             sampling=SAMPLING, request_id=rid, ignore_eos=True)


def drive(engine: Engine, requests: list[GenerationRequest], stagger: int = 0):
    tokens: dict[str, list[int]] = {}
    finals: dict[str, FinalEvent] = {}
    pending, step = list(requests), 0
    while pending or engine.has_work():
        if pending and (stagger == 0 or step % stagger == 0):
            batch = pending if stagger == 0 else pending[:1]
            for r in batch:
                engine.add_request(r)
            pending = pending[len(batch):]
        for ev in engine.step():
            if isinstance(ev, CanvasEvent):
                tokens.setdefault(ev.request_id, []).extend(ev.token_ids)
            elif isinstance(ev, FinalEvent):
                finals[ev.request_id] = ev
        step += 1
        assert step < 10_000
    return tokens, finals


def solo(loaded, r: GenerationRequest):
    return generate_single(loaded.model, r.prompt_ids, max_tokens=r.max_tokens, seed=r.seed, sampling=SAMPLING,
                           ignore_eos=True, images=r.images, vision=loaded.vision, record_logits=True)


class SegmentLog:
    """Wraps the model's forward to record every forward's segments."""

    def __init__(self, model) -> None:
        self.model, self.forward, self.segments = model, model.forward, []

    def __enter__(self):
        def record(tokens, segments, kv, soft=None, image_embeds=None):
            self.segments.append(list(segments))
            return self.forward(tokens, segments, kv, soft, image_embeds)

        self.model.forward = record
        return self

    def __exit__(self, *exc):
        del self.model.forward


@pytest.mark.parametrize("chunk", [16, 512])
def test_image_requests_in_batches_equal_their_solo_runs(loaded, chunk):
    """Requests with one image, two images and none, admitted together: the tokens of each equal its solo run's.
    Prompts prefilled whole: every step's logits bit for bit. In chunks of 16 (shorter than every image): the
    first step's logits within 1e-5 (chunked attention sums in another order than the solo run's whole-prompt
    prefill, as for text prompts; later steps drift further, measured up to 2.5e-4 on logits up to ~30, on the
    text-only request too, with no flipped token)."""
    reqs = [request(loaded, "one-a", images(0)[:1], 0), request(loaded, "two", images(1), 1),
            request(loaded, "one-b", images(2)[1:], 2)]
    gen = torch.Generator().manual_seed(5)
    reqs.insert(1, GenerationRequest(prompt_ids=torch.randint(8, 320, (37,), generator=gen).tolist(), max_tokens=20,
                                     seed=3, sampling=SAMPLING, request_id="text", ignore_eos=True))
    engine = RecordingEngine(loaded.model, loaded.generation, None,
                             EngineConfig(kv_cache_memory=8 << 20, prefill_chunk=chunk, max_step_tokens=4096,
                                          block_size=4), vision=loaded.vision)
    logits = engine.logits  # the engine's on_denoise hook is gone: a recording subclass observes it
    with SegmentLog(loaded.model) as log:
        tokens, finals = drive(engine, reqs)
    assert engine.vision_images == 4  # each image encoded once
    # every image's soft tokens sit in one encode segment (chunk boundaries moved past images)
    spans = [(seg, span) for segs in log.segments for seg in segs for span in seg.image_spans]
    assert len(spans) == 4
    assert all(seg.position <= a < b <= seg.position + seg.length for seg, (a, b) in spans)
    assert sorted(b - a for _, (a, b) in spans) == sorted(i.image.num_soft_tokens for r in reqs for i in r.images)
    # the images of requests admitted together ran in one vision batch: fewer encoder runs than images
    assert 0 < engine.vision_runs < engine.vision_images
    for r in reqs:
        expected = solo(loaded, r)
        assert tokens[r.request_id] == expected.token_ids, r.request_id
        assert len(logits[r.request_id]) == len(expected.step_logits)
        if chunk >= len(r.prompt_ids):
            assert all(torch.equal(a, b) for a, b in zip(logits[r.request_id], expected.step_logits, strict=True))
        else:
            torch.testing.assert_close(logits[r.request_id][0], expected.step_logits[0], rtol=0, atol=1e-5)
        assert finals[r.request_id].stats.images == len(r.images)
    assert finals["two"].stats.vision_seconds > 0 and finals["text"].stats.vision_seconds == 0


def test_prefix_cache_keys_carry_the_image(loaded):
    """Same text, another image: no KV shared past the text before the image. The same image again: the cache
    serves the prefix through the image, and the output is still the cold run's."""
    engine = Engine(loaded.model, loaded.generation, None,
                    EngineConfig(kv_cache_memory=8 << 20, prefill_chunk=512, block_size=4), vision=loaded.vision)
    first = request(loaded, "a", [picture(1)], seed=11)
    other = request(loaded, "b", [picture(2)], seed=11)
    again = request(loaded, "c", [picture(1)], seed=11)
    assert first.prompt_ids == other.prompt_ids  # only the pixels differ
    assert key_ids(first.prompt_ids, first.images) != key_ids(other.prompt_ids, other.images)
    image_start = first.images[0].start
    drive(engine, [first])
    _, finals_b = drive(engine, [other])
    tokens_c, finals_c = drive(engine, [again])
    assert finals_b["b"].stats.cached_prompt_tokens <= image_start
    assert finals_c["c"].stats.cached_prompt_tokens >= first.images[0].end
    assert tokens_c["c"] == solo(loaded, again).token_ids


def test_cached_prefix_never_ends_inside_an_image(loaded):
    """A prompt that ends with an image, sent twice: the cache must leave a block to compute, which would end the
    cached prefix inside the image; it stops before the image instead, the image is encoded whole, and the output
    is the cold run's."""
    engine = Engine(loaded.model, loaded.generation, None,
                    EngineConfig(kv_cache_memory=8 << 20, prefill_chunk=512, block_size=4), vision=loaded.vision)
    base = request(loaded, "base", [picture(3, (64, 48))], seed=12)
    image = base.images[0]
    prompt = base.prompt_ids[:image.end + 1]  # ... <boi> <image> x 48 <eoi>
    assert (len(prompt) - 4) // 4 * 4 > image.start  # where a plain prefix match would end: inside the image

    def ending_with_image(rid: str) -> GenerationRequest:
        return GenerationRequest(prompt_ids=prompt, images=base.images, max_tokens=16, seed=1, sampling=SAMPLING,
                                 request_id=rid, ignore_eos=True)

    drive(engine, [ending_with_image("first")])
    with SegmentLog(loaded.model) as log:
        tokens, finals = drive(engine, [ending_with_image("again")])
    cached = finals["again"].stats.cached_prompt_tokens
    assert 0 < cached <= image.start  # a hit, stopped before the image
    first_encode = log.segments[0][0]
    assert first_encode.position == cached and first_encode.image_spans == ((image.start, image.end),)
    assert tokens["again"] == solo(loaded, ending_with_image("solo")).token_ids


def test_chunk_end_moves_past_an_image():
    from dgserve.model.image_processing import ProcessedImage

    def fake(n: int) -> ProcessedImage:
        return ProcessedImage(torch.zeros(4 * n, 3, dtype=torch.uint8), torch.zeros(4 * n, 2, dtype=torch.long), n,
                              8, 8, bytes(16))

    placed = [PromptImage(10, fake(20)), PromptImage(40, fake(5))]  # [10, 30) and [40, 45)
    assert chunk_end(0, 100, 16, placed) == 30  # 16 would cut the first image
    assert chunk_end(30, 100, 16, placed) == 32  # then the fixed boundaries again
    assert chunk_end(32, 100, 16, placed) == 48
    assert chunk_end(40, 100, 4, placed) == 45
    assert chunk_end(0, 100, 10, placed) == 10  # ending where an image starts is fine
    assert chunk_end(96, 100, 16, placed) == 100


def test_engine_without_vision_refuses_images(loaded):
    engine = Engine(loaded.model, loaded.generation, None, EngineConfig(kv_cache_memory=4 << 20))
    with pytest.raises(ValueError, match="the vision tower is not loaded"):
        engine.add_request(request(loaded, "x", [picture(4)], seed=1))


def test_bad_image_spans_are_refused(loaded):
    engine = Engine(loaded.model, loaded.generation, None, EngineConfig(kv_cache_memory=4 << 20),
                    vision=loaded.vision)
    good = request(loaded, "x", [picture(4)], seed=1)
    shifted = GenerationRequest(prompt_ids=good.prompt_ids, images=(PromptImage(good.images[0].start - 1,
                                                                                 good.images[0].image),),
                                request_id="y")
    with pytest.raises(ValueError, match="are not all image tokens"):
        engine.add_request(shifted)
    extra = GenerationRequest(prompt_ids=[*good.prompt_ids, IDS["image_token_id"]], images=good.images,
                              request_id="z")
    with pytest.raises(ValueError, match="image tokens but its images have"):
        engine.add_request(extra)


def test_fast_execution_takes_image_prompts(loaded):
    """``execution: fast`` (CPU here): the prefill chunk holding an image runs the exact packed forward (the whole
    image, its features, its mask; the runner's rows are at most one canvas), the rest the fast runner's rows.
    The picture decides the tokens (counter-based sampling: the same request gives the same tokens)."""
    engine = Engine(loaded.model, loaded.generation, None,
                    EngineConfig(kv_cache_memory=8 << 20, block_size=4, execution="fast"), vision=loaded.vision)
    assert engine.runner is not None and engine.prefill_chunk == loaded.config.canvas_length
    reqs = [request(loaded, "a", [picture(1)], 0), request(loaded, "other", [picture(2)], 0),
            request(loaded, "again", [picture(1)], 0), request(loaded, "two", images(1), 1)]
    with SegmentLog(loaded.model) as log:
        tokens, finals = drive(engine, reqs)
    assert all(finals[r.request_id].finish_reason == "length" and len(tokens[r.request_id]) == 20 for r in reqs)
    assert engine.vision_images == 5
    spans = sorted(span for segs in log.segments for seg in segs for span in seg.image_spans)
    assert spans == sorted((i.start, i.end) for r in reqs for i in r.images)  # each image whole, in exact forwards
    assert tokens["a"] == tokens["again"] != tokens["other"]
