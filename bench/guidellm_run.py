"""guidellm (the vLLM project's benchmark tool for OpenAI-compatible servers) against ``dgserve run``: a short
streaming benchmark on /v1/chat/completions and on /v1/completions, with guidellm's request defaults (it streams
with ``stream_options.continuous_usage_stats``, ``ignore_eos`` and ``stop: null``) and a local tokenizer.

    python bench/guidellm_run.py [--model tiny] [--requests 24] [--streams 1,8] [--results DIR] [--out FILE]

Prints one Markdown row per (endpoint, profile): requests succeeded / errored, TTFT, inter-token latency and
output tokens/s as guidellm measured them; exits 1 if any request errored. Needs the ``guidellm`` package (a test
extra) and runs offline (``HF_HUB_OFFLINE=1``: the tokenizer is the checkpoint's own directory).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.bench_record import BenchRun, md_table  # noqa: E402

ENDPOINTS = ("/v1/chat/completions", "/v1/completions")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def dgserve_run(args: list[str], log: Path, startup_s: float = 300) -> Iterator[str]:
    """``dgserve run ARGS`` on a free port until the block ends (then Ctrl-C); yields its base URL."""
    port = _free_port()
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_ADDRESS": ""}
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "dgserve.deploy.cli", "run", *args, "--port", str(port)],
                                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + startup_s
        while "press Ctrl-C to stop" not in log.read_text():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"dgserve run did not come up:\n{log.read_text()[-3000:]}")
            time.sleep(1.0)
        yield f"http://127.0.0.1:{port}"
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def scenario(base: str, model: str, tokenizer: str, endpoint: str, streams: int, requests: int,
             prompt_tokens: int, output_tokens: int) -> dict[str, Any]:
    profile = {"kind": "synchronous"} if streams == 1 else {"kind": "concurrent", "streams": streams}
    return {"metadata": {"name": f"dgserve {endpoint} x{streams}"}, "spec": {
        "backend": {"kind": "openai_http", "target": base, "model": model, "request_format": endpoint},
        "tokenizer": {"kind": "hf_auto", "model": tokenizer},
        "profile": profile,
        "data": [{"kind": "synthetic_text", "prompt_tokens": prompt_tokens, "output_tokens": output_tokens}],
        "constraints": [{"kind": "max_requests", "count": requests}, {"kind": "max_duration", "seconds": 600}]}}


def run_guidellm(spec: dict[str, Any], out_dir: Path, name: str) -> dict[str, Any]:
    path = out_dir / f"{name}.scenario.json"
    path.write_text(json.dumps(spec, indent=2))
    result = out_dir / f"{name}.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "guidellm", "run", "--scenario", str(path), "--output",
           f"kind=json,path={result}", "--disable-console-interactive"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    (out_dir / f"{name}.log").write_text(done.stdout + done.stderr)
    if done.returncode != 0 or not result.is_file():
        raise RuntimeError(f"guidellm failed ({done.returncode}):\n{(done.stdout + done.stderr)[-3000:]}")
    return json.loads(result.read_text())


def summarize(report: dict[str, Any]) -> dict[str, float | int]:
    """The figures of guidellm's JSON report (its first benchmark)."""
    bench = report["benchmarks"][0]
    metrics = bench["metrics"]

    def successful(name: str, stat: str = "median") -> float:
        return float(metrics[name]["successful"][stat])

    totals = metrics["request_totals"]
    return {"successful": int(totals["successful"]), "errored": int(totals["errored"]),
            "incomplete": int(totals.get("incomplete", 0)),
            "ttft_ms": successful("time_to_first_token_ms"), "itl_ms": successful("inter_token_latency_ms"),
            "output_tokens_per_s": successful("output_tokens_per_second", "mean"),
            "requests_per_s": successful("requests_per_second", "mean")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny", help="what dgserve run serves (its --model)")
    parser.add_argument("--tokenizer", default=None, help="local tokenizer directory (default: the tiny model's)")
    parser.add_argument("--requests", type=int, default=24, help="requests per benchmark")
    parser.add_argument("--streams", default="1,8", help="concurrent streams per benchmark (1: synchronous)")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--output-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="dgserve run --threads")
    parser.add_argument("--results", type=Path, default=Path("guidellm-results"), help="guidellm's files go here")
    parser.add_argument("--out", default=None, help="append the JSON record to this file")
    args = parser.parse_args(argv)
    from dgserve.train.paths import TINY_DIR

    bench = BenchRun("guidellm")
    tokenizer = args.tokenizer or str(TINY_DIR)
    args.results.mkdir(parents=True, exist_ok=True)
    points, errors = [], 0
    with dgserve_run(["--model", args.model, "--threads", str(args.threads)],
                     args.results / "dgserve-run.log") as base:
        import urllib.request

        with urllib.request.urlopen(f"{base}/v1/models", timeout=60) as resp:
            served = json.loads(resp.read())["data"][0]["id"]
        for endpoint in ENDPOINTS:
            for streams in (int(s) for s in args.streams.split(",")):
                name = f"{endpoint.strip('/').replace('/', '_')}-x{streams}"
                spec = scenario(base, served, tokenizer, endpoint, streams, args.requests, args.prompt_tokens,
                                args.output_tokens)
                figures = summarize(run_guidellm(spec, args.results, name))
                errors += figures["errored"] + figures["incomplete"]
                points.append({"endpoint": endpoint, "streams": streams, **figures})
                bench.progress(f"{endpoint} x{streams}: {figures['successful']} ok, {figures['errored']} errored")
        state = bench.contention()  # while dgserve run (its Ray cluster) still counts as this run's own
    rows = [[p["endpoint"], p["streams"], p["successful"], p["errored"] + p["incomplete"], f"{p['ttft_ms']:.0f}",
             f"{p['itl_ms']:.1f}", f"{p['output_tokens_per_s']:.1f}", f"{p['requests_per_s']:.2f}"] for p in points]
    table = md_table(["endpoint", "streams", "succeeded", "errored", "TTFT median ms", "ITL median ms",
                      "output tok/s", "req/s"], rows)
    notes = [f"guidellm against dgserve run --model {args.model} --threads {args.threads}: synthetic prompts of "
             f"{args.prompt_tokens} tokens, {args.output_tokens} output tokens asked, {args.requests} requests each",
             bench.command()]
    bench.finish({"model": args.model, "errors": errors, "points": points}, table, args.out, notes, state)
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
