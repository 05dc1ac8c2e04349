"""Counting aten ops with a ``TorchDispatchMode``: the CPU proxies of GPU launch and sync overhead (used by
tests/test_fast_proxies.py and bench/fast_proxies.py)."""

from __future__ import annotations

import collections

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dgserve.engine import fast_step as fs
from dgserve.engine.runner import FastRunner, Row
from dgserve.model.config import PRESETS
from dgserve.model.diffusion_gemma import DiffusionGemma
from dgserve.model.generation_config import SamplingParams

# ops that only make views or change metadata: no kernel launch on a GPU
VIEW_OPS = {"view", "_unsafe_view", "reshape", "transpose", "permute", "expand", "slice", "select", "unsqueeze",
            "squeeze", "t", "as_strided", "detach", "alias", "split", "chunk", "unbind", "split_with_sizes",
            "lift_fresh", "_reshape_alias", "view_as", "contiguous"}
# ops that read a tensor's value on the host, or whose output size depends on values (a sync on a GPU)
SYNC_OPS = {"_local_scalar_dense", "item", "nonzero", "bincount", "multinomial", "unique", "_unique2",
            "unique_consecutive", "unique_dim", "masked_select", "is_nonzero", "equal", "allclose", "repeat_interleave",
            "tolist", "_assert_async"}
SAMPLING = SamplingParams(max_denoising_steps=16)


class OpLog(TorchDispatchMode):
    """Records every aten op with its arguments' devices; ``launching`` leaves out views and no-op casts."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()
        self.sync: list[str] = []
        self.cross_device: list[str] = []
        self.uses: collections.Counter[int] = collections.Counter()  # id(tensor argument) -> ops using it

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        out = func(*args, **kwargs)
        tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
        for a in tensors:
            self.uses[id(a)] += 1
        if name in SYNC_OPS or (name in ("index", "index_put_", "index_put") and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] if len(args) > 1 else []))):
            self.sync.append(name)
        if len({a.device for a in tensors} | ({out.device} if isinstance(out, torch.Tensor) else set())) > 1:
            self.cross_device.append(name)
        no_op_cast = name in ("to", "type_as") and out is (args[0] if args else None)
        if name not in VIEW_OPS and not no_op_cast:
            self.ops[name] += 1
        return out

    @property
    def launching(self) -> int:
        return sum(self.ops.values())


def meta_model(preset: str) -> DiffusionGemma:
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("meta"):
            return DiffusionGemma(PRESETS[preset])
    finally:
        torch.set_default_dtype(old)


STEADY_SAMPLING = SamplingParams(max_denoising_steps=16)


def denoise_rows(runner: FastRunner, n: int, prefix: int = 300) -> list[Row]:
    c = runner.canvas
    table = runner.pool.new_table()
    assert runner.pool.ensure_capacity(table, prefix + c)
    table.mark_written(prefix)
    return [Row(fs.DENOISE, i, prefix, table, c, fresh=False, cur_step=5, sampling=STEADY_SAMPLING, seed=i)
            for i in range(n)]


def step_input(runner: FastRunner, rows: list[Row]) -> tuple[fs.StepLayout, torch.Tensor]:
    s = runner.row_bucket(len(rows))
    layout = fs.StepLayout.build(runner.model, runner.block_size, runner.context_bucket(rows))
    return layout, torch.from_numpy(runner._pack(rows, s, layout)).to(runner.device)


def forward_ops(runner: FastRunner, n: int) -> OpLog:
    layout, inp = step_input(runner, denoise_rows(runner, n))
    with torch.inference_mode():
        x = fs.step_inputs(runner.model, layout, inp, runner.state, runner.scratch)
        runner.model.forward_canvases(x.batch, runner.pool.k_flat, runner.pool.v_flat)  # first use: device tables
        log = OpLog()
        with log:
            hidden = runner.model.forward_canvases(x.batch, runner.pool.k_flat, runner.pool.v_flat)
    assert hidden.shape == (runner.row_bucket(n), runner.canvas, runner.model.config.text.hidden_size)
    return log
