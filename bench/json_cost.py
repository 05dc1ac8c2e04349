"""What JSON output by constrained denoising costs: tokens per forward (and denoising steps per canvas, seconds) of the
same seeded chat requests on the ``tiny`` model with and without a JSON-schema constraint, in exact mode, and how
many constrained outputs validate against the schema.

    python bench/json_cost.py [--n 50] [--max-tokens 96]

Constrained canvases accept only a contiguous left-to-right run of confident positions per step (at least one), so
they take more steps than the entropy-bound sampler's any-order acceptance; structure the grammar forces (braces,
keys) has zero entropy and is accepted in long runs.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jsonschema
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.bench_record import BenchRun, md_table  # noqa: E402
from dgserve.engine.engine import Engine, EngineConfig  # noqa: E402
from dgserve.engine.grammar import JsonConstraint  # noqa: E402
from dgserve.engine.request import CanvasEvent, FinalEvent, GenerationRequest  # noqa: E402
from dgserve.model.checkpoint import load  # noqa: E402

PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age", "kind"], "properties": {
    "name": {"type": "string", "maxLength": 12}, "age": {"type": "integer", "minimum": 0, "maximum": 150},
    "kind": {"enum": ["king", "queen", "knight"]}}}
SORTED = {"type": "object", "additionalProperties": False, "required": ["sorted"], "properties": {
    "sorted": {"type": "array", "maxItems": 8, "items": {"type": "integer", "minimum": 0, "maximum": 9}}}}
# (name, prompt per seed, schema): word salad (the tiny model's English) and its trained task, sorting digits
WORKLOADS = (("describe a king", lambda i: "Describe a king.", PERSON),
             ("sort digits", lambda i: "sort " + " ".join(str((7 * i + 3 * k) % 10) for k in range(6)), SORTED))


def run(loaded, n: int, max_tokens: int, prompt_of, schema: dict, constrained: bool) -> dict[str, float]:
    engine = Engine(loaded.model, loaded.generation, loaded.tokenizer,
                    EngineConfig(execution="exact", kv_cache_memory=64 << 20))
    constraint = JsonConstraint(json.dumps(schema)) if constrained else None
    for seed in range(n):
        prompt = loaded.tokenizer.encode_chat([{"role": "user", "content": prompt_of(seed)}])
        engine.add_request(GenerationRequest(prompt, max_tokens=max_tokens, seed=seed, request_id=str(seed),
                                             sampling=loaded.generation.sampling, constraint=constraint))
    started = time.perf_counter()
    texts: dict[str, str] = {}
    finals: list[FinalEvent] = []
    for ev in engine.run_until_done():
        if isinstance(ev, CanvasEvent):
            texts[ev.request_id] = texts.get(ev.request_id, "") + ev.text
        elif isinstance(ev, FinalEvent):
            finals.append(ev)
    seconds = time.perf_counter() - started
    valid = 0
    for text in texts.values():
        try:
            jsonschema.validate(json.loads(text), schema)
            valid += 1
        except (json.JSONDecodeError, jsonschema.ValidationError):
            pass
    tokens = sum(f.stats.new_tokens for f in finals)
    steps = sum(f.stats.denoise_steps for f in finals)
    canvases = sum(f.stats.canvases for f in finals)
    return {"tokens": tokens, "tokens_per_forward": tokens / steps, "steps_per_canvas": steps / canvases,
            "seconds": seconds, "valid": valid}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=50, help="requests per workload")
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--out", default=None, help="append the JSON record to this file")
    args = parser.parse_args(argv)
    bench = BenchRun("json_cost")
    torch.set_num_threads(1)
    loaded = load("tiny")
    points, rows = [], []
    for name, prompt_of, schema in WORKLOADS:
        for constrained in (False, True):
            r = run(loaded, args.n, args.max_tokens, prompt_of, schema, constrained)
            bench.progress(f"{name}, constrained={constrained}: {r['steps_per_canvas']:.2f} steps per canvas")
            points.append({"workload": name, "constrained": constrained, **{k: round(v, 3) for k, v in r.items()}})
            rows.append([name, "JSON schema (constrained)" if constrained else "free text", r["tokens"],
                         f"{r['tokens_per_forward']:.2f}", f"{r['steps_per_canvas']:.2f}", f"{r['seconds']:.1f}",
                         f"{r['valid']}/{args.n}"])
    table = md_table(["workload", "output", "new tokens", "tokens per forward", "steps per canvas", "seconds",
                      "valid for the schema"], rows)
    notes = [f"tiny model, exact mode, 1 thread; {args.n} chat requests per workload (seed = index), max_tokens "
             f"{args.max_tokens}, batched in one engine", bench.command()]
    bench.finish({"n": args.n, "max_tokens": args.max_tokens, "points": points}, table, args.out, notes)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
