"""`dgserve run` as a user runs it: the console script with no flags but a port, an embedded Ray of its
own, the default (shipped, trained) model, then a chat request through the real HTTP port."""

from __future__ import annotations

import json
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
    log = tmp_path / "dgserve-run.log"
    with dgserve_run([], log) as base:
        printed = log.read_text()
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
