"""The step-level continuous-batching engine (no Ray).

Every ``step()`` runs ONE packed forward holding canvases of many requests, each at its own denoising
step, plus prefill chunks and commits of finished canvases; requests are admitted and retired at
every step. KV lives in a paged pool with a prefix cache; sampling uses each request's own generator,
so a seeded request's tokens do not depend on its batch-mates. ``dgserve.engine.loop.AsyncEngine`` drives
``step()`` from a worker thread and streams events to asyncio consumers.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from dgserve.engine import fast_step
from dgserve.engine.constrained import ConstrainedCanvas, constrained_step
from dgserve.engine.finish import canvas_outcome, text_ids
from dgserve.engine.grammar import Grammars, GrammarUnavailable, Matcher
from dgserve.engine.kv_budget import default_kv_budget
from dgserve.engine.kv_pages import BlockTable, KVPagePool, PagedKV
from dgserve.engine.prefix_cache import PrefixCache
from dgserve.engine.prompt_images import check_images, chunk_end, cut_points, key_ids, spans_in
from dgserve.engine.request import (
    CanvasEvent,
    DraftEvent,
    EngineOverloaded,
    Event,
    FinalEvent,
    FinishReason,
    GenerationRequest,
    InvalidRequest,
    MaxTokensTooLarge,
    PromptImage,
    PromptTooLong,
    RequestStats,
)
from dgserve.engine.runner import FastRunner, Row
from dgserve.engine.sampler import (
    StabilityTracker,
    VocabPass,
    default_chunk_rows,
    denoise_step,
    random_canvas,
    temperature,
    vocab_pass,
)
from dgserve.engine.sampling_filters import AcceptedLogprobs, RowFilters
from dgserve.engine.sampling_noise import NoisePrefetcher
from dgserve.engine.scheduler import SchedulerLimits, SeqView, StepPlan, Work, schedule
from dgserve.engine.single import make_generator
from dgserve.model.checkpoint import GenerationDefaults
from dgserve.model.diffusion_gemma import DiffusionGemma
from dgserve.model.kv import Segment
from dgserve.model.vision_checkpoint import LoadedVision

log = logging.getLogger(__name__)


class EngineConfig(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)

    # bytes; None: enough for max_running sequences at full context, at most kv_cache_fraction of the free
    # device memory (dgserve.engine.kv_budget)
    kv_cache_memory: int | None = Field(None, gt=0)
    kv_cache_fraction: float = Field(0.5, gt=0.0, le=0.95)
    block_size: int = Field(16, ge=1)
    max_step_tokens: int = Field(8192, ge=1)
    max_running: int = Field(64, ge=1)
    prefill_chunk: int = Field(512, ge=1)
    # requests queued for admission at most, beyond which they are refused (EngineOverloaded: a 429); None: no
    # bound here (a Serve replica then bounds its queue from measured throughput: dgserve.replicas.admission)
    max_waiting: int | None = Field(None, ge=0)
    enable_prefix_cache: bool = True
    # CPU only: draw requests' next-step sampling noise (canvas x vocab fp32 each) on a worker thread while
    # the forward runs, up to this many bytes in flight (0: off); same random stream, same tokens
    # (dgserve.engine.sampling_noise). A fixed bound: peak memory still does not grow with batch x vocab.
    sampling_noise_prefetch_bytes: int = Field(64 << 20, ge=0)
    # "exact": bit-identical to the reference on CPU fp32 and batch-invariant (the oracle); "fast": static-shape
    # rows, one attention call per layer, no host syncs, counter-based sampling (see README); "auto": fast on
    # CUDA, exact elsewhere
    execution: Literal["auto", "exact", "fast"] = "auto"
    # fast mode: torch.compile each layer type's forward (None: on CUDA only) with this backend
    compile: bool | None = None
    compile_backend: str = "inductor"
    # fast mode on CUDA: capture each step bucket in a CUDA graph (None: on)
    cuda_graphs: bool | None = None
    # fast mode: the Triton kernels of dgserve.kernels (fused denoising sampler; fused MoE) or the torch path;
    # "auto": what the GPU suite measured faster on this card (dgserve.kernels.MEASURED_DEFAULTS), torch elsewhere
    sampler_kernel: Literal["auto", "torch", "triton"] = "auto"
    moe_kernel: Literal["auto", "torch", "triton"] = "auto"


@dataclass
class _Seq:
    req: GenerationRequest
    arrival: int
    slot: int
    tokens: list[int]  # prompt + committed canvases (as encoded)
    gen: torch.Generator
    stats: RequestStats
    started: float
    phase: str = "waiting"
    table: BlockTable | None = None
    cached_len: int = 0
    out_ids: list[int] = field(default_factory=list)
    text: str = ""
    canvas: torch.Tensor | None = None
    argmax: torch.Tensor | None = None
    soft: torch.Tensor | None = None
    tracker: StabilityTracker | None = None
    cur_step: int = 0
    steps: int = 0
    last_served: int = -1
    canvas_index: int = 0
    decoder: object | None = None
    prompt_len: int = 0
    noise: concurrent.futures.Future | None = None  # the next step's sampling noise, being drawn from gen
    seed: int = 0  # fast mode: the counter-based randomness' seed
    canvas_started: bool = False  # fast mode: the current canvas has taken at least one step
    prompt_keys: list[int] = field(default_factory=list)  # the prompt as the prefix cache hashes it (images in)
    accepted_lp: AcceptedLogprobs | None = None  # exact mode, with logprobs: per position of the current canvas
    final_lp: VocabPass | None = None  # exact mode, with logprobs: the last step's log-probabilities
    matcher: Matcher | None = None  # constrained requests: the grammar state after the tokens decided so far
    constrained: ConstrainedCanvas | None = None  # constrained requests: the current canvas

    def next_boundary(self, chunk: int, canvas: int) -> int:
        """End of the next prefill chunk. Boundaries are fixed: the prompt in ``chunk``-sized pieces from
        position 0 (a piece that would cut an image ends after it), then one piece per committed canvas; so
        recomputing a request's KV after preemption or failover repeats the original arithmetic exactly,
        whatever else is running."""
        pos = self.cached_len
        if pos < self.prompt_len:
            return chunk_end(pos, self.prompt_len, chunk, self.req.images)
        return min(len(self.tokens), self.prompt_len + ((pos - self.prompt_len) // canvas + 1) * canvas)

    def cache_keys(self, end: int) -> list[int]:
        """The prefix cache's ids of positions ``[0, end)``."""
        return self.prompt_keys[:end] + self.tokens[self.prompt_len:end]

    def next_images(self, chunk: int, canvas: int) -> list[PromptImage]:
        """The images of the next prefill chunk."""
        if not self.req.images or self.cached_len >= self.prompt_len:
            return []
        return spans_in(self.req.images, self.cached_len, self.next_boundary(chunk, canvas))


