"""Reading checkpoints that are already FP8: the layout of published FP8 checkpoints (``quantization_config`` in
``config.json``; ``F8_E4M3`` weights each with a ``weight_scale`` tensor), checked, and each tensor's scales brought
to dgserve's shape (one fp32 scale per output channel).

Supported: compressed-tensors ``float-quantized`` checkpoints with 8-bit float weights scaled per channel or per
tensor (llm-compressor's ``FP8_DYNAMIC`` and ``FP8`` schemes; static activation scales are read past, activations
are always quantized per token at run time), and ``fbgemm_fp8``. Packed expert tensors (``experts.gate_up_proj``)
carry their scales as ``experts.gate_up_proj_scale``. Anything else (block-wise FP8, integer or 4-bit formats,
e5m2 weights) is refused with the reason.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from dgserve.model.quantization import FP8, QuantizationError

log = logging.getLogger(__name__)

FP8_STORAGE = {"F8_E4M3": FP8}
_REFUSED_FP8 = {"F8_E5M2": "e5m2", "F8_E4M3FNUZ": "e4m3fnuz", "F8_E5M2FNUZ": "e5m2fnuz"}
_SUPPORTED = ("compressed-tensors 'float-quantized' with 8-bit float weights scaled per channel or per tensor "
              "(llm-compressor's FP8_DYNAMIC / FP8 schemes), or fbgemm_fp8")


@dataclass(frozen=True)
class Fp8Layout:
    """How a pre-quantized checkpoint stores its FP8 weights (from ``config.json``'s ``quantization_config``)."""

    method: str
    weight_strategies: tuple[str, ...]
    activations: str  # "dynamic per token", "static per tensor (read past: dgserve quantizes per token)", "none"


def read_layout(raw: dict[str, Any], source: str) -> Fp8Layout | None:
    """The checkpoint's FP8 layout, None if it has no ``quantization_config``; QuantizationError for a layout dgserve
    cannot load, naming what is unsupported."""
    qc = raw.get("quantization_config")
    if qc is None:
        return None
    where = f"{source}: quantization_config"
    if not isinstance(qc, dict):
        raise QuantizationError(f"{where} is not an object")
    method = qc.get("quant_method")
    if method == "fbgemm_fp8":
        return Fp8Layout(method, ("channel",), "dynamic per token")
    if method == "fp8":
        block = qc.get("weight_block_size")
        raise QuantizationError(f"{where}: quant_method 'fp8' with weight_block_size {block} (block-wise scales, "
                                f"weight_scale_inv tensors) is not supported; dgserve loads {_SUPPORTED}")
    if method != "compressed-tensors":
        raise QuantizationError(f"{where}: quant_method {method!r} is not supported; dgserve loads {_SUPPORTED}")
    fmt = qc.get("format")
    if fmt not in ("float-quantized", "naive-quantized"):
        raise QuantizationError(f"{where}: format {fmt!r} is not supported; dgserve loads {_SUPPORTED}")
    groups = qc.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise QuantizationError(f"{where}: no config_groups")
    strategies, activations = set(), set()
    for gname, group in groups.items():
        w = (group or {}).get("weights") or {}
        at = f"{where}.config_groups.{gname}"
        if w.get("num_bits") != 8 or w.get("type") != "float":
            raise QuantizationError(f"{at}.weights: {w.get('num_bits')}-bit {w.get('type')} weights are not supported; "
                                    f"dgserve loads {_SUPPORTED}")
        if w.get("strategy") not in ("channel", "tensor"):
            raise QuantizationError(f"{at}.weights: strategy {w.get('strategy')!r} is not supported (per-channel or "
                                    "per-tensor scales only; block and group scales are not)")
        strategies.add(w["strategy"])
        act = (group or {}).get("input_activations")
        if not act:
            activations.add("none")
        elif act.get("num_bits") != 8 or act.get("type") != "float":
            raise QuantizationError(f"{at}.input_activations: {act.get('num_bits')}-bit {act.get('type')} "
                                    "activations are not supported (8-bit float or none)")
        else:
            activations.add("dynamic per token" if act.get("dynamic") else
                            "static per tensor (read past: dgserve quantizes per token)")
    layout = Fp8Layout(method, tuple(sorted(strategies)), "; ".join(sorted(activations)))
    log.info("%s: pre-quantized FP8 checkpoint (%s, weights per %s, activations %s)", source, method,
             "/".join(layout.weight_strategies), layout.activations)
    return layout


def check_storage(dtype: str, where: str, layout: Fp8Layout | None) -> None:
    """An FP8 tensor in the files: allowed in e4m3 with a quantization_config saying how it is scaled."""
    if dtype in _REFUSED_FP8:
        raise QuantizationError(f"{where} is stored as {_REFUSED_FP8[dtype]}; dgserve loads e4m3 (F8_E4M3) weights")
    if layout is None:
        raise QuantizationError(f"{where} is stored as {dtype} but config.json has no quantization_config saying how "
                                "it is scaled")


def scales(raw: torch.Tensor, weight_shape: list[int], where: str) -> torch.Tensor:
    """A checkpoint's scale tensor of a weight ``[..., out, in]`` -> fp32 ``[..., out]``: per channel ``[..., out]`` /
    ``[..., out, 1]``, per tensor (one value, or one per expert of a packed tensor), broadcast to every channel."""
    lead, out = weight_shape[:-2], weight_shape[-2]
    n_lead = 1
    for d in lead:
        n_lead *= d
    t = raw.float()
    if t.numel() == n_lead * out:
        return t.reshape(*lead, out)
    if t.numel() == n_lead:
        return t.reshape(*lead, 1).expand(*lead, out).contiguous()
    if t.numel() == 1:
        return t.reshape([1] * (len(lead) + 1)).expand(*lead, out).contiguous()
    raise QuantizationError(f"{where} has shape {list(raw.shape)} for a weight of shape {weight_shape}; expected one "
                            f"scale per output channel ({[*lead, out]}) or per tensor (block-wise scales are not "
                            "supported)")


def scale_tensor_name(ckpt_name: str) -> str:
    """``...q_proj.weight`` -> ``...q_proj.weight_scale``; ``...experts.gate_up_proj`` -> ``..._scale``."""
    return ckpt_name + "_scale"


def compressed_tensors_config() -> dict[str, Any]:
    """The ``quantization_config`` of an FP8 model dgserve writes: compressed-tensors' FP8_DYNAMIC scheme (e4m3
    weights with a scale per output channel, activations quantized per token at run time)."""
    return {
        "quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
        "config_groups": {"group_0": {
            "targets": ["Linear"],
            "weights": {"num_bits": 8, "type": "float", "strategy": "channel", "symmetric": True, "dynamic": False},
            "input_activations": {"num_bits": 8, "type": "float", "strategy": "token", "symmetric": True,
                                  "dynamic": True}}},
        "ignore": ["lm_head", "re:.*router.*", "re:.*self_conditioning.*"],
    }
