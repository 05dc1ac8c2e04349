"""CPU proxies of the fast path's GPU behaviour, as counts (and one host-side timing), beside the exact path's.

    python bench/fast_proxies.py            # the published 26B-A4B dims on the meta device, tiny-random on CPU

- launching ops per forward at the published dims (meta device: no data, no memory), fast path at 1 / 2 / 8 / 64
  canvases; the exact path's forward on meta, where its data-dependent ops fail;
- sync-class ops (value reads, data-dependent shapes, device copies) in one steady-state engine step, both modes;
- tied-embedding GEMMs per canvas-step at vocabulary 262,144 (fast: counted; exact: its 16-row chunks);
- graph breaks in each layer type's fast forward (``torch._dynamo.explain``);
- host time per fast engine step with a stub in place of the device program, at 1 and 64 canvases.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.bench_record import BenchRun, md_table  # noqa: E402
from bench.op_log import OpLog, denoise_rows, forward_ops, meta_model, step_input  # noqa: E402
from dgserve.engine import fast_step as fs  # noqa: E402
from dgserve.engine.engine import Engine, EngineConfig  # noqa: E402
from dgserve.engine.kv_pages import KVPagePool, PagedKV  # noqa: E402
from dgserve.engine.request import GenerationRequest  # noqa: E402
from dgserve.engine.runner import FastRunner  # noqa: E402
from dgserve.engine.sampler import default_chunk_rows  # noqa: E402
from dgserve.model.checkpoint import LoadedModel, load  # noqa: E402
from dgserve.model.generation_config import SamplingParams  # noqa: E402
from dgserve.model.kv import Segment  # noqa: E402
from dgserve.model.layers import TransformerLayer, rope_cos_sin  # noqa: E402


def published_counts() -> dict:
    model = meta_model("diffusiongemma-26b-a4b")
    cfg = model.config
    pool = KVPagePool(cfg, 256, 256, block_size=16, dtype=torch.bfloat16, device="meta",
                      scratch_tokens=cfg.canvas_length)
    runner = FastRunner(model, pool, num_slots=64)
    out = {f"fast_ops_{n}": forward_ops(runner, n).launching for n in (1, 2, 8, 64)}
    # the whole step: sync-class ops and tied-embedding reads
    layout, inp = step_input(runner, denoise_rows(runner, 1))
    log = OpLog()
    with torch.inference_mode(), log:
        fs.fast_step(model, runner.algorithm, layout, inp, runner.state, pool.k_flat, pool.v_flat, runner.scratch)
    out["fast_step_sync_ops"] = len(log.sync) + len(log.cross_device)
    out["fast_embedding_gemms_per_canvas"] = log.uses[id(model.embed_tokens.weight)] - 1  # less the lookup
    chunk = default_chunk_rows(cfg.text.vocab_size)
    out["exact_embedding_gemms_per_canvas"] = 2 * -(-cfg.canvas_length // chunk)
    # the exact path's packed forward on meta
    exact_pool = KVPagePool(cfg, 64, 64, block_size=16, dtype=torch.bfloat16, device="meta")
    table = exact_pool.new_table()
    exact_pool.ensure_capacity(table, 512)
    table.mark_written(256)
    kv = PagedKV(exact_pool, {0: table})
    log = OpLog()
    try:
        with torch.inference_mode(), log:
            model(torch.zeros(cfg.canvas_length, dtype=torch.long, device="meta"),
                  [Segment("denoise", 0, cfg.canvas_length, 256)], kv)
        out["exact_on_meta"] = f"ran: {log.launching} launching ops"
    except Exception as exc:  # data-dependent ops cannot run without data
        out["exact_on_meta"] = f"fails after {log.launching} ops: {type(exc).__name__}: {str(exc).splitlines()[0][:90]}"
    return out


def engine_sync_ops(execution: str) -> int:
    """Sync-class ops in one steady-state engine step over 3 canvases (tiny-random, CPU)."""
    tiny = load("tiny-random")
    engine = Engine(tiny.model, tiny.generation, None, EngineConfig(execution=execution, kv_cache_memory=16 << 20))
    for i in range(3):
        engine.add_request(GenerationRequest(prompt_ids=[5, 6, 7 + i], max_tokens=64, seed=i, ignore_eos=True,
                                             sampling=SamplingParams(max_denoising_steps=16), request_id=f"r{i}"))
    for _ in range(3):
        engine.step()
    log = OpLog()
    with log:
        engine.step()
    return len(log.sync) + len(log.cross_device)


def graph_breaks(tiny: LoadedModel | None = None) -> dict[str, int]:
    """Graph breaks in a sliding and a full layer's fast forward (``tiny``: default the tiny-random preset)."""
    tiny = tiny or load("tiny-random")
    model, cfg = tiny.model, tiny.config
    pool = KVPagePool(cfg, 32, 32, block_size=16, dtype=model.dtype, scratch_tokens=cfg.canvas_length)
    runner = FastRunner(model, pool, num_slots=4)
    layout, inp = step_input(runner, denoise_rows(runner, 2, prefix=40))
    out = {}
    with torch.inference_mode():
        x = fs.step_inputs(model, layout, inp, runner.state, runner.scratch)
        for index in (0, 1):
            layer = model.layers[index]
            kind = layer.self_attn.layer_type
            cos, sin = rope_cos_sin(x.batch.positions.reshape(-1), model.inv_freq(inp.device)[kind], model.dtype)
            scalar = torch.where(x.batch.denoise[:, None, None], layer.layer_scalar, layer.encoder_layer_scalar)
            e = torch._dynamo.explain(TransformerLayer.forward_rows)(
                layer, model.embed_tokens(x.batch.tokens), cos, sin, x.batch.layouts[kind], pool.k_flat[index],
                pool.v_flat[index], scalar, model.dispatcher)
            out[kind] = e.graph_break_count
    return out


