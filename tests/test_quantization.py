"""FP8 weights (``model.quantization: fp8``) on CPU through the emulation: quantization arithmetic, loading (quantized
tensor by tensor, or a pre-quantized checkpoint in the published layout), clear errors for what is not supported,
both execution modes, the trained tiny model's accuracy, and the settings (CLI, deploy config)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from console import dgserve, one_line_error
from safetensors.torch import load_file, save_file

from dgserve.config import DeployConfig
from dgserve.engine import fast_step as fs
from dgserve.engine.engine import Engine, EngineConfig
from dgserve.engine.kv_pages import KVPagePool, PagedKV
from dgserve.engine.request import CanvasEvent, FinalEvent, GenerationRequest
from dgserve.engine.runner import FastRunner, Row
from dgserve.model import fp8_checkpoint
from dgserve.model import quantization as quant
from dgserve.model.checkpoint import SHIPPED_CHECKPOINTS, CheckpointError, load, save
from dgserve.model.generation_config import SamplingParams
from dgserve.model.kv import Segment
from dgserve.train.evaluate import sort_exact_match

TINY = SHIPPED_CHECKPOINTS["tiny"]
EMULATED = {"quantization": "fp8", "fp8_emulation": True}
QUANTIZED = (".self_attn.q_proj.weight", ".self_attn.k_proj.weight", ".self_attn.v_proj.weight",
             ".self_attn.o_proj.weight", ".mlp.gate_proj.weight", ".mlp.up_proj.weight", ".mlp.down_proj.weight",
             ".experts.gate_up_proj", ".experts.down_proj")


# -- arithmetic ---------------------------------------------------------------------------------------------------


def test_weights_quantize_per_output_channel():
    """Each output channel's largest magnitude maps to e4m3's 448; every weight is within e4m3's rounding (3 mantissa
    bits: 1/16 relative, or 2^-9 of the scale among the subnormals); a zero channel stays zero with a finite scale."""
    w = torch.randn(3, 40, 24, generator=torch.Generator().manual_seed(0)) * torch.rand(3, 40, 1) * 4
    w[1, 7] = 0
    q, s = quant.quantize_weight(w)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (3, 40) and s.dtype == torch.float32
    assert torch.isfinite(s).all() and (q[1, 7].float() == 0).all()
    nonzero = w.abs().amax(-1) > 0
    assert torch.equal(q.float().abs().amax(-1)[nonzero], torch.full_like(s, 448.0)[nonzero])
    back = quant.dequantize(q, s, torch.float32)
    bound = torch.maximum(w.abs() / 16, s[..., None] * 2.0 ** -9)
    assert ((back - w).abs() <= bound * 1.0001).all()


def test_activations_quantize_per_token():
    x = torch.randn(5, 32, generator=torch.Generator().manual_seed(1)) * torch.tensor([1e-3, 1, 10, 100, 0])[:, None]
    q, s = quant.quantize_rows(x.to(torch.bfloat16))
    assert s.shape == (5, 1) and q.shape == x.shape
    assert torch.equal(q.float().abs().amax(-1)[:4], torch.full((4,), 448.0))
    assert (q[4].float() == 0).all()


def test_plan_needs_cuda_or_an_explicit_emulation():
    with pytest.raises(quant.QuantizationError, match=r"compute capability >= 8.9.*--fp8-emulation"):
        quant.plan("fp8", torch.device("cpu"), torch.float32)
    with pytest.raises(quant.QuantizationError, match="'int8'"):
        quant.plan("int8", torch.device("cpu"), torch.float32)
    assert quant.plan("fp8", torch.device("cpu"), torch.float32, emulation=True).compute == "emulated"
    assert not quant.plan("none", torch.device("cpu"), torch.float32).fp8
    with pytest.raises(CheckpointError, match="compute capability"):
        load("tiny-random", quantization="fp8")


# -- loading ------------------------------------------------------------------------------------------------------


def test_load_quantizes_tensor_by_tensor(monkeypatch):
    """Attention projections, dense MLP and experts become e4m3 with their scales, exactly the quantization of the
    checkpoint's values; embedding, router, norms and self-conditioning keep the model dtype. The model is built with
    its FP8 modules before anything is allocated and each checkpoint tensor is quantized as it is read: no
    full-precision copy of a quantized weight exists at any time beyond the one tensor being read."""
    seen: list[int] = []
    original = quant.quantize_into_

    def recording(weight, scale, full, start=0):
        seen.append(full.numel())
        original(weight, scale, full, start)

    monkeypatch.setattr(quant, "quantize_into_", recording)
    lm = load(TINY, **EMULATED)
    files = load_file(TINY / "model.safetensors")
    state = lm.model.state_dict()
    quantized = [n for n in state if n.endswith(QUANTIZED)]
    t = lm.config.text
    # per layer: 4 attention projections (full layers have no v_proj), 3 dense MLP, 2 packed expert tensors
    assert len(seen) == len(quantized) == sum(9 - (not t.is_sliding(i)) for i in range(t.num_hidden_layers))
    assert max(seen) == max(files[f"model.decoder.{n}"].numel() for n in quantized)
    for name in quantized:
        q, s = quant.quantize_weight(files[f"model.decoder.{name}"])
        assert torch.equal(state[name], q) and torch.equal(state[quant.scale_name(name)], s), name
    for name, t in state.items():
        if not name.endswith(QUANTIZED) and not name.endswith("_scale"):
            assert t.dtype in (torch.float32, torch.long), name
    built = sum(t.numel() * t.element_size() for t in state.values())
    assert built < 0.5 * (TINY / "model.safetensors").stat().st_size


def _write_fp8_checkpoint(src: Path, out: Path, scale_shape: str = "channel", scale_dtype=torch.float32,
                          config_update: dict | None = None) -> None:
    """A checkpoint in the published FP8 layout, written here without dgserve's writer: compressed-tensors'
    ``float-quantized`` config, e4m3 weights, ``weight_scale`` tensors shaped ``[out, 1]`` (``[E, out, 1]`` for the
    packed experts) or, per tensor, one value."""
    out.mkdir()
    tensors = {}
    for name, t in load_file(src / "model.safetensors").items():
        if name.endswith(QUANTIZED):
            amax = t.abs().amax(-1, keepdim=True) if scale_shape == "channel" else t.abs().amax().reshape(())
            scale = amax.float().clamp(min=1e-12) / 448.0
            tensors[name] = (t.float() / scale).clamp(-448, 448).to(torch.float8_e4m3fn)
            tensors[name + "_scale"] = scale.to(scale_dtype)
        else:
            tensors[name] = t
    save_file(tensors, str(out / "model.safetensors"))
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "compressed-tensors", "format": "float-quantized",
        "config_groups": {"group_0": {
            "targets": ["Linear"],
            "weights": {"num_bits": 8, "type": "float", "strategy": scale_shape, "symmetric": True, "dynamic": False},
            "input_activations": {"num_bits": 8, "type": "float", "strategy": "token", "dynamic": True}}},
        "ignore": ["lm_head"], **(config_update or {})}
    (out / "config.json").write_text(json.dumps(config))
    for extra in ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (src / extra).exists():
            shutil.copy(src / extra, out / extra)


@torch.inference_mode()
def _denoise_logits(model, prompt: list[int], canvas: torch.Tensor) -> torch.Tensor:
    from bench.ar_baseline import new_kv

    kv = new_kv(model)
    model(torch.tensor(prompt), [Segment("encode", 0, len(prompt), 0)], kv)
    return model.logits(model(canvas, [Segment("denoise", 0, canvas.shape[0], len(prompt))], kv, None))


def test_prequantized_checkpoint_gives_the_logits_of_quantizing_at_load(tmp_path):
    """The tiny model written in the published FP8 layout loads to the same weights and scales as quantizing the
    bf16/fp32 checkpoint at load time, and gives the same logits bit for bit; read without quantization it is
    dequantized, within FP8's error of the original."""
    _write_fp8_checkpoint(TINY, tmp_path / "fp8")
    at_load, prequantized = load(TINY, **EMULATED), load(tmp_path / "fp8", **EMULATED)
    for (na, a), (nb, b) in zip(at_load.model.state_dict().items(), prequantized.model.state_dict().items(),
                                strict=True):
        assert na == nb and torch.equal(a, b), na
    prompt = at_load.tokenizer.encode("sort 9 4 7 1")
    canvas = torch.randint(0, at_load.config.text.vocab_size, (at_load.config.canvas_length,),
                           generator=torch.Generator().manual_seed(0))
    want = _denoise_logits(at_load.model, prompt, canvas)
    assert torch.equal(_denoise_logits(prequantized.model, prompt, canvas), want)
    dequantized = load(tmp_path / "fp8")
    assert all(not quant.is_fp8(t) for t in dequantized.model.state_dict().values())
    full = _denoise_logits(load(TINY).model, prompt, canvas)
    got = _denoise_logits(dequantized.model, prompt, canvas)
    assert float((got - full).norm() / full.norm()) < 0.05


