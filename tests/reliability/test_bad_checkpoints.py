"""Bad checkpoints on the serving path: a Serve app whose model directory is broken fails to deploy with the
loader's clear message surfaced to whoever deployed it, and the failure stays inside that app: a good app on
the same cluster keeps serving throughout.

The loader's own messages are unit-tested in tests/test_checkpoint.py; this suite checks what reaches the
operator through Ray Serve, for failures in the ingress (config.json) and in the model replica (weights).
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import torch
from reliability.harness import MODEL, delete_app, deploy, record, size
from safetensors.torch import load_file, save_file

from dgserve.model.checkpoint import ASSETS, load, save

pytestmark = pytest.mark.slow


def _truncate(d: Path) -> None:
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _rewrite(d: Path, mutate: Callable[[dict[str, torch.Tensor]], None]) -> None:
    tensors = load_file(d / "model.safetensors")
    mutate(tensors)
    save_file(tensors, str(d / "model.safetensors"))


def _wrong_shape(d: Path) -> None:
    _rewrite(d, lambda t: t.__setitem__("model.decoder.layers.0.self_attn.q_proj.weight", torch.zeros(3, 3)))


def _wrong_dtype(d: Path) -> None:
    _rewrite(d, lambda t: t.__setitem__("model.decoder.norm.weight", torch.zeros(64, dtype=torch.int8)))


def _missing_weights(d: Path) -> None:
    (d / "model.safetensors").unlink()


def _missing_config(d: Path) -> None:
    (d / "config.json").unlink()


def _other_model_config(d: Path) -> None:
    (d / "config.json").write_text(json.dumps({"model_type": "gemma4", "hidden_size": 64}))


# name -> (break the directory, fragments the deploy error must contain)
CASES: dict[str, tuple[Callable[[Path], None], tuple[str, ...]]] = {
    "truncated": (_truncate, ("model.safetensors", "truncated")),
    "wrong_shape": (_wrong_shape, ("q_proj.weight", "shape [3, 3], expected [64, 64]")),
    "wrong_dtype": (_wrong_dtype, ("model.decoder.norm.weight", "dtype I8")),
    "missing_weights": (_missing_weights, ("no model.safetensors",)),
    "missing_config": (_missing_config, ("config.json", "missing")),
    "other_model": (_other_model_config, ("model_type is 'gemma4'",)),
}
# CI size: a weights failure (only the replica sees it) and a config failure (the ingress sees it too);
# the full size runs every case.
CI_CASES = ("truncated", "other_model")


@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("good") / "ckpt"
    save(load(MODEL).model, out)
    for f in (ASSETS / MODEL).iterdir():
        shutil.copy(f, out / f.name)
    return out


@pytest.fixture(scope="module")
def good_app(serve_http, good_checkpoint):
    url = deploy(serve_http, "ckpt-good", "/ckpt-good", {"model": {"path": str(good_checkpoint),
                                                                    "served_name": "good"}})
    yield url
    delete_app("ckpt-good")


def _serves(url: str) -> bool:
    r = httpx.post(url + "/v1/completions", timeout=60,
                   json={"model": "good", "prompt": "still here?", "max_tokens": 8, "seed": 1})
    return r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("stop", "length")


def test_good_checkpoint_copy_serves(good_app):
    assert _serves(good_app)


@pytest.mark.parametrize("case", list(size(CI_CASES, tuple(CASES))))
def test_bad_checkpoint_fails_deploy_clearly_and_alone(case, serve_http, good_app, good_checkpoint, tmp_path):
    from ray import serve

    breaker, fragments = CASES[case]
    bad = tmp_path / case
    shutil.copytree(good_checkpoint, bad)
    breaker(bad)
    name = f"ckpt-{case.replace('_', '-')}"
    started = time.perf_counter()
    try:
        with pytest.raises(RuntimeError) as info:
            deploy(serve_http, name, f"/{name}", {"model": {"path": str(bad)}})
        seconds = time.perf_counter() - started
        app = serve.status().applications[name]
        assert app.status == "DEPLOY_FAILED"
        # serve.run names the deployment(s) that failed; their status (`serve status`) carries the cause
        failed = {d: s.message for d, s in app.deployments.items() if s.status == "DEPLOY_FAILED"}
        assert failed and all(d in str(info.value) for d in failed), (info.value, failed)
        message = "\n".join(failed.values())
        assert "CheckpointError" in message, message
        for fragment in fragments:
            assert fragment in message, message
        assert str(bad) in message  # names the directory at fault
    finally:
        delete_app(name)
    assert _serves(good_app)  # the other app's replica was never disturbed
    record("bad_checkpoints", case=case, failed_deployments=sorted(failed), seconds_to_fail=round(seconds, 1))
