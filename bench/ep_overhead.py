"""Expert-parallel overhead: one denoising forward split into attention+dense, expert compute and
all-to-all, at EP=1/2/4 on CPU (gloo, one process per rank), beside a DGX H100 roofline estimate
for the published model (26B-A4B, bf16) at EP=1/2/4/8.

    python bench/ep_overhead.py              # bench-cpu preset (~90M), 8 canvases of 64 tokens
    python bench/ep_overhead.py --small      # tiny-random, a smoke run (< 1 min)
    python bench/ep_overhead.py --roofline   # only the estimate
    python bench/ep_overhead.py --gpu-experts  # on a GPU: time the published model's expert MLPs at EP=1..8

CPU figures show the mechanics (what an all-to-all costs relative to the work around it, on loopback
TCP); they say nothing about NVLink. A CPU group shares the machine's cores, so per-rank compute
does not shrink with W the way it does on W GPUs. Step time = the slowest rank's forward.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from dgserve.model.config import PRESETS, ModelConfig  # noqa: E402

# -- the roofline estimate -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Hardware:
    name: str = "DGX H100"
    nvlink_bytes_s: float = 450e9  # per direction per GPU (900 GB/s bidirectional)
    hbm_bytes_s: float = 3.35e12
    flops: float = 989e12  # dense bf16
    a2a_latency_s: float = 20e-6  # assumed fixed cost of one NCCL all-to-all over NVLink (launch + sync)


@dataclass
class RooflineRow:
    world: int
    canvases: int
    tokens: int  # in the whole group
    expert_tflop_per_rank: float
    expert_weight_gb_per_rank: float
    expert_ms: float  # max(compute, weight read) per rank, all layers
    a2a_mb_per_rank: float  # bytes one direction of the busiest rank's links carries per step, all layers
    a2a_bw_ms: float
    a2a_latency_ms: float
    a2a_ms: float
    dense_ms: float  # attention + dense MLP + router + LM head (replicated weights; DP over canvases)
    a2a_over_expert: float


def roofline(config: ModelConfig, world: int, canvases: int, hw: Hardware = Hardware(), bytes_per: int = 2
             ) -> RooflineRow:
    """Per-step estimate for one denoising forward over ``canvases`` canvases dealt to ``world`` ranks
    (data-parallel attention: whole canvases per rank, so the busiest rank holds ceil(N/W)), with
    uniform routing (experts, hence expert rows, balanced over ranks) and no overlap of communication
    with compute. Times are the busiest rank's."""
    t = config.text
    h, inter, e, k, layers = t.hidden_size, t.moe_intermediate_size, t.num_experts, t.top_k_experts, \
        t.num_hidden_layers
    tokens = canvases * config.canvas_length
    busiest = math.ceil(canvases / world) * config.canvas_length  # tokens of the rank with most canvases
    rows_per_rank = k * tokens / world  # (token, expert) rows each rank computes
    expert_params = 3 * h * inter
    flops = 2 * expert_params * rows_per_rank * layers
    touched = 1 - (1 - k / e) ** tokens  # chance an expert gets >= 1 row in a step (uniform routing)
    weight_bytes = layers * (e / world) * touched * expert_params * bytes_per
    expert_s = max(flops / hw.flops, weight_bytes / hw.hbm_bytes_s)
    # one direction of the busiest rank's links: its own rows going out (dispatch) + results of the rows
    # others sent it going back (combine); the other direction carries the mirror image
    dispatch_out = k * busiest * (world - 1) / world
    combine_out = k * (tokens - busiest) / world
    a2a_bytes = layers * (dispatch_out + combine_out) * h * bytes_per
    a2a_bw_s = a2a_bytes / hw.nvlink_bytes_s
    a2a_lat_s = layers * 3 * hw.a2a_latency_s if world > 1 else 0.0  # counts, rows, results
    counts = config.parameter_counts()
    dense_params = counts["total"] - counts["experts"]
    # per token: every dense matmul (embedding lookup free) + the tied LM head over the vocabulary
    dense_flops = 2 * dense_params * busiest
    dense_s = max(dense_flops / hw.flops, dense_params * bytes_per / hw.hbm_bytes_s)
    a2a_s = a2a_bw_s + a2a_lat_s
    return RooflineRow(world=world, canvases=canvases, tokens=tokens, expert_tflop_per_rank=flops / 1e12,
                       expert_weight_gb_per_rank=weight_bytes / 1e9, expert_ms=expert_s * 1e3,
                       a2a_mb_per_rank=a2a_bytes / 1e6, a2a_bw_ms=a2a_bw_s * 1e3, a2a_latency_ms=a2a_lat_s * 1e3,
                       a2a_ms=a2a_s * 1e3, dense_ms=dense_s * 1e3,
                       a2a_over_expert=a2a_s / expert_s if expert_s else 0.0)


