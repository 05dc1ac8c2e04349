"""Hugging Face model ids (issue 17, item 13), offline: the test writes a Hub cache in huggingface_hub's own layout
(``models--owner--name/refs`` + ``snapshots/<commit>``) under ``HF_HUB_CACHE`` and runs the ``dgserve`` console
script with ``HF_HUB_OFFLINE=1``, so nothing touches the network."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from console import dgserve, one_line_error
from huggingface_hub.utils import filter_repo_objects

from dgserve.model.hub import METADATA_FILES, SUBFOLDERS, WEIGHT_FILES, is_hub_id
from dgserve.train.paths import TINY_DIR

pytestmark = pytest.mark.skipif(not (TINY_DIR / "model.safetensors").is_file(), reason="tiny not trained yet")
REPO = "google/diffusiongemma-test"
MAIN, V2 = "a" * 40, "b" * 40


def _snapshot(cache: Path, commit: str, refs: list[str], files: dict[str, Path | str]) -> None:
    repo = cache / f"models--{REPO.replace('/', '--')}"
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    for name, source in files.items():
        if isinstance(source, Path):
            shutil.copyfile(source, snap / name)
        else:
            (snap / name).write_text(source)
    (repo / "refs").mkdir(exist_ok=True)
    for ref in refs:
        (repo / "refs" / ref).write_text(commit)


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory) -> Path:
    """The shipped tiny checkpoint as REPO: main as shipped, tag v2 with one denoising step per canvas."""
    cache = tmp_path_factory.mktemp("hub")
    files: dict[str, Path | str] = {p.name: p for p in TINY_DIR.iterdir() if p.name != "MODEL_CARD.md"}
    _snapshot(cache, MAIN, ["main"], files)
    one_step = {**json.loads((TINY_DIR / "generation_config.json").read_text()), "max_denoising_steps": 1}
    _snapshot(cache, V2, ["v2"], {**files, "generation_config.json": json.dumps(one_step)})
    return cache


def offline(cache: Path) -> dict[str, str]:
    return {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "HF_TOKEN": ""}


@pytest.mark.slow  # runs the dgserve console script in a subprocess
def test_a_model_id_loads_from_the_cache_offline(hub_cache) -> None:
    args = ["generate", "--prompt", "sort 3 1 2", "--chat", "--json", "--seed", "0", "--max-tokens", "32"]
    by_id = json.loads(dgserve(*args, "--model", REPO, env=offline(hub_cache)).stdout)
    shipped = json.loads(dgserve(*args, "--model", "tiny").stdout)
    assert by_id["text"].strip() == "1 2 3" and by_id["token_ids"] == shipped["token_ids"]
    assert by_id["stats"]["denoise_steps"] > by_id["stats"]["canvases"]
    v2 = json.loads(dgserve(*args, "--model", REPO, "--revision", "v2", env=offline(hub_cache)).stdout)
    assert v2["stats"]["denoise_steps"] == v2["stats"]["canvases"]  # v2's generation_config: one step each


@pytest.mark.slow  # runs the dgserve console script in a subprocess
def test_missing_from_the_cache_offline_is_one_clear_line(hub_cache) -> None:
    line = one_line_error(dgserve("generate", "--prompt", "hi", "--model", "google/not-cached",
                                  env=offline(hub_cache)), "generate")
    assert f"google/not-cached: not in the local Hugging Face cache ({hub_cache}) and HF_HUB_OFFLINE is set" in line
    revision = one_line_error(dgserve("generate", "--prompt", "hi", "--model", REPO, "--revision", "v9",
                                      env=offline(hub_cache)), "generate")
    assert f"{REPO} at revision v9: not in the local Hugging Face cache" in revision


@pytest.mark.slow  # runs the dgserve console script in a subprocess
def test_the_ingress_needs_only_the_metadata_files(tmp_path, hub_cache) -> None:
    """``load_metadata`` (what the ingress calls) asks for config, generation config and tokenizer files only."""
    cache = tmp_path / "hub"
    shutil.copytree(hub_cache, cache)
    (cache / f"models--{REPO.replace('/', '--')}" / "snapshots" / MAIN / "model.safetensors").unlink()
    code = ("from dgserve.model.checkpoint import load_metadata; m = load_metadata('google/diffusiongemma-test'); "
            "print(m.config.canvas_length, m.tokenizer is not None)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**__import__("os").environ, **offline(cache)})
    assert proc.returncode == 0 and proc.stdout.split() == ["32", "True"], proc.stderr
    assert "no model.safetensors" in one_line_error(dgserve("generate", "--prompt", "hi", "--model", REPO,
                                                            env=offline(cache)), "generate")


def test_only_weights_configs_and_tokenizer_files_are_fetched() -> None:
    listing = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "model.safetensors.index.json",
               "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "chat_template.jinja", "pytorch_model.bin", "README.md", ".gitattributes",
               "original/consolidated.safetensors", "onnx/model.onnx", "vision/config.json"]
    pick = list(filter_repo_objects(listing, allow_patterns=[*METADATA_FILES, *WEIGHT_FILES],
                                    ignore_patterns=list(SUBFOLDERS)))
    assert pick == listing[:9]
    metadata = list(filter_repo_objects(listing, allow_patterns=list(METADATA_FILES),
                                        ignore_patterns=list(SUBFOLDERS)))
    assert metadata == listing[3:9]


@pytest.mark.parametrize(("name", "hub"), [
    ("google/diffusiongemma-26B-A4B-it", True), ("tiny", False), ("tiny-random", False), ("./ckpt", False),
    ("/models/x", False), ("a/b/c", False), ("google/", False), ("google/../x", False),
])
def test_which_names_are_hub_ids(name, hub) -> None:
    assert is_hub_id(name) is hub
