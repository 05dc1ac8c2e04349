"""One fast-path engine step as a pure tensor program: unpack the step's input rows, run the model over
``[S, C]`` rows, sample every denoised canvas, update the device-resident canvas state, pack the output rows.

Everything here has static shapes for a bucket ``(S, full-context blocks)``, reads no tensor value on the host,
and writes only to persistent tensors (canvas state, KV pages) through index copies, so the whole step can be
compiled and captured in one CUDA graph per bucket (``dgserve.engine.runner``). The host sends one int32
``[S, F]`` array per step (:class:`StepLayout` says where each field lies) and gets one int32 ``[S, 2 + C]``
array back: ``finished``, ``accepted`` positions, and the argmax canvas (the committed tokens of a finished
canvas, the draft of one still running).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from dgserve.engine import counter_rng
from dgserve.engine.denoising import DenoisingAlgorithm, inverse_cdf_sample, schedule_temperature
from dgserve.model.canvas_batch import CanvasBatch, RowDescriptors, attn_layout, sliding_blocks, write_blocks
from dgserve.model.diffusion_gemma import DiffusionGemma

# row kinds
PAD, DENOISE, COMMIT, PREFILL = 0, 1, 2, 3
# header fields of an input row (int32; the four floats are stored as their float32 bits)
(F_SLOT, F_KIND, F_LENGTH, F_PREFIX, F_FRESH, F_CUR_STEP, F_MAX_STEPS, F_CANVAS_INDEX, F_SEED_LO, F_SEED_HI,
 F_SLIDING_BASE, F_THRESHOLD, F_GREEDY, F_T_MIN, F_T_DELTA, F_BOUND, F_CONFIDENCE) = range(17)
HEADER = 17
OUT_FINISHED, OUT_ACCEPTED, OUT_TOKENS = 0, 1, 2


@dataclass(frozen=True)
class StepLayout:
    """Where the fields of one input row lie: the header, the prefill tokens, then four block-id tables."""

    canvas: int
    block_size: int
    full_blocks: int  # NBf: full-space blocks gathered per row (the context bucket)
    sliding_blocks: int  # NBs (0 without sliding layers)
    write_blocks: int  # WB

    @classmethod
    def build(cls, model: DiffusionGemma, block_size: int, full_blocks: int) -> StepLayout:
        t = model.config.text
        has_sliding = any(t.is_sliding(i) for i in range(t.num_hidden_layers))
        canvas = model.config.canvas_length
        return cls(canvas, block_size, full_blocks, sliding_blocks(t.sliding_window, block_size) if has_sliding else 0,
                   write_blocks(canvas, block_size))

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
    def width(self) -> int:
        return self.sliding_write.stop


@dataclass
class CanvasState:
    """Device-resident per-slot sampler state (row ``slots`` is the padding rows' scratch slot)."""

    canvas: torch.Tensor  # [N + 1, C] the canvas being denoised
    argmax: torch.Tensor  # [N + 1, C] its last argmax (what a commit encodes)
    soft: torch.Tensor  # [N + 1, C, H] self-conditioning input for its next step
    run: torch.Tensor  # [N + 1] consecutive steps with an unchanged argmax canvas

    @classmethod
    def allocate(cls, slots: int, canvas: int, hidden: int, dtype: torch.dtype, device: torch.device) -> CanvasState:
        n = slots + 1
        return cls(canvas=torch.zeros(n, canvas, dtype=torch.long, device=device),
                   argmax=torch.zeros(n, canvas, dtype=torch.long, device=device),
                   soft=torch.zeros(n, canvas, hidden, dtype=dtype, device=device),
                   run=torch.zeros(n, dtype=torch.long, device=device))

    @property
    def pad_slot(self) -> int:
        return self.canvas.shape[0] - 1


def _float_field(inp: torch.Tensor, field: int) -> torch.Tensor:
    return inp[:, field].contiguous().view(torch.float32)


def canvas_vocab_pass(model: DiffusionGemma, hidden: torch.Tensor, temp: torch.Tensor, u: torch.Tensor,
                      greedy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """LM head, sampling, entropy and soft embeddings for one canvas ``hidden [C, H]``: two GEMMs against the
    tied embedding (logits and soft embeddings), everything else one pass over ``[C, V]``. Returns (sample,
    argmax, entropy, soft ``[C, H]``)."""
    scaled = model.logits(hidden) / temp  # [C, V] fp32
    logp = torch.log_softmax(scaled, dim=-1)
    probs = logp.exp()
    entropy = -(probs * logp).sum(-1)
    argmax = scaled.argmax(-1)
    sample = torch.where(greedy, argmax, inverse_cdf_sample(probs, u))
    if model.dtype != torch.float32:
        # the reference feeds the logits, cast to the embedding dtype, to the next step's softmax
        probs = torch.softmax(scaled.to(model.dtype), dim=-1, dtype=torch.float32)
    return sample, argmax, entropy, model.soft_embeddings(probs)


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


def fast_step(model: DiffusionGemma, algorithm: DenoisingAlgorithm, layout: StepLayout, inp: torch.Tensor,
              state: CanvasState, k_pages: list[torch.Tensor], v_pages: list[torch.Tensor],
              scratch: dict[str, int], vocab_pass: VocabPass = canvas_vocab_pass) -> torch.Tensor:
    """One step over the rows of ``inp [S, layout.width]`` (int32); returns ``[S, 2 + C]`` int32. ``vocab_pass``:
    :func:`canvas_vocab_pass` (torch) or :func:`kernel_vocab_pass` (the fused Triton sampler)."""
    c, vocab = layout.canvas, model.config.text.vocab_size
    x = step_inputs(model, layout, inp, state, scratch)
    seed_lo, seed_hi, canvas_index, cur_step, max_steps = x.seed_lo, x.seed_hi, x.canvas_index, x.cur_step, x.max_steps
    slot, denoise, fresh, canvas, previous, soft = x.slot, x.denoise, x.fresh, x.canvas, x.previous, x.batch.soft
    step_index = max_steps - cur_step  # steps this canvas has taken before this one
    hidden = model.forward_canvases(x.batch, k_pages, v_pages)  # [S, C, H]

    # the sampler, one canvas at a time (a [C, V] fp32 working set each)
    temp = schedule_temperature(cur_step, max_steps, _float_field(inp, F_T_MIN), _float_field(inp, F_T_DELTA))
    u = counter_rng.uniforms(counter_rng.stream_keys(seed_lo, seed_hi, canvas_index, step_index,
                                                     counter_rng.SAMPLE), c)
    greedy = inp[:, F_GREEDY] != 0
    samples, argmaxes, entropies, softs = [], [], [], []
    for r in range(hidden.shape[0]):
        sample, argmax, entropy, soft_r = vocab_pass(model, hidden[r], temp[r], u[r], greedy[r])
        samples.append(sample)
        argmaxes.append(argmax)
        entropies.append(entropy)
        softs.append(soft_r)
    sample, argmax, entropy = torch.stack(samples), torch.stack(argmaxes), torch.stack(entropies)  # [S, C]
    new_soft = torch.stack(softs)  # [S, C, H]

    accepted = algorithm.accept(entropy, _float_field(inp, F_BOUND))
    renoise = counter_rng.randint(counter_rng.stream_keys(seed_lo, seed_hi, canvas_index, step_index,
                                                          counter_rng.RENOISE), c, vocab)
    new_canvas = torch.where(accepted, sample, renoise)
    run = algorithm.stable_run(argmax, previous, state.run.index_select(0, slot), ~fresh)
    stop = algorithm.stop(run, entropy, inp[:, F_THRESHOLD].long(), _float_field(inp, F_CONFIDENCE))
    finished = denoise & (stop | (cur_step <= 1))

    # state of the denoised rows (other rows keep theirs; padding rows write the scratch slot)
    d2, d3 = denoise[:, None], denoise[:, None, None]
    state.canvas.index_copy_(0, slot, torch.where(d2, new_canvas, canvas))
    state.argmax.index_copy_(0, slot, torch.where(d2, argmax, previous))
    state.soft.index_copy_(0, slot, torch.where(d3, new_soft.to(state.soft.dtype), soft))
    state.run.index_copy_(0, slot, torch.where(denoise, run, state.run.index_select(0, slot)))
    return torch.cat([finished[:, None].int(), accepted.sum(-1, keepdim=True).int(), argmax.int()], dim=1)
