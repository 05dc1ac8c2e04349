"""The CPU benchmark scripts at their smallest sizes, so they cannot rot: each runs end to end and
prints a JSON record whose figures are present and positive. No wall-clock figure is asserted beyond
"positive" (DESIGN.md: tests never assert timings)."""

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

from bench.bench_record import last_json_line  # noqa: E402
from dgserve.deploy import cli  # noqa: E402

pytestmark = pytest.mark.slow


def _run(args: list[str], timeout: int = 240) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    record = last_json_line(proc.stdout)
    assert "| " in proc.stdout  # the markdown table came first
    return record


def _check_record(record: dict[str, Any], name: str, out: Path) -> dict[str, Any]:
    assert record["benchmark"] == name
    assert record["command"].startswith("python ") and record["date"]
    assert record["machine"]["cpu_model"] and record["machine"]["cores"] >= 1
    assert len(record["load_before"]) == 3 and len(record["load_after"]) == 3
    assert isinstance(record["contended"], bool)
    assert record["wall_s"] > 0
    lines = out.read_text().splitlines()  # --out appended the same record
    assert json.loads(lines[-1]) == record
    return record["results"]


def _positive(d: dict[str, Any], *keys: str) -> None:
    for k in keys:
        v = d[k]
        assert isinstance(v, int | float) and not isinstance(v, bool) and v > 0, (k, v)


def test_engine_vs_reference_small(tmp_path: Path) -> None:
    out = tmp_path / "r.jsonl"
    r = _check_record(_run(["bench/engine_vs_reference.py", "--small", "--threads", "1", "--out", str(out)]),
                      "engine_vs_reference", out)
    a, b = r["a"], r["b"]
    _positive(a, "reference_tokens_per_s", "dgserve_tokens_per_s", "ratio")
    # same weights, same sampler, same seed: the engine and transformers' generate agree token for token
    assert a["identical_tokens"] is True
    _positive(b, "reference_tokens_per_s", "dgserve_tokens_per_s", "ratio")
    for side in ("reference", "dgserve"):
        for run in b["runs"][side]:
            assert run["new_tokens"] == b["useful_tokens"]  # each request cut to its own length
            assert run["steps_per_canvas"] == r["sampling"]["max_denoising_steps"]
            _positive(run, "tokens_per_s", "ttfc_mean_s", "forwards")


def test_diffusion_vs_ar_small(tmp_path: Path) -> None:
    out = tmp_path / "r.jsonl"
    r = _check_record(_run(["bench/diffusion_vs_ar.py", "--small", "--threads", "1", "--out", str(out)]),
                      "diffusion_vs_ar", out)
    sides = ["hf_ar", "dg_ar", *(f"diffusion_{s}" for s in r["steps"])]
    assert set(r["measured"]) == {f"{s}/batch_{b}" for s in sides for b in r["batches"]}
    for entry in r["measured"].values():
        _positive(entry, "tokens_per_s", "wall_s", "step_s", "new_tokens")
    assert r["ratios"] and all(v > 0 for v in r["ratios"].values())
    assert all(v > 0 for v in r["machine_gemm_gflops"].values()) and r["machine_copy_gbps"] > 0
    _positive(r, "flops_per_token_ar", "flops_per_token_denoise")
    assert r["flops_per_token_denoise"] > r["flops_per_token_ar"]
    assert set(r["break_even"]) == {f"{ar}/batch_{b}" for ar in ("hf_ar", "dg_ar") for b in r["batches"]}


def test_concurrency_curve_small_through_the_cli(tmp_path: Path) -> None:
    out, png = tmp_path / "r.jsonl", tmp_path / "curve.png"
    # through `dgserve bench NAME ARGS`, which passes the arguments on to the script
    r = _check_record(_run(["-m", "dgserve.deploy.cli", "bench", "concurrency-curve", "--small", "--threads", "1",
                            "--plot", str(png), "--out", str(out)]), "concurrency_curve", out)
    assert [p["concurrency"] for p in r["points"]] == [1, 2, 4]
    for p in r["points"]:
        _positive(p, "tokens_per_s", "per_request_tokens_per_s", "ttfc_mean_s", "ttfc_max_s", "wall_s")
        assert p["new_tokens"] == p["concurrency"] * r["max_tokens"]
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert r["plot"] is None
    else:
        assert r["plot"] == str(png) and png.stat().st_size > 1000


