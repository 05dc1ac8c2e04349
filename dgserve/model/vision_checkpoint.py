"""Loading the vision tower and projector from a DiffusionGemma checkpoint (the ``model.encoder.vision_tower.*``
and ``model.encoder.embed_vision.*`` tensors the text loader leaves alone), with the text weights' checks:
built on the meta device, every tensor memory-mapped, its dtype and shape checked, missing and unexpected
tensors named. ``vision="off"`` loads nothing (text-only serving keeps its memory).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import SafetensorError, safe_open

from dgserve.model.checkpoint import CheckpointError, read_json_object
from dgserve.model.config import ConfigError
from dgserve.model.image_processing import ImageProcessor, ProcessedImage
from dgserve.model.vision import VisionTower
from dgserve.model.vision_config import ImageProcessorConfig, VisionConfig

log = logging.getLogger(__name__)

VisionMode = Literal["auto", "off"]
VISION_MODES: tuple[VisionMode, ...] = ("auto", "off")
# Where the checkpoint keeps the vision weights; the module names below it are VisionTower's own.
CHECKPOINT_PREFIX = "model.encoder."
_VISION_ROOTS = ("model.encoder.vision_tower.", "model.encoder.embed_vision.")
_FLOAT_DTYPES = ("F32", "F16", "BF16")
PREPROCESSOR_CONFIG_FILE = "preprocessor_config.json"
PROCESSOR_CONFIG_FILE = "processor_config.json"  # newer layout: the image processor's settings nested inside


class VisionCheckpointError(CheckpointError):
    """The checkpoint's vision tower cannot be loaded; the message names the file and tensor at fault."""


@dataclass(frozen=True)
class VisionSpec:
    """What an ingress needs to prepare images for a checkpoint (no weights)."""

    config: VisionConfig
    processor: ImageProcessorConfig


@dataclass
class LoadedVision:
    tower: VisionTower
    spec: VisionSpec

    def __post_init__(self) -> None:
        self.processor = ImageProcessor(self.spec.processor)

    def encode(self, images: Sequence[ProcessedImage]) -> list[torch.Tensor]:
        """Each image's features in the text model's embedding space, ``[num_soft_tokens, H_text]``, computed
        as one batch (an image's features do not depend on the others in it)."""
        if not images:
            return []
        features = self.tower(*self.processor.batch(images, self.tower.device))
        return list(torch.split(features, [image.num_soft_tokens for image in images]))


def read_vision_spec(path: Path, mode: VisionMode = "auto") -> VisionSpec | None:
    """The vision tower's config and image preprocessing of a checkpoint directory; None when the checkpoint
    has no vision tower or ``mode`` is ``off``."""
    check_vision_mode(mode)
    if mode == "off":
        return None
    file = path / "config.json"
    vision = read_json_object(file).get("vision_config")
    if vision is None:
        return None
    try:
        config = VisionConfig.from_hf_dict(vision, source=str(file))
        return VisionSpec(config, _read_image_processor_config(path, config))
    except ConfigError as exc:
        raise VisionCheckpointError(f"{exc} (set vision: off to serve this checkpoint as text only)") from exc


def _read_image_processor_config(path: Path, vision: VisionConfig) -> ImageProcessorConfig:
    """The checkpoint's preprocessor settings; the reference defaults when it ships none."""
    flat, nested = path / PREPROCESSOR_CONFIG_FILE, path / PROCESSOR_CONFIG_FILE
    if flat.is_file():
        return ImageProcessorConfig.from_hf_dict(read_json_object(flat), vision, str(flat))
    if nested.is_file():
        raw = read_json_object(nested).get("image_processor")
        if isinstance(raw, dict):
            return ImageProcessorConfig.from_hf_dict(raw, vision, f"{nested}: image_processor")
    return ImageProcessorConfig.for_vision(vision)


