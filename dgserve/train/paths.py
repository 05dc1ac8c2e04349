"""Where the shipped tiny checkpoint lives, and resolving ``tiny`` before it is a registered preset."""

from __future__ import annotations

import os
from pathlib import Path

TINY_DIR = Path(__file__).resolve().parent.parent / "model" / "assets" / "tiny"


def default_work_dir(name: str = "tiny") -> Path:
    """Resumable training state: ``$XDG_CACHE_HOME/dgserve/train-<name>`` (default ``~/.cache``)."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "dgserve" / f"train-{name}"


def resolve_model(name: str) -> str:
    """``tiny`` -> the shipped checkpoint directory while ``load`` does not know the preset yet."""
    from dgserve.model.config import PRESETS

    if name == "tiny" and name not in PRESETS and not Path(name).exists():
        return str(TINY_DIR)
    return name