def test_prequantized_per_tensor_and_bf16_scales_load(tmp_path):
    """Per-tensor scales (one value) are broadcast to every channel; scales stored in bf16 are read as fp32."""
    _write_fp8_checkpoint(TINY, tmp_path / "t", scale_shape="tensor", scale_dtype=torch.bfloat16)
    lm = load(tmp_path / "t", **EMULATED)
    layer = lm.model.layers[0]
    s = layer.self_attn.q_proj.weight_scale
    assert s.dtype == torch.float32 and torch.equal(s, s[:1].expand_as(s))
    assert torch.equal(layer.experts.gate_up_proj_scale, layer.experts.gate_up_proj_scale[:, :1].expand_as(
        layer.experts.gate_up_proj_scale))
    out = _denoise_logits(lm.model, lm.tokenizer.encode("sort 3 1 2"), torch.arange(lm.config.canvas_length))
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("case, update, match", [
    ("block-wise", {"quant_method": "fp8", "weight_block_size": [128, 128]}, "block-wise"),
    ("int4", {"config_groups": {"g": {"weights": {"num_bits": 4, "type": "int", "strategy": "group"}}}},
     "4-bit int weights are not supported"),
    ("group scales", {"config_groups": {"g": {"weights": {"num_bits": 8, "type": "float", "strategy": "group"}}}},
     "strategy 'group' is not supported"),
    ("awq", {"quant_method": "awq"}, "quant_method 'awq' is not supported"),
])
def test_unsupported_quantization_configs_are_refused(tmp_path, case, update, match):
    _write_fp8_checkpoint(TINY, tmp_path / "c", config_update=update)
    with pytest.raises(CheckpointError, match=match):
        load(tmp_path / "c", **EMULATED)


