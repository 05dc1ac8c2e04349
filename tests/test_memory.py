"""Peak memory of one denoise step does not grow with the vocabulary beyond one [canvas, V] tensor.

Measured in a fresh subprocess from the kernel's peak-RSS counter (VmHWM), reset just before the
step through /proc/self/clear_refs, so every allocation (torch's CPU allocator included) counts.
glibc's mmap threshold is pinned so freed large blocks go back to the kernel: the counter then tracks
live memory, not malloc's caching.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import json, sys, torch
    from dgserve.model.config import ModelConfig, TextConfig
    from dgserve.model.checkpoint import _empty_model, init_random_
    from dgserve.model.generation_config import SamplingParams
    from dgserve.model.kv import ContiguousKV, Segment
    from dgserve.engine.sampler import denoise_step

    torch.set_num_threads(1)
    vocab, canvas = int(sys.argv[1]), 256
    cfg = ModelConfig(text=TextConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, sliding_window=8, global_head_dim=16, num_global_key_value_heads=1,
        layer_types=("sliding_attention", "full_attention"), num_experts=2, top_k_experts=1,
        moe_intermediate_size=16), canvas_length=canvas)
    model = _empty_model(cfg, torch.float32, torch.device("cpu"), None)
    init_random_(model)
    kv = ContiguousKV(2, [True, False], 8)
    model(torch.arange(10), [Segment("encode", 0, 10, 0)], kv)
    gen = torch.Generator().manual_seed(0)
    params = SamplingParams()
    canvas_ids = torch.randint(0, vocab, (canvas,), generator=gen)

    def step(soft):
        hidden = model(canvas_ids, [Segment("denoise", 0, canvas, 10)], kv, soft)
        return denoise_step(model, hidden, canvas_ids, 48, params, gen)

    out = step(None)  # warm-up: allocator pools, first-touch pages
    def rss(field):
        for line in open("/proc/self/status"):
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    open("/proc/self/clear_refs", "w").write("5")  # reset the peak-RSS counter
    base = rss("VmRSS:")
    out = step(out.soft)
    peak = rss("VmHWM:")
    print(json.dumps({"base": base, "peak": peak}))
""")


def _peak_growth(vocab: int) -> int:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(vocab)], capture_output=True, text=True, timeout=300,
                          env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    return res["peak"] - res["base"]


@pytest.mark.slow
def test_denoise_step_peak_memory_bounded_by_one_logits_tensor():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pytest.skip("peak-RSS reset (/proc/self/clear_refs) not available")
    canvas = 256
    published_vocab = 262_144
    growth_small = _peak_growth(65_536)
    growth_large = _peak_growth(published_vocab)
    # at the published vocabulary one step needs less than one fp32 [canvas, V] logits tensor ...
    assert growth_large <= canvas * published_vocab * 4, growth_large
    # ... and the step's working set does not grow with the vocabulary (4x larger vocab, same peak)
    assert growth_large <= 1.25 * growth_small + (8 << 20), (growth_small, growth_large)


ENGINE_SCRIPT = textwrap.dedent("""
    import json, sys, torch
    from dgserve.model.config import ModelConfig, TextConfig
    from dgserve.model.checkpoint import GenerationDefaults, _empty_model, init_random_
    from dgserve.model.generation_config import SamplingParams
    from dgserve.engine.engine import Engine, EngineConfig
    from dgserve.engine.request import GenerationRequest

    torch.set_num_threads(1)
    vocab, canvas, n = int(sys.argv[1]), 64, int(sys.argv[2])
    cfg = ModelConfig(text=TextConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, sliding_window=8, global_head_dim=16, num_global_key_value_heads=1,
        layer_types=("sliding_attention", "full_attention"), num_experts=2, top_k_experts=1,
        moe_intermediate_size=16), canvas_length=canvas)
    model = _empty_model(cfg, torch.float32, torch.device("cpu"), None)
    init_random_(model)
    engine = Engine(model, GenerationDefaults(eos_token_ids=()), None, EngineConfig(
        kv_cache_memory=64 << 20, max_running=n, max_step_tokens=n * canvas + 1024, enable_prefix_cache=False))
    params = SamplingParams(max_denoising_steps=4, stability_threshold=None, confidence_threshold=None)
    for i in range(n):
        engine.add_request(GenerationRequest(prompt_ids=[3 + i, 4, 5], max_tokens=canvas, seed=i, sampling=params,
                                             request_id=str(i), ignore_eos=True))
    engine.step()  # prefill of all
    engine.step()  # first denoise step of all canvases (warm-up)
    def rss(field):
        for line in open("/proc/self/status"):
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = rss("VmRSS:")
    engine.step()  # one step: a forward over n canvases + the vocabulary work of every canvas
    assert max(engine.canvases_in_forward) == n
    print(json.dumps({"base": base, "peak": rss("VmHWM:")}))
""")


@pytest.mark.slow
def test_engine_step_with_32_canvases_bounded_independent_of_batch_and_vocab():
    """A step with 32 canvases of 64 tokens at vocabulary 262,144: holding the step's logits would take
    32 x 64 x 262,144 x 4 B = 2.1 GB; the engine stays under a fixed 200 MB bound, the same with 8 canvases
    or a 4x smaller vocabulary (the vocabulary work is done canvas by canvas, in row chunks)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pytest.skip("peak-RSS reset (/proc/self/clear_refs) not available")

    def growth(vocab: int, n: int) -> int:
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
        proc = subprocess.run([sys.executable, "-c", ENGINE_SCRIPT, str(vocab), str(n)], capture_output=True,
                              text=True, timeout=600, env=env)
        assert proc.returncode == 0, proc.stderr[-2000:]
        res = json.loads(proc.stdout.strip().splitlines()[-1])
        return res["peak"] - res["base"]

    bound = 200 << 20
    big = growth(262_144, 32)
    assert big < bound, big
    assert big < 32 * 64 * 262_144 * 4 / 10
    for vocab, n in ((262_144, 8), (65_536, 32)):
        assert growth(vocab, n) < bound
