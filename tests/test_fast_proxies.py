"""CPU proxies of the fast path's GPU behaviour, as counts (what a GPU would show as launch and sync overhead):

- the published model's fast forward and whole fast step run on the ``meta`` device, which has no data: any op
  that needs a tensor's value on the host (``.item()``, ``nonzero``, boolean masks, ``bincount``...) fails there;
- a ``TorchDispatchMode`` over the step sees no sync-class op and no copy between devices;
- launching ops per forward at the published dims, and how many more each canvas adds;
- tied-embedding GEMMs per canvas-step at vocabulary 262,144;
- ``torch._dynamo.explain``: no graph break in a layer's fast forward; compiled inside the engine, one graph per
  layer type and step bucket over 50 steps of requests arriving and leaving.
"""

from __future__ import annotations

import pytest
import torch

from bench.op_log import STEADY_SAMPLING, OpLog, denoise_rows, forward_ops, meta_model, step_input
from dgserve.engine import fast_step as fs
from dgserve.engine.engine import Engine, EngineConfig
from dgserve.engine.kv_pages import KVPagePool
from dgserve.engine.request import GenerationRequest
from dgserve.engine.runner import FastRunner
from dgserve.model.checkpoint import load
from dgserve.model.diffusion_gemma import DiffusionGemma
from dgserve.model.generation_config import SamplingParams
from dgserve.model.layers import TransformerLayer


@pytest.fixture(scope="module")
def published():
    """The published 26B-A4B model on the meta device (no memory), bf16, with a small meta KV pool."""
    model = meta_model("diffusiongemma-26b-a4b")
    cfg = model.config
    pool = KVPagePool(cfg, 256, 256, block_size=16, dtype=torch.bfloat16, device="meta",
                      scratch_tokens=cfg.canvas_length)
    return model, pool, FastRunner(model, pool, num_slots=64)


def test_published_fast_forward_runs_on_meta_with_few_launching_ops(published):
    """The published model's fast forward completes on the meta device (nothing in it reads a value), with at
    most 2,500 launching ops for one canvas (the exact path's packed forward: ~4,600) and at most 5 more per
    added canvas (exact: ~195), none of them sync-class or cross-device."""
    _, _, runner = published
    one = forward_ops(runner, 1)
    assert not one.sync and not one.cross_device, (one.sync, one.cross_device)
    assert one.launching <= 2500, one.ops.most_common(12)
    for n in (2, 8, 64):
        more = forward_ops(runner, n)
        assert more.launching - one.launching <= 5 * (n - 1), (n, more.launching, one.launching)


def test_published_fast_step_has_no_sync_ops_and_two_vocab_gemms_per_canvas(published):
    """A whole steady-state fast step (inputs, forward, sampler over the 262,144-token vocabulary, state update,
    output) on meta: no sync-class op, no copy between devices; the tied embedding is read by two GEMMs per
    canvas (logits and soft embeddings; the exact sampler's 16-row chunks make 32) plus the token lookup."""
    model, pool, runner = published
    for n in (1, 4):
        rows = denoise_rows(runner, n)
        layout, inp = step_input(runner, rows)
        log = OpLog()
        with torch.inference_mode(), log:
            out = fs.fast_step(model, runner.algorithm, layout, inp, runner.state, pool.k_flat, pool.v_flat,
                               runner.scratch)
        assert out.shape == (runner.row_bucket(n), 2 + runner.canvas) and out.dtype == torch.int32
        assert not log.sync and not log.cross_device, (log.sync, log.cross_device)
        embedding_reads = log.uses[id(model.embed_tokens.weight)]
        assert embedding_reads == 1 + 2 * runner.row_bucket(n), embedding_reads


def test_engine_steady_state_step_copies_once_each_way():
    """In the CPU engine, each fast step is one forward with one input and one output copy."""
    tiny = load("tiny-random")
    engine = Engine(tiny.model, tiny.generation, None, EngineConfig(execution="fast", kv_cache_memory=16 << 20))
    for i in range(3):
        engine.add_request(GenerationRequest(prompt_ids=[5, 6, 7 + i], max_tokens=64, seed=i, ignore_eos=True,
                                             sampling=STEADY_SAMPLING, request_id=f"r{i}"))
    for _ in range(3):
        engine.step()
    before = (engine.forwards, engine.runner.transfers_to_host, engine.runner.transfers_to_device)
    for _ in range(5):
        engine.step()
    after = (engine.forwards, engine.runner.transfers_to_host, engine.runner.transfers_to_device)
    assert [b - a for a, b in zip(before, after, strict=True)] == [5, 5, 5]


