"""Triton kernels of the fast path: the fused denoising sampler (``dgserve.kernels.sampler``) and the fused MoE
(``dgserve.kernels.fused_moe``). This package imports no Triton itself; :func:`available` says whether a kernel can
run on a device (CUDA with Triton installed, or CPU tensors under ``TRITON_INTERPRET=1``, which is how the tests
run them), and :func:`resolve` turns a ``"auto" | "torch" | "triton"`` setting into the implementation to use.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Literal

import torch

KernelChoice = Literal["auto", "torch", "triton"]
KernelName = Literal["sampler", "moe"]

# What "auto" picks, per GPU model (torch.cuda.get_device_name) and kernel, decided by bench/gpu_suite.py's
# "sampler kernel vs torch fast path" and "Triton MoE vs grouped_mm" rows. Cards not listed, and any kernel not yet
# measured on a card, get the torch path (the one the fast-path tests and the earlier GPU runs validated).
MEASURED_DEFAULTS: dict[str, dict[str, str]] = {}


def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """Triton's CPU interpreter is on (it must be set before a kernel module is imported)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def available(device: torch.device) -> bool:
    """Whether the Triton kernels can run on ``device``."""
    if not triton_installed():
        return False
    if device.type == "cuda":
        return not interpreting()
    return device.type == "cpu" and interpreting()


def measured_default(device: torch.device, kernel: KernelName) -> str:
    if device.type != "cuda":
        return "torch"
    return MEASURED_DEFAULTS.get(torch.cuda.get_device_name(device), {}).get(kernel, "torch")


def resolve(choice: KernelChoice, kernel: KernelName, device: torch.device) -> Literal["torch", "triton"]:
    """The implementation a setting selects on ``device``: ``auto`` takes the measured default of the card;
    ``triton`` where Triton cannot run is a clear error."""
    if choice == "auto":
        picked = measured_default(device, kernel)
        return "triton" if picked == "triton" and available(device) else "torch"
    if choice == "triton" and not available(device):
        why = "Triton is not installed (pip install 'dgserve[kernels]')" if not triton_installed() else \
            f"Triton kernels run on CUDA devices (this model is on {device.type})"
        raise ValueError(f"{kernel}_kernel: triton: {why}; use 'torch' or 'auto'")
    return "triton" if choice == "triton" else "torch"


def dot_in_fp32(device: torch.device) -> bool:
    """The interpreter computes ``tl.dot`` of bf16 operands on their raw bits, so under it the kernels upcast
    their operands to fp32 first (bf16 and fp8 products are exact in fp32, so the result is the same)."""
    return device.type != "cuda"
