"""Shared fixtures: reference checkpoints written once per session."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


@pytest.fixture(scope="session")
def reference_checkpoints(tmp_path_factory):
    """name -> (transformers model, checkpoint dir) for every spec in hf_oracle.SPECS."""
    import hf_oracle

    root = tmp_path_factory.mktemp("reference")
    out = {}
    for name, spec in hf_oracle.SPECS.items():
        model = hf_oracle.build_reference(spec)
        out[name] = (model, hf_oracle.save_reference(model, root / name))
    return out