@pytest.mark.parametrize("layer_index", [0, 1])
def test_layer_fast_forward_has_no_graph_breaks(layer_index):
    """``torch._dynamo.explain`` of a sliding and a full layer's fast forward: one graph, no break."""
    tiny = load("tiny-random")
    model, cfg = tiny.model, tiny.config
    pool = KVPagePool(cfg, 32, 32, block_size=16, dtype=model.dtype, scratch_tokens=cfg.canvas_length)
    runner = FastRunner(model, pool, num_slots=4)
    layout, inp = step_input(runner, denoise_rows(runner, 2, prefix=40))
    with torch.inference_mode():
        x = fs.step_inputs(model, layout, inp, runner.state, runner.scratch)
        layer = model.layers[layer_index]
        kind = layer.self_attn.layer_type
        hidden = model.embed_tokens(x.batch.tokens)
        cos, sin = (t.view(-1, t.shape[-1]) for t in _rope(model, x.batch.positions, kind))
        scalar = torch.where(x.batch.denoise[:, None, None], layer.layer_scalar, layer.encoder_layer_scalar)
        explained = torch._dynamo.explain(TransformerLayer.forward_rows)(
            layer, hidden, cos, sin, x.batch.layouts[kind], pool.k_flat[layer_index], pool.v_flat[layer_index],
            scalar, model.dispatcher)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


def _rope(model: DiffusionGemma, positions: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    from dgserve.model.layers import rope_cos_sin

    return rope_cos_sin(positions.reshape(-1), model.inv_freq(positions.device)[kind], model.dtype)


def test_compiled_engine_makes_one_graph_per_layer_type_and_bucket():
    """50 engine steps with requests arriving and leaving (row counts and context lengths vary) with the layers
    and the sampler pass compiled (``fullgraph=True, dynamic=False``): every compilation is a new (layer type,
    step bucket) or canvases-per-pass count, none is a recompilation of one already seen."""
    graphs: list[tuple] = []

    def counting_backend(gm, example_inputs):
        graphs.append(tuple(tuple(t.shape) for t in example_inputs if isinstance(t, torch.Tensor)))
        return gm.forward

    torch._dynamo.reset()
    name = "dgserve_test_counting"
    torch._dynamo.register_backend(name=name)(counting_backend)
    tiny = load("tiny-random")
    engine = Engine(tiny.model, tiny.generation, None, EngineConfig(
        execution="fast", kv_cache_memory=16 << 20, compile=True, compile_backend=name))
    g = torch.Generator().manual_seed(0)
    arrived = 0
    try:
        for step in range(50):
            if step % 4 == 0 and arrived < 10:
                plen = int(torch.randint(3, 250, (1,), generator=g))
                engine.add_request(GenerationRequest(
                    prompt_ids=torch.randint(6, 500, (plen,), generator=g).tolist(), max_tokens=40 + 10 * arrived,
                    seed=arrived, ignore_eos=True, sampling=SamplingParams(max_denoising_steps=4),
                    request_id=f"r{arrived}"))
                arrived += 1
            if engine.has_work():
                engine.step()
        assert engine.completed >= 3  # requests left while others arrived
    finally:
        tiny.model.compiled_layer_rows = None
        torch._dynamo.reset()
    layer_types = len(set(tiny.config.text.layer_types))
    buckets = engine.runner.buckets_seen
    assert len({rows for rows, _ in buckets}) >= 3 and len(buckets) >= 4, buckets
    assert len(graphs) == len(set(graphs)), "a layer type recompiled for a shape it had already compiled"
    # the plain sampler pass: one graph per canvases-per-pass count
    chunk = engine.runner.vocab_chunk
    passes = {min(chunk, v - i) for v in engine.runner.vocab_rows_seen for i in range(0, v, chunk)}
    assert len(graphs) <= layer_types * len(buckets) + len(passes), (len(graphs), buckets, passes)
