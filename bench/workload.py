"""Request mixes for the CPU benchmarks, and a driver that feeds one to dgserve's engine in-process.

A mix is a list of :class:`RequestSpec` (prompt ids, tokens to generate, seed, arrival time). The
driver runs ``Engine.step()`` in this thread, adding each request when its arrival time has passed,
and records when each request's first canvas and last token came out. Outputs are fixed-length
(``ignore_eos``): random weights never converge, so EOS would make lengths arbitrary.
"""

from __future__ import annotations

import random
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

from dgserve.engine.engine import Engine, EngineConfig
from dgserve.engine.request import CanvasEvent, FinalEvent, GenerationRequest
from dgserve.model.checkpoint import LoadedModel
from dgserve.model.generation_config import SamplingParams

# KV pages for 64 concurrent bench-cpu sequences: the sliding space (capped at half the budget) must
# hold 64 windows of 512 plus a prefill chunk of 512 (~12 MiB each), so 1 GiB is not enough.
DEFAULT_KV_BYTES = 2 << 30


@dataclass(frozen=True)
class RequestSpec:
    index: int
    prompt_ids: list[int]
    max_tokens: int
    seed: int
    arrival_s: float = 0.0


# Prompts avoid the lowest ids, where dgserve's tokenizers keep their special tokens (pad, eos, bos,
# turn markers, the image placeholder that the API rejects in a text prompt).
FIRST_PLAIN_ID = 16


def random_prompt(rng: random.Random, vocab: int, length: int) -> list[int]:
    return [rng.randrange(FIRST_PLAIN_ID, vocab) for _ in range(length)]


def uniform_mix(n: int, vocab: int, prompt_len: int, max_tokens: int, seed: int = 0) -> list[RequestSpec]:
    """``n`` requests arriving together, all with the same prompt length and output length."""
    rng = random.Random(seed)
    return [RequestSpec(i, random_prompt(rng, vocab, prompt_len), max_tokens, seed * 1000 + i) for i in range(n)]


def staggered_mix(n: int, vocab: int, prompt_range: tuple[int, int], tokens_range: tuple[int, int],
                  gap_s: float, seed: int = 0, content_seed: int | None = None) -> list[RequestSpec]:
    """``n`` requests arriving every ``gap_s`` seconds with prompt and output lengths drawn uniformly
    from the (inclusive) ranges by ``seed``; the prompts' token ids are drawn by ``content_seed``
    (default ``seed``), so rounds of a benchmark can share the lengths but not the prompts."""
    rng = random.Random(seed)
    content = random.Random(seed if content_seed is None else content_seed + 7_919)
    out = []
    for i in range(n):
        plen = rng.randint(*prompt_range)
        max_tokens = rng.randint(*tokens_range)
        out.append(RequestSpec(i, random_prompt(content, vocab, plen), max_tokens, seed * 1000 + i,
                               round(i * gap_s, 6)))
    return out


@dataclass
class Outcome:
    arrival_s: float
    new_tokens: int = 0
    first_canvas_s: float | None = None  # since the run started
    done_s: float | None = None
    denoise_steps: int = 0
    canvases: int = 0
    token_ids: list[int] = field(default_factory=list)


@dataclass
class LoadResult:
    """What one side of a comparison achieved on one request mix."""

    outcomes: list[Outcome]
    forwards: int = 0  # decoder/encoder forwards (engine steps) or reference denoise forwards
    cpu_s: float = 0.0  # CPU seconds this process used meanwhile (a contention-robust cross-check)

    @property
    def tokens(self) -> int:
        return sum(o.new_tokens for o in self.outcomes)

    @property
    def wall_s(self) -> float:
        """From the first arrival to the last request's completion."""
        return max(o.done_s or 0.0 for o in self.outcomes) - min(o.arrival_s for o in self.outcomes)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s if self.wall_s > 0 else 0.0

    def summary(self) -> dict[str, Any]:
        lat = [(o.done_s or 0.0) - o.arrival_s for o in self.outcomes]
        ttfc = [(o.first_canvas_s if o.first_canvas_s is not None else o.done_s or 0.0) - o.arrival_s
                for o in self.outcomes]
        per_req = [o.new_tokens / x for o, x in zip(self.outcomes, lat, strict=True) if x > 0]
        steps = sum(o.denoise_steps for o in self.outcomes)
        canvases = sum(o.canvases for o in self.outcomes)
        out: dict[str, Any] = {
            "requests": len(self.outcomes), "new_tokens": self.tokens, "wall_s": round(self.wall_s, 4),
            "tokens_per_s": round(self.tokens_per_s, 3),
            "per_request_tokens_per_s": round(statistics.fmean(per_req), 3) if per_req else 0.0,
            "latency_mean_s": round(statistics.fmean(lat), 4),
            "ttfc_mean_s": round(statistics.fmean(ttfc), 4), "ttfc_p50_s": round(statistics.median(ttfc), 4),
            "ttfc_max_s": round(max(ttfc), 4), "cpu_s": round(self.cpu_s, 3),
        }
        if canvases:
            out["steps_per_canvas"] = round(steps / canvases, 3)
        if self.forwards:
            out["forwards"] = self.forwards
            if steps:
                out["canvases_per_forward"] = round(steps / self.forwards, 3)
        return out


