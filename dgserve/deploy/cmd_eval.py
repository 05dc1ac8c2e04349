"""``dgserve eval``: held-out denoising loss, synthetic-task exact match and tokens/s of a trained
checkpoint over a grid of sampler settings (the speed/quality curve)."""

from __future__ import annotations

import argparse
import json

from pydantic import BaseModel, ConfigDict, Field

from dgserve.deploy.cli_support import THREADS_HELP


class EvalArgs(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    model: str = "tiny"
    n: int = Field(100, ge=1, le=100_000)
    entropy_bounds: list[float] = Field(default_factory=lambda: [0.05, 0.1, 0.3], min_length=1)
    max_steps: list[int] = Field(default_factory=lambda: [8, 16, 48], min_length=1)
    loss: bool = True
    json_output: bool = False
    threads: int = Field(1, ge=1, le=256)


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def run(args: EvalArgs) -> int:
    import torch

    from dgserve.model.checkpoint import load
    from dgserve.train.evaluate import TEXT_PROMPTS, complete, heldout_loss, sweep
    from dgserve.train.paths import resolve_model

    torch.set_num_threads(args.threads)
    loaded = load(resolve_model(args.model))
    if loaded.tokenizer is None:
        raise ValueError(f"{args.model}: the checkpoint has no tokenizer.json; eval needs one")
    losses = heldout_loss(loaded) if args.loss else {}
    results = sweep(loaded, n=args.n, entropy_bounds=args.entropy_bounds, max_steps=args.max_steps)
    samples = {p: loaded.tokenizer.decode(complete(loaded, p, 64, seed=0).token_ids) for p in TEXT_PROMPTS}
    if args.json_output:
        print(json.dumps({"model": loaded.source, "heldout_loss": losses,
                          "settings": [r.as_dict() for r in results], "samples": samples}))
        return 0
    print(f"model {loaded.source}")
    if losses:
        print("held-out denoising loss (nats/token): " + ", ".join(f"{k} {v}" for k, v in losses.items()))
    print(f"{'entropy_bound':>13} {'max_steps':>9} {'sort_exact':>10} {'tokens/s':>9} {'tok/fwd':>7} "
          f"{'steps/canvas':>12}")
    for r in results:
        print(f"{r.entropy_bound:>13g} {r.max_steps:>9d} {r.sort_exact_match:>10.3f} {r.tokens_per_second:>9.1f} "
              f"{r.tokens_per_forward:>7.2f} {r.steps_per_canvas:>12.1f}")
    for prompt, text in samples.items():
        print(f"{prompt!r} -> {text!r}")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="quality/speed of a trained checkpoint (held-out loss, task accuracy, tokens/s)",
                       description="Evaluate a trained checkpoint: held-out denoising loss, exact match on the "
                                   "synthetic sorting task and tokens/s, over a grid of sampler settings.")
    p.add_argument("--model", default="tiny", help="checkpoint directory or preset (default tiny)")
    p.add_argument("--n", type=int, default=100, help="held-out sorting problems per setting (default 100)")
    p.add_argument("--entropy-bounds", type=_floats, default=[0.05, 0.1, 0.3], help="comma list (0.05,0.1,0.3)")
    p.add_argument("--max-steps", type=_ints, default=[8, 16, 48], help="comma list (8,16,48)")
    p.add_argument("--no-loss", dest="loss", action="store_false", help="skip the held-out loss")
    p.add_argument("--json", dest="json_output", action="store_true", help="print one JSON object")
    p.add_argument("--threads", type=int, default=1, help=THREADS_HELP)
    p.set_defaults(handler=lambda ns: run(EvalArgs(**ns)))