def test_step_floor_small(tmp_path: Path) -> None:
    out = tmp_path / "r.jsonl"
    r = _check_record(_run(["bench/step_floor.py", "--small", "--threads", "1", "--out", str(out)]), "step_floor", out)
    assert [p["concurrency"] for p in r["points"]] == [1, 2]
    for p in r["points"]:
        _positive(p, "tokens_per_s", "wall_ms", "matmul_ms", "exp_ms", "floor_ms", "max_tokens_per_s")
        assert p["canvas_steps"] == p["concurrency"] * r["steps"]  # one canvas each, every step taken
        assert p["matmul_ms"] < p["wall_ms"] and 0 < p["matmul_share"] < 1
        assert p["floor_ms"] == pytest.approx(p["matmul_ms"] + p["exp_ms"] / r["threads"], abs=0.02)


def test_fp8_quality_small(tmp_path: Path) -> None:
    out = tmp_path / "r.jsonl"
    r = _check_record(_run(["bench/fp8_quality.py", "--small", "--threads", "1", "--out", str(out)]), "fp8_quality",
                      out)
    for model in ("tiny-random", "tiny"):
        assert set(r[model]) == {"bf16_vs_fp32", "fp8_vs_fp32", "fp8_vs_bf16"}
        for pair in r[model].values():
            assert pair["rel_l2"] > 0 and 0 <= pair["top1_agreement"] <= 1 and pair["positions"] > 0
    exact = r["tiny_sort_exact_match"]
    assert exact["problems"] == 10 and 0 <= exact["bf16"] <= 1 and 0 <= exact["fp8"] <= 1


def test_serving_overhead_small(serve_http: str, tmp_path: Path) -> None:
    from bench import serving_overhead

    out = tmp_path / "r.jsonl"
    threads = torch.get_num_threads()
    try:
        assert serving_overhead.main(["--small", "--http-base", serve_http, "--replica-cpus", "0.5",
                                      "--threads", "1", "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    record = json.loads(out.read_text().splitlines()[-1])
    r = _check_record(record, "serving_overhead", out)
    _positive(r, "in_process_tokens_per_s", "http_serve_tokens_per_s", "ratio")
    counted = {side: [run["new_tokens"] for run in r["runs"][side]] for side in ("in_process", "http_serve")}
    # both sides count the API's completion tokens (pad ids excluded) of the same seeded requests
    assert counted["in_process"] == counted["http_serve"], counted
    assert all(0.5 * r["requests"] * r["max_tokens"] < n <= r["requests"] * r["max_tokens"]
               for n in counted["in_process"]), counted


def test_bench_cli_lists_and_rejects(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["bench", "--list"]) == 0
    listed = capsys.readouterr().out
    for name in ("engine-vs-reference", "diffusion-vs-ar", "concurrency-curve", "serving-overhead", "step-floor",
                 "fp8-quality"):
        assert name in listed
    assert cli.main(["bench", "no-such-bench"]) == 2
    assert "unknown benchmark 'no-such-bench'" in capsys.readouterr().err


def test_json_cost_small(tmp_path: Path) -> None:
    out = tmp_path / "json.jsonl"
    r = _check_record(_run(["bench/json_cost.py", "--n", "3", "--max-tokens", "64", "--out", str(out)]), "json_cost",
                      out)
    constrained = [p for p in r["points"] if p["constrained"]]
    assert len(constrained) == 2 and all(p["valid"] == 3 for p in constrained)  # every constrained output is valid
    for p in r["points"]:
        _positive(p, "steps_per_canvas", "seconds")


def test_filter_entropy_small(tmp_path: Path) -> None:
    out = tmp_path / "entropy.jsonl"
    r = _check_record(_run(["bench/filter_entropy.py", "--n", "3", "--out", str(out)]), "filter_entropy", out)
    assert {(p["filters"], p["acceptance_entropy"]) for p in r["points"]} >= {("top_k 1", "filtered"),
                                                                            ("top_k 1", "unfiltered")}
    for p in r["points"]:
        _positive(p, "steps_per_canvas")


def test_guidellm_small(tmp_path: Path) -> None:
    """guidellm from PyPI against dgserve run, both endpoints, a handful of requests: none errors."""
    out = tmp_path / "guidellm.jsonl"
    r = _check_record(_run(["bench/guidellm_run.py", "--requests", "4", "--streams", "1", "--output-tokens", "32",
                            "--results", str(tmp_path / "results"), "--out", str(out)], timeout=900), "guidellm", out)
    assert r["errors"] == 0 and [p["endpoint"] for p in r["points"]] == ["/v1/chat/completions", "/v1/completions"]
    for p in r["points"]:
        assert p["successful"] == 4
        _positive(p, "output_tokens_per_s", "ttft_ms")
