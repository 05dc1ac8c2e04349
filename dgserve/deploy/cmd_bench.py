"""``dgserve bench NAME [ARGS...]``: run one of the benchmark scripts under ``bench/`` by name.

The scripts live beside ``dgserve/`` in a source checkout (they are not part of the installed
package); this command finds them, runs the chosen one with the same interpreter and the checkout on
``PYTHONPATH``, passes every further argument through, and returns its exit status.
``dgserve bench --list`` shows what is available; ``dgserve bench NAME --help`` the script's options.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from dgserve.deploy.cli_support import UsageError

# name -> (script under bench/, what it measures); a script that is absent in this checkout is skipped
BENCHMARKS: dict[str, tuple[str, str]] = {
    "engine-vs-reference": ("engine_vs_reference.py", "dgserve engine vs transformers' generate (CPU)"),
    "diffusion-vs-ar": ("diffusion_vs_ar.py", "block diffusion vs autoregressive decoding, with a roofline"),
    "concurrency-curve": ("concurrency_curve.py", "tokens/s and time to first canvas vs concurrent requests"),
    "step-floor": ("step_floor.py", "matmul + multinomial-noise floor of a denoising step (exact-parity bound)"),
    "serving-overhead": ("serving_overhead.py", "HTTP + Ray Serve vs the engine in-process at saturation"),
    "ep-overhead": ("ep_overhead.py", "expert-parallel step split (CPU, gloo) + DGX H100 roofline"),
    "guidellm": ("guidellm_run.py", "guidellm's streaming benchmark against dgserve run, chat and completions"),
    "json-cost": ("json_cost.py", "JSON output by constrained denoising vs free text on the tiny model"),
    "filter-entropy": ("filter_entropy.py", "acceptance entropy filtered or not, with sampling filters (tiny)"),
    "fp8-quality": ("fp8_quality.py", "FP8 weights (CPU emulation) vs bf16: logits error, top-1, tiny's accuracy"),
    "gpu-suite": ("gpu_suite.sh", "the one-GPU suite (26B-A4B, random bf16 weights; --cpu-smoke on CPU)"),
}


class BenchArgs(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    name: str | None = None
    args: list[str] = Field(default_factory=list)
    list_benchmarks: bool = False


def bench_dir() -> Path:
    """``bench/`` of the source checkout this dgserve was imported from."""
    return Path(__file__).resolve().parents[2] / "bench"


def available() -> dict[str, Path]:
    root = bench_dir()
    return {name: root / script for name, (script, _) in BENCHMARKS.items() if (root / script).is_file()}


def command_for(name: str, args: list[str]) -> list[str]:
    scripts = available()
    if name not in scripts:
        known = ", ".join(scripts) or "none"
        where = bench_dir()
        hint = "" if where.is_dir() else f" ({where} is missing: run dgserve from a source checkout)"
        raise UsageError(f"unknown benchmark {name!r}; available: {known}{hint}")
    script = scripts[name]
    if script.suffix == ".sh":
        return ["bash", str(script), *args]
    return [sys.executable, str(script), *args]


def run(a: BenchArgs) -> int:
    if a.list_benchmarks or a.name is None:
        scripts = available()
        for name, (_, what) in BENCHMARKS.items():
            if name in scripts:
                print(f"{name:22s} {what}")
        if a.name is None and not a.list_benchmarks:
            print("\nusage: dgserve bench NAME [ARGS...]   (ARGS go to the script; NAME --help lists them)")
        return 0
    cmd = command_for(a.name, a.args)
    root = str(bench_dir().parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(x for x in (root, os.environ.get("PYTHONPATH")) if x),
           "PYTHON": sys.executable}
    return subprocess.call(cmd, env=env)


def add_parser(sub: argparse._SubParsersAction) -> None:
    g = sub.add_parser("bench", help="run a benchmark script from bench/ by name",
                       description="Run a benchmark script from bench/ by name; further arguments go to the script.")
    g.add_argument("name", nargs="?", help=f"one of: {', '.join(BENCHMARKS)}")
    g.add_argument("args", nargs=argparse.REMAINDER, help="arguments passed to the script")
    g.add_argument("--list", dest="list_benchmarks", action="store_true", help="list the benchmarks")
    g.set_defaults(handler=lambda ns: run(BenchArgs(**ns)))
