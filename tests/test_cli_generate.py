"""`dgserve generate` as a user runs it: the installed console script, in a subprocess."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # each test starts the console script, which imports torch, in a subprocess


def _dgserve(*args: str) -> subprocess.CompletedProcess:
    exe = shutil.which("dgserve")
    cmd = [exe, *args] if exe else [sys.executable, "-m", "dgserve.deploy.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def test_generate_json_tiny_random():
    proc = _dgserve("generate", "--model", "tiny-random", "--prompt", "hi", "--json", "--max-tokens", "40",
                    "--seed", "3")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert set(out) >= {"text", "token_ids", "stats"}
    assert set(out["stats"]) >= {"new_tokens", "canvases", "denoise_steps", "tokens_per_forward", "seconds",
                                 "tokens_per_second"}
    assert out["stats"]["new_tokens"] == len(out["token_ids"]) <= 40
    assert out["stats"]["canvases"] >= 1
    again = json.loads(_dgserve("generate", "--model", "tiny-random", "--prompt", "hi", "--json", "--max-tokens",
                                "40", "--seed", "3").stdout)
    assert again["token_ids"] == out["token_ids"]  # same seed, same tokens


def test_default_model_is_the_trained_tiny():
    default = json.loads(_dgserve("generate", "--prompt", "Q: sort 9 4 7\nA:", "--json", "--max-tokens", "32",
                                  "--seed", "0").stdout)
    tiny = json.loads(_dgserve("generate", "--model", "tiny", "--prompt", "Q: sort 9 4 7\nA:", "--json",
                               "--max-tokens", "32", "--seed", "0").stdout)
    assert default["token_ids"] == tiny["token_ids"]
    assert default["text"].strip() == "4 7 9", default["text"]  # the synthetic task the shipped model learned


def test_generate_chat_prints_text():
    proc = _dgserve("generate", "--prompt", "hello", "--chat", "--max-tokens", "8", "--seed", "1")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() != "" or proc.stdout == "\n"


@pytest.mark.parametrize(("args", "message"), [
    (["--max-tokens", "0"], "invalid --max-tokens"),
    (["--model", "/nonexistent/dir"], "not a checkpoint directory, not a preset"),
    (["--steps", "0"], "invalid --steps"),
])
def test_generate_bad_arguments(args, message):
    proc = _dgserve("generate", "--prompt", "hi", *args)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
