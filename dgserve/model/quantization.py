"""FP8 weights (``model.quantization: fp8``): e4m3 weights with one fp32 scale per output channel for the attention
projections, the dense MLP and the experts; the tied embedding / LM head, the router, the norms and the
self-conditioning MLP stay in the model dtype.

How a quantized matmul computes (``Fp8Compute``, chosen per device at load time):

- ``w8a8`` (CUDA, compute capability >= 8.9): activations quantized per token with a dynamic scale, fp8 x fp8
  products accumulated in fp32 (``torch._scaled_mm`` / ``torch._scaled_grouped_mm``, or the Triton kernels where
  torch has no kernel for the card or the shape), both scales applied to the fp32 result;
- ``weight_only`` (older GPUs): bf16 activations, the fp8 weights converted in the kernel (Triton), the channel
  scale applied to the result;
- ``emulated`` (CPU, only when asked for): ``w8a8``'s arithmetic written out: the same quantization of weights and
  activations, the products of the fp8 values in fp32, the same scaling. Tests and quality checks run it.

The modules are swapped in on the meta device before the weights are allocated (:func:`convert_`), so a
checkpoint is quantized tensor by tensor as it is read (``dgserve.model.fp8_checkpoint``).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from dgserve.model.config import ModelConfig
from dgserve.model.moe import ExpertBatch, ExpertWeights, expert_runs, grouped_mm, grouped_mm_supported
from dgserve.model.triton_ops import fp8_linear_triton, fused_expert_mlp, quantize_rows_triton

log = logging.getLogger(__name__)

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448
_TINY = 1e-12  # floor of an all-zero row's amax: its scale stays finite and its values quantize to 0
Quantization = Literal["none", "fp8"]
Fp8Compute = Literal["w8a8", "weight_only", "emulated"]
QUANTIZED_LINEARS = {"self_attn": ("q_proj", "k_proj", "v_proj", "o_proj"), "mlp": ("gate_proj", "up_proj",
                                                                                      "down_proj")}


class QuantizationError(ValueError):
    """A quantization setting this machine or model cannot run; the message says what to change."""


CPU_FP8_MESSAGE = ("FP8 compute needs a CUDA GPU of compute capability >= 8.9 (FP8 matmuls; older CUDA GPUs run FP8 "
                   "weights with bf16 matmuls), and this model is on {device}. To check FP8 numerics on a CPU, ask "
                   "for the emulation explicitly: --fp8-emulation (model.fp8_emulation: true); it rounds as the GPU "
                   "does and multiplies in fp32, so it is slower than the unquantized model, not faster")


@dataclass(frozen=True)
class QuantizationPlan:
    """What ``checkpoint.load`` builds: the method and, for FP8, how its matmuls compute on the target device."""

    method: Quantization = "none"
    compute: Fp8Compute | None = None

    @property
    def fp8(self) -> bool:
        return self.method == "fp8"


def plan(method: str, device: torch.device, dtype: torch.dtype, emulation: bool = False) -> QuantizationPlan:
    """Check a quantization setting against the device and dtype; raises QuantizationError saying what to change."""
    if method == "none":
        return QuantizationPlan()
    if method != "fp8":
        raise QuantizationError(f"quantization {method!r}: use 'none' or 'fp8'")
    if emulation:
        return QuantizationPlan("fp8", "emulated")
    if device.type != "cuda":
        raise QuantizationError(CPU_FP8_MESSAGE.format(device=device.type))
    if dtype != torch.bfloat16:
        raise QuantizationError(f"quantization fp8 on CUDA computes in bfloat16; got dtype {dtype} "
                                "(use --dtype bfloat16, model.dtype: bfloat16)")
    major, minor = torch.cuda.get_device_capability(device)
    return QuantizationPlan("fp8", "w8a8" if (major, minor) >= (8, 9) else "weight_only")


# -- quantizing ---------------------------------------------------------------------------------------------------


def quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[..., out, in]`` -> e4m3 ``[..., out, in]`` and fp32 scales ``[..., out]`` (the channel's amax / 448)."""
    scale = w.abs().amax(-1).float().clamp(min=_TINY) / FP8_MAX
    return (w.float() / scale.unsqueeze(-1)).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-token quantization of activations ``[T, K]`` -> e4m3 ``[T, K]`` and fp32 scales ``[T, 1]``; on a
    GPU one Triton kernel (``dgserve.kernels.quantize``, the same bits) where Triton runs."""
    if x.device.type == "cuda" and _triton_ok(x.device):
        return quantize_rows_triton(x)
    scale = x.abs().amax(-1, keepdim=True).float().clamp(min=_TINY) / FP8_MAX
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``q [..., out, in]`` with scales broadcastable to ``[..., out]`` -> ``dtype``."""
    return (q.float() * scale.float().unsqueeze(-1)).to(dtype)