def test_bad_fp8_tensors_are_refused(tmp_path):
    ckpt = tmp_path / "c"
    _write_fp8_checkpoint(TINY, ckpt)
    files = load_file(ckpt / "model.safetensors")
    name = "model.decoder.layers.0.self_attn.q_proj.weight"

    def rewrite(tensors: dict, config: dict | None = None) -> None:
        save_file(tensors, str(ckpt / "model.safetensors"))
        if config is not None:
            (ckpt / "config.json").write_text(json.dumps(config))

    rewrite({k: v for k, v in files.items() if k != name + "_scale"})
    with pytest.raises(CheckpointError, match=f"FP8 tensor {name} has no scale tensor {name}_scale"):
        load(ckpt, **EMULATED)
    rewrite({**files, name + "_scale": torch.ones(2, 3)})  # block-like scales
    with pytest.raises(CheckpointError, match=r"has shape \[2, 3\] for a weight .*block-wise scales"):
        load(ckpt, **EMULATED)
    rewrite({**files, name: files[name].float().to(torch.float8_e5m2)})
    with pytest.raises(CheckpointError, match="stored as e5m2"):
        load(ckpt, **EMULATED)
    config = json.loads((ckpt / "config.json").read_text())
    del config["quantization_config"]
    rewrite(files, config)
    with pytest.raises(CheckpointError, match="no quantization_config"):
        load(ckpt, **EMULATED)


def test_an_fp8_model_saves_in_the_layout_it_loads(tmp_path):
    lm = load("tiny-random", **EMULATED)
    save(lm.model, tmp_path / "s")
    config = json.loads((tmp_path / "s" / "config.json").read_text())
    assert config["quantization_config"] == fp8_checkpoint.compressed_tensors_config()
    again = load(tmp_path / "s", **EMULATED)
    for (na, a), (nb, b) in zip(lm.model.state_dict().items(), again.model.state_dict().items(), strict=True):
        assert na == nb and torch.equal(a, b), na


