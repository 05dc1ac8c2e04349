"""``dgserve batch``: generate for every row of a JSONL/Parquet file on an autoscaled pool of engines (Ray Data).

Re-running the same command after a crash resumes: rows whose id is already in the output are skipped.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import TextIO

from pydantic import ValidationError

from dgserve.config import DEFAULT_MODEL
from dgserve.deploy.batch import BatchError, BatchJob, Progress, run_batch
from dgserve.deploy.cli_support import EXECUTION_HELP, UsageError, add_quantization_args

BAR_WIDTH = 24


class ProgressBar:
    """One status line on stderr: redrawn in place on a terminal, a line every few seconds otherwise."""

    def __init__(self, stream: TextIO | None = None, interval_s: float | None = None) -> None:
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.interval_s = interval_s if interval_s is not None else (0.2 if self.tty else 5.0)
        self._last = 0.0

    @staticmethod
    def line(p: Progress) -> str:
        todo = max(p.total_rows - p.skipped, 0)
        handled = p.done + p.errors
        frac = min(handled / todo, 1.0) if todo else 1.0
        filled = int(frac * BAR_WIDTH)
        bar = "#" * filled + "-" * (BAR_WIDTH - filled)
        rate = handled / p.elapsed_s if p.elapsed_s > 0 else 0.0
        eta = f"  eta {int((todo - handled) / rate)}s" if rate > 0 and handled < todo else ""
        skipped = f"  ({p.skipped} already done)" if p.skipped else ""
        return (f"[{bar}] {handled}/{todo} rows{skipped}  {p.errors} errors  {p.tokens_per_s:,.0f} tokens/s  "
                f"{len(p.workers)} workers{eta}")

    def __call__(self, p: Progress, final: bool = False) -> None:
        now = time.monotonic()
        if not final and now - self._last < self.interval_s:
            return
        self._last = now
        if self.tty:
            self.stream.write("\r\033[K" + self.line(p) + ("\n" if final else ""))
        else:
            self.stream.write(self.line(p) + "\n")
        self.stream.flush()


def run(fields: dict) -> int:
    quiet = fields.pop("quiet", False)
    try:
        job = BatchJob(**fields)
    except ValidationError as exc:
        err = exc.errors()[0]
        if err["loc"]:
            raise  # the CLI names the option
        raise UsageError(err["msg"].removeprefix("Value error, ")) from None
    bar = None if quiet else ProgressBar()
    last: list[Progress] = []

    def on_progress(p: Progress) -> None:
        last[:] = [p]
        if bar is not None:
            bar(p)

    try:
        summary = run_batch(job, on_progress=on_progress)
    except BatchError as exc:
        raise UsageError(str(exc)) from None
    if bar is not None and last:
        bar(last[0], final=True)
    print(f"{summary.written} rows written to {summary.output} ({summary.skipped} were already there), "
          f"{summary.errors} errors in {summary.errors_file}; {summary.tokens} tokens in {summary.seconds:.1f} s "
          f"({summary.tokens / summary.seconds if summary.seconds > 0 else 0:,.0f} tokens/s) on up to "
          f"{summary.workers} workers", file=sys.stderr)
    if summary.errors:
        print(f"dgserve batch: {summary.errors} of {summary.total_rows} rows failed; each is listed with its reason "
              f"in {summary.errors_file} (exit status 1)", file=sys.stderr)
        return 1
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "batch", help="generate for every row of a JSONL/Parquet file on an autoscaled pool of engines",
        description="Input rows: {\"id\": ..., \"prompt\": \"...\"} or {\"id\": ..., \"messages\": [...]} (optional "
                    "\"max_tokens\", \"seed\"). Output rows: id, text, finish_reason, prompt_tokens, "
                    "completion_tokens. Rows that fail go to the errors file; rerunning resumes. Exit status 0 "
                    "when every row was written, 1 when some rows failed, 2 for a bad job.")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"checkpoint directory, preset or Hugging Face model id "
                                                          f"(default {DEFAULT_MODEL})")
    p.add_argument("--revision", help="with a Hugging Face model id: its branch, tag or commit (default main)")
    p.add_argument("--input", required=True, help="prompts, .jsonl or .parquet")
    p.add_argument("--output", required=True, help="results, .jsonl or .parquet (resumed if it exists)")
    p.add_argument("--errors", help="errors file (default OUTPUT.errors.jsonl)")
    p.add_argument("--min-workers", type=int, default=1, help="engine actors kept up (default 1)")
    p.add_argument("--max-workers", type=int, help="the pool grows up to this many under backlog (default: min)")
    p.add_argument("--address", help="Ray cluster address (default: start a local Ray)")
    p.add_argument("--max-tokens", type=int, default=256, help="per row, unless the row sets max_tokens")
    p.add_argument("--seed", type=int, help="derive each row's seed from this and its id (reproducible)")
    p.add_argument("--steps", type=int, help="max denoising steps per canvas (default: the checkpoint's)")
    p.add_argument("--batch-size", type=int, default=32, help="prompts run together by one engine (default 32)")
    p.add_argument("--worker-cpus", type=float, default=1.0, help="CPUs per engine actor (default 1)")
    p.add_argument("--worker-gpus", type=float, default=0.0, help="GPUs per engine actor (default 0; 1 on GPUs)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="weight and activation dtype (default float32)")
    add_quantization_args(p)
    p.add_argument("--vision", default="auto", choices=["auto", "off"],
                   help="auto: chat rows may hold image_url parts (data: URLs); off: text only, no vision weights")
    p.add_argument("--kv-cache-memory", type=int, help="KV cache bytes per engine (default: what the engine's "
                                                       "running sequences at full context need, at most half the "
                                                       "free memory)")
    p.add_argument("--execution", default="auto", choices=["auto", "exact", "fast"], help=EXECUTION_HELP)
    p.add_argument("--flush-rows", type=int, default=256, help="rows per durable part file (default 256)")
    p.add_argument("--flush-seconds", type=float, default=10.0, help="longest wait before results are durable")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    p.set_defaults(handler=run)