QUANTIZE_CHUNK = 1 << 24  # elements quantized at once while loading: bounds the fp32 temporaries (64 MiB)


def quantize_into_(weight: torch.Tensor, scale: torch.Tensor, full: torch.Tensor, start: int = 0) -> None:
    """Quantize ``full`` (rows ``start..`` of ``weight`` along dim 0, on any device) into ``weight`` and ``scale``,
    a few rows at a time (scales are per output channel, so a slice of rows quantizes as the whole tensor would)."""
    per_row = max(1, full[0].numel()) if full.shape[0] else 1
    step = max(1, QUANTIZE_CHUNK // per_row)
    for i in range(0, full.shape[0], step):
        part = full[i:i + step].to(weight.device)
        q, s = quantize_weight(part)
        weight[start + i:start + i + part.shape[0]].copy_(q)
        scale[start + i:start + i + part.shape[0]].copy_(s)


def dequantize_into_(target: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> None:
    """``target`` (full precision) = ``q * scale`` per output channel, a few rows at a time on target's device (an FP8
    checkpoint read into an unquantized model)."""
    per_row = max(1, q[0].numel()) if q.shape[0] else 1
    step = max(1, QUANTIZE_CHUNK // per_row)
    for i in range(0, q.shape[0], step):
        target[i:i + step].copy_(dequantize(q[i:i + step].to(target.device), scale[i:i + step].to(target.device),
                                            target.dtype))


def is_fp8(t: torch.Tensor) -> bool:
    return t.dtype == FP8


def scale_name(weight_name: str) -> str:
    """The state-dict name of an FP8 weight's scales (``q_proj.weight`` -> ``q_proj.weight_scale``)."""
    return weight_name + "_scale"


# -- matmuls ------------------------------------------------------------------------------------------------------


@functools.cache
def _cuda_scaled_ops(index: int) -> tuple[bool, bool]:
    """Whether torch's row-wise ``_scaled_mm`` and ``_scaled_grouped_mm`` run on this GPU (which cards have kernels
    depends on the torch build, so it is asked, once, with a tiny call)."""
    dev = torch.device("cuda", index)
    a = torch.zeros(16, 32, dtype=FP8, device=dev)
    ones = torch.ones(16, 1, device=dev)
    try:
        torch._scaled_mm(a, a[:16].t(), scale_a=ones, scale_b=ones.t().contiguous(), out_dtype=torch.bfloat16)
        mm = True
    except (RuntimeError, NotImplementedError) as exc:
        log.info("torch._scaled_mm (row-wise) unavailable on %s: %s", torch.cuda.get_device_name(dev), exc)
        mm = False
    try:
        w = torch.zeros(2, 32, 32, dtype=FP8, device=dev)
        torch._scaled_grouped_mm(a, w.transpose(-2, -1), torch.ones(16, device=dev), torch.ones(2, 32, device=dev),
                                 offs=torch.tensor([8, 16], dtype=torch.int32, device=dev), out_dtype=torch.bfloat16)
        grouped = True
    except (RuntimeError, NotImplementedError, AttributeError) as exc:
        log.info("torch._scaled_grouped_mm unavailable on %s: %s", torch.cuda.get_device_name(dev), exc)
        grouped = False
    torch.cuda.synchronize(dev)
    return mm, grouped


def _triton_ok(device: torch.device) -> bool:
    return _triton_on(device.type)


@functools.cache
def _triton_on(device_type: str) -> bool:
    from dgserve import kernels

    return kernels.available(torch.device(device_type))


def linear_backend(compute: Fp8Compute, device: torch.device, in_features: int, out_features: int) -> str:
    """How an FP8 linear layer runs: ``scaled_mm``, ``triton`` (W8A8 or weight-only by ``compute``), ``dequant``
    (converts the weight per call: correct, slow; logged) or ``emulated``."""
    if compute == "emulated":
        return "emulated"
    aligned = in_features % 16 == 0 and out_features % 16 == 0
    if compute == "w8a8" and aligned and _cuda_scaled_ops(device.index or 0)[0]:
        return "scaled_mm"
    return "triton" if _triton_ok(device) else "dequant"


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, compute: Fp8Compute,
               backend: str) -> torch.Tensor:
    """``x [T, K] @ (weight * scale)^T`` -> ``[T, N]`` in x's dtype, as ``compute`` / ``backend`` say."""
    if backend == "emulated":
        q, s = quantize_rows(x)
        return ((q.float() @ weight.float().t()) * s * scale).to(x.dtype)
    if backend == "scaled_mm":
        q, s = quantize_rows(x)
        return torch._scaled_mm(q, weight.t(), scale_a=s, scale_b=scale[None], out_dtype=x.dtype)
    if backend == "triton":
        return fp8_linear_triton(x, weight, scale, compute == "w8a8")
    return F.linear(x, weight.to(x.dtype)) * scale.to(x.dtype)


class Fp8Linear(nn.Module):
    """A bias-optional linear layer with an e4m3 ``weight [out, in]`` and fp32 ``weight_scale [out]``."""

    def __init__(self, in_features: int, out_features: int, bias: bool, compute: Fp8Compute, backend: str) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.compute, self.backend = compute, backend
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=FP8), requires_grad=False)
        self.weight_scale = nn.Parameter(torch.empty(out_features, dtype=torch.float32), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = fp8_linear(x.reshape(-1, self.in_features), self.weight, self.weight_scale, self.compute, self.backend)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, fp8 {self.compute} via {self.backend}"


class Fp8ExpertWeights(ExpertWeights):
    """Packed FP8 experts: ``gate_up_proj [E, 2I, H]`` / ``down_proj [E, H, I]`` in e4m3 with scales
    ``gate_up_proj_scale [E, 2I]`` / ``down_proj_scale [E, H]``. Runs (exact mode) go expert by expert through
    :func:`fp8_linear`; the grouped path uses ``torch._scaled_grouped_mm`` (W8A8 where torch has the kernel), the
    Triton fused MoE (``kernel == "triton"``, and wherever torch has no FP8 grouped kernel), or the emulation."""

    def __init__(self, hidden: int, intermediate: int, expert_ids: list[int], compute: Fp8Compute,
                 device: torch.device) -> None:
        super().__init__(hidden, intermediate, expert_ids)
        n = len(expert_ids)
        self.compute = compute
        self.gate_up_proj = nn.Parameter(torch.empty(n, 2 * intermediate, hidden, dtype=FP8), requires_grad=False)
        self.down_proj = nn.Parameter(torch.empty(n, hidden, intermediate, dtype=FP8), requires_grad=False)
        self.gate_up_proj_scale = nn.Parameter(torch.empty(n, 2 * intermediate, dtype=torch.float32),
                                               requires_grad=False)
        self.down_proj_scale = nn.Parameter(torch.empty(n, hidden, dtype=torch.float32), requires_grad=False)
        self.dense_backend = linear_backend(compute, device, hidden, intermediate)  # exact mode's per-expert calls
        aligned = hidden % 16 == 0 and intermediate % 16 == 0
        if compute == "emulated":
            self.grouped_backend = "emulated"
        elif compute == "w8a8" and aligned and _cuda_scaled_ops(device.index or 0)[1]:
            self.grouped_backend = "scaled_grouped_mm"
        elif _triton_ok(device):
            self.grouped_backend = "triton"
        else:
            self.grouped_backend = "dequant"
            log.warning("FP8 experts on %s without torch's scaled grouped kernel or Triton: the weights are "
                        "converted to bf16 in every forward (correct, but slower than bf16 weights); install Triton "
                        "(pip install 'dgserve[kernels]')", device)

    def run_expert(self, local_index: int, x: torch.Tensor) -> torch.Tensor:
        gate, up = fp8_linear(x, self.gate_up_proj[local_index], self.gate_up_proj_scale[local_index], self.compute,
                              self.dense_backend).chunk(2, dim=-1)
        return fp8_linear(F.gelu(gate, approximate="tanh") * up, self.down_proj[local_index],
                          self.down_proj_scale[local_index], self.compute, self.dense_backend)

    def forward(self, batch: ExpertBatch) -> torch.Tensor:
        if batch.runs is not None:
            return expert_runs(batch.x, batch.runs, self)
        if batch.x.shape[0] == 0:
            return batch.x.new_empty(0, batch.x.shape[1])
        if self.kernel == "triton" or self.grouped_backend == "triton":
            return fused_expert_mlp(batch.x, batch.counts, self)
        if self.grouped_backend == "scaled_grouped_mm":
            return self._scaled_grouped(batch.x, batch.counts)
        if self.grouped_backend == "emulated":
            return self._emulated_grouped(batch.x, batch.counts)
        return self._dequantized_grouped(batch.x, batch.counts)

    def sync_free(self, x: torch.Tensor) -> bool:
        if self.grouped_backend == "emulated":
            return _f32_grouped_ok(x, self)
        if self.grouped_backend == "dequant" and self.kernel != "triton":
            return grouped_mm_supported(x, self)
        return True

    def _scaled_grouped(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        offs = torch.cumsum(counts, dim=0, dtype=torch.int32)
        q, s = quantize_rows(x)
        gate_up = torch._scaled_grouped_mm(q, self.gate_up_proj.transpose(-2, -1), s.view(-1), self.gate_up_proj_scale,
                                           offs=offs, out_dtype=x.dtype)
        gate, up = gate_up.chunk(2, dim=-1)
        q, s = quantize_rows(F.gelu(gate, approximate="tanh") * up)
        return torch._scaled_grouped_mm(q, self.down_proj.transpose(-2, -1), s.view(-1), self.down_proj_scale,
                                        offs=offs, out_dtype=x.dtype)

    def _emulated_grouped(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """W8A8 as the GPU computes it, in fp32 grouped matmuls (CPU), without a host sync where the shapes allow."""
        if not _f32_grouped_ok(x, self):
            return expert_runs(x, [(i, int(n)) for i, n in enumerate(counts.tolist())], self)
        offs = torch.cumsum(counts, dim=0, dtype=torch.int32)
        # each row's expert, for its channel scales: the group its index falls in (static shapes, no sync)
        expert = torch.searchsorted(offs, torch.arange(x.shape[0], device=x.device, dtype=torch.int32), right=True)
        expert = expert.clamp(max=counts.shape[0] - 1)
        q, s = quantize_rows(x)
        gate_up = grouped_mm(q.float(), self.gate_up_proj.float().transpose(-2, -1), offs)
        gate, up = (gate_up * s * self.gate_up_proj_scale.index_select(0, expert)).to(x.dtype).chunk(2, dim=-1)
        q, s = quantize_rows(F.gelu(gate, approximate="tanh") * up)
        y = grouped_mm(q.float(), self.down_proj.float().transpose(-2, -1), offs)
        return (y * s * self.down_proj_scale.index_select(0, expert)).to(x.dtype)

    def _dequantized_grouped(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        if not grouped_mm_supported(x, self):
            return expert_runs(x, [(i, int(n)) for i, n in enumerate(counts.tolist())], self)
        offs = torch.cumsum(counts, dim=0, dtype=torch.int32)
        gate_up = F.grouped_mm(x, dequantize(self.gate_up_proj, self.gate_up_proj_scale, x.dtype).transpose(-2, -1),
                               offs=offs)
        gate, up = gate_up.chunk(2, dim=-1)
        return F.grouped_mm(F.gelu(gate, approximate="tanh") * up,
                            dequantize(self.down_proj, self.down_proj_scale, x.dtype).transpose(-2, -1), offs=offs)


def _f32_grouped_ok(x: torch.Tensor, experts: ExpertWeights) -> bool:
    """The emulation's grouped matmuls are fp32 ``grouped_mm`` calls: their shape rules."""
    return grouped_mm_supported(x.new_empty(0, x.shape[-1], dtype=torch.float32), experts)


# -- building -----------------------------------------------------------------------------------------------------


def convert_(model: nn.Module, plan: QuantizationPlan, device: torch.device) -> None:
    """Swap in the FP8 modules of a ``DiffusionGemma`` built on the meta device (before its weights are allocated):
    attention projections, dense MLP and experts; everything else stays as built."""
    if not plan.fp8:
        return
    assert plan.compute is not None
    with torch.device("meta"):
        for layer in model.layers:
            for part, names in QUANTIZED_LINEARS.items():
                module = getattr(layer, part)
                for name in names:
                    lin = getattr(module, name, None)
                    if lin is None:
                        continue
                    setattr(module, name, Fp8Linear(
                        lin.in_features, lin.out_features, lin.bias is not None, plan.compute,
                        linear_backend(plan.compute, device, lin.in_features, lin.out_features)))
            old = layer.experts
            hidden, inter = old.down_proj.shape[1], old.down_proj.shape[2]
            layer.experts = Fp8ExpertWeights(hidden, inter, old.expert_ids, plan.compute, device)
    backends = sorted({m.backend for m in model.modules() if isinstance(m, Fp8Linear)}
                      | {m.grouped_backend for m in model.modules() if isinstance(m, Fp8ExpertWeights)})
    log.info("FP8 weights (%s) on %s: %s", plan.compute, device, ", ".join(backends))


def weight_bytes(config: ModelConfig, dtype: torch.dtype, method: Quantization = "none",
                 expert_share: float = 1.0) -> int:
    """Bytes of a model's weights: quantized matrices at one byte per element plus four per output channel, the rest
    in ``dtype``. ``expert_share``: the fraction of the experts held (an expert-parallel rank's)."""
    t = config.text
    counts = config.parameter_counts()
    elt = torch.empty((), dtype=dtype).element_size()
    experts = counts["experts"] * expert_share
    if method == "none":
        return int((counts["total"] - counts["experts"] + experts) * elt)
    h = t.hidden_size
    linear = linear_channels = 0
    for i in range(t.num_hidden_layers):
        hd, kvh, heads = t.layer_head_dim(i), t.layer_kv_heads(i), t.num_attention_heads
        kv = (2 if t.is_sliding(i) else 1) * kvh * hd
        linear += h * (2 * heads * hd + kv) + 3 * h * t.intermediate_size
        linear_channels += heads * hd + kv + h + 2 * t.intermediate_size + h
    expert_channels = t.num_hidden_layers * t.num_experts * (2 * t.moe_intermediate_size + h) * expert_share
    rest = counts["total"] - counts["experts"] - linear
    return int(rest * elt + linear + experts + 4 * (linear_channels + expert_channels))