def host_ms_per_step(canvases: int, steps: int = 30) -> float:
    """Engine.step() wall time with the device program replaced by a stub: the host side alone."""
    tiny = load("tiny-random")
    c = tiny.config.canvas_length
    engine = Engine(tiny.model, tiny.generation, None, EngineConfig(
        execution="fast", kv_cache_memory=64 << 20, max_running=canvases, max_step_tokens=canvases * c + 512))

    def stub(model, algorithm, layout, inp, state, k_pages, v_pages, scratch, variant=None, **_):
        return torch.zeros(inp.shape[0], 2 + c, dtype=torch.int32)

    engine.runner.step_fn = stub
    for i in range(canvases):
        engine.add_request(GenerationRequest(prompt_ids=[5, 6, 7 + i % 100], max_tokens=c, seed=i, ignore_eos=True,
                                             sampling=SamplingParams(max_denoising_steps=1000), request_id=f"r{i}"))
    for _ in range(3):  # prefill, then steady-state denoising (the stub never finishes a canvas)
        engine.step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t0)
    assert engine.canvases_in_forward[-1] == canvases
    return round(1000 * statistics.median(times), 3)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="also append the JSON record to this file")
    a = p.parse_args(argv)
    bench = BenchRun("fast_proxies")
    torch.set_num_threads(1)
    counts = published_counts()
    bench.progress("published-dims counts done")
    sync = {m: engine_sync_ops(m) for m in ("exact", "fast")}
    breaks = graph_breaks()
    host = {n: host_ms_per_step(n) for n in (1, 64)}
    results = {**counts, "engine_step_sync_ops": sync, "graph_breaks": breaks, "host_ms_per_step": host}
    rows = [
        ["launching ops per forward, 1 canvas (26B-A4B dims)", "~4,600 (issue 15)", counts["fast_ops_1"], "<= 2,500"],
        ["... more per added canvas (2 / 8 / 64 canvases)", "~195",
         " / ".join(f"{(counts[f'fast_ops_{n}'] - counts['fast_ops_1']) / (n - 1):.1f}" for n in (2, 8, 64)), "<= 5"],
        ["forward on the meta device", counts["exact_on_meta"], "ran", "completes"],
        ["sync-class ops in a steady-state engine step (tiny, CPU)", sync["exact"], sync["fast"], "0 in the forward"],
        ["sync-class ops in a whole fast step at 26B-A4B dims (meta)", "-", counts["fast_step_sync_ops"], "0"],
        ["tied-embedding GEMMs per canvas-step (V 262,144)", counts["exact_embedding_gemms_per_canvas"],
         counts["fast_embedding_gemms_per_canvas"], "2"],
        ["graph breaks per layer type (dynamo explain)", "14-17 (issue 15)", str(breaks), "0"],
        ["host ms per engine step, stub model, 1 / 64 canvases", "-", f"{host[1]} / {host[64]}", "<= 1 / <= 5"],
    ]
    bench.finish(results, md_table(["proxy", "exact path", "fast path", "goal"], rows), a.out, [
        "published dims on the meta device in bf16; engine figures on tiny-random, CPU, one thread"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
