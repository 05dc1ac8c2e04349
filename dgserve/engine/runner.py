"""The fast path's model runner: turns a step's rows into one device-resident input array (one host-to-device
copy), runs :func:`dgserve.engine.fast_step.fast_step` (eagerly, with compiled layers, or by replaying a CUDA
graph captured for the step's bucket) and returns its output rows with one device-to-host copy.

Buckets: with compiled layers or CUDA graphs the row count is padded up to one of ``row_buckets`` (1, 2, 4, ...,
64 by default), so a steady stream of steps reuses a handful of shapes: one compiled graph per layer type and
shape, one CUDA graph per bucket (captured on first use, the padding rows of the capture writing only scratch
slots and the scratch state slot). An eager step runs at its own row count. The full-attention context is
gathered for a power of two of blocks either way. Only the denoised rows (put first) run the sampler.
"""

from __future__ import annotations

import functools
import logging
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from dgserve import kernels
from dgserve.engine import fast_step as fs
from dgserve.engine.denoising import EntropyBound
from dgserve.engine.kv_pages import BlockTable, KVPagePool
from dgserve.engine.sampling_filters import bias_table
from dgserve.model.diffusion_gemma import DiffusionGemma
from dgserve.model.generation_config import SamplingParams
from dgserve.model.layers import TransformerLayer

log = logging.getLogger(__name__)

DEFAULT_ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
MIN_CONTEXT_BLOCKS = 16
MAX_CONTEXT_BUCKETS = 16  # powers of two from MIN_CONTEXT_BLOCKS: up to 2**19 positions at 16-token blocks


@dataclass
class Row:
    """One row of a fast step, as the engine describes it."""

    kind: int  # fast_step.DENOISE / COMMIT / PREFILL
    slot: int
    prefix_len: int  # cached positions before the row's tokens
    table: BlockTable
    length: int = 0  # valid tokens (PREFILL: the chunk's length; canvases: the canvas length)
    tokens: Sequence[int] = ()  # PREFILL only
    fresh: bool = False  # DENOISE: the canvas' first step (draw it, zero its self-conditioning)
    cur_step: int = 1  # DENOISE: steps remaining, N..1
    sampling: SamplingParams = field(default_factory=SamplingParams)
    greedy: bool = False
    seed: int = 0
    canvas_index: int = 0  # which canvas of the request (a stream of the counter-based randomness)
    suppress_before: int = 0  # DENOISE: positions where EOS and pad are not sampled (min_tokens)
    suppress_ids: tuple[int, ...] = ()  # the ids min_tokens suppresses
    logprobs: bool = False  # DENOISE: report log-probabilities

    @property
    def variant(self) -> fs.StepVariant:
        """What this row needs of the step's program."""
        if self.kind != fs.DENOISE:
            return fs.PLAIN
        return fs.StepVariant(filters=self.sampling.filtered or self.suppress_before > 0, logprobs=self.logprobs)


def _float_bits(*values: float) -> list[int]:
    return list(struct.unpack(f"<{len(values)}i", struct.pack(f"<{len(values)}f", *values)))


def _int32(value: int) -> int:
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value >= 1 << 31 else value


