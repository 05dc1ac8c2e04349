"""Batch invariance on CPU: the row-count probe at the models' own shapes, and MoE dispatch on one device (grouped
and per-run expert MLPs agree; a segment's expert outputs do not depend on the other segments packed into the
same forward). The engine-level tests are in test_engine.py, the EP ones in test_ep.py, the served ones in
test_serving.py."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from dgserve.model.batch_invariance import PINNED_MKL_PATH, PROBE_ROWS, blas_path, short_row_limit
from dgserve.model.config import PRESETS
from dgserve.model.diffusion_gemma import DiffusionGemma
from dgserve.model.moe import ExpertWeights, LocalDispatcher, expert_runs, grouped_expert_mlp

HIDDEN, INTER, EXPERTS, TOP_K = 64, 48, 8, 2


@pytest.fixture(scope="module")
def experts() -> ExpertWeights:
    g = torch.Generator().manual_seed(0)
    ex = ExpertWeights(HIDDEN, INTER, list(range(EXPERTS)))
    ex.gate_up_proj.copy_(torch.randn(ex.gate_up_proj.shape, generator=g) * 0.2)
    ex.down_proj.copy_(torch.randn(ex.down_proj.shape, generator=g) * 0.2)
    return ex


def _routing(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x = torch.randn(n, HIDDEN, generator=g)
    index = torch.stack([torch.randperm(EXPERTS, generator=g)[:TOP_K] for _ in range(n)])
    weights = torch.softmax(torch.randn(n, TOP_K, generator=g), dim=-1)
    return x, index, weights


def test_grouped_kernel_equals_per_expert_runs(experts):
    g = torch.Generator().manual_seed(1)
    counts = torch.tensor([0, 3, 1, 17, 0, 2, 40, 5])
    x = torch.randn(int(counts.sum()), HIDDEN, generator=g)
    runs = [(e, int(n)) for e, n in enumerate(counts.tolist())]
    assert torch.equal(grouped_expert_mlp(x, counts, experts), expert_runs(x, runs, experts))


@pytest.mark.parametrize("threads", [1, 2])
def test_segment_outputs_do_not_depend_on_batch_mates(experts, threads):
    """Short segments (few rows per expert, where BLAS takes other code paths) packed with long ones: each
    segment's rows come out bit-identical to a dispatch of that segment alone."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(2)
        lengths = [3, 32, 1, 7, 64, 2]
        parts = [_routing(n, g) for n in lengths]
        x, index, weights = (torch.cat([p[i] for p in parts]) for i in range(3))
        dispatcher = LocalDispatcher()
        before_counts = experts.routed.clone()
        packed = dispatcher(0, x, index, weights, experts, lengths)
        # routing counts for metrics are per expert, whatever the grouping
        routed = (experts.routed - before_counts).tolist()
        assert routed == torch.bincount(index.reshape(-1), minlength=EXPERTS).tolist()
        alone = torch.cat([dispatcher(0, *p, experts, [n]) for p, n in zip(parts, lengths, strict=True)])
        assert torch.equal(packed, alone)
    finally:
        torch.set_num_threads(before)


def test_mkl_is_pinned_to_one_code_path():
    """Importing dgserve pins MKL's code path (unless the user chose one), so the probe below finds the same
    limits on Intel and AMD CPUs; the test process runs with it."""
    assert blas_path() == os.environ.get("MKL_CBWR", PINNED_MKL_PATH)
    assert blas_path() is not None


@pytest.mark.parametrize("preset", ["tiny-random", "bench-cpu"])
@pytest.mark.parametrize("threads", [1, 2])
def test_short_row_limit_holds_at_the_model_shapes(preset, threads):
    """The probe's answer at a model's matmul shapes holds for those shapes in other calls: from ``limit`` rows
    on, each row comes out as in a much longer call, wherever it sits in it (what the engine relies on when it
    packs a prompt with other work)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.device("meta"):
            shapes = DiffusionGemma(PRESETS[preset]).packed_linear_shapes()
        assert len(shapes) >= 4  # q/k/v/o, dense MLP, router: several distinct shapes
        limit = short_row_limit(torch.device("cpu"), torch.float32, shapes)
        assert 0 <= limit < PROBE_ROWS
        g = torch.Generator().manual_seed(3)
        for k, n in sorted(shapes):
            weight = torch.randn(n, k, generator=g)
            x = torch.randn(300, k, generator=g)
            full = F.linear(x, weight)
            for rows in range(max(limit, 1), 80):
                assert torch.equal(F.linear(x[:rows], weight), full[:rows]), (k, n, rows)
                assert torch.equal(F.linear(x[150:150 + rows], weight), full[150:150 + rows]), (k, n, rows)
    finally:
        torch.set_num_threads(before)


def test_short_row_limit_is_zero_off_cpu():
    assert short_row_limit(torch.device("meta"), torch.float32, [(64, 64)]) == 0