def load_vision(path: Path, files: dict[str, Path], text_hidden: int, dtype: torch.dtype, device: torch.device,
                mode: VisionMode = "auto") -> LoadedVision | None:
    """The checkpoint's vision tower + projector, or None (``mode`` off, no vision_config, or no vision tensors:
    a text-only export). Present vision tensors must match the config exactly.

    ``files`` maps tensor names to the safetensors file holding them (the text loader's weight map)."""
    spec = read_vision_spec(path, mode)
    if spec is None:
        if mode == "off":
            log.info("%s: vision is off: the vision tower is not loaded and image inputs are refused", path)
        return None
    present = sorted(n for n in files if n.startswith(_VISION_ROOTS))
    if not present:
        # a text-only export that kept the vision_config (dgserve's own tiny model is one): nothing to load
        log.info("%s: config.json describes a vision tower but the weights hold none; serving text only", path)
        return None
    tower = _empty_tower(spec.config, text_hidden, dtype, device)
    expected = {CHECKPOINT_PREFIX + name: tensor for name, tensor in tower.state_dict(keep_vars=True).items()}
    unexpected = [n for n in present if n not in expected]
    if unexpected:
        raise VisionCheckpointError(
            f"{_describe(files, unexpected[0])}: unexpected vision tensor {unexpected[0]}"
            f"{f' (and {len(unexpected) - 1} more)' if len(unexpected) > 1 else ''}; config.json's vision_config "
            "does not describe these weights")
    missing = [n for n in expected if n not in files]
    if missing:
        raise VisionCheckpointError(
            f"{_describe(files, present[0])}: missing vision tensor {missing[0]}"
            f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}")
    handles: dict[Path, Any] = {}
    try:
        with torch.no_grad():
            for name, target in expected.items():
                file = files[name]
                if file not in handles:
                    handles[file] = _open(file)
                target.copy_(_read_checked(handles[file], file, name, list(target.shape)))
    finally:
        handles.clear()
    tower.eval().requires_grad_(False)  # serving only, as the text model
    log.info("%s: vision tower loaded (%d layers, hidden %d, %d soft tokens per image at most)", path,
             spec.config.num_hidden_layers, spec.config.hidden_size, spec.processor.max_soft_tokens)
    return LoadedVision(tower, spec)


def check_vision_mode(mode: str) -> None:
    if mode not in VISION_MODES:
        raise VisionCheckpointError(f"vision={mode!r}: expected one of {', '.join(VISION_MODES)}")


def _empty_tower(config: VisionConfig, text_hidden: int, dtype: torch.dtype, device: torch.device) -> VisionTower:
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            tower = VisionTower(config, text_hidden)
    finally:
        torch.set_default_dtype(old)
    return tower.to_empty(device=device)


def _open(file: Path) -> Any:
    try:
        return safe_open(file, framework="pt", device="cpu")
    except (SafetensorError, OSError) as exc:
        raise VisionCheckpointError(f"{file}: unreadable safetensors file (truncated or corrupt?): {exc}") from exc


def _read_checked(handle: Any, file: Path, name: str, expected: list[int]) -> torch.Tensor:
    sl = handle.get_slice(name)
    if sl.get_dtype() not in _FLOAT_DTYPES:
        raise VisionCheckpointError(f"{file}: tensor {name} has dtype {sl.get_dtype()}; expected one of "
                                    f"{', '.join(_FLOAT_DTYPES)} (quantized vision towers are not supported)")
    shape = list(sl.get_shape())
    if shape != expected:
        raise VisionCheckpointError(f"{file}: tensor {name} has shape {shape}, expected {expected} "
                                    "(from config.json's vision_config)")
    try:
        return sl[:] if shape else handle.get_tensor(name)
    except (SafetensorError, OSError, RuntimeError) as exc:
        raise VisionCheckpointError(f"{file}: cannot read tensor {name} (truncated file?): {exc}") from exc


def _describe(files: dict[str, Path], name: str) -> str:
    return str(files[name]) if name in files else str(next(iter(files.values())))


def parameter_bytes(loaded: LoadedVision | None) -> int:
    """Bytes of the vision tower's parameters and buffers (0 when not loaded)."""
    if loaded is None:
        return 0
    return sum(t.numel() * t.element_size() for t in loaded.tower.state_dict().values())


__all__ = ["VISION_MODES", "LoadedVision", "VisionCheckpointError", "VisionMode", "VisionSpec", "check_vision_mode",
           "load_vision", "parameter_bytes", "read_vision_spec"]
