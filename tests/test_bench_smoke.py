"""The GPU benchmark suite's CPU smoke run (every measurement present, positive, error-free) and the
AR baseline's replicated forward loop (same K/V as the model's forward, packing-invariant)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.ar_baseline import encode_last_hidden, generate_ar, new_kv  # noqa: E402
from dgserve.model.checkpoint import load  # noqa: E402
from dgserve.model.kv import Segment  # noqa: E402

DIFFUSION_KEYS = {"new_tokens", "prompt_tokens", "steps", "prefill_ms", "denoise_forward_ms",
                  "denoise_forward_ms_median", "sampler_ms", "step_ms", "commit_ms", "wall_s", "tokens_per_s",
                  "wall_s_no_commit", "tokens_per_s_no_commit", "peak_gib", "measure_s"}
AR_KEYS = {"batch", "prompt_tokens", "new_tokens", "prefill_ms", "ms_per_token_step", "wall_s", "tokens_per_s",
           "tokens_per_s_per_seq", "peak_gib", "measure_s"}
PACKED_KEYS = {"canvases", "tokens", "prompt_tokens_per_seq", "steps_per_canvas", "reps", "prefill_ms", "forward_ms",
               "vocab_pass_ms", "step_ms", "commit_ms", "implied_tokens_per_s", "implied_tokens_per_s_forward_only",
               "peak_gib", "measure_s"}


def _positive_numbers(entry: dict[str, Any], keys: set[str], where: str) -> None:
    assert "error" not in entry and "skipped" not in entry, f"{where}: {entry}"
    missing = keys - entry.keys()
    assert not missing, f"{where} lacks {sorted(missing)}"
    for key in keys:
        value = entry[key]
        assert isinstance(value, int | float) and not isinstance(value, bool), f"{where}.{key} = {value!r}"
        assert value > 0, f"{where}.{key} = {value!r}"


@pytest.mark.timeout(300)
def test_gpu_suite_cpu_smoke(tmp_path: Path) -> None:
    out = tmp_path / "gs"
    env = {**os.environ, "PYTHON": sys.executable}
    env.pop("DGSERVE_BENCH_T0", None)
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_suite.sh"), "--cpu-smoke", "--out", str(out)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads((out / "results.json").read_text())
    md = (out / "results.md").read_text()
    assert "packed forward timing (engine not yet in the loop)" in md
    assert "| steps |" in md and md in proc.stdout

    meta = r["meta"]
    for key in ("device", "torch", "date", "config", "command", "dtype", "params_total", "params_active"):
        assert isinstance(meta[key], str) and meta[key], key
    assert meta["config"] == "tiny-random" and "--cpu-smoke" in meta["command"]
    assert "fatal" not in meta and "warmup_error" not in meta
    assert meta["init_s"] > 0 and meta["total_s"] > 0

    s = r["settings"]
    assert s["steps"] == [16, 12, 48]  # the GPU run's step counts: same keys in both
    assert set(r["diffusion"]) == {f"steps_{n}" for n in s["steps"]}
    for name, entry in r["diffusion"].items():
        _positive_numbers(entry, DIFFUSION_KEYS, f"diffusion.{name}")
        assert entry["steps"] == int(name.removeprefix("steps_"))
        assert entry["new_tokens"] == 32  # one tiny-random canvas
    _positive_numbers(r["generate_single"]["steps_16"], {"new_tokens", "steps", "wall_s", "tokens_per_s"},
                      "generate_single.steps_16")
    assert set(r["ar"]) == {"batch_1", f"batch_{s['ar_batch']}"}
    for name, entry in r["ar"].items():
        _positive_numbers(entry, AR_KEYS, f"ar.{name}")
        assert entry["new_tokens"] == s["ar_tokens"] and "truncated_by_time_guard" not in entry
    fast = r["fast"]
    assert {f"modes_{c}" for c in s["fast_canvases"]} <= set(fast)
    for c in s["fast_canvases"]:
        _positive_numbers(fast[f"modes_{c}"], {"eager_step_ms", "eager_forward_ms", "graphed_step_ms"}, f"fast.{c}")
        assert fast[f"modes_{c}"]["graphed_argmax_agreement_with_eager"] == 1.0  # on CPU: the same eager step
    _positive_numbers(fast["sampler"], {"exact_16_row_chunks_ms", "fast_per_canvas_ms"}, "fast.sampler")
    b1 = fast["engine_batch1_steps_16"]
    _positive_numbers(b1, {"tokens_per_s_end_to_end", "tokens_per_s_steady_state", "inter_canvas_ms"}, "fast.b1")
    assert b1["new_tokens"] == 4 * 32
    cc = fast[f"engine_concurrent_{s['concurrent']}"]
    assert cc["new_tokens"] == s["concurrent"] * 32 and cc["max_canvases_per_forward"] == s["concurrent"]
    assert "## Fast path" in md
    assert set(r["packed"]) == {f"canvases_{c}" for c in s["canvases"]}
    for name, entry in r["packed"].items():
        _positive_numbers(entry, PACKED_KEYS, f"packed.{name}")
        assert entry["fits"] is True and entry["label"] == "packed forward timing (engine not yet in the loop)"
    mem = r["memory"]
    for key in ("weights_gib", "peak_gib", "after_init_gib"):
        assert mem[key] > 0, key
    assert mem["largest_packed_canvases_fit"] == max(s["canvases"])
    assert r["ratios"] and all(v > 0 for v in r["ratios"].values())
    assert "diffusion_steps_16_over_ar_batch_1" in r["ratios"]
    assert r["problems"] == []


@pytest.fixture(scope="module")
def tiny_model() -> Any:
    model = load("tiny-random").model
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():  # distinct per-mode scalars, so using the wrong one would show
        for layer in model.layers:
            layer.layer_scalar.uniform_(0.5, 1.5, generator=gen)
            layer.encoder_layer_scalar.uniform_(0.5, 1.5, generator=gen)
    return model


def test_encode_last_hidden_writes_the_models_kv(tiny_model: Any) -> None:
    model = tiny_model
    prompts = [[5, 9, 17, 33, 65, 129, 257, 300, 7, 11], [4, 8, 15, 16, 23, 42]]
    flat = torch.tensor([t for p in prompts for t in p])
    segments = [Segment("encode", i, len(p), 0) for i, p in enumerate(prompts)]
    kv_model, kv_ar = new_kv(model), new_kv(model)
    model(flat, segments, kv_model)
    hidden = encode_last_hidden(model, flat, segments, kv_ar)
    assert hidden.shape == (2, model.config.text.hidden_size)
    for layer in range(model.config.text.num_hidden_layers):
        for seq, p in enumerate(prompts):
            k1, v1 = kv_model.read(layer, seq, 0, len(p))
            k2, v2 = kv_ar.read(layer, seq, 0, len(p))
            torch.testing.assert_close(k2, k1, rtol=0, atol=0)
            torch.testing.assert_close(v2, v1, rtol=0, atol=0)
    # incremental decoding over the cache gives the last token's hidden state of a full prefill
    kv_inc = new_kv(model)
    p = prompts[0]
    encode_last_hidden(model, torch.tensor(p[:-1]), [Segment("encode", 0, len(p) - 1, 0)], kv_inc)
    last = encode_last_hidden(model, torch.tensor(p[-1:]), [Segment("encode", 0, 1, len(p) - 1)], kv_inc)
    torch.testing.assert_close(last[0], hidden[0], rtol=1e-4, atol=1e-5)


def test_generate_ar_batched_matches_single(tiny_model: Any) -> None:
    # 20 prompt + 24 new tokens crosses tiny-random's 16-token sliding window (trimmed cache)
    prompts = [list(range(3, 23)), list(range(100, 120)), list(range(200, 220))]
    batched = generate_ar(tiny_model, prompts, 24)
    assert batched.batch == 3 and batched.new_tokens == 24 and batched.tokens_per_s > 0
    for i, p in enumerate(prompts):
        single = generate_ar(tiny_model, [p], 24)
        assert single.token_ids[0] == batched.token_ids[i]