def make_engine(lm: LoadedModel, kv_bytes: int = DEFAULT_KV_BYTES, max_running: int = 64,
                max_step_tokens: int = 8192, prefix_cache: bool = True, noise_prefetch_bytes: int | None = None,
                execution: str = "exact", compile: bool | None = None) -> Engine:
    """``noise_prefetch_bytes``: EngineConfig.sampling_noise_prefetch_bytes (None: the engine's default);
    ``execution`` / ``compile``: the engine's execution mode and whether fast mode compiles its layers."""
    extra = {} if noise_prefetch_bytes is None else {"sampling_noise_prefetch_bytes": noise_prefetch_bytes}
    cfg = EngineConfig(kv_cache_memory=kv_bytes, max_running=max_running,
                       max_step_tokens=max(max_step_tokens, max_running * lm.config.canvas_length),
                       enable_prefix_cache=prefix_cache, execution=execution, compile=compile, **extra)
    return Engine(lm.model, lm.generation, lm.tokenizer, cfg)


def drive_engine(engine: Engine, specs: list[RequestSpec], sampling: SamplingParams, tag: str,
                 keep_tokens: bool = False) -> LoadResult:
    """Feed ``specs`` to ``engine`` at their arrival times (in-process, this thread) until all finish."""
    pending = sorted(specs, key=lambda s: s.arrival_s)
    outcomes: dict[str, Outcome] = {}
    forwards0 = engine.forwards
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    while pending or engine.has_work():
        now = time.perf_counter() - t0
        while pending and pending[0].arrival_s <= now:
            s = pending.pop(0)
            rid = f"{tag}-{s.index}"
            engine.add_request(GenerationRequest(prompt_ids=list(s.prompt_ids), max_tokens=s.max_tokens,
                                                 seed=s.seed, sampling=sampling, ignore_eos=True, request_id=rid))
            outcomes[rid] = Outcome(arrival_s=s.arrival_s)
        if not engine.has_work():
            time.sleep(max(0.0, pending[0].arrival_s - (time.perf_counter() - t0)))
            continue
        for ev in engine.step():
            o = outcomes[ev.request_id]
            t = time.perf_counter() - t0
            if isinstance(ev, CanvasEvent):
                if o.first_canvas_s is None:
                    o.first_canvas_s = t
                if keep_tokens:
                    o.token_ids.extend(ev.token_ids)
            elif isinstance(ev, FinalEvent):
                if ev.finish_reason != "length":
                    raise RuntimeError(f"{ev.request_id} finished with {ev.finish_reason}: {ev.error}")
                o.done_s, o.new_tokens = t, ev.stats.new_tokens
                o.denoise_steps, o.canvases = ev.stats.denoise_steps, ev.stats.canvases
    return LoadResult([outcomes[f"{tag}-{s.index}"] for s in sorted(specs, key=lambda s: s.index)],
                      forwards=engine.forwards - forwards0, cpu_s=time.process_time() - cpu0)


def warmup_mix(lm: LoadedModel, seed: int) -> list[RequestSpec]:
    """Two short requests of one canvas, for an untimed warm-up before the measured runs."""
    return uniform_mix(2, lm.config.text.vocab_size, 4, lm.config.canvas_length, seed=seed + 99)


def warm_engine(lm: LoadedModel, steps: int, seed: int, max_running: int = 64,
                noise_prefetch_bytes: int | None = None) -> tuple[Engine, SamplingParams]:
    """:func:`make_engine` with the benchmarks' sampler (``steps`` denoising steps), warmed up."""
    sampling = SamplingParams(max_denoising_steps=steps)
    engine = make_engine(lm, max_running=max_running, noise_prefetch_bytes=noise_prefetch_bytes)
    drive_engine(engine, warmup_mix(lm, seed), sampling, "warm")
    return engine, sampling


def abba(reps: int, sides: list[str]) -> list[tuple[int, str]]:
    """Alternating side order over ``reps`` rounds, as (round, side): A B, B A, A B, ... so drift hits
    both sides alike. Give each round its own prompts: a repeated prompt would hit dgserve's prefix
    cache (and skip its prefill) where the other side recomputes it."""
    order: list[tuple[int, str]] = []
    for r in range(reps):
        order += [(r, side) for side in (sides if r % 2 == 0 else list(reversed(sides)))]
    return order


__all__ = ["DEFAULT_KV_BYTES", "LoadResult", "Outcome", "RequestSpec", "abba", "drive_engine", "make_engine",
           "random_prompt", "staggered_mix", "uniform_mix"]
