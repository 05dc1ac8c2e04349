"""The memory plan: where one GPU's memory goes with the published model in bf16, and how many canvases fit."""

from __future__ import annotations

import pytest
import torch

from dgserve.engine.kv_pages import block_bytes
from dgserve.engine.memory_plan import GIB, memory_plan
from dgserve.model.config import PRESETS

PUBLISHED = PRESETS["diffusiongemma-26b-a4b"]
H100, H200 = 80 * 10**9, 141 * 10**9


def test_published_model_on_one_h100_and_one_h200():
    """bf16 weights are 47 GiB (25.25B parameters). At 2,048 tokens of context per request, one H100 (80 GB) holds
    the KV of 63 canvases next to the weights, a 64-canvas step's activations and the canvas state; one H200
    (141 GB) holds 250. Most of a short request's KV is the sliding layers' 1,024-position window (25 of 30
    layers), so a longer context costs little more: 55 and 221 at 4,096 tokens."""
    h100 = memory_plan(PUBLISHED, torch.bfloat16, H100, context_tokens=2048)
    h200 = memory_plan(PUBLISHED, torch.bfloat16, H200, context_tokens=2048)
    assert round(h100.weight_bytes / GIB, 1) == 47.0
    assert (h100.max_canvases, h200.max_canvases) == (63, 250)
    assert (memory_plan(PUBLISHED, torch.bfloat16, H100, context_tokens=4096).max_canvases,
            memory_plan(PUBLISHED, torch.bfloat16, H200, context_tokens=4096).max_canvases) == (55, 221)
    sliding = block_bytes(PUBLISHED, "sliding", 16, torch.bfloat16)
    full = block_bytes(PUBLISHED, "full", 16, torch.bfloat16)
    assert sliding > 9 * full  # 25 sliding layers x 8 KV heads vs 5 full layers x 2 KV heads (x2 head dim)


@pytest.mark.parametrize("preset", ["tiny-random", "bench-cpu", "diffusiongemma-26b-a4b"])
@pytest.mark.parametrize("device_gib", [16, 80, 141])
def test_plan_adds_up_and_grows_with_memory(preset, device_gib):
    cfg = PRESETS[preset]
    plan = memory_plan(cfg, torch.bfloat16, device_gib * GIB)
    parts = (plan.weight_bytes + plan.reserve_bytes + plan.canvas_state_bytes + plan.step_workspace_bytes
             + plan.kv_budget_bytes)
    if plan.kv_budget_bytes > 0:
        assert parts == plan.device_bytes
        assert plan.max_canvases * plan.kv_bytes_per_sequence <= plan.kv_budget_bytes
    else:  # does not fit: nothing left for KV, no canvas
        assert plan.max_canvases == 0 and parts >= plan.device_bytes
    bigger = memory_plan(cfg, torch.bfloat16, 2 * device_gib * GIB)
    assert bigger.max_canvases >= plan.max_canvases
    assert memory_plan(cfg, torch.float32, device_gib * GIB).max_canvases <= plan.max_canvases
    assert plan.describe().startswith(f"{device_gib:.1f} GiB")


def test_fp8_weights_on_one_h100_fit_64_canvases_and_54_more():
    """FP8 weights (e4m3 attention projections, dense MLP and experts, fp32 scales per output channel; embedding,
    router, norms and self-conditioning in bf16) are 24.3 GiB, half of bf16's 47.0. One H100 (80 GB) then holds the
    KV of 118 canvases at 4,096 tokens of context (bf16: 55), 54 more than a 64-canvas batch, and 134 at 2,048
    (bf16: 63); the FP8 step workspace includes the per-token quantization of the expert rows."""
    fp8 = memory_plan(PUBLISHED, torch.bfloat16, H100, context_tokens=4096, quantization="fp8")
    bf16 = memory_plan(PUBLISHED, torch.bfloat16, H100, context_tokens=4096)
    assert round(fp8.weight_bytes / GIB, 1) == 24.3
    assert fp8.step_workspace_bytes > bf16.step_workspace_bytes
    assert (fp8.max_canvases, fp8.max_canvases - 64) == (118, 54)
    assert memory_plan(PUBLISHED, torch.bfloat16, H100, context_tokens=2048, quantization="fp8").max_canvases == 134


@pytest.mark.parametrize("preset", ["tiny-random", "bench-cpu", "diffusiongemma-26b-a4b"])
@pytest.mark.parametrize("quantization", ["none", "fp8"])
def test_weight_bytes_are_those_of_the_built_model(preset, quantization):
    """The plan's weight bytes against the state dict of the model as ``load`` builds it (on the meta device): within
    1% (the plan leaves out the norm weights)."""
    from dgserve.model.checkpoint import _empty_model
    from dgserve.model.quantization import QuantizationPlan

    cfg = PRESETS[preset]
    plan = QuantizationPlan(quantization, "emulated" if quantization == "fp8" else None)
    model = _empty_model(cfg, torch.bfloat16, torch.device("meta"), None, plan)
    built = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    assert abs(memory_plan(cfg, torch.bfloat16, 80 * GIB, quantization=quantization).weight_bytes / built - 1) < 0.01
