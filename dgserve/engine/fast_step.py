"""One fast-path engine step as a pure tensor program: unpack the step's input rows, run the model over
``[S, C]`` rows, sample every denoised canvas, update the device-resident canvas state, pack the output rows.

Everything here has static shapes for a bucket ``(S, full-context blocks)``, reads no tensor value on the host,
and writes only to persistent tensors (canvas state, KV pages) through index copies, so the whole step can be
compiled and captured in one CUDA graph per bucket (``dgserve.engine.runner``). The host sends one int32
``[S, F]`` array per step (:class:`StepLayout` says where each field lies) and gets one int32 ``[S, 2 + C]``
array back: ``finished``, ``accepted`` positions, and the argmax canvas (the committed tokens of a finished
canvas, the draft of one still running). A step whose rows ask for sampling filters or logprobs runs a variant of
the program (:class:`StepVariant`, chosen on the host from the rows' settings, one graph per variant): filters
read fixed-size per-row fields of the input (``dgserve.engine.sampling_filters``); logprobs add each position's
reported log-probability and top alternatives to the output row.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from dgserve.engine import counter_rng
from dgserve.engine.denoising import DenoisingAlgorithm, inverse_cdf_sample, schedule_temperature
from dgserve.engine.sampling_filters import (
    ACCEPTANCE_ENTROPY,
    TOP_LOGPROBS,
    AcceptedLogprobs,
    RowFilters,
    filtered_logits,
    top_logprobs,
)
from dgserve.model.canvas_batch import CanvasBatch, RowDescriptors, attn_layout, sliding_blocks, write_blocks
from dgserve.model.diffusion_gemma import DiffusionGemma
from dgserve.model.generation_config import MAX_LOGIT_BIAS

# row kinds
PAD, DENOISE, COMMIT, PREFILL = 0, 1, 2, 3
# header fields of an input row (int32; the four floats are stored as their float32 bits)
(F_SLOT, F_KIND, F_LENGTH, F_PREFIX, F_FRESH, F_CUR_STEP, F_MAX_STEPS, F_CANVAS_INDEX, F_SEED_LO, F_SEED_HI,
 F_SLIDING_BASE, F_THRESHOLD, F_GREEDY, F_T_MIN, F_T_DELTA, F_BOUND, F_CONFIDENCE,
 F_TOP_K, F_TOP_P, F_MIN_P, F_SUPPRESS_BEFORE) = range(21)
HEADER = 21
SUPPRESS_SLOTS = 8  # ids min_tokens keeps out of a canvas' first positions (EOS ids and pad), -1 padded
OUT_FINISHED, OUT_ACCEPTED, OUT_TOKENS = 0, 1, 2


@dataclass(frozen=True)
class StepVariant:
    """Which optional parts a step's program runs (the host picks it from the rows' settings)."""

    filters: bool = False  # some row has sampling filters or min_tokens' suppression
    logprobs: bool = False  # some row reports log-probabilities


PLAIN = StepVariant()


def output_width(canvas: int, variant: StepVariant) -> int:
    """Columns of an output row: finished, accepted, the argmax canvas; with logprobs each position's reported
    log-probability (float32 bits), then its top ids, then their log-probabilities (bits), ``TOP_LOGPROBS`` each."""
    return 2 + canvas + (canvas * (1 + 2 * TOP_LOGPROBS) if variant.logprobs else 0)


@dataclass(frozen=True)
class StepLayout:
    """Where the fields of one input row lie: the header, the prefill tokens, then four block-id tables."""

    canvas: int
    block_size: int
    full_blocks: int  # NBf: full-space blocks gathered per row (the context bucket)
    sliding_blocks: int  # NBs (0 without sliding layers)
    write_blocks: int  # WB

    @classmethod
    def build(cls, model: DiffusionGemma, block_size: int, full_blocks: int,
              sliding: int | None = None) -> StepLayout:
        """``sliding``: sliding-window blocks gathered per row (default: a whole window's, any row's need)."""
        t = model.config.text
        has_sliding = any(t.is_sliding(i) for i in range(t.num_hidden_layers))
        canvas = model.config.canvas_length
        window = sliding_blocks(t.sliding_window, block_size)
        nbs = (window if sliding is None else min(sliding, window)) if has_sliding else 0
        return cls(canvas, block_size, full_blocks, nbs, write_blocks(canvas, block_size))

    @property
    def tokens(self) -> slice:
        return slice(HEADER, HEADER + self.canvas)

    @property
    def full_table(self) -> slice:
        start = HEADER + self.canvas
        return slice(start, start + self.full_blocks)

    @property
    def sliding_table(self) -> slice:
        start = self.full_table.stop
        return slice(start, start + self.sliding_blocks)

    @property
    def full_write(self) -> slice:
        start = self.sliding_table.stop
        return slice(start, start + self.write_blocks)

    @property
    def sliding_write(self) -> slice:
        start = self.full_write.stop
        return slice(start, start + self.write_blocks)

    @property
    def bias_ids(self) -> slice:
        start = self.sliding_write.stop
        return slice(start, start + MAX_LOGIT_BIAS)

    @property
    def bias_values(self) -> slice:  # float32 bits
        start = self.bias_ids.stop
        return slice(start, start + MAX_LOGIT_BIAS)

    @property
    def suppress_ids(self) -> slice:
        start = self.bias_values.stop
        return slice(start, start + SUPPRESS_SLOTS)

    @property
    def width(self) -> int:
        return self.suppress_ids.stop


@dataclass
class CanvasState:
    """Device-resident per-slot sampler state (row ``slots`` is the padding rows' scratch slot)."""

    canvas: torch.Tensor  # [N + 1, C] the canvas being denoised
    argmax: torch.Tensor  # [N + 1, C] its last argmax (what a commit encodes)
    soft: torch.Tensor  # [N + 1, C, H] self-conditioning input for its next step
    run: torch.Tensor  # [N + 1] consecutive steps with an unchanged argmax canvas
    accepted_lp: AcceptedLogprobs  # [N + 1, C, ...] what logprobs report (kept by the logprobs variant only)

    @classmethod
    def allocate(cls, slots: int, canvas: int, hidden: int, dtype: torch.dtype, device: torch.device) -> CanvasState:
        n = slots + 1
        return cls(canvas=torch.zeros(n, canvas, dtype=torch.long, device=device),
                   argmax=torch.zeros(n, canvas, dtype=torch.long, device=device),
                   soft=torch.zeros(n, canvas, hidden, dtype=dtype, device=device),
                   run=torch.zeros(n, dtype=torch.long, device=device),
                   accepted_lp=AcceptedLogprobs.empty((n, canvas), device))

    @property
    def pad_slot(self) -> int:
        return self.canvas.shape[0] - 1


def _float_field(inp: torch.Tensor, field: int) -> torch.Tensor:
    return inp[:, field].contiguous().view(torch.float32)


def canvas_vocab_pass(model: DiffusionGemma, hidden: torch.Tensor, temp: torch.Tensor, u: torch.Tensor,
                      greedy: torch.Tensor, filters: RowFilters | None = None, logprobs: bool = False
                      ) -> tuple[torch.Tensor, ...]:
    """LM head, sampling, entropy and soft embeddings for the rows ``hidden [R, H]`` of one canvas (or of several:
    ``temp`` then per row, ``[R, 1]``, and ``greedy`` ``[R]``): two GEMMs against the
    tied embedding (logits and soft embeddings), everything else one pass over ``[C, V]``. Returns (sample,
    argmax, entropy, soft ``[C, H]``), with ``logprobs`` also the sample's and the argmax's log-probabilities
    and the top ids and log-probabilities. ``filters``: sample and argmax from the filtered distribution (the
    soft embeddings keep the unfiltered one, as the exact path does)."""
    if filters is None and not logprobs:
        sample, argmax, entropy, probs = _plain_sample(model, hidden, temp, u, greedy)
        return sample, argmax, entropy, model.soft_embeddings(probs)
    logits = model.logits(hidden)
    scaled = logits / temp  # [R, V] fp32
    logp = torch.log_softmax(scaled, dim=-1)
    probs = logp.exp()
    entropy = -torch.einsum("rv,rv->r", probs, logp)  # a row-wise dot: no [R, V] product buffer
    sampled_logp, sampled_probs = logp, probs
    if filters is not None:
        filtered = filtered_logits(logits, temp, filters)
        sampled_logp = torch.log_softmax(filtered, dim=-1)
        sampled_probs = sampled_logp.exp()
        if ACCEPTANCE_ENTROPY == "filtered":
            entropy = -(sampled_probs * sampled_logp.clamp(min=torch.finfo(torch.float32).min)).sum(-1)
        argmax = filtered.argmax(-1)
    else:
        argmax = scaled.argmax(-1)
    sample = torch.where(greedy, argmax, inverse_cdf_sample(sampled_probs, u, argmax=argmax))
    if model.dtype != torch.float32:
        # the reference feeds the logits, cast to the embedding dtype, to the next step's softmax
        probs = torch.softmax(scaled.to(model.dtype), dim=-1, dtype=torch.float32)
    out: tuple[torch.Tensor, ...] = (sample, argmax, entropy, model.soft_embeddings(probs))
    if logprobs:
        ids, values = top_logprobs(sampled_logp)
        out += (sampled_logp.gather(1, sample[:, None]).squeeze(1), sampled_logp.gather(1, argmax[:, None]).squeeze(1),
                ids, values)
    return out


def _plain_sample(model: DiffusionGemma, hidden: torch.Tensor, temp: torch.Tensor, u: torch.Tensor,
                  greedy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`canvas_vocab_pass` without filters or logprobs, in as few passes over ``[R, V]`` as eager torch
    allows (on a CPU each pass, and each new ``[R, V]`` buffer, costs about as much as the arithmetic): the
    logits softcapped and scaled in place, one ``max`` for the argmax and the softmax shift, one ``exp``, the
    entropy as ``log Z - sum(p * x)`` over the shifted logits ``x``. Returns (sample, argmax, entropy, the
    probabilities the soft embeddings take)."""
    scaled = torch.nn.functional.linear(hidden, model.embed_tokens.weight).float()  # [R, V]
    cap = model.config.text.final_logit_softcapping
    if cap is not None:
        scaled.div_(cap).tanh_().mul_(cap)
    scaled.div_(temp)
    # the reference feeds the logits, cast to the embedding dtype, to the next step's softmax
    soft_logits = scaled.to(model.dtype) if model.dtype != torch.float32 else None
    top, argmax = scaled.max(-1, keepdim=True)
    shifted = scaled.sub_(top)
    probs = shifted.exp()
    z = probs.sum(-1, keepdim=True)
    probs.div_(z)
    entropy = z.log().squeeze(-1) - torch.einsum("rv,rv->r", probs, shifted)
    argmax = argmax.squeeze(-1)
    sample = torch.where(greedy, argmax, inverse_cdf_sample(probs, u, argmax=argmax))
    if soft_logits is not None:
        probs = torch.softmax(soft_logits, dim=-1, dtype=torch.float32)
    return sample, argmax, entropy, probs


VOCAB_CHUNK_ELEMENTS = 1 << 24  # [rows, V] fp32 working set of one sampler pass: 64 MiB


def vocab_chunk(canvas: int, vocab: int, budget: int = VOCAB_CHUNK_ELEMENTS) -> int:
    """Canvases per torch sampler pass: as many as keep one ``[rows, V]`` fp32 intermediate within ``budget``
    elements (at least one). Small vocabularies (the CPU models) batch several canvases into each GEMM against
    the embedding, which runs ~25 % faster per canvas at 512 rows than at 64 on a CPU; the published model's
    ``[256, 262,144]`` canvas is already over budget, so it keeps one canvas per pass."""
    return max(1, budget // (canvas * vocab))


def kernel_vocab_pass(model: DiffusionGemma, hidden: torch.Tensor, temp: torch.Tensor, u: torch.Tensor,
                      greedy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`canvas_vocab_pass` through the fused Triton sampler (``dgserve.kernels.sampler``): the LM-head GEMM,
    then kernels that read its ``[C, V]`` output and write no vocabulary-sized tensor of their own."""
    from dgserve.kernels import sampler

    sample, argmax, entropy, soft = sampler.vocab_pass(hidden, model.embed_tokens.weight, model.embed_scale_value(),
                                                       model.config.text.final_logit_softcapping, temp, u)
    return torch.where(greedy, argmax, sample), argmax, entropy, soft


@dataclass
class StepInputs:
    """The unpacked input rows of a step (device tensors) and the model batch built from them."""

    batch: CanvasBatch
    slot: torch.Tensor
    denoise: torch.Tensor
    fresh: torch.Tensor
    canvas: torch.Tensor  # [S, C] the canvases being denoised (fresh ones drawn)
    previous: torch.Tensor  # [S, C] the slots' last argmax canvases
    seed_lo: torch.Tensor
    seed_hi: torch.Tensor
    canvas_index: torch.Tensor
    cur_step: torch.Tensor
    max_steps: torch.Tensor


def step_inputs(model: DiffusionGemma, layout: StepLayout, inp: torch.Tensor, state: CanvasState,
                scratch: dict[str, int]) -> StepInputs:
    """Unpack ``inp [S, layout.width]`` (int32) against the canvas state into the model batch.
    ``scratch``: the first scratch slot of each page space (``"full"``, ``"sliding"``)."""
    cfg = model.config.text
    c, vocab = layout.canvas, cfg.vocab_size
    slot = inp[:, F_SLOT].long()
    kind = inp[:, F_KIND]
    denoise = kind == DENOISE
    commit = kind == COMMIT
    encode = commit | (kind == PREFILL)
    fresh = (inp[:, F_FRESH] != 0) & denoise
    seed_lo, seed_hi = inp[:, F_SEED_LO], inp[:, F_SEED_HI]
    canvas_index = inp[:, F_CANVAS_INDEX]
    cur_step, max_steps = inp[:, F_CUR_STEP], inp[:, F_MAX_STEPS]
    prefix = inp[:, F_PREFIX].long()

    # inputs: a fresh canvas is drawn here; committed canvases are the argmax kept on the device
    initial = counter_rng.randint(counter_rng.stream_keys(seed_lo, seed_hi, canvas_index, torch.zeros_like(cur_step),
                                                          counter_rng.INITIAL_CANVAS), c, vocab)
    canvas = torch.where(fresh[:, None], initial, state.canvas.index_select(0, slot))
    previous = state.argmax.index_select(0, slot)
    tokens = torch.where(denoise[:, None], canvas,
                         torch.where(commit[:, None], previous, inp[:, layout.tokens].long()))
    keep_soft = (denoise & ~fresh)[:, None, None]
    soft = torch.where(keep_soft, state.soft.index_select(0, slot),
                       torch.zeros((), dtype=state.soft.dtype, device=state.soft.device))
    rows = RowDescriptors(
        prefix_len=prefix, length=inp[:, F_LENGTH].long(), encode=encode,
        full_table=inp[:, layout.full_table].long(), sliding_table=inp[:, layout.sliding_table].long(),
        sliding_base=inp[:, F_SLIDING_BASE].long(), full_write=inp[:, layout.full_write].long(),
        sliding_write=inp[:, layout.sliding_write].long())
    layouts = {}
    kv_heads = {cfg.layer_types[i]: cfg.layer_kv_heads(i) for i in range(cfg.num_hidden_layers)}
    for layer_type, kvh in kv_heads.items():
        group = cfg.num_attention_heads // kvh
        if layer_type == "full_attention":
            layouts[layer_type] = attn_layout(
                rows, table=rows.full_table, base_block=torch.zeros_like(prefix), writes=rows.full_write,
                canvas=c, block_size=layout.block_size, window=None, scratch_slot=scratch["full"], group=group,
                dtype=model.dtype)
        else:
            layouts[layer_type] = attn_layout(
                rows, table=rows.sliding_table, base_block=rows.sliding_base, writes=rows.sliding_write,
                canvas=c, block_size=layout.block_size, window=cfg.sliding_window, scratch_slot=scratch["sliding"],
                group=group, dtype=model.dtype)
    positions = prefix[:, None] + torch.arange(c, device=inp.device)[None, :]
    batch = CanvasBatch(tokens=tokens, positions=positions, denoise=denoise, soft=soft, layouts=layouts)
    return StepInputs(batch, slot, denoise, fresh, canvas, previous, seed_lo, seed_hi, canvas_index, cur_step,
                      max_steps)


VocabPass = Callable[[DiffusionGemma, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
                     tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]


def step_filters(inp: torch.Tensor, layout: StepLayout, r: int) -> RowFilters:
    """Row ``r``'s sampling filters from its input fields, one row per canvas position."""
    c = layout.canvas
    row = inp[r]
    suppress_ids = row[layout.suppress_ids].long()
    # an empty slot (-1) suppresses nothing: point it at the first real id (suppressing it twice changes nothing)
    suppress_ids = torch.where(suppress_ids >= 0, suppress_ids, suppress_ids[0].clamp(min=0))
    before = torch.where(suppress_ids[0] >= 0, row[F_SUPPRESS_BEFORE], torch.zeros_like(row[F_SUPPRESS_BEFORE]))
    return RowFilters(
        top_k=row[F_TOP_K].long().expand(c), top_p=row[F_TOP_P:F_TOP_P + 1].view(torch.float32).expand(c),
        min_p=row[F_MIN_P:F_MIN_P + 1].view(torch.float32).expand(c),
        bias_ids=row[layout.bias_ids].long().expand(c, -1),
        bias_values=row[layout.bias_values].contiguous().view(torch.float32).expand(c, -1),
        suppress=torch.arange(c, device=inp.device) < before, suppress_ids=suppress_ids)


def fast_step(model: DiffusionGemma, algorithm: DenoisingAlgorithm, layout: StepLayout, inp: torch.Tensor,
              state: CanvasState, k_pages: list[torch.Tensor], v_pages: list[torch.Tensor],
              scratch: dict[str, int], variant: StepVariant = PLAIN,
              vocab_pass: VocabPass = canvas_vocab_pass, vocab_rows: int | None = None,
              vocab_chunk: int = 1) -> torch.Tensor:
    """One step over the rows of ``inp [S, layout.width]`` (int32); returns ``[S, output_width(C, variant)]``
    int32. ``vocab_pass``: :func:`canvas_vocab_pass` (torch) or :func:`kernel_vocab_pass` (the fused Triton
    sampler); a step with filters or logprobs runs :func:`canvas_vocab_pass`, which has them. ``vocab_rows``:
    only the first rows run the sampler (the runner puts the denoised rows first; the others' sampler outputs
    would be discarded anyway), all ``S`` when ``None``. It is a static count: a CUDA graph is captured per
    value. ``vocab_chunk``: canvases per sampler pass of a plain step (see :func:`vocab_chunk`; ``vocab_pass``
    must then take rows of several canvases, as :func:`canvas_vocab_pass` does); filtered and logprob passes
    take one canvas at a time."""
    c, vocab = layout.canvas, model.config.text.vocab_size
    x = step_inputs(model, layout, inp, state, scratch)
    seed_lo, seed_hi, canvas_index, cur_step, max_steps = x.seed_lo, x.seed_hi, x.canvas_index, x.cur_step, x.max_steps
    slot, denoise, fresh, previous = x.slot, x.denoise, x.fresh, x.previous
    step_index = max_steps - cur_step  # steps this canvas has taken before this one
    hidden = model.forward_canvases(x.batch, k_pages, v_pages)  # [S, C, H]

    # the sampler, one canvas at a time (a [C, V] fp32 working set each)
    temp = schedule_temperature(cur_step, max_steps, _float_field(inp, F_T_MIN), _float_field(inp, F_T_DELTA))
    u = counter_rng.uniforms(counter_rng.stream_keys(seed_lo, seed_hi, canvas_index, step_index,
                                                     counter_rng.SAMPLE), c)
    greedy = inp[:, F_GREEDY] != 0
    rows = hidden.shape[0]
    sampled = rows if vocab_rows is None else vocab_rows
    assert 0 <= sampled <= rows, (sampled, rows)
    passes: list[tuple[torch.Tensor, ...]] = []
    if variant == PLAIN and vocab_chunk > 1:
        # several canvases per pass: larger GEMMs against the embedding, fewer passes
        for start in range(0, sampled, vocab_chunk):
            k = min(vocab_chunk, sampled - start)
            part = slice(start, start + k)
            out = vocab_pass(model, hidden[part].reshape(k * c, -1), temp[part, None].expand(k, c).reshape(k * c, 1),
                             u[part].reshape(k * c), greedy[part, None].expand(k, c).reshape(k * c))
            passes.extend(zip(*(t.reshape(k, c, *t.shape[1:]).unbind(0) for t in out), strict=True))
    else:
        for r in range(sampled):
            if variant == PLAIN:
                passes.append(vocab_pass(model, hidden[r], temp[r], u[r], greedy[r]))
            else:
                filters = step_filters(inp, layout, r) if variant.filters else None
                passes.append(canvas_vocab_pass(model, hidden[r], temp[r], u[r], greedy[r], filters,
                                                variant.logprobs))
    stacked = _pad_passes(passes, rows, c, hidden)
    assert not variant.logprobs or len(stacked) == 8, "a logprobs step samples at least the row that asked"
    sample, argmax, entropy = stacked[0], stacked[1], stacked[2]  # [S, C]
    new_soft = stacked[3]  # [S, C, H]

    accepted = algorithm.accept(entropy, _float_field(inp, F_BOUND))
    renoise = counter_rng.randint(counter_rng.stream_keys(seed_lo, seed_hi, canvas_index, step_index,
                                                          counter_rng.RENOISE), c, vocab)
    new_canvas = torch.where(accepted, sample, renoise)
    run = algorithm.stable_run(argmax, previous, state.run.index_select(0, slot), ~fresh)
    stop = algorithm.stop(run, entropy, inp[:, F_THRESHOLD].long(), _float_field(inp, F_CONFIDENCE))
    finished = denoise & (stop | (cur_step <= 1))

    # state of the denoised rows; every other row writes the scratch slot: a sequence's commit and its next
    # canvas' first denoising step share a step, and so a slot, and only the denoised row's state may land
    kept = torch.where(denoise, slot, torch.full_like(slot, state.pad_slot))
    state.canvas.index_copy_(0, kept, new_canvas)
    state.argmax.index_copy_(0, kept, argmax)
    state.soft.index_copy_(0, kept, new_soft.to(state.soft.dtype))
    state.run.index_copy_(0, kept, run)
    out = [finished[:, None].int(), accepted.sum(-1, keepdim=True).int(), argmax.int()]
    if variant.logprobs:
        out += _logprob_columns(state, slot, kept, fresh, accepted, sample, argmax, stacked)
    return torch.cat(out, dim=1)


def _pad_passes(passes: list[tuple[torch.Tensor, ...]], rows: int, canvas: int, hidden: torch.Tensor
                ) -> list[torch.Tensor]:
    """Stack the per-canvas sampler outputs into ``[rows, ...]`` tensors; rows that ran no sampler get zeros
    (a placeholder the state update never keeps: they are not denoised). Sample and argmax ``[rows, C]`` long,
    entropy ``[rows, C]`` fp32, soft embeddings ``[rows, C, H]``, then the logprob outputs if any."""
    if not passes:
        zeros_ids = torch.zeros(rows, canvas, dtype=torch.long, device=hidden.device)
        return [zeros_ids, zeros_ids, torch.zeros(rows, canvas, dtype=torch.float32, device=hidden.device),
                torch.zeros_like(hidden)]
    stacked = [torch.stack([p[i] for p in passes]) for i in range(len(passes[0]))]
    missing = rows - len(passes)
    if missing:
        stacked = [torch.cat([t, t.new_zeros((missing, *t.shape[1:]))]) for t in stacked]
    return stacked


def _logprob_columns(state: CanvasState, slot: torch.Tensor, kept_slot: torch.Tensor, fresh: torch.Tensor,
                     accepted: torch.Tensor, sample: torch.Tensor, argmax: torch.Tensor,
                     stacked: list[torch.Tensor]) -> list[torch.Tensor]:
    """Keep each position's log-probabilities from the step that accepted it; the output columns report them for
    the argmax canvas (what a finished canvas commits). ``stacked``: the step's sampler outputs, ``[S, ...]``."""
    lp_sample, lp_argmax, top_ids, top_lps = stacked[4:8]
    kept = state.accepted_lp
    stored = AcceptedLogprobs(*(t.index_select(0, slot) for t in (kept.token, kept.logprob, kept.top_ids,
                                                                   kept.top_logprobs)))
    # a fresh canvas forgets the previous canvas' positions
    f2, f3 = fresh[:, None], fresh[:, None, None]
    stored = AcceptedLogprobs(torch.where(f2, torch.full_like(stored.token, -1), stored.token), stored.logprob,
                              torch.where(f3, torch.zeros_like(stored.top_ids), stored.top_ids), stored.top_logprobs)
    new = stored.accept(accepted, sample, lp_sample, top_ids, top_lps)
    # denoised rows only (``kept_slot``: the scratch slot for the others)
    kept.token.index_copy_(0, kept_slot, new.token)
    kept.logprob.index_copy_(0, kept_slot, new.logprob)
    kept.top_ids.index_copy_(0, kept_slot, new.top_ids)
    kept.top_logprobs.index_copy_(0, kept_slot, new.top_logprobs)
    lp, ids, values = new.report(argmax, lp_argmax, top_ids, top_lps)
    s = lp.shape[0]
    return [lp.contiguous().view(torch.int32), ids.int().reshape(s, -1),
            values.contiguous().view(torch.int32).reshape(s, -1)]
