"""One request, start to finish, with no batching: the plain block-diffusion loop.

Prefill the prompt, then canvas after canvas: random canvas -> denoising steps -> commit the argmax
canvas (encoder pass appends its K/V) until EOS or ``max_tokens``. This is what ``dgserve generate``
runs, and the oracle the batching engine is tested against.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from dgserve.engine.finish import canvas_outcome
from dgserve.engine.prompt_images import check_images
from dgserve.engine.request import PromptImage, RequestStats
from dgserve.engine.sampler import StabilityTracker, denoise_step, random_canvas
from dgserve.model.diffusion_gemma import DiffusionGemma
from dgserve.model.generation_config import GREEDY_SEED, SamplingParams
from dgserve.model.kv import ContiguousKV, Segment
from dgserve.model.vision_checkpoint import LoadedVision


@dataclass
class SingleResult:
    token_ids: list[int]
    finish_reason: str  # "stop" (EOS, or a canvas of pad ids only) or "length" (cut by max_tokens)
    stats: RequestStats
    step_logits: list[torch.Tensor] = field(default_factory=list)  # only when record_logits=True


def make_generator(seed: int | None, device: torch.device) -> torch.Generator:
    if seed is None:
        seed = int.from_bytes(os.urandom(8), "little") & ((1 << 63) - 1)
    return torch.Generator(device=device).manual_seed(seed)


@torch.inference_mode()
def generate_single(
    model: DiffusionGemma,
    prompt_ids: list[int],
    *,
    max_tokens: int = 256,
    seed: int | None = None,
    sampling: SamplingParams | None = None,
    eos_token_ids: tuple[int, ...] = (1,),
    pad_token_id: int | None = None,
    ignore_eos: bool = False,
    chunk_rows: int | None = None,
    record_logits: bool = False,
    on_canvas: Callable[[list[int]], None] | None = None,
    images: Sequence[PromptImage] = (),
    vision: LoadedVision | None = None,
) -> SingleResult:
    """``images``: the prompt's images (their placeholder tokens in ``prompt_ids``), encoded by ``vision``."""
    if not prompt_ids:
        raise ValueError("the prompt must contain at least one token")
    check_images(prompt_ids, images, model.config.image_token_id)
    if images and vision is None:
        raise ValueError("the prompt has images but no vision tower was loaded")
    sampling = sampling or SamplingParams()
    if seed is None and sampling.greedy:
        seed = GREEDY_SEED  # as GenerationRequest does: greedy output is deterministic
    cfg = model.config
    device = model.device
    vocab, canvas_len = cfg.text.vocab_size, cfg.canvas_length
    kv = ContiguousKV(cfg.text.num_hidden_layers,
                      [cfg.text.is_sliding(i) for i in range(cfg.text.num_hidden_layers)], cfg.text.sliding_window)
    gen = make_generator(seed, device)
    stats = RequestStats(prompt_tokens=len(prompt_ids))
    started = time.perf_counter()
    prompt = torch.tensor(prompt_ids, dtype=torch.long, device=device)
    image_embeds = None
    if images:
        assert vision is not None
        vision_started = time.perf_counter()
        image_embeds = torch.cat(vision.encode([image.image for image in images]))
        stats.images, stats.vision_seconds = len(images), time.perf_counter() - vision_started
    spans = tuple((image.start, image.end) for image in images)
    model(prompt, [Segment("encode", 0, len(prompt_ids), 0, spans)], kv, image_embeds=image_embeds)
    kv.trim()
    length = len(prompt_ids)
    out: list[int] = []
    logits_log: list[torch.Tensor] = []
    finish = "length"
    for _ in range(math.ceil(max_tokens / canvas_len)):
        canvas = random_canvas(canvas_len, vocab, gen, device)
        argmax = canvas
        soft = None
        tracker = StabilityTracker(sampling)
        steps = 0
        for cur_step in range(sampling.max_denoising_steps, 0, -1):
            hidden = model(canvas, [Segment("denoise", 0, canvas_len, length)], kv, soft)
            if record_logits:
                logits_log.append(model.logits(hidden))
            step = denoise_step(model, hidden, canvas, cur_step, sampling, gen, chunk_rows)
            steps += 1
            canvas, argmax, soft = step.canvas, step.argmax, step.soft
            if tracker.update(step.argmax, step.entropy):
                break
        stats.denoise_steps += steps
        stats.steps_per_canvas.append(steps)
        stats.canvases += 1
        if stats.time_to_first_canvas is None:
            stats.time_to_first_canvas = time.perf_counter() - started
        outcome = canvas_outcome(argmax.tolist(), max_tokens - len(out), eos_token_ids, pad_token_id, ignore_eos)
        out.extend(outcome.token_ids)
        stats.completion_tokens += outcome.completion_tokens
        if on_canvas is not None:
            on_canvas(outcome.token_ids)
        if outcome.finish is not None:
            finish = outcome.finish
            break
        model(argmax, [Segment("encode", 0, canvas_len, length)], kv)
        kv.trim()
        length += canvas_len
    stats.new_tokens = len(out)
    stats.seconds = time.perf_counter() - started
    return SingleResult(token_ids=out, finish_reason=finish, stats=stats, step_logits=logits_log)
