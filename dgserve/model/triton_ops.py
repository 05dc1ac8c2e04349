"""The Triton kernels the model calls, as torch custom ops: the fused MoE (``dgserve.kernels.fused_moe``) as the grouped
path of ``ExpertWeights`` (bf16/fp32 experts, or FP8 experts: W8A8 with per-token activation scales, or weight-only),
one FP8 projection (the dense layers' Triton backend), and the per-token activation quantization
(``dgserve.kernels.quantize``). As custom ops they stay one opaque call each inside ``torch.compile``'d layers, and
their launches are captured by CUDA graphs like any other kernel.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from dgserve.model.moe import ExpertWeights


@torch.library.custom_op("dgserve::fused_expert_mlp", mutates_args=())
def _fused_expert_mlp(x: torch.Tensor, counts: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor,
                      gate_up_scale: torch.Tensor | None, down_scale: torch.Tensor | None,
                      fp8_activations: bool) -> torch.Tensor:
    from dgserve.kernels import fused_moe
    from dgserve.model.quantization import quantize_rows

    return fused_moe.expert_mlp(x, counts, gate_up, down, gate_up_scale, down_scale,
                                quantize_rows if fp8_activations else None)


@_fused_expert_mlp.register_fake
def _(x, counts, gate_up, down, gate_up_scale, down_scale, fp8_activations):
    return x.new_empty(x.shape)


def fused_expert_mlp(x: torch.Tensor, counts: torch.Tensor, experts: ExpertWeights) -> torch.Tensor:
    """``[N, H]`` expert outputs of rows grouped by local expert (``counts`` a device tensor), in x's dtype."""
    gate_up_scale = getattr(experts, "gate_up_proj_scale", None)
    down_scale = getattr(experts, "down_proj_scale", None)
    w8a8 = getattr(experts, "compute", None) in ("w8a8", "emulated")
    return _fused_expert_mlp(x, counts, experts.gate_up_proj, experts.down_proj, gate_up_scale, down_scale, w8a8)


@torch.library.custom_op("dgserve::fp8_linear_triton", mutates_args=())
def fp8_linear_triton(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                      fp8_activations: bool) -> torch.Tensor:
    """``x [T, K] @ (weight [N, K] * scale [N])^T`` through the grouped kernel with one group (W8A8, or weight-only
    FP8 with the weight converted in the kernel); x's dtype."""
    from dgserve.kernels import fused_moe
    from dgserve.model.quantization import quantize_rows

    counts = torch.full((1,), x.shape[0], dtype=torch.int32, device=x.device)
    return fused_moe.grouped_linear(x, counts, weight[None], scale[None], quantize_rows if fp8_activations else None)


@fp8_linear_triton.register_fake
def _(x, weight, scale, fp8_activations):
    return x.new_empty(x.shape[0], weight.shape[0])


@torch.library.custom_op("dgserve::quantize_rows_triton", mutates_args=())
def quantize_rows_triton(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token FP8 quantization in one kernel: e4m3 ``[T, K]`` and fp32 scales ``[T, 1]``."""
    from dgserve.kernels import quantize

    return quantize.quantize_rows(x)


@quantize_rows_triton.register_fake
def _(x):
    return x.new_empty(x.shape, dtype=torch.float8_e4m3fn), x.new_empty(x.shape[0], 1, dtype=torch.float32)
