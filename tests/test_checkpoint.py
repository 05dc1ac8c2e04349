"""Checkpoint loading: round trip, presets, and every bad-input case with its message."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from dgserve.model.checkpoint import CheckpointError, load, save
from dgserve.model.config import PRESETS


@pytest.fixture
def good_dir(tmp_path):
    lm = load("tiny-random")
    out = tmp_path / "ckpt"
    save(lm.model, out)
    return out


def test_roundtrip_equal_weights(good_dir):
    a, b = load("tiny-random"), load(good_dir)
    for (na, ta), (nb, tb) in zip(a.model.state_dict().items(), b.model.state_dict().items(), strict=True):
        assert na == nb
        assert torch.equal(ta, tb), na


def test_sharded_index(good_dir, tmp_path):
    tensors = load_file(good_dir / "model.safetensors")
    names = sorted(tensors)
    shard_dir = tmp_path / "sharded"
    shard_dir.mkdir()
    shutil.copy(good_dir / "config.json", shard_dir / "config.json")
    half = len(names) // 2
    weight_map = {}
    for i, part in enumerate((names[:half], names[half:])):
        fname = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({n: tensors[n] for n in part}, str(shard_dir / fname))
        weight_map.update({n: fname for n in part})
    (shard_dir / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    a, b = load(good_dir), load(shard_dir)
    assert all(torch.equal(x, y) for x, y in zip(a.model.state_dict().values(), b.model.state_dict().values(),
                                                 strict=True))


def test_expert_subset_reads_only_owned_experts(good_dir):
    full = load(good_dir)
    part = load(good_dir, expert_ids=[1, 2, 5])
    for lf, lp in zip(full.model.layers, part.model.layers, strict=True):
        assert lp.experts.gate_up_proj.shape[0] == 3
        assert torch.equal(lp.experts.gate_up_proj, lf.experts.gate_up_proj[[1, 2, 5]])
        assert torch.equal(lp.experts.down_proj, lf.experts.down_proj[[1, 2, 5]])


def test_published_preset_dims():
    counts = PRESETS["diffusiongemma-26b-a4b"].parameter_counts()
    assert abs(counts["total"] / 1e9 - 25.2) < 0.1
    assert abs(counts["active"] / 1e9 - 3.8) < 0.1
    assert 80e6 < PRESETS["bench-cpu"].parameter_counts()["total"] < 100e6


def _expect(path, *fragments):
    with pytest.raises(CheckpointError) as info:
        load(path)
    msg = str(info.value)
    for f in fragments:
        assert f in msg, msg
    return msg


def test_missing_config(good_dir):
    (good_dir / "config.json").unlink()
    _expect(good_dir, "config.json", "missing")


def test_unknown_model_type(good_dir):
    cfg = json.loads((good_dir / "config.json").read_text())
    cfg["model_type"] = "llama"
    (good_dir / "config.json").write_text(json.dumps(cfg))
    _expect(good_dir, "config.json", "model_type is 'llama'")


def test_config_of_another_model(good_dir):
    (good_dir / "config.json").write_text(json.dumps({"model_type": "gemma4", "hidden_size": 64}))
    _expect(good_dir, "model_type is 'gemma4'")


def test_invalid_json_config(good_dir):
    (good_dir / "config.json").write_text("{not json")
    _expect(good_dir, "config.json", "not valid JSON")


def test_missing_weights(good_dir):
    (good_dir / "model.safetensors").unlink()
    _expect(good_dir, "no model.safetensors")


def test_pickle_refused(good_dir):
    (good_dir / "model.safetensors").unlink()
    torch.save({"x": torch.zeros(1)}, good_dir / "pytorch_model.bin")
    _expect(good_dir, "pytorch_model.bin", "pickle checkpoints are refused")


def test_truncated_file(good_dir):
    f = good_dir / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    _expect(good_dir, "model.safetensors", "truncated")


def test_garbage_file(good_dir):
    (good_dir / "model.safetensors").write_bytes(b"\x00" * 100)
    _expect(good_dir, "model.safetensors", "unreadable safetensors")


def _rewrite(good_dir, mutate):
    f = good_dir / "model.safetensors"
    tensors = load_file(f)
    mutate(tensors)
    save_file(tensors, str(f))


def test_missing_tensor(good_dir):
    _rewrite(good_dir, lambda t: t.pop("model.decoder.layers.1.mlp.up_proj.weight"))
    _expect(good_dir, "missing tensor model.decoder.layers.1.mlp.up_proj.weight")


def test_wrong_shape(good_dir):
    def mutate(t):
        t["model.decoder.layers.0.self_attn.q_proj.weight"] = torch.zeros(3, 3)
    _expect_shape = _rewrite(good_dir, mutate)
    del _expect_shape
    _expect(good_dir, "model.decoder.layers.0.self_attn.q_proj.weight", "shape [3, 3], expected [64, 64]")


def test_wrong_dtype(good_dir):
    def mutate(t):
        t["model.decoder.norm.weight"] = torch.zeros(64, dtype=torch.int8)
    _rewrite(good_dir, mutate)
    _expect(good_dir, "model.decoder.norm.weight", "dtype I8")


def test_missing_shard(good_dir):
    (good_dir / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"model.decoder.norm.weight": "model-00001-of-00002.safetensors"}}))
    _expect(good_dir, "model-00001-of-00002.safetensors", "missing")


def test_not_a_directory_nor_preset(tmp_path):
    _expect(tmp_path / "nope", "not a checkpoint directory, not a preset")


def test_bf16_checkpoint_cast_on_load(good_dir):
    f = good_dir / "model.safetensors"
    tensors = {k: v.to(torch.bfloat16) for k, v in load_file(f).items()}
    save_file(tensors, str(f))
    lm = load(good_dir, dtype=torch.float32)
    assert lm.model.embed_tokens.weight.dtype == torch.float32