class Engine:
    def __init__(self, model: DiffusionGemma, generation: GenerationDefaults, tokenizer=None,
                 config: EngineConfig | None = None, vision: LoadedVision | None = None) -> None:
        self.model = model
        self.generation = generation
        self.tokenizer = tokenizer
        self.config = config or EngineConfig()
        self.vision = vision
        cfg = model.config
        self.canvas = cfg.canvas_length
        self.vocab = cfg.text.vocab_size
        self.execution = resolve_execution(self.config.execution, model.device)
        fast = self.execution == "fast"
        # fast mode runs every piece of work as a row of at most one canvas: prompts prefill canvas by canvas
        self.prefill_chunk = min(self.config.prefill_chunk, self.canvas) if fast else self.config.prefill_chunk
        # a prefill chunk ends after an image it would cut, so it may be one image longer than prefill_chunk
        longest_chunk = self.prefill_chunk + (vision.spec.processor.max_soft_tokens if vision else 0)
        budget = self.config.kv_cache_memory or default_kv_budget(
            cfg, max_running=self.config.max_running, block_size=self.config.block_size,
            prefill_chunk=longest_chunk, fraction=self.config.kv_cache_fraction, dtype=model.dtype,
            device=model.device)
        self.pool = KVPagePool.from_budget(cfg, budget, block_size=self.config.block_size, dtype=model.dtype,
                                           device=model.device, max_seqs=self.config.max_running,
                                           max_chunk=longest_chunk, scratch_tokens=self.canvas if fast else 0)
        self.prefix_cache = PrefixCache(self.pool) if self.config.enable_prefix_cache else None
        self.limits = SchedulerLimits(max_step_tokens=max(self.config.max_step_tokens, self.canvas, longest_chunk),
                                      max_running=self.config.max_running, canvas=self.canvas,
                                      prefill_chunk=self.prefill_chunk)
        # the vision encoder's work per image in the step budget's unit (text tokens), by parameter count: each
        # image runs over the processor's max_patches (padded as the reference does)
        self._vision_cost = 0.0 if vision is None else (
            vision.spec.processor.max_patches * sum(p.numel() for p in vision.tower.parameters())
            / cfg.parameter_counts()["active"])
        self.vision_images = 0
        self.vision_runs = 0
        self.vision_seconds = 0.0
        self.waiting: deque[_Seq] = deque()
        self.running: dict[str, _Seq] = {}
        self._arrivals = 0
        self._free_slots: list[int] = list(range(self.config.max_running * 2 - 1, -1, -1))
        self.step_index = 0
        # rolling stats
        self.encoder_tokens = 0
        self.forwards = 0
        self.canvases_in_forward: deque[int] = deque(maxlen=256)
        self.tokens_in_forward: deque[int] = deque(maxlen=256)
        self.completed = 0
        self.preemptions = 0
        prefetch = self.config.sampling_noise_prefetch_bytes
        self._noise = NoisePrefetcher(prefetch) if prefetch and model.device.type == "cpu" and not fast else None
        self._grammars: Grammars | None = None
        self.runner: FastRunner | None = None
        if fast:
            on_cuda = model.device.type == "cuda"
            compile_layers = self.config.compile if self.config.compile is not None else on_cuda
            graphs = self.config.cuda_graphs if self.config.cuda_graphs is not None else on_cuda
            self.runner = FastRunner(model, self.pool, len(self._free_slots), compile=compile_layers,
                                     compile_backend=self.config.compile_backend, cuda_graphs=graphs,
                                     sampler_kernel=self.config.sampler_kernel, moe_kernel=self.config.moe_kernel)

    # -- requests ---------------------------------------------------------------------------------
    def check_request(self, req: GenerationRequest) -> None:
        """Raise InvalidRequest / PromptTooLong / MaxTokensTooLarge (bad request) or EngineOverloaded (queue full);
        reads state only."""
        if not req.prompt_ids:
            raise InvalidRequest("the prompt must contain at least one token")
        if req.max_tokens < 1:
            raise InvalidRequest("max_tokens must be at least 1")
        if any(not 0 <= t < self.vocab for t in req.prompt_ids):
            raise InvalidRequest(f"prompt token ids must be in [0, {self.vocab})")
        if req.images and self.vision is None:
            raise InvalidRequest("the prompt has images but this engine runs the text model only (the vision tower "
                                 "is not loaded: vision: off, or a checkpoint without one)")
        try:
            check_images(req.prompt_ids, req.images, self.model.config.image_token_id)
        except ValueError as exc:
            raise InvalidRequest(str(exc)) from exc
        self._check_constraint(req)
        fits = self.max_tokens_that_fit(req)
        if fits == 0:
            raise PromptTooLong(self._too_large(req, fits))
        if fits < req.max_tokens and not req.fit_max_tokens:
            raise MaxTokensTooLarge(self._too_large(req, fits))
        if self.config.max_waiting is not None and len(self.waiting) >= self.config.max_waiting:
            raise EngineOverloaded(len(self.waiting))

    def _check_constraint(self, req: GenerationRequest) -> None:
        if req.logprobs is not None and not 0 <= req.logprobs <= 20:
            raise InvalidRequest("logprobs asks for 0 to 20 alternatives")
        bias = req.sampling.logit_bias or {}
        if any(not 0 <= t < self.vocab for t in bias):
            raise InvalidRequest(f"logit_bias names token ids outside the vocabulary [0, {self.vocab})")
        if req.constraint is None:
            return
        if req.ignore_eos:
            raise InvalidRequest("ignore_eos cannot be combined with JSON output (the output ends where the JSON does)")
        try:
            self.grammars().compile(req.constraint)
        except GrammarUnavailable as exc:
            raise InvalidRequest(str(exc)) from exc
        except (RuntimeError, ValueError) as exc:
            raise InvalidRequest(f"the JSON schema cannot be compiled into a grammar: {exc}") from exc

    def grammars(self) -> Grammars:
        """The JSON grammar compiler for this model's tokenizer (made on first use)."""
        if self._grammars is None:
            if self.tokenizer is None:
                raise GrammarUnavailable("JSON output needs the checkpoint's tokenizer")
            self._grammars = Grammars(self.tokenizer, self.vocab, tuple(self.generation.eos_token_ids))
        return self._grammars

    def max_tokens_that_fit(self, req: GenerationRequest) -> int:
        """The largest max_tokens this request can have for its KV to fit the cache when it runs alone.

        Its KV grows canvas by canvas up to prompt + committed + every canvas of max_tokens (a request preempted
        just before its last canvas is re-admitted with that canvas reserved), so a request whose total fits
        always progresses: as the oldest it can preempt all others; one that does not fit would preempt itself
        forever. Whole canvases: 0 when not even the prompt and one canvas fit."""
        held = len(req.prompt_ids) + len(req.committed_ids)
        return max(0, (self.pool.token_capacity() - held) // self.canvas * self.canvas)

    def _too_large(self, req: GenerationRequest, fits: int) -> str:
        held = len(req.prompt_ids) + len(req.committed_ids)
        need = held + -(-req.max_tokens // self.canvas) * self.canvas
        advice = f"lower max_tokens to at most {fits}" if fits >= 1 else "shorten the prompt"
        return (f"prompt ({held} tokens) + max_tokens ({req.max_tokens}, rounded up to whole canvases of "
                f"{self.canvas}) need {need} tokens of KV cache, but the server's cache holds "
                f"{self.pool.token_capacity()}; {advice}")

    def add_request(self, req: GenerationRequest) -> None:
        self.check_request(req)
        if req.fit_max_tokens and req.max_tokens > (fits := self.max_tokens_that_fit(req)):
            req = dataclasses.replace(req, max_tokens=fits)
        if req.request_id in self.running or any(s.req.request_id == req.request_id for s in self.waiting):
            raise InvalidRequest(f"duplicate request id {req.request_id!r}")
        gen = make_generator(req.seed, self.model.device)
        seed = continued_fast_seed(req)
        if req.rng_state is not None and seed is None:
            gen.set_state(torch.frombuffer(bytearray(req.rng_state), dtype=torch.uint8))
        if seed is None:
            seed = req.seed
        seq = _Seq(req=req, arrival=self._arrivals, slot=-1, tokens=[*req.prompt_ids, *req.committed_ids],
                   gen=gen, stats=RequestStats(prompt_tokens=len(req.prompt_ids), images=len(req.images)),
                   started=time.perf_counter(), prompt_len=len(req.prompt_ids),
                   seed=seed if seed is not None else int(torch.randint(0, 1 << 62, (1,), generator=gen)),
                   prompt_keys=key_ids(req.prompt_ids, req.images))
        if req.constraint is not None:
            seq.matcher = self.grammars().matcher(req.constraint)
            for t in text_ids(req.committed_ids, self.generation.pad_token_id):  # failover: the output so far
                seq.matcher.accept(t)
        if self.tokenizer is not None:
            seq.decoder = self.tokenizer.incremental_decoder(req.skip_special_tokens)
            # failover: the text of these tokens was already streamed; prime the decoder canvas by canvas so
            # a character split across the canvas boundary comes out exactly as it would have without it
            for i in range(0, len(req.committed_ids), self.canvas):
                seq.decoder.push(text_ids(req.committed_ids[i:i + self.canvas], self.generation.pad_token_id))
        self._arrivals += 1
        self.waiting.append(seq)

    def cancel(self, request_id: str) -> list[Event]:
        """Free the request's pages now; returns its final event (if it was known)."""
        for s in list(self.waiting):
            if s.req.request_id == request_id:
                self.waiting.remove(s)
                return [self._finish(s, "cancelled")]
        s = self.running.get(request_id)
        return [self._finish(s, "cancelled")] if s is not None else []

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def fail_all(self, error: str) -> list[FinalEvent]:
        """End every waiting and running request with an error event and free its pages (after a failed step)."""
        seqs = [*self.running.values(), *self.waiting]
        self.waiting.clear()
        return [self._finish(s, "error", error) for s in seqs]

    # -- one step ---------------------------------------------------------------------------------
    def plan(self) -> StepPlan:
        running = [self._view(s) for s in self.running.values()]
        waiting = [self._view(s) for s in self.waiting]
        return schedule(running, waiting, self.pool.num_available_blocks("full"), self.limits)

    def step(self) -> list[Event]:
        events: list[Event] = []
        plan = self.plan()
        for rid in plan.preempt:
            self._preempt(self.running[rid])
        for rid in plan.admit:
            seq = next(s for s in self.waiting if s.req.request_id == rid)
            if not self._admit(seq):
                break
        work = [w for w in plan.work if w.request_id in self.running]
        # memory for writes (commits may need a new canvas' worth of blocks)
        ready = []
        for w in work:
            s = self.running[w.request_id]
            if w.kind == "commit" and not self.pool.ensure_capacity(s.table, s.cached_len + self.canvas):
                self._preempt(s)
                continue
            ready.append(w)
        if not ready:
            self.step_index += 1
            return events
        seqs = [(w, self.running[w.request_id]) for w in ready]
        with torch.inference_mode():
            if self.runner is not None:
                # prefill chunks holding images take the exact packed forward (whole images, their features and
                # mask), and so do the canvases of constrained requests (their grammar runs on the host between
                # positions); everything else the fast runner's rows
                imaged = [(w, s) for w, s in seqs
                          if (w.kind == "prefill" and s.next_images(self.prefill_chunk, self.canvas))
                          or (w.kind != "prefill" and s.matcher is not None)]
                if imaged:
                    events.extend(self._forward_exact(imaged))
                # an expert-parallel rank runs one forward per step, as its peers do (each forward is a sequence of
                # collectives): with an image chunk this step, the other rows wait for the next one
                rest = [] if imaged and self.model.dispatcher.collective else \
                    [(w, s) for w, s in seqs if all(s is not t for _, t in imaged)]
                if rest:
                    events.extend(self._forward_fast(rest))
            else:
                events.extend(self._forward_exact(seqs))
        self.step_index += 1
        return events

    def _encode_images(self, prefilling: list[_Seq]) -> dict[int, torch.Tensor]:
        """Run the vision tower once over every image of this step's prefill chunks (one batch across requests);
        returns each image's features by ``id(PromptImage)``."""
        owners = [(s, image) for s in prefilling for image in s.next_images(self.prefill_chunk, self.canvas)]
        if not owners:
            return {}
        assert self.vision is not None
        started = time.perf_counter()
        features = self.vision.encode([image.image for _, image in owners])
        seconds = time.perf_counter() - started
        self.vision_images += len(owners)
        self.vision_runs += 1
        self.vision_seconds += seconds
        for s, _ in owners:
            s.stats.vision_seconds += seconds / len(owners)
        return {id(image): f for (_, image), f in zip(owners, features, strict=True)}

    def _forward_exact(self, seqs: list[tuple[Work, _Seq]]) -> list[Event]:
        """One packed forward over variable-length segments, then each canvas sampled on its own generator."""
        events: list[Event] = []
        tokens, segments, softs = [], [], []
        any_soft = False
        features = self._encode_images([s for w, s in seqs if w.kind == "prefill"])
        image_embeds = []
        for w, s in seqs:
            if w.kind == "prefill":
                # up to the fixed boundary (a prefix-cache hit at admission may have moved cached_len)
                ids = s.tokens[s.cached_len:s.next_boundary(self.prefill_chunk, self.canvas)]
                images = s.next_images(self.prefill_chunk, self.canvas)
                image_embeds.extend(features.pop(id(image)) for image in images)
                segments.append(Segment("encode", s.slot, len(ids), s.cached_len,
                                        tuple((image.start, image.end) for image in images)))
                tokens.append(torch.tensor(ids, dtype=torch.long))
            elif w.kind == "commit":
                segments.append(Segment("encode", s.slot, self.canvas, s.cached_len))
                tokens.append(torch.tensor(s.tokens[s.cached_len:s.cached_len + self.canvas], dtype=torch.long))
            else:
                if s.canvas is None:
                    self._start_canvas(s)
                segments.append(Segment("denoise", s.slot, self.canvas, s.cached_len))
                tokens.append(s.canvas.to("cpu"))
                softs.append(s.soft)
                any_soft |= s.soft is not None
        device = self.model.device
        soft = None
        if any_soft:
            h = self.model.config.text.hidden_size
            soft = torch.cat([x if x is not None else torch.zeros(self.canvas, h, dtype=self.model.dtype, device=device)
                              for x in softs])
        kv = PagedKV(self.pool, {s.slot: s.table for _, s in seqs})
        hidden = self.model(torch.cat(tokens).to(device), segments, kv, soft,
                            torch.cat(image_embeds) if image_embeds else None)
        del image_embeds  # the vision encoder's outputs are not kept after the prefill that used them
        self._count_forward(seqs)
        offset = 0
        for (w, s), seg in zip(seqs, segments, strict=True):
            if w.kind == "denoise":
                events.extend(self._after_denoise(s, hidden[offset:offset + self.canvas]))
                offset += self.canvas
            else:
                self._after_encode(s, seg.length)
        return events

    def _forward_fast(self, seqs: list[tuple[Work, _Seq]]) -> list[Event]:
        """One fast-path step (``dgserve.engine.runner``): every row and the sampler on the device, one copy
        each way. A commit, or the prefill chunk that completes a prompt, takes the first denoising step of the
        sequence's next canvas along in the same forward (each layer writes the encoded K/V before any row
        gathers its prefix), instead of leaving it to a forward of its own."""
        assert self.runner is not None
        rows = []
        along: list[tuple[_Seq, Row]] = []  # first denoising steps riding with their sequence's encode row
        budget = self.limits.max_step_tokens - sum(w.length for w, _ in seqs)
        for w, s in seqs:
            if w.kind == "denoise":
                rows.append(self._denoise_row(s, s.cached_len))
                continue
            if w.kind == "prefill":
                ids = s.tokens[s.cached_len:s.next_boundary(self.prefill_chunk, self.canvas)]
                rows.append(Row(fast_step.PREFILL, s.slot, s.cached_len, s.table, len(ids), ids))
                completes = s.cached_len + len(ids) >= len(s.tokens)
            else:
                rows.append(Row(fast_step.COMMIT, s.slot, s.cached_len, s.table, self.canvas))
                completes = True
            if completes and s.matcher is None and budget >= self.canvas:
                budget -= self.canvas
                along.append((s, self._denoise_row(s, s.cached_len + rows[-1].length)))
        out = self.runner.run(rows + [row for _, row in along])
        self._count_forward(seqs, extra_canvases=len(along))
        events: list[Event] = []
        for (w, s), row, result in zip(seqs, rows, out, strict=False):
            if w.kind != "denoise":
                s.table.mark_written(s.cached_len + row.length)
                self._after_encode(s, row.length)
            else:
                events.extend(self._after_fast_denoise(s, result))
        for (s, _), result in zip(along, out[len(rows):], strict=True):
            assert s.phase == "denoise", s.phase
            events.extend(self._after_fast_denoise(s, result))
        return events

    def _denoise_row(self, s: _Seq, prefix_len: int) -> Row:
        """The fast step's row for one denoising step of ``s``'s canvas after ``prefix_len`` cached tokens."""
        p = s.req.sampling
        if not s.canvas_started:
            s.steps = 0
        return Row(fast_step.DENOISE, s.slot, prefix_len, s.table, self.canvas, fresh=not s.canvas_started,
                   cur_step=p.max_denoising_steps - s.steps, sampling=p, greedy=p.greedy, seed=s.seed,
                   canvas_index=len(s.req.committed_ids) // self.canvas + s.canvas_index,
                   suppress_before=self.suppress_before(s), suppress_ids=self.suppressed_ids(),
                   logprobs=s.req.logprobs is not None)

    def _after_fast_denoise(self, s: _Seq, result: np.ndarray) -> list[Event]:
        """Book a fast denoising step's output row: a draft, or the finished canvas."""
        events: list[Event] = []
        s.canvas_started = True
        s.steps += 1
        s.last_served = self.step_index
        finished = bool(result[fast_step.OUT_FINISHED])
        tokens = result[fast_step.OUT_TOKENS:fast_step.OUT_TOKENS + self.canvas]
        if s.req.draft_every and s.steps % s.req.draft_every == 0 and not finished:
            ids = tokens.tolist()
            text = self.tokenizer.decode(ids) if self.tokenizer is not None else ""
            events.append(DraftEvent(s.req.request_id, ids, text, s.steps))
        if finished:
            s.canvas_started = False
            reported = None
            if s.req.logprobs is not None:
                reported = _fast_logprobs(result[fast_step.OUT_TOKENS + self.canvas:], self.canvas)
            events.extend(self._finish_canvas(s, tokens.tolist(), reported))
        return events

    def _count_forward(self, seqs: list[tuple[Work, _Seq]], extra_canvases: int = 0) -> None:
        """``extra_canvases``: first denoising steps a fast step ran beside their sequences' encode rows."""
        self.forwards += 1
        self.canvases_in_forward.append(sum(1 for w, _ in seqs if w.kind == "denoise") + extra_canvases)
        self.tokens_in_forward.append(sum(w.length for w, _ in seqs) + extra_canvases * self.canvas)

    def _after_encode(self, s: _Seq, length: int) -> None:
        # a prefix-cache hit at admission can leave fewer tokens than the planned chunk
        self.encoder_tokens += length
        s.cached_len += length
        if self.prefix_cache is not None:
            self.prefix_cache.insert(s.cache_keys(s.cached_len), s.table)
        self.pool.release_out_of_window(s.table, s.cached_len)
        if s.cached_len >= len(s.tokens):
            s.phase = "denoise"

    # -- internals --------------------------------------------------------------------------------
    def _view(self, s: _Seq) -> SeqView:
        chunk = s.next_boundary(self.prefill_chunk, self.canvas) - s.cached_len
        if s.req.images:
            # the vision encoder runs in the step of the chunk holding the images: its work counts in that step's
            # budget (capped at the whole budget, so such a chunk can always run, alone if it must)
            chunk += math.ceil(len(s.next_images(self.prefill_chunk, self.canvas)) * self._vision_cost)
            chunk = min(chunk, self.limits.max_step_tokens)
        if s.phase == "waiting":
            need = self.pool.blocks_needed(len(s.tokens) + self.canvas).full
            return SeqView(s.req.request_id, s.arrival, "waiting", tokens_to_prefill=len(s.tokens), need_blocks=need,
                           next_chunk=chunk)
        held = len(s.table.full) if s.table is not None else 0
        if s.phase == "commit":
            need = self.pool.blocks_needed(s.cached_len + self.canvas, s.table).full
            return SeqView(s.req.request_id, s.arrival, "commit", need_blocks=need, held_blocks=held)
        if s.phase == "prefill":
            return SeqView(s.req.request_id, s.arrival, "prefill", tokens_to_prefill=len(s.tokens) - s.cached_len,
                           held_blocks=held, next_chunk=chunk)
        return SeqView(s.req.request_id, s.arrival, "denoise", held_blocks=held, last_served=s.last_served)

    def _admit(self, s: _Seq) -> bool:
        table = self.pool.new_table()
        cached = 0
        if self.prefix_cache is not None:
            # leave a whole block to compute: a cache hit then gives a cold run's bits (see PrefixCache.match)
            match = self.prefix_cache.match(s.cache_keys(len(s.tokens)), min_tail=self.pool.block_size,
                                            avoid=cut_points(s.req.images))
            self.prefix_cache.attach(table, match)
            cached = match.num_tokens
        if not self.pool.ensure_capacity(table, len(s.tokens) + self.canvas):
            self.pool.free(table)
            return False
        self.waiting.remove(s)
        s.table, s.cached_len, s.phase = table, cached, "prefill"
        if s.stats.cached_prompt_tokens == 0:
            s.stats.cached_prompt_tokens = min(cached, len(s.req.prompt_ids))
        s.slot = self._free_slots.pop()
        self.running[s.req.request_id] = s
        return True

    def _preempt(self, s: _Seq) -> None:
        log.info("preempting %s (%d cached tokens)", s.req.request_id, s.cached_len)
        self.preemptions += 1
        self.pool.free(s.table)
        self._free_slots.append(s.slot)
        del self.running[s.req.request_id]
        s.table, s.cached_len, s.slot = None, 0, -1
        s.phase = "waiting"
        # fast mode: the canvas state lived in the slot; the canvas restarts (the same counter-based draws, so
        # the same tokens as without the preemption, up to batching's rounding)
        s.canvas_started = False
        # back to the queue in arrival order (it is older than anything that arrived after it)
        idx = next((i for i, w in enumerate(self.waiting) if w.arrival > s.arrival), len(self.waiting))
        self.waiting.insert(idx, s)

    def _start_canvas(self, s: _Seq) -> None:
        s.canvas = random_canvas(self.canvas, self.vocab, s.gen, self.model.device)
        s.argmax = s.canvas
        s.soft = None
        s.tracker = StabilityTracker(s.req.sampling)
        s.cur_step = s.req.sampling.max_denoising_steps
        s.steps = 0
        if s.req.logprobs is not None:
            s.accepted_lp = AcceptedLogprobs.empty((self.canvas,), self.model.device)
        if s.matcher is not None:
            s.constrained = ConstrainedCanvas(s.canvas.clone())
            s.canvas = s.constrained.tokens
        self._prefetch_noise(s)

    def _prefetch_noise(self, s: _Seq) -> None:
        """Start drawing the next step's sampling noise (the generator's next use) on the noise thread."""
        # greedy draws no noise; constrained canvases sample position by position
        if self._noise is not None and s.noise is None and not s.req.sampling.greedy and s.matcher is None:
            s.noise = self._noise.submit((self.canvas, self.vocab), s.gen)

    def _drop_noise(self, s: _Seq) -> None:
        if s.noise is not None and self._noise is not None:
            self._noise.release(s.noise)
        s.noise = None

    def denoised(self, request_id: str, step: int, hidden: torch.Tensor) -> None:
        """Exact mode: called with each denoising step's final hidden states ``[C, H]``, before sampling. A no-op;
        a subclass that records them (logits of every step, for parity checks) overrides it."""

    def _after_constrained(self, s: _Seq, hidden: torch.Tensor) -> list[Event]:
        """A constrained canvas' step (``dgserve.engine.constrained``): decide a left-to-right run of positions."""
        assert s.constrained is not None and s.matcher is not None
        params = s.req.sampling
        temp = temperature(max(s.cur_step, 1), params)  # past the schedule's steps: its last temperature
        # the next step's self-conditioning comes from the unfiltered distribution, as in an unconstrained step
        soft = vocab_pass(self.model, hidden, temp, s.gen, default_chunk_rows(self.vocab), greedy=True).soft
        filters = self._filters(s) or RowFilters.for_canvas(params, self.canvas, 0, (), self.model.device)
        constrained_step(self.model, hidden, s.constrained, temp, params, s.gen, s.matcher, filters,
                         self.generation.eos_token_ids[0], logprobs=s.req.logprobs is not None)
        s.steps += 1
        s.last_served = self.step_index
        s.soft = soft
        s.cur_step -= 1
        events: list[Event] = []
        c = s.constrained
        if not c.done:
            if s.req.draft_every and s.steps % s.req.draft_every == 0:
                ids = c.tokens[:c.fixed].tolist()
                events.append(DraftEvent(s.req.request_id, ids, self.tokenizer.decode(ids) if self.tokenizer else "",
                                         s.steps))
            return events
        reported = None
        if s.req.logprobs is not None:
            n = max((len(ids) for ids, _ in c.top), default=1)
            ids = torch.tensor([i + [0] * (n - len(i)) for i, _ in c.top])
            values = torch.tensor([v + [0.0] * (n - len(v)) for _, v in c.top])
            reported = (torch.tensor(c.logprobs), ids, values)
        committed = c.tokens.tolist()
        s.argmax = c.tokens
        s.constrained = None
        return self._finish_canvas(s, committed, reported)

    def _after_denoise(self, s: _Seq, hidden: torch.Tensor) -> list[Event]:
        self.denoised(s.req.request_id, s.steps, hidden)
        if s.constrained is not None:
            return self._after_constrained(s, hidden)
        noise = None
        if s.noise is not None and self._noise is not None:
            noise = self._noise.take(s.noise)
            s.noise = None
        logprobs = s.req.logprobs is not None
        out = denoise_step(self.model, hidden, s.canvas, s.cur_step, s.req.sampling, s.gen, noise=noise,
                           filters=self._filters(s), logprobs=logprobs)
        del noise
        if out.logprobs is not None:
            assert s.accepted_lp is not None and out.sample is not None
            lp = out.logprobs
            s.accepted_lp = s.accepted_lp.accept(out.accepted, out.sample, lp.logprob, lp.top_ids, lp.top_logprobs)
            s.final_lp = lp
        s.steps += 1
        s.last_served = self.step_index
        s.canvas, s.argmax, s.soft = out.canvas, out.argmax, out.soft
        stop = s.tracker.update(out.argmax, out.entropy)
        s.cur_step -= 1
        if not (stop or s.cur_step == 0):
            self._prefetch_noise(s)
        events: list[Event] = []
        if s.req.draft_every and s.steps % s.req.draft_every == 0 and not (stop or s.cur_step == 0):
            ids = out.argmax.tolist()
            text = self.tokenizer.decode(ids) if self.tokenizer is not None else ""
            events.append(DraftEvent(s.req.request_id, ids, text, s.steps))
        if stop or s.cur_step == 0:
            reported = None
            if s.accepted_lp is not None and s.final_lp is not None:
                f = s.final_lp
                reported = s.accepted_lp.report(s.argmax, f.argmax_logprob, f.top_ids, f.top_logprobs)
            events.extend(self._finish_canvas(s, s.argmax.tolist(), reported))
        return events

    def suppressed_ids(self) -> tuple[int, ...]:
        """What min_tokens keeps out of the first positions: EOS and padding (neither is text)."""
        pad = self.generation.pad_token_id
        return tuple(self.generation.eos_token_ids) + (() if pad is None else (pad,))

    def suppress_before(self, s: _Seq) -> int:
        """Positions of the next canvas where EOS and padding are not sampled (min_tokens not reached yet)."""
        return max(0, s.req.min_tokens - s.stats.completion_tokens)

    def _filters(self, s: _Seq) -> RowFilters | None:
        """The request's sampling filters for its current canvas (None: none, the reference's arithmetic)."""
        before = self.suppress_before(s)
        if not s.req.sampling.filtered and before == 0:
            return None
        return RowFilters.for_canvas(s.req.sampling, self.canvas, before, self.suppressed_ids(), self.model.device)

    def _finish_canvas(self, s: _Seq, committed: list[int],
                       logprobs: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> list[Event]:
        """Commit a canvas; ``logprobs``: its positions' reported log-probabilities ([C], [C, N] ids, [C, N])."""
        s.stats.denoise_steps += s.steps
        s.stats.steps_per_canvas.append(s.steps)
        s.stats.canvases += 1
        if s.stats.time_to_first_canvas is None:
            s.stats.time_to_first_canvas = time.perf_counter() - s.started
        pad = self.generation.pad_token_id
        outcome = canvas_outcome(committed, s.req.max_tokens - len(s.out_ids), self.generation.eos_token_ids, pad,
                                 s.req.ignore_eos)
        new = outcome.token_ids
        completion = outcome.completion_tokens
        finish: FinishReason | None = outcome.finish
        text = s.decoder.push(text_ids(new, pad)) if s.decoder is not None else ""
        if finish is not None and s.decoder is not None:
            text += s.decoder.flush()  # the final canvas: emit any held-back partial character too
        if s.req.stop and s.decoder is not None:
            cut = self._stop_cut(s, s.text + text, new)
            if cut is not None:
                end, kept = cut
                text = (s.text + text)[len(s.text):end] if end >= len(s.text) else ""
                new = new[:kept]
                completion = sum(1 for t in new if t != pad)
                finish = "stop"
        s.text += text
        s.out_ids.extend(new)
        s.stats.completion_tokens += completion
        s.canvas_index += 1
        s.canvas = s.soft = s.tracker = None
        s.accepted_lp = s.final_lp = s.constrained = None
        if finish is None:
            s.tokens.extend(committed)
            s.phase = "commit"
        rng = None
        if finish is None:
            rng = fast_rng_state(s.seed) if self.runner is not None else bytes(s.gen.get_state().numpy().tobytes())
        event = CanvasEvent(s.req.request_id, new, text, s.canvas_index - 1, rng, completion)
        if logprobs is not None and s.req.logprobs is not None:
            lp, ids, values = (t[:len(new)].tolist() for t in logprobs)
            n = s.req.logprobs
            text_at = [j for j, t in enumerate(new) if t != pad]
            event.logprob_token_ids = [new[j] for j in text_at]
            event.logprobs = [lp[j] for j in text_at]
            event.top_logprobs = [list(zip(ids[j][:n], values[j][:n], strict=True)) for j in text_at]
        events: list[Event] = [event]
        if finish is not None:
            events.append(self._finish(s, finish))
        return events

    def _stop_cut(self, s: _Seq, full: str, new: list[int]) -> tuple[int, int] | None:
        """Where the first stop string cuts the text ``full`` (committed text plus this canvas'), and how many of this
        canvas' ids ``new`` the kept text needs; None when no stop string counts yet. The text is cut before the stop
        string (after it with include_stop_str); a match within the first min_tokens tokens does not count."""
        assert self.tokenizer is not None
        pad = self.generation.pad_token_id
        matches = sorted((i, i + len(x), i + len(x) if s.req.include_stop_str else i) for x in s.req.stop
                         for i in _find_all(full, x))
        for _, match_end, end in matches:
            if match_end <= len(s.text):
                continue  # inside the text of earlier canvases: checked when they committed
            # the fewest of this canvas' ids whose text reaches ``end`` (the text of ids is the decode of all ids)
            before = text_ids(s.out_ids, pad)
            kept = next((j for j in range(len(new) + 1)
                         if len(self.tokenizer.decode(before + text_ids(new[:j], pad), s.req.skip_special_tokens))
                         >= end), len(new))
            if s.stats.completion_tokens + sum(1 for t in new[:kept] if t != pad) < s.req.min_tokens:
                continue
            return end, kept
        return None

    def _finish(self, s: _Seq, reason: FinishReason, error: str | None = None) -> FinalEvent:
        self._drop_noise(s)
        if s.req.request_id in self.running:
            if self.prefix_cache is not None and s.table is not None:
                self.prefix_cache.insert(s.cache_keys(s.cached_len), s.table)
            self.pool.free(s.table)
            self._free_slots.append(s.slot)
            del self.running[s.req.request_id]
        s.stats.new_tokens = len(s.out_ids)
        s.stats.seconds = time.perf_counter() - s.started
        self.completed += 1
        return FinalEvent(s.req.request_id, reason, s.stats, error)

    # -- stats ------------------------------------------------------------------------------------
    def stats(self) -> dict[str, float | int]:
        n = len(self.canvases_in_forward) or 1
        out: dict[str, float | int] = {
            "running": len(self.running), "waiting": len(self.waiting),
            "active_canvases": sum(1 for s in self.running.values() if s.phase == "denoise"),
            "forwards": self.forwards, "completed": self.completed, "encoder_tokens": self.encoder_tokens,
            "canvases_per_forward": sum(self.canvases_in_forward) / n,
            "tokens_per_forward": sum(self.tokens_in_forward) / n,
            "kv_blocks_used": self.pool.num_used_blocks("full"),
            "kv_blocks_free": self.pool.num_free_blocks("full"),
            "kv_bytes_used": self.pool.bytes_used(), "kv_bytes_capacity": self.pool.capacity_bytes(),
            "vision_images": self.vision_images, "vision_encoder_seconds": self.vision_seconds,
        }
        if self.prefix_cache is not None:
            out["prefix_cache_hit_rate"] = self.prefix_cache.stats.hit_rate
        return out

    def run_until_done(self, max_steps: int = 10_000_000) -> list[Event]:
        events: list[Event] = []
        for _ in range(max_steps):
            if not self.has_work():
                break
            events.extend(self.step())
        return events


FAST_RNG_TAG = b"dgserve-fast-rng:"


def _fast_logprobs(columns, canvas: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The logprob columns of a fast step's output row (``fast_step.output_width``) as ([C], [C, N], [C, N])."""
    flat = torch.from_numpy(np.ascontiguousarray(columns))
    n = (flat.shape[0] - canvas) // (2 * canvas)
    lp = flat[:canvas].view(torch.float32)
    ids = flat[canvas:canvas + canvas * n].long().view(canvas, n)
    values = flat[canvas + canvas * n:canvas + 2 * canvas * n].contiguous().view(torch.float32).view(canvas, n)
    return lp, ids, values


def _find_all(text: str, sub: str) -> list[int]:
    """Start of every occurrence of ``sub`` in ``text``."""
    out, i = [], text.find(sub)
    while i >= 0:
        out.append(i)
        i = text.find(sub, i + 1)
    return out


def resolve_execution(execution: str, device: torch.device) -> str:
    """``auto`` is fast on CUDA and exact elsewhere."""
    if execution == "auto":
        return "fast" if device.type == "cuda" else "exact"
    return execution


def fast_rng_state(seed: int) -> bytes:
    """A fast-mode request's randomness at a canvas boundary: its seed (the canvas index is implied by the
    committed tokens a continuation carries)."""
    return FAST_RNG_TAG + seed.to_bytes(8, "little")


def continued_fast_seed(req: GenerationRequest) -> int | None:
    """The seed a fast-mode continuation (failover) must use, from the RNG state it carries."""
    if req.rng_state is not None and req.rng_state.startswith(FAST_RNG_TAG):
        return int.from_bytes(req.rng_state[len(FAST_RNG_TAG):], "little")
    return None

