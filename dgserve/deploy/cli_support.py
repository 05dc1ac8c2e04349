"""Shared bits of the CLI subcommands: the default model, the one-line error type, and the checks of the
device and thread options that several subcommands take."""

from __future__ import annotations

import re

DEVICES = ("auto", "cpu", "cuda")
EXECUTION_HELP = ("exact: bit-identical to the reference on CPU fp32 and batch-invariant; fast: static-shape rows, "
                  "no host syncs, compiled and CUDA-graphed on a GPU, counter-based sampling (default auto: fast on "
                  "CUDA, exact elsewhere)")
THREADS_HELP = ("torch CPU threads (default 1: on a busy machine more threads than free cores make every step "
                "many times slower; outputs depend on the count, so keep it fixed to reproduce a seed)")


class UsageError(Exception):
    """A user-caused error the CLI reports in one line (exit status 2)."""


def check_device(device: str) -> str:
    """``auto`` (CUDA if there is a GPU, else CPU), ``cpu``, ``cuda`` or ``cuda:N``, checked against this machine:
    a device that is not there is a ValueError that says so, not a torch traceback later."""
    if device not in DEVICES and not re.fullmatch(r"cuda:\d+", device):
        raise ValueError(f"{device!r} is not a device; use one of {', '.join(DEVICES)} or cuda:N")
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            why = "this torch is built without CUDA" if torch.version.cuda is None else "no GPU is visible"
            raise ValueError(f"{device}: CUDA is not available on this machine ({why}; torch {torch.__version__}); "
                             "use cpu")
        index = int(device.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise ValueError(f"{device}: this machine has {torch.cuda.device_count()} GPU(s)")
    return device


def check_model_path(path: str, source: str) -> None:
    """A deploy config's ``model.path`` that cannot name a model anywhere (a mistyped preset) fails at build time,
    not on the cluster; a path that exists only there is fine when absolute."""
    from dgserve.model.checkpoint import CheckpointError, check_model_name

    try:
        check_model_name(path)
    except CheckpointError as exc:
        raise UsageError(f"{source}: model.path: {exc}") from None