def roofline_table(config: ModelConfig, worlds=(1, 2, 4, 8), canvases=(1, 8, 64)) -> str:
    lines = ["| EP | canvases | tokens | expert TFLOP/rank | expert GB read/rank | expert ms | all-to-all MB/rank "
             "| a2a bandwidth ms | a2a latency ms | a2a ms | dense ms | a2a / expert |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for n in canvases:
        for w in worlds:
            r = roofline(config, w, n)
            lines.append(f"| {w} | {n} | {r.tokens} | {r.expert_tflop_per_rank:.2f} "
                         f"| {r.expert_weight_gb_per_rank:.1f} | {r.expert_ms:.2f} | {r.a2a_mb_per_rank:.0f} "
                         f"| {r.a2a_bw_ms:.2f} | {r.a2a_latency_ms:.2f} "
                         f"| {r.a2a_ms:.2f} | {r.dense_ms:.2f} | {r.a2a_over_expert:.2f} |")
    return "\n".join(lines)


# -- CPU measurement (gloo) -----------------------------------------------------------------------------

def _rank_worker(rank: int, world: int, port: int, preset: str, canvases: int, steps: int, warmup: int,
                 threads: int, out_dir: str) -> None:
    result: dict = {}
    try:
        torch.set_num_threads(threads)  # 1: OpenMP spinning on shared cores distorts everything
        from dgserve.cluster.process_group import create_store, init_ep_group
        from dgserve.model.checkpoint import load
        from dgserve.model.ep_dispatch import ExpertParallelDispatcher
        from dgserve.model.ep_weights import shard_model
        from dgserve.model.kv import ContiguousKV, Segment
        from dgserve.model.moe import LocalDispatcher
        from dgserve.model.placement import ExpertPlacement

        store = create_store("127.0.0.1", rank + 1, world, port=port)
        init_ep_group(rank, world, store, timeout_s=300)
        full = load(preset)
        cfg, t = full.config, full.config.text
        placement = ExpertPlacement.contiguous(t.num_experts, world)
        if world == 1:
            model = full.model
            model.dispatcher = LocalDispatcher()
            disp = None
        else:
            model = shard_model(full.model, placement.owned_experts(rank))
            disp = ExpertParallelDispatcher(placement, rank, t.num_hidden_layers, timing=True)
            model.dispatcher = disp
        del full
        mine = [c for c in range(canvases) if c % world == rank]  # canvases of this rank (data parallel)
        kv = ContiguousKV(t.num_hidden_layers, [t.is_sliding(i) for i in range(t.num_hidden_layers)],
                          t.sliding_window)
        g = torch.Generator().manual_seed(rank)
        prompt_len = 16

        def forward(kind: str) -> None:
            if not mine:
                assert disp is not None
                disp.empty_forward([layer.experts for layer in model.layers], t.hidden_size, t.top_k_experts,
                                   model.dtype)
                return
            if kind == "encode":
                segs = [Segment("encode", i, prompt_len, 0) for i in range(len(mine))]
            else:
                segs = [Segment("denoise", i, cfg.canvas_length, prompt_len) for i in range(len(mine))]
            tokens = torch.randint(0, t.vocab_size, (sum(s.length for s in segs),), generator=g)
            model(tokens, segs, kv)

        forward("encode")
        for _ in range(warmup):
            forward("denoise")
        if disp is not None:
            disp.reset_stats()
        times = []
        for _ in range(steps):
            if world > 1:
                torch.distributed.barrier()
            t0 = time.perf_counter()
            forward("denoise")
            times.append(time.perf_counter() - t0)
        result = {"rank": rank, "canvases": len(mine), "forward_ms": 1e3 * sum(times) / steps}
        if disp is not None:
            result.update(a2a_ms=1e3 * disp.a2a_seconds / steps, expert_ms=1e3 * disp.expert_seconds / steps,
                          dispatch_other_ms=1e3 * disp.other_seconds / steps,
                          mb_sent=disp.bytes_sent / steps / 1e6)
        else:  # EP=1: time the local experts with the same split, one extra pass over recorded routing
            result.update(a2a_ms=0.0, dispatch_other_ms=0.0, mb_sent=0.0,
                          expert_ms=_local_expert_ms(model, forward, steps))
    except BaseException as exc:  # reported by the parent
        import traceback

        result = {"rank": rank, "error": f"{exc}\n{traceback.format_exc()}"}
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    os._exit(0)


def _local_expert_ms(model, forward, steps: int) -> float:
    """EP=1 has no dispatcher timing: wrap the local dispatcher to time its calls."""
    inner = model.dispatcher
    spent = [0.0]

    def timed(*args, **kwargs):
        t0 = time.perf_counter()
        out = inner(*args, **kwargs)
        spent[0] += time.perf_counter() - t0
        return out

    model.dispatcher = timed
    for _ in range(steps):
        forward("denoise")
    model.dispatcher = inner
    return 1e3 * spent[0] / steps


def measure_cpu(world: int, preset: str, canvases: int, steps: int, warmup: int) -> dict:
    import torch.distributed as dist
    import torch.multiprocessing as mp

    master = dist.TCPStore("127.0.0.1", 0, world + 1, is_master=True, wait_for_workers=False)
    threads = 1
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as out:
        procs = [ctx.Process(target=_rank_worker, args=(r, world, master.port, preset, canvases, steps, warmup,
                                                        threads, out)) for r in range(world)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(600)
            if p.is_alive():
                p.kill()
        ranks = []
        for r in range(world):
            f = Path(out, f"rank{r}.json")
            ranks.append(json.loads(f.read_text()) if f.exists() else {"rank": r, "error": "no result"})
    errors = [x["error"] for x in ranks if "error" in x]
    if errors:
        raise RuntimeError(errors[0])
    slow = max(ranks, key=lambda x: x["forward_ms"])
    moe = slow["a2a_ms"] + slow["expert_ms"] + slow["dispatch_other_ms"]
    return {"world": world, "canvases": canvases, "step_ms": slow["forward_ms"],
            "attention_dense_ms": slow["forward_ms"] - moe, "expert_ms": slow["expert_ms"],
            "all_to_all_ms": slow["a2a_ms"], "dispatch_other_ms": slow["dispatch_other_ms"],
            "mb_sent_per_rank": slow["mb_sent"], "ranks": ranks}


# -- GPU check of the expert side of the estimate ------------------------------------------------------

def gpu_experts(config: ModelConfig, worlds=(1, 2, 4, 8), canvases=(1, 8, 64), reps: int = 10) -> list[dict]:
    """Time one layer's expert MLPs (grouped, bf16) at the published dims for a rank's share at EP=W,
    rows spread evenly over its experts; x30 layers; beside the roofline's expert time."""
    from dgserve.model.moe import ExpertWeights, grouped_expert_mlp

    device = torch.device("cuda")
    t = config.text
    out = []
    for w in worlds:
        n_local = t.num_experts // w
        with torch.device(device):
            experts = ExpertWeights(t.hidden_size, t.moe_intermediate_size, list(range(n_local))).to(torch.bfloat16)
        torch.nn.init.normal_(experts.gate_up_proj, std=0.02)
        torch.nn.init.normal_(experts.down_proj, std=0.02)
        for n in canvases:
            rows = t.top_k_experts * n * config.canvas_length // w
            counts = torch.full((n_local,), rows // n_local, dtype=torch.long, device=device)
            counts[: rows - int(counts.sum())] += 1
            x = torch.randn(rows, t.hidden_size, dtype=torch.bfloat16, device=device)
            for _ in range(3):
                grouped_expert_mlp(x, counts, experts)
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(reps):
                grouped_expert_mlp(x, counts, experts)
            end.record()
            torch.cuda.synchronize()
            layer_ms = start.elapsed_time(end) / reps
            est = roofline(config, w, n)
            out.append({"world": w, "canvases": n, "rows_per_rank_layer": rows,
                        "measured_expert_ms_all_layers": layer_ms * t.num_hidden_layers,
                        "roofline_expert_ms": est.expert_ms, "device": torch.cuda.get_device_name()})
        del experts
        torch.cuda.empty_cache()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="tiny-random, few steps: a smoke run")
    ap.add_argument("--preset", default=None, help="model preset for the CPU runs (default bench-cpu)")
    ap.add_argument("--worlds", default="1,2,4")
    ap.add_argument("--canvases", type=int, default=None, help="canvases per step in the whole group")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--roofline", action="store_true", help="print only the DGX H100 estimate")
    ap.add_argument("--gpu-experts", action="store_true", help="time the published model's experts on this GPU")
    ap.add_argument("--json", default=None, help="also write all figures to this file")
    args = ap.parse_args(argv)
    published = PRESETS["diffusiongemma-26b-a4b"]
    report: dict = {"roofline": [asdict(roofline(published, w, n)) for n in (1, 8, 64) for w in (1, 2, 4, 8)]}
    print("DGX H100 estimate, diffusiongemma-26b-a4b bf16, one denoising forward (no comm/compute overlap):")
    print(roofline_table(published))
    if args.gpu_experts:
        rows = gpu_experts(published)
        report["gpu_experts"] = rows
        print("\nmeasured expert MLPs on", rows[0]["device"] if rows else "?")
        for r in rows:
            print(f"  EP={r['world']} canvases={r['canvases']:>2}: "
                  f"measured {r['measured_expert_ms_all_layers']:8.2f} ms  roofline {r['roofline_expert_ms']:8.2f} ms")
    if not args.roofline and not args.gpu_experts:
        preset = args.preset or ("tiny-random" if args.small else "bench-cpu")
        canvases = args.canvases or (4 if args.small else 8)
        steps = args.steps or (2 if args.small else 5)
        warmup = 1
        cfg = PRESETS[preset]
        print(f"\nCPU (gloo, loopback), preset {preset}: {canvases} canvases x {cfg.canvas_length} tokens per step, "
              f"{steps} timed steps, {os.cpu_count()} cores shared by the ranks")
        print("| EP | step ms | attention+dense ms | expert ms | all-to-all ms | dispatch other ms | MB out/rank "
              "| a2a / expert |")
        print("|---:|---:|---:|---:|---:|---:|---:|---:|")
        report["cpu"] = []
        for w in (int(x) for x in args.worlds.split(",")):
            m = measure_cpu(w, preset, canvases, steps, warmup)
            report["cpu"].append(m)
            ratio = m["all_to_all_ms"] / m["expert_ms"] if m["expert_ms"] else math.nan
            print(f"| {w} | {m['step_ms']:.1f} | {m['attention_dense_ms']:.1f} | {m['expert_ms']:.1f} "
                  f"| {m['all_to_all_ms']:.1f} | {m['dispatch_other_ms']:.1f} | {m['mb_sent_per_rank']:.2f} "
                  f"| {ratio:.2f} |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
