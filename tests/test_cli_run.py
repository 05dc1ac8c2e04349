"""`dgserve run` as a user runs it: the console script with no flags but a port, an embedded Ray of its
own, the default (shipped, trained) model, then a chat request through the real HTTP port, `dgserve status`
beside it, clients that walk away mid-stream, and Ctrl-C: a log with no tracebacks from start to exit."""

from __future__ import annotations

import json
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from dgserve_process import dgserve_run

from dgserve.train.evaluate import ascii_word_fraction
from dgserve.train.paths import TINY_DIR

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not (TINY_DIR / "model.safetensors").is_file(), reason="tiny not trained yet")]


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        return json.loads(resp.read())


def test_dgserve_run_default_model_answers_chat_with_readable_text(tmp_path: Path):
    with dgserve_run([], tmp_path) as run:
        base = run.base
        printed = run.log.read_text()
        assert f"dgserve is serving tiny at {base}/v1" in printed and "try: curl" in printed
        with urllib.request.urlopen(f"{base}/v1/models", timeout=30) as resp:
            models = json.loads(resp.read())
        assert [m["id"] for m in models["data"]] == ["tiny"]  # the default model is the trained one

        # the synthetic task in chat form: a checkable, readable answer
        chat = _post(f"{base}/v1/chat/completions", {
            "model": "tiny", "messages": [{"role": "user", "content": "sort 5 2 8 1"}], "max_tokens": 32, "seed": 0})
        answer = chat["choices"][0]["message"]["content"]
        assert answer.strip() == "1 2 5 8", answer
        assert chat["choices"][0]["finish_reason"] == "stop"

        # an ordinary English prompt: English words back (the model card says how good they are: not very)
        done = _post(f"{base}/v1/completions", {"model": "tiny", "prompt": "And the king said unto", "max_tokens": 64,
                                                 "seed": 0})
        text = done["choices"][0]["text"]
        assert len(text.split()) >= 5 and ascii_word_fraction(text) >= 0.8, text

        # `dgserve status` finds this run's embedded Ray (it has no dashboard) without an address
        status = subprocess.run([*run.cmd, "status"], env=run.env, capture_output=True, text=True, timeout=120)
        assert status.returncode == 0, status.stdout + status.stderr
        assert status.stdout.splitlines()[0] == "dgserve  RUNNING", status.stdout

        # clients that disconnect mid-stream are routine: no traceback in the log (checked when the run ends)
        for _ in range(4):
            _stream_then_hang_up(f"{base}/v1/chat/completions", {
                "model": "tiny", "messages": [{"role": "user", "content": "Write a long story about a king."}],
                "max_tokens": 2000, "ignore_eos": True, "stream": True})


def _stream_then_hang_up(url: str, body: dict) -> None:
    """Read the first bytes of a stream, then close the connection without reading the rest."""
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        assert resp.read(64)