# -- execution ----------------------------------------------------------------------------------------------------


def test_fp8_fast_forward_matches_exact_mode():
    """One denoising step of the tiny-random FP8 model (fp32 activations around the emulated FP8 matmuls): the fast
    path's forward (grouped experts, static rows) against exact mode's (per-expert runs, packed segments)."""
    lm = load("tiny-random", **EMULATED)
    model, cfg = lm.model, lm.config
    c = cfg.canvas_length
    g = torch.Generator().manual_seed(2)
    prompt = torch.randint(3, cfg.text.vocab_size, (20,), generator=g).tolist()
    canvas = torch.randint(0, cfg.text.vocab_size, (c,), generator=g)
    pool = KVPagePool.from_budget(cfg, 16 << 20, block_size=4, dtype=model.dtype, max_seqs=4, scratch_tokens=c)
    runner = FastRunner(model, pool, num_slots=4)
    exact_table = pool.new_table()
    assert pool.ensure_capacity(exact_table, len(prompt) + c)
    kv = PagedKV(pool, {0: exact_table})
    with torch.inference_mode():
        model(torch.tensor(prompt), [Segment("encode", 0, len(prompt), 0)], kv)
        want = model.logits(model(canvas, [Segment("denoise", 0, c, len(prompt))], kv, None))
        fast_table = pool.new_table()
        assert pool.ensure_capacity(fast_table, len(prompt) + c)
        runner.run([Row(fs.PREFILL, 1, 0, fast_table, len(prompt), prompt)])
        fast_table.mark_written(len(prompt))
        runner.state.canvas[1] = canvas
        row = Row(fs.DENOISE, 1, len(prompt), fast_table, c, fresh=False, cur_step=3,
                  sampling=SamplingParams(max_denoising_steps=4))
        layout = fs.StepLayout.build(model, pool.block_size, runner.context_bucket([row]))
        x = fs.step_inputs(model, layout, torch.from_numpy(runner._pack([row], 1, layout)), runner.state,
                           runner.scratch)
        got = model.logits(model.forward_canvases(x.batch, pool.k_flat, pool.v_flat)[0])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)


def test_published_fp8_fast_forward_on_meta_is_sync_free(monkeypatch):
    """The CPU proxy of the CUDA FP8 path: the published model with W8A8 modules (``_scaled_mm`` for the dense
    projections, ``_scaled_grouped_mm`` for the experts, as on an H100) runs its fast forward on the meta device (no
    op reads a value) with no sync-class or cross-device op, and FP8 adds only the activation quantization's ops
    (a fixed number per projection, none per canvas)."""
    from bench.op_log import forward_ops, meta_model

    monkeypatch.setattr(quant, "_cuda_scaled_ops", lambda index: (True, True))  # torch's kernels, as on an H100
    runners = {}
    for method in ("none", "fp8"):
        model = meta_model("diffusiongemma-26b-a4b")
        quant.convert_(model, quant.QuantizationPlan(method, "w8a8" if method == "fp8" else None),
                       torch.device("meta"))
        pool = KVPagePool(model.config, 256, 256, block_size=16, dtype=torch.bfloat16, device="meta",
                          scratch_tokens=model.config.canvas_length)
        runners[method] = FastRunner(model, pool, num_slots=8)
    experts = runners["fp8"].model.layers[0].experts
    assert experts.grouped_backend == "scaled_grouped_mm"
    assert runners["fp8"].model.layers[0].self_attn.q_proj.backend == "scaled_mm"
    logs = {m: forward_ops(r, n) for m, r in runners.items() for n in (1,)}
    fp8 = logs["fp8"]
    assert not fp8.sync and not fp8.cross_device, (fp8.sync, fp8.cross_device)
    assert fp8.ops["_scaled_mm"] > 0 and fp8.ops["_scaled_grouped_mm"] == 2 * 30
    eight = forward_ops(runners["fp8"], 8)
    assert eight.launching == fp8.launching + (logs["none"].launching - logs["none"].launching)  # none per canvas