class FastRunner:
    """Runs fast-path steps for an engine (see the module docstring).

    ``num_slots``: the engine's request slots (the canvas state holds one row per slot, plus a scratch row).
    ``compile``: compile each layer type's forward and the plain sampler pass with ``torch.compile``
    (``fullgraph=True, dynamic=False``); ``compile_backend`` picks the backend (tests use ``"eager"``).
    ``cuda_graphs``: capture each bucket's whole step in a CUDA graph (CUDA only).
    ``sampler_kernel`` / ``moe_kernel``: ``"triton"`` runs the sampler / the experts' grouped path with the Triton
    kernels of ``dgserve.kernels``, ``"torch"`` with torch ops, ``"auto"`` as measured for the card.
    ``static_shapes``: run steps at bucketed shapes (see :attr:`static_shapes`); None: when compiled layers or CUDA
    graphs need them. An eager runner compared bit for bit with a graphed one asks for them too.
    """

    def __init__(self, model: DiffusionGemma, pool: KVPagePool, num_slots: int, *, compile: bool = False,
                 compile_backend: str = "inductor", cuda_graphs: bool = False,
                 row_buckets: Sequence[int] = DEFAULT_ROW_BUCKETS, sampler_kernel: kernels.KernelChoice = "auto",
                 moe_kernel: kernels.KernelChoice = "auto", static_shapes: bool | None = None) -> None:
        if pool.scratch_blocks * pool.block_size < model.config.canvas_length:
            raise ValueError("the fast path needs a KV pool with a canvas of scratch slots (scratch_tokens)")
        self.model = model
        self.pool = pool
        self._static_shapes = static_shapes
        self.device = model.device
        self.canvas = model.config.canvas_length
        self.block_size = pool.block_size
        self.row_buckets = tuple(sorted(row_buckets))
        self.state = fs.CanvasState.allocate(num_slots, self.canvas, model.config.text.hidden_size, model.dtype,
                                             self.device)
        self.algorithm = EntropyBound()
        self.scratch = {"full": pool.scratch_slot("full"), "sliding": pool.scratch_slot("sliding")}
        self.sampler_kernel = kernels.resolve(sampler_kernel, "sampler", self.device)
        self.moe_kernel = kernels.resolve(moe_kernel, "moe", self.device)
        triton_sampler = self.sampler_kernel == "triton"
        self.vocab_pass: fs.VocabPass = fs.kernel_vocab_pass if triton_sampler else fs.canvas_vocab_pass
        # canvases per sampler pass of a plain step (the Triton sampler takes one canvas at a time)
        self.vocab_chunk = 1 if triton_sampler else fs.vocab_chunk(self.canvas, model.config.text.vocab_size)
        for layer in model.layers:
            layer.experts.kernel = self.moe_kernel
        self.cuda_graphs = cuda_graphs and self.device.type == "cuda" and not model.dispatcher.collective
        experts = model.layers[0].experts
        probe = torch.empty(0, model.config.text.hidden_size, dtype=model.dtype, device=self.device)
        if self.cuda_graphs and not experts.sync_free(probe):
            log.warning("CUDA graphs off: the grouped expert kernel does not run %s on this device, and the "
                        "per-expert fallback reads expert counts on the host", model.dtype)
            self.cuda_graphs = False
        self.compiled = compile and not model.dispatcher.collective
        if self.compiled:
            # one graph per (layer type, row bucket, context bucket): more than dynamo's default of 8 per function
            graphs = len(set(model.config.text.layer_types)) * len(self.row_buckets) * MAX_CONTEXT_BUCKETS
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, graphs)
            torch._dynamo.config.accumulated_recompile_limit = max(
                torch._dynamo.config.accumulated_recompile_limit, graphs)
            model.compiled_layer_rows = torch.compile(TransformerLayer.forward_rows, fullgraph=True, dynamic=False,
                                                      backend=compile_backend)
            if not triton_sampler:
                # the plain sampler pass too (one graph per canvases-per-pass count): its elementwise work over
                # [rows, V] fuses into a few loops
                self.vocab_pass = torch.compile(fs.canvas_vocab_pass, fullgraph=True, dynamic=False,
                                                backend=compile_backend)
        self._graphs: dict[tuple[int, int, int, fs.StepVariant], _CapturedStep] = {}
        self.transfers_to_host = 0  # device-to-host copies (one per step)
        self.transfers_to_device = 0  # host-to-device copies (one per step)
        self.steps = 0
        # the device program (a benchmark of the host side swaps in a stub)
        self.step_fn: Callable[..., torch.Tensor] = functools.partial(fs.fast_step, vocab_pass=self.vocab_pass)
        self.buckets_seen: set[tuple[int, int]] = set()  # (rows, full-context blocks) of the steps run
        self.vocab_rows_seen: set[int] = set()  # rows of the steps run that ran the sampler

    # -- buckets ------------------------------------------------------------------------------------
    def row_bucket(self, n: int) -> int:
        for b in self.row_buckets:
            if b >= n:
                return b
        return n  # beyond the largest bucket: its own shape

    def context_bucket(self, rows: Sequence[Row]) -> int:
        need = max((-(-r.prefix_len // self.block_size) for r in rows), default=0)
        blocks = MIN_CONTEXT_BLOCKS
        while blocks < need:
            blocks *= 2
        return blocks

    def _layout(self, rows: Sequence[Row]) -> fs.StepLayout:
        """The step's gather widths: under static shapes the context bucket and a whole sliding window; an eager
        step gathers only the blocks its rows hold (at least one)."""
        if self.static_shapes:
            return fs.StepLayout.build(self.model, self.block_size, self.context_bucket(rows))
        bs = self.block_size
        held = [-(-r.prefix_len // bs) for r in rows]
        sliding = [h - self._sliding_base(r.prefix_len) for h, r in zip(held, rows, strict=True)]
        return fs.StepLayout.build(self.model, bs, max(1, *held), sliding=max(1, *sliding))

    def _sliding_base(self, prefix_len: int) -> int:
        """The first block a sliding layer gathers for a row after ``prefix_len`` cached tokens."""
        return max(0, prefix_len - (self.model.config.text.sliding_window - 1)) // self.block_size

    # -- one step -----------------------------------------------------------------------------------
    @property
    def static_shapes(self) -> bool:
        """Whether steps run at bucketed shapes: compiled layers (one graph per shape) and CUDA graphs need them;
        an eager step runs at its own row count, with no padding rows, unless the runner was asked otherwise."""
        if self._static_shapes is not None:
            return self._static_shapes
        return self.cuda_graphs or self.compiled

    def run(self, rows: Sequence[Row]) -> np.ndarray:
        """Run one step; returns ``[len(rows), output_width]`` int32 (``fast_step``'s output rows, in the order of
        ``rows``; the variant's optional columns when some row asked for them, see ``fast_step.output_width``).

        The denoised rows go first in the device program, and only they (up to their own bucket under static
        shapes) run the sampler's vocabulary pass: prefill and commit rows would only discard its outputs."""
        assert rows, "a step needs at least one row"
        order = sorted(range(len(rows)), key=lambda i: rows[i].kind != fs.DENOISE)
        ordered = [rows[i] for i in order]
        denoised = sum(1 for r in rows if r.kind == fs.DENOISE)
        if self.static_shapes:
            s = self.row_bucket(len(rows))
            vocab_rows = min(s, self.row_bucket(denoised)) if denoised else 0
        else:
            s, vocab_rows = len(rows), denoised
        layout = self._layout(rows)
        variants = [r.variant for r in rows]
        variant = fs.StepVariant(filters=any(v.filters for v in variants), logprobs=any(v.logprobs for v in variants))
        self.buckets_seen.add((s, layout.full_blocks))
        self.vocab_rows_seen.add(vocab_rows)
        host = self._pack(ordered, s, layout)
        if self.cuda_graphs:
            out = self._graph(s, layout, variant, vocab_rows).replay(host)
        else:
            inp = torch.from_numpy(host)
            if self.device.type != "cpu":
                inp = inp.pin_memory().to(self.device, non_blocking=True)
            self.transfers_to_device += 1
            with torch.inference_mode():
                result = self.step_fn(self.model, self.algorithm, layout, inp, self.state, self.pool.k_flat,
                                      self.pool.v_flat, self.scratch, variant, vocab_rows=vocab_rows,
                                      vocab_chunk=self.vocab_chunk)
            out = result.cpu().numpy() if result.device.type != "cpu" else result.numpy()
        self.transfers_to_host += 1
        self.steps += 1
        in_order = np.empty((len(rows), out.shape[1]), dtype=out.dtype)
        in_order[order] = out[:len(rows)]
        return in_order

    def _pack(self, rows: Sequence[Row], s: int, layout: fs.StepLayout) -> np.ndarray:
        host = np.full((s, layout.width), -1, dtype=np.int32)
        host[:, :fs.HEADER] = 0
        host[:, layout.tokens] = 0
        bs = self.block_size
        for i, r in enumerate(rows):
            h = host[i]
            p = r.sampling
            adaptive = p.stability_threshold is not None and p.confidence_threshold is not None
            lo, hi = r.seed & 0xFFFFFFFF, (r.seed >> 32) & 0xFFFFFFFF
            sliding_base = self._sliding_base(r.prefix_len)
            h[:fs.F_T_MIN] = [r.slot, r.kind, r.length or self.canvas, r.prefix_len, int(r.fresh), r.cur_step,
                              p.max_denoising_steps, r.canvas_index, _int32(lo), _int32(hi), sliding_base,
                              p.stability_threshold if adaptive else -1, int(r.greedy)]
            h[fs.F_T_MIN:fs.F_CONFIDENCE + 1] = _float_bits(p.t_min, p.t_max - p.t_min, p.entropy_bound,
                                                            p.confidence_threshold if adaptive else 0.0)
            h[fs.F_TOP_K] = p.top_k
            h[fs.F_TOP_P:fs.F_MIN_P + 1] = _float_bits(p.top_p, p.min_p)
            h[fs.F_SUPPRESS_BEFORE] = r.suppress_before
            ids, values = bias_table(p)
            h[layout.bias_ids] = ids
            h[layout.bias_values] = _float_bits(*values)
            assert len(r.suppress_ids) <= fs.SUPPRESS_SLOTS, "more EOS and pad ids than the step's fields hold"
            h[layout.suppress_ids.start:layout.suppress_ids.start + len(r.suppress_ids)] = r.suppress_ids
            if r.kind == fs.PREFILL:
                h[fs.HEADER:fs.HEADER + len(r.tokens)] = r.tokens
            full = r.table.full[:layout.full_blocks]
            h[layout.full_table.start:layout.full_table.start + len(full)] = full
            first = r.prefix_len // bs
            wfull = r.table.full[first:first + layout.write_blocks]
            h[layout.full_write.start:layout.full_write.start + len(wfull)] = wfull
            if layout.sliding_blocks:
                window = r.table.sliding[sliding_base:sliding_base + layout.sliding_blocks]
                sl = [-1 if b is None else b for b in window]
                h[layout.sliding_table.start:layout.sliding_table.start + len(sl)] = sl
                wsl = [-1 if b is None else b for b in r.table.sliding[first:first + layout.write_blocks]]
                h[layout.sliding_write.start:layout.sliding_write.start + len(wsl)] = wsl
        pad = self.state.pad_slot
        for i in range(len(rows), s):
            host[i, :fs.F_T_MIN] = [pad, fs.PAD, self.canvas, 0, 0, 1, 1, 0, 0, 0, 0, -1, 0]
            host[i, fs.F_T_MIN:fs.F_CONFIDENCE + 1] = _float_bits(1.0, 0.0, 0.0, 0.0)
            host[i, fs.F_TOP_P] = _float_bits(1.0)[0]
        host[:, layout.bias_ids] = np.where(host[:, layout.bias_ids] < 0, 0, host[:, layout.bias_ids])
        host[len(rows):, layout.bias_values] = 0
        return host

    def _graph(self, s: int, layout: fs.StepLayout, variant: fs.StepVariant = fs.PLAIN,
               vocab_rows: int | None = None) -> _CapturedStep:
        vocab_rows = s if vocab_rows is None else vocab_rows
        key = (s, vocab_rows, layout.full_blocks, variant)
        graph = self._graphs.get(key)
        if graph is None:
            started = time.perf_counter()
            padding = self._pack([], s, layout)
            graph = _CapturedStep(self, layout, padding, variant, vocab_rows)
            self._graphs[key] = graph
            log.info("captured the fast step for %d rows (%d sampled), %d context blocks, %s in %.2f s", s,
                     vocab_rows, layout.full_blocks, variant, time.perf_counter() - started)
        return graph

    def capture(self, row_counts: Sequence[int] | None = None) -> float:
        """Capture the CUDA graphs of the given row buckets at the smallest context bucket up front (largest
        first, so the others reuse its memory), every row sampled (the steady state: all rows denoising); other
        sampled-row counts are captured on first use. Returns the seconds it took."""
        started = time.perf_counter()
        if self.cuda_graphs:
            for s in sorted(row_counts or self.row_buckets, reverse=True):
                self._graph(s, fs.StepLayout.build(self.model, self.block_size, MIN_CONTEXT_BLOCKS))
        return time.perf_counter() - started


class _CapturedStep:
    """A CUDA graph of ``fast_step`` for one bucket, with its static input and output buffers."""

    pool: object = None  # the memory pool all captures share

    def __init__(self, runner: FastRunner, layout: fs.StepLayout, padding: np.ndarray,
                 variant: fs.StepVariant = fs.PLAIN, vocab_rows: int | None = None) -> None:
        self.host_in = torch.from_numpy(padding).pin_memory()
        self.host_out = torch.empty((padding.shape[0], fs.output_width(runner.canvas, variant)),
                                    dtype=torch.int32).pin_memory()
        self.static_in = self.host_in.to(runner.device)

        def step() -> torch.Tensor:
            return runner.step_fn(runner.model, runner.algorithm, layout, self.static_in, runner.state,
                                  runner.pool.k_flat, runner.pool.v_flat, runner.scratch, variant,
                                  vocab_rows=vocab_rows, vocab_chunk=runner.vocab_chunk)

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.inference_mode(), torch.cuda.stream(side):
            for _ in range(2):  # warm-up (all padding rows: only scratch slots and the scratch state row change)
                step()
        torch.cuda.current_stream().wait_stream(side)
        if _CapturedStep.pool is None:
            _CapturedStep.pool = torch.cuda.graph_pool_handle()
        self.graph = torch.cuda.CUDAGraph()
        with torch.inference_mode(), torch.cuda.graph(self.graph, pool=_CapturedStep.pool):
            self.static_out = step()
        self.done = torch.cuda.Event()

    def replay(self, host: np.ndarray) -> np.ndarray:
        self.host_in.numpy()[:] = host
        self.static_in.copy_(self.host_in, non_blocking=True)
        self.graph.replay()
        self.host_out.copy_(self.static_out, non_blocking=True)
        self.done.record()
        self.done.synchronize()
        return self.host_out.numpy()
