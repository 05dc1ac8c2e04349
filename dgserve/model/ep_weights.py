"""One expert-parallel rank's share of the weights: dense parts plus the experts it owns.

From a checkpoint directory the owned experts are slice-read straight from the safetensors files
(``checkpoint.load(path, expert_ids=...)``). Presets have no files: their random weights are drawn
for the whole model (the stream depends on every tensor), so the full model is built once and the
owned experts copied out - fine for the small presets tests and CPU benchmarks use.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from dgserve.model.checkpoint import LoadedModel, load, read_config, resolve_shipped, resolve_source
from dgserve.model.config import PRESETS, ModelConfig
from dgserve.model.diffusion_gemma import DiffusionGemma
from dgserve.model.vision_checkpoint import VisionMode

log = logging.getLogger(__name__)


def source_config(path_or_preset: str | Path) -> ModelConfig:
    name = resolve_source(path_or_preset, weights=False)
    if name in PRESETS and not Path(name).exists():
        return PRESETS[name]
    return read_config(Path(name))


def load_rank_share(path_or_preset: str | Path, expert_ids: list[int], dtype: str | torch.dtype = torch.float32,
                    device: str | torch.device = "cpu", seed: int = 0, vision: VisionMode = "auto") -> LoadedModel:
    """The model of one rank: every dense weight (the vision tower too), and the experts ``expert_ids`` (global
    ids, ascending)."""
    name = resolve_shipped(str(path_or_preset))
    if not (name in PRESETS and not Path(name).exists()):
        return load(name, dtype=dtype, device=device, expert_ids=expert_ids, seed=seed, vision=vision)
    full = load(name, dtype=dtype, device="cpu", seed=seed)
    if full.config.parameter_counts()["total"] > 2_000_000_000:
        log.warning("building preset %s in full on every rank to take its expert share; use a checkpoint "
                    "directory for large models (ranks then slice-read their experts)", name)
    full.model = shard_model(full.model, expert_ids, device)
    return full


def shard_model(full: DiffusionGemma, expert_ids: list[int], device: str | torch.device = "cpu") -> DiffusionGemma:
    """A copy of ``full`` holding only experts ``expert_ids`` (dense weights shared by copy)."""
    with torch.device("meta"):
        part = DiffusionGemma(full.config, expert_ids=expert_ids)
    part = part.to_empty(device=device).to(full.dtype)
    index = torch.tensor(expert_ids, dtype=torch.long)
    state = {}
    for key, value in full.state_dict().items():
        state[key] = value.index_select(0, index) if ".experts." in key else value
    part.load_state_dict(state, strict=True)
    return part.eval()


def parameter_bytes(model: DiffusionGemma) -> dict[str, int]:
    """Bytes of parameters and buffers, split into experts and everything else (dense)."""
    experts = dense = 0
    for key, value in model.state_dict().items():
        n = value.numel() * value.element_size()
        if ".experts." in key:
            experts += n
        else:
            dense += n
    return {"dense": dense, "experts": experts, "total": dense + experts}


__all__ = ["load_rank_share", "parameter_bytes", "shard_model", "source_config"]
