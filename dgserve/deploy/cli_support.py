"""Shared bits of the CLI subcommands: the default model, the one-line error type, and the checks of the
device, quantization and thread options that several subcommands take."""

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


QUANTIZATION_HELP = ("fp8: e4m3 weights for the attention projections, dense MLP and experts, quantized at load "
                     "time (FP8 matmuls on CUDA compute capability >= 8.9, weight-only FP8 on older GPUs; needs "
                     "--dtype bfloat16 there); an FP8 checkpoint is read as it is (default none)")
FP8_EMULATION_HELP = ("with --quantization fp8 on a machine without such a GPU: emulate the FP8 arithmetic (the same "
                      "rounding, fp32 matmuls; slower than no quantization, for checking quality)")


def add_quantization_args(p) -> None:
    p.add_argument("--quantization", default="none", choices=["none", "fp8"], help=QUANTIZATION_HELP)
    p.add_argument("--fp8-emulation", action="store_true", help=FP8_EMULATION_HELP)


def check_quantization_flags(quantization: str, fp8_emulation: bool) -> None:
    if fp8_emulation and quantization != "fp8":
        raise UsageError("--fp8-emulation emulates FP8 weights: it needs --quantization fp8")


def check_quantization(quantization: str, fp8_emulation: bool, device: str, dtype: str) -> None:
    """``--quantization`` / ``--fp8-emulation`` against this machine's device: FP8 matmuls need a CUDA GPU, the
    emulation is used only when asked for (a ValueError saying so otherwise)."""
    check_quantization_flags(quantization, fp8_emulation)
    if quantization == "none":
        return
    import torch

    from dgserve.model.checkpoint import resolve_dtype
    from dgserve.model.quantization import plan

    plan(quantization, torch.device(check_device(device)), resolve_dtype(dtype), fp8_emulation)


def check_model_path(path: str, source: str) -> None:
    """A deploy config's ``model.path`` that cannot name a model anywhere (a mistyped preset) fails at build time,
    not on the cluster; a path that exists only there is fine when absolute."""
    from dgserve.model.checkpoint import CheckpointError, check_model_name

    try:
        check_model_name(path)
    except CheckpointError as exc:
        raise UsageError(f"{source}: model.path: {exc}") from None