def test_fp8_layer_fast_forward_has_no_graph_breaks():
    """``torch._dynamo.explain`` of an FP8 sliding and full layer's fast forward (the emulated path): no break."""
    from bench.fast_proxies import graph_breaks

    lm = load("tiny-random", **EMULATED)
    assert isinstance(lm.model.layers[0].experts, quant.Fp8ExpertWeights)
    assert graph_breaks(lm) == {"sliding_attention": 0, "full_attention": 0}


@pytest.mark.parametrize("execution", ["exact", "fast"])
def test_fp8_engine_serves_requests_in_both_modes(execution):
    lm = load("tiny-random", **EMULATED)
    engine = Engine(lm.model, lm.generation, None, EngineConfig(execution=execution, kv_cache_memory=8 << 20))
    for i in range(3):
        engine.add_request(GenerationRequest(prompt_ids=list(range(5, 12 + 4 * i)), max_tokens=40, seed=i,
                                             sampling=SamplingParams(max_denoising_steps=3), request_id=f"r{i}",
                                             ignore_eos=True))
    events = engine.run_until_done()
    finals = {e.request_id: e.finish_reason for e in events if isinstance(e, FinalEvent)}
    assert finals == {f"r{i}": "length" for i in range(3)}
    for i in range(3):
        assert sum(len(e.token_ids) for e in events if isinstance(e, CanvasEvent) and e.request_id == f"r{i}") == 40


def test_tiny_exact_match_with_fp8_within_two_points_of_bf16():
    """The shipped tiny model on its 100 held-out sorting problems (the checkpoint's sampler, seed = problem index):
    FP8 weights (emulated W8A8) lose at most 2 points against bf16 (measured: bf16 87%, FP8 90%)."""
    bf16 = load(TINY, dtype="bfloat16")
    fp8 = load(TINY, dtype="bfloat16", **EMULATED)
    acc_bf16, _, _ = sort_exact_match(bf16, bf16.generation.sampling, 100)
    acc_fp8, _, _ = sort_exact_match(fp8, fp8.generation.sampling, 100)
    assert acc_bf16 > 0.8  # the task is learnt: the comparison means something
    assert acc_fp8 >= acc_bf16 - 0.02, (acc_fp8, acc_bf16)


# -- settings -----------------------------------------------------------------------------------------------------


def test_deploy_config_takes_quantization_and_checks_it():
    cfg = DeployConfig.from_args({"model": {"quantization": "fp8", "dtype": "bfloat16"}})
    assert cfg.replica_slice().model.quantization == "fp8"
    with pytest.raises(ValueError, match="fp8_emulation emulates FP8 weights"):
        DeployConfig.from_args({"model": {"fp8_emulation": True}})
    with pytest.raises(ValueError, match="ep_size > 1 is not supported"):
        DeployConfig.from_args({"model": {"quantization": "fp8"}, "replicas": {"ep_size": 2}})
    with pytest.raises(ValueError, match="quantization"):
        DeployConfig.from_args({"model": {"quantization": "int4"}})


@pytest.mark.slow  # subprocesses
@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU-only machine's message")
@pytest.mark.parametrize("command", ["run", "generate", "batch"])
def test_cli_fp8_on_a_cpu_only_machine_says_what_it_needs(command, tmp_path):
    extra = {"run": ["--port", "65000"], "generate": ["--prompt", "sort 3 1 2"],
             "batch": ["--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out.jsonl")]}[command]
    line = one_line_error(dgserve(command, "--quantization", "fp8", *extra), command)
    assert "FP8 compute needs a CUDA GPU of compute capability >= 8.9" in line and "--fp8-emulation" in line
    line = one_line_error(dgserve(command, "--fp8-emulation", *extra), command)
    assert "needs --quantization fp8" in line


@pytest.mark.slow  # a subprocess
def test_cli_generate_with_the_fp8_emulation():
    proc = dgserve("generate", "--prompt", "sort 5 2 8 1", "--chat", "--quantization", "fp8", "--fp8-emulation",
                   "--json", "--seed", "0")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["text"].strip() == "1 2 5 8"
