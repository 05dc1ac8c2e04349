"""Command-line arguments every CPU benchmark shares: the model preset (with ``--small`` for the smoke test),
torch threads, seed and where the JSON record goes; and the comma-separated integer lists several take."""

from __future__ import annotations

import argparse

from dgserve.model.config import PRESETS

THREADS_HELP = "torch threads (default: one per core)"


def add_preset_args(p: argparse.ArgumentParser, small_help: str) -> None:
    """``--small`` (tiny-random at the smallest sizes: the smoke test) and ``--preset``."""
    p.add_argument("--small", action="store_true", help=small_help)
    p.add_argument("--preset", default=None, help="model preset (default bench-cpu; --small: tiny-random)")


def add_run_args(p: argparse.ArgumentParser, threads_help: str = THREADS_HELP) -> None:
    """``--threads``, ``--seed`` and ``--out``."""
    p.add_argument("--threads", type=int, default=0, help=threads_help)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="append the JSON record to this file")


def resolve_preset(p: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    """Fill in the default preset and reject an unknown one (exits with a usage error)."""
    a.preset = a.preset or ("tiny-random" if a.small else "bench-cpu")
    if a.preset not in PRESETS:
        p.error(f"--preset {a.preset!r}: choose one of {', '.join(sorted(PRESETS))}")


def int_list(p: argparse.ArgumentParser, flag: str, text: str) -> list[int]:
    """``"1,8,16"`` -> sorted distinct positive integers; anything else exits with a usage error."""
    try:
        values = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        values = []
    if not values or values[0] < 1:
        p.error(f"{flag}: comma-separated positive integers")
    return values
