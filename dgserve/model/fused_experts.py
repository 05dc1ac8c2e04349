"""The Triton fused MoE (``dgserve.kernels.fused_moe``) as the grouped path of ``ExpertWeights``, wrapped in a
torch custom op so that ``torch.compile`` keeps it as one opaque call (its launches are captured by CUDA
graphs like any other kernel). bf16/fp32 experts, or FP8 experts (W8A8 with per-token activation scales, or
weight-only, as the experts' ``compute`` says).
"""

from __future__ import annotations

import torch

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
