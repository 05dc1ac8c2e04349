"""Loading (and writing) DiffusionGemma checkpoints in the Hugging Face layout.

``load(path_or_preset, dtype, device)`` reads ``config.json``, ``model.safetensors`` (or a sharded
``model.safetensors.index.json``), ``generation_config.json`` and the tokenizer files. The model is
built on the meta device and each tensor is memory-mapped, checked, cast and copied into place, so
a checkpoint never needs twice its size in memory. The vision tower, if any, is read by
``vision_checkpoint`` with the same checks. Presets build a deterministic random model instead; Hugging Face
model ids are resolved to their cached snapshot (``dgserve.model.hub``).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from dgserve.model import fp8_checkpoint
from dgserve.model import quantization as quant
from dgserve.model.config import PRESETS, ConfigError, ModelConfig
from dgserve.model.diffusion_gemma import DiffusionGemma
from dgserve.model.generation_config import SamplingParams
from dgserve.model.hub import HubError, is_hub_id, snapshot

if TYPE_CHECKING:
    from dgserve.model.vision_checkpoint import LoadedVision, VisionMode, VisionSpec

log = logging.getLogger(__name__)

ASSETS = Path(__file__).parent / "assets"
_FLOAT_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
SHIPPED_CHECKPOINTS = {"tiny": ASSETS / "tiny"}  # presets that are trained checkpoint directories in the package
_PICKLE_NAMES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.pth", "model.ckpt")
# Prefixes under which a checkpoint may hold the (tied) text weights, in order of preference.
_TEXT_PREFIXES = ("model.decoder.", "model.encoder.language_model.", "model.language_model.")


class CheckpointError(ValueError):
    """A checkpoint directory cannot be loaded; the message names the file (and tensor) at fault."""


@dataclass(frozen=True)
class GenerationDefaults:
    """Per-checkpoint defaults from generation_config.json."""

    sampling: SamplingParams = field(default_factory=SamplingParams)
    eos_token_ids: tuple[int, ...] = (1,)
    pad_token_id: int | None = 0
    max_new_tokens: int = 256


@dataclass
class LoadedModel:
    model: DiffusionGemma
    config: ModelConfig
    generation: GenerationDefaults
    tokenizer: Any | None  # dgserve.model.tokenizer.Tokenizer when the checkpoint ships one
    source: str
    vision: LoadedVision | None = None  # the vision tower + projector (None: text only)


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype not in table:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(table)}")
    return table[dtype]


def load(path_or_preset: str | Path, dtype: str | torch.dtype = torch.float32, device: str | torch.device = "cpu",
         expert_ids: list[int] | None = None, seed: int = 0, revision: str | None = None,
         vision: VisionMode = "auto", quantization: str = "none", fp8_emulation: bool = False) -> LoadedModel:
    """Load a checkpoint directory or a Hugging Face model id (``revision``: its branch, tag or commit), or build a
    named preset (``tiny-random``, ``diffusiongemma-26b-a4b``...).

    ``expert_ids``: load only these experts (an expert-parallel rank's share); default all.
    ``vision``: ``auto`` loads the vision tower when the checkpoint has one (every rank: it is dense), ``off``
    never loads it.
    ``quantization``: ``fp8`` quantizes the attention projections, dense MLP and experts to e4m3 as each tensor is
    read (``dgserve.model.quantization``; ``fp8_emulation`` runs their arithmetic emulated, e.g. on CPU), and reads
    an already quantized checkpoint as it is; ``none`` dequantizes such a checkpoint to ``dtype``. The vision tower
    is never quantized.
    """
    from dgserve.model.vision_checkpoint import check_vision_mode, load_vision

    check_vision_mode(vision)
    dtype = resolve_dtype(dtype)
    device = torch.device(device)
    try:
        plan = quant.plan(quantization, device, dtype, fp8_emulation)
    except quant.QuantizationError as exc:
        raise CheckpointError(str(exc)) from None
    name = resolve_source(path_or_preset, revision)
    if name in PRESETS and not Path(name).exists():
        return _load_preset(name, dtype, device, expert_ids, seed, plan)
    path = Path(name)
    config = read_config(path)
    layout = _read_fp8_layout(path)
    weights = _weight_files(path)
    model = _empty_model(config, dtype, device, expert_ids, plan)
    _fill_from_safetensors(model, weights, dtype, layout)
    model.eval()
    return LoadedModel(model=model, config=config, generation=read_generation_config(path, config),
                       tokenizer=_maybe_tokenizer(path), source=str(path),
                       vision=load_vision(path, weights, config.text.hidden_size, dtype, device, vision))


def _read_fp8_layout(path: Path) -> fp8_checkpoint.Fp8Layout | None:
    file = path / "config.json"
    try:
        return fp8_checkpoint.read_layout(json.loads(file.read_text()), str(file))
    except quant.QuantizationError as exc:
        raise CheckpointError(str(exc)) from None


@dataclass
class ModelMetadata:
    """Everything about a checkpoint but its weights (what an ingress needs to tokenize and validate)."""

    config: ModelConfig
    generation: GenerationDefaults
    tokenizer: Any | None
    source: str
    vision: VisionSpec | None = None  # image preprocessing of a checkpoint with a vision tower (None: text only)


def _preset_names() -> str:
    return ", ".join(sorted({*PRESETS, *SHIPPED_CHECKPOINTS}))


def resolve_shipped(name: str) -> str:
    """A shipped checkpoint's preset name (``tiny``) -> its directory in the package; anything else unchanged."""
    return str(SHIPPED_CHECKPOINTS[name]) if name in SHIPPED_CHECKPOINTS and not Path(name).exists() else name


def resolve_source(path_or_preset: str | Path, revision: str | None = None, *, weights: bool = True) -> str:
    """A preset name, or the local checkpoint directory of a path, a shipped preset or a Hugging Face model id
    (downloaded into the Hub's cache if needed; ``weights=False``: its metadata files only)."""
    name = resolve_shipped(str(path_or_preset))
    if (name in PRESETS and not Path(name).exists()) or Path(name).is_dir():
        return name
    if is_hub_id(name):
        try:
            return str(snapshot(name, revision, weights=weights))
        except HubError as exc:
            raise CheckpointError(str(exc)) from None
    raise CheckpointError(f"{name}: not a checkpoint directory, not a preset (presets: {_preset_names()}) and not a "
                          "Hugging Face model id (owner/name)")


def check_model_name(name: str) -> None:
    """Without reading or downloading anything: whether ``name`` can name a model somewhere (a preset, a local or
    absolute checkpoint path, a Hugging Face model id); CheckpointError otherwise, e.g. for a mistyped preset."""
    if name in PRESETS or name in SHIPPED_CHECKPOINTS or Path(name).is_absolute() or Path(name).exists() \
            or is_hub_id(name):
        return
    raise CheckpointError(f"{name}: not a preset (presets: {_preset_names()}), not an existing directory and not a "
                          "Hugging Face model id (owner/name); a directory that exists only on the cluster needs an "
                          "absolute path")


def load_metadata(path_or_preset: str | Path, revision: str | None = None, vision: VisionMode = "auto"
                  ) -> ModelMetadata:
    from dgserve.model.vision_checkpoint import check_vision_mode, read_vision_spec

    check_vision_mode(vision)
    name = resolve_source(path_or_preset, revision, weights=False)
    if name in PRESETS and not Path(name).exists():
        config = PRESETS[name]
        asset = ASSETS / name
        return ModelMetadata(config, GenerationDefaults(eos_token_ids=config.text.eos_token_id,
                                                        pad_token_id=config.text.pad_token_id),
                             _maybe_tokenizer(asset) if asset.is_dir() else None, f"preset:{name}")
    path = Path(name)
    config = read_config(path)
    return ModelMetadata(config, read_generation_config(path, config), _maybe_tokenizer(path), str(path),
                         read_vision_spec(path, vision))


def read_json_object(file: Path) -> dict[str, Any]:
    """A checkpoint file holding one JSON object (errors name the file)."""
    try:
        raw = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{file}: not valid JSON ({exc})") from exc
    if not isinstance(raw, dict):
        raise CheckpointError(f"{file}: expected a JSON object")
    return raw


def read_config(path: Path) -> ModelConfig:
    file = path / "config.json"
    if not file.is_file():
        raise CheckpointError(f"{file}: missing (a Hugging Face checkpoint directory needs config.json)")
    raw = read_json_object(file)
    try:
        return ModelConfig.from_hf_dict(raw, source=str(file))
    except ConfigError as exc:
        raise CheckpointError(str(exc)) from exc


def read_generation_config(path: Path, config: ModelConfig) -> GenerationDefaults:
    file = path / "generation_config.json"
    eos_default = config.text.eos_token_id
    if not file.is_file():
        return GenerationDefaults(eos_token_ids=eos_default, pad_token_id=config.text.pad_token_id)
    try:
        raw = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{file}: not valid JSON ({exc})") from exc
    base = SamplingParams()
    sampler = raw.get("sampler_config") or {}
    try:
        sampling = SamplingParams(
            max_denoising_steps=int(raw.get("max_denoising_steps") or base.max_denoising_steps),
            entropy_bound=float(sampler.get("entropy_bound", base.entropy_bound)),
            t_max=float(raw["t_max"]) if raw.get("t_max") is not None else base.t_max,
            t_min=float(raw["t_min"]) if raw.get("t_min") is not None else base.t_min,
            stability_threshold=int(raw["stability_threshold"]) if raw.get("stability_threshold") is not None
            else base.stability_threshold,
            confidence_threshold=float(raw["confidence_threshold"]) if raw.get("confidence_threshold") is not None
            else base.confidence_threshold,
        )
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"{file}: invalid sampler settings: {exc}") from exc
    eos = raw.get("eos_token_id")
    eos_ids = eos_default if eos is None else tuple(int(e) for e in (eos if isinstance(eos, list) else [eos]))
    return GenerationDefaults(sampling=sampling, eos_token_ids=eos_ids,
                              pad_token_id=raw.get("pad_token_id", config.text.pad_token_id),
                              max_new_tokens=int(raw.get("max_new_tokens") or 256))


def _maybe_tokenizer(path: Path) -> Any | None:
    if not (path / "tokenizer.json").is_file():
        return None
    from dgserve.model.tokenizer import Tokenizer

    return Tokenizer.from_dir(path)


def _weight_files(path: Path) -> dict[str, Path]:
    """Map tensor name -> safetensors file holding it."""
    index = path / "model.safetensors.index.json"
    single = path / "model.safetensors"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index}: not a valid safetensors index ({exc})") from exc
        files = {}
        for tensor, shard in weight_map.items():
            shard_path = path / shard
            if not shard_path.is_file():
                raise CheckpointError(f"{index}: shard {shard} (holding {tensor}) is missing")
            files[tensor] = shard_path
        return files
    if single.is_file():
        return {name: single for name in _safetensors_keys(single)}
    pickles = [n for n in _PICKLE_NAMES if (path / n).exists()]
    if pickles:
        raise CheckpointError(
            f"{path / pickles[0]}: pickle checkpoints are refused (loading them can run arbitrary code); "
            "convert the checkpoint to safetensors")
    raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json")


def _safetensors_keys(file: Path) -> list[str]:
    try:
        with safe_open(file, framework="pt", device="cpu") as f:
            return list(f.keys())
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{file}: unreadable safetensors file (truncated or corrupt?): {exc}") from exc


def _empty_model(config: ModelConfig, dtype: torch.dtype, device: torch.device,
                 expert_ids: list[int] | None, plan: quant.QuantizationPlan | None = None) -> DiffusionGemma:
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            model = DiffusionGemma(config, expert_ids=expert_ids)
        if plan is not None:
            quant.convert_(model, plan, device)  # FP8 modules swapped in before anything is allocated
    finally:
        torch.set_default_dtype(old)
    return model.to_empty(device=device)


def _checkpoint_name_candidates(name: str) -> list[str]:
    if name.endswith(".encoder_layer_scalar"):
        return ["model.encoder.language_model." + name.replace("encoder_layer_scalar", "layer_scalar")]
    if name.endswith(".layer_scalar"):
        return ["model.decoder." + name]
    if name.startswith("self_conditioning."):
        return ["model.decoder." + name]
    names = [p + name for p in _TEXT_PREFIXES]
    if name == "embed_tokens.weight":
        names.append("lm_head.weight")
    return names


class _Tensors:
    """The checkpoint's safetensors files by tensor name, each opened (memory-mapped) once."""

    def __init__(self, files: dict[str, Path]) -> None:
        self.files = files
        self.handles: dict[Path, Any] = {}

    def slice(self, name: str) -> tuple[Any, Path]:
        file = self.files[name]
        if file not in self.handles:
            try:
                self.handles[file] = safe_open(file, framework="pt", device="cpu")
            except (SafetensorError, OSError) as exc:
                raise CheckpointError(f"{file}: unreadable safetensors file (truncated or corrupt?): {exc}") from exc
        return self.handles[file].get_slice(name), file


def _fill_from_safetensors(model: DiffusionGemma, files: dict[str, Path], dtype: torch.dtype,
                           layout: fp8_checkpoint.Fp8Layout | None = None) -> None:
    """Copy every tensor into place, one at a time: FP8 targets are quantized as they are read (or copied with their
    scales from an FP8 checkpoint); FP8 tensors of a checkpoint are dequantized where the model keeps full precision."""
    tensors = _Tensors(files)
    state = model.state_dict(keep_vars=True)
    scales = {quant.scale_name(n) for n, t in state.items() if quant.is_fp8(t)}
    try:
        for name, target in state.items():
            if name in scales:
                continue  # written with its weight
            ckpt_name = next((c for c in _checkpoint_name_candidates(name) if c in files), None)
            with torch.no_grad():
                if ckpt_name is None:
                    if name.endswith("layer_scalar"):
                        # Absent buffers default to 1, as in the reference's initialisation.
                        target.fill_(1.0)
                        continue
                    raise CheckpointError(
                        f"{_describe(files)}: missing tensor {_checkpoint_name_candidates(name)[0]}")
                tensor, scale = _read_tensor(tensors, ckpt_name, name, target, model, layout)
                if quant.is_fp8(target):
                    scale_target = state[quant.scale_name(name)]
                    if scale is None:
                        quant.quantize_into_(target, scale_target, tensor)
                    else:
                        target.copy_(tensor)
                        scale_target.copy_(scale)
                elif scale is not None:
                    quant.dequantize_into_(target, tensor, scale)
                else:
                    target.copy_(tensor.to(target.dtype))
    except quant.QuantizationError as exc:
        raise CheckpointError(str(exc)) from None
    finally:
        tensors.handles.clear()


def _read_tensor(tensors: _Tensors, ckpt_name: str, name: str, target: torch.Tensor, model: DiffusionGemma,
                 layout: fp8_checkpoint.Fp8Layout | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The checkpoint's tensor for ``target`` (only this model's experts), and its fp32 scales if it is FP8."""
    sl, file = tensors.slice(ckpt_name)
    st_dtype = sl.get_dtype()
    fp8 = st_dtype.startswith("F8_")
    if fp8:
        fp8_checkpoint.check_storage(st_dtype, f"{file}: tensor {ckpt_name}", layout)
    elif st_dtype not in _FLOAT_DTYPES:
        raise CheckpointError(f"{file}: tensor {ckpt_name} has dtype {st_dtype}; expected one of "
                              f"{', '.join(_FLOAT_DTYPES)} or an FP8 checkpoint's F8_E4M3")
    shape = list(sl.get_shape())
    expected = list(target.shape)
    expert_ids = _expert_ids_for(name, model)
    full_expected = [model.config.text.num_experts, *expected[1:]] if expert_ids is not None else expected
    if shape != full_expected:
        raise CheckpointError(f"{file}: tensor {ckpt_name} has shape {shape}, expected {full_expected}")
    partial = expert_ids is not None and expert_ids != list(range(model.config.text.num_experts))
    try:
        if partial:
            tensor = _read_experts(sl, expert_ids)
        else:
            tensor = sl[:] if shape else tensors.handles[file].get_tensor(ckpt_name)
    except (SafetensorError, OSError, RuntimeError) as exc:
        raise CheckpointError(f"{file}: cannot read tensor {ckpt_name} (truncated file?): {exc}") from exc
    if not fp8:
        return tensor, None
    scale_name = fp8_checkpoint.scale_tensor_name(ckpt_name)
    if scale_name not in tensors.files:
        raise CheckpointError(f"{file}: FP8 tensor {ckpt_name} has no scale tensor {scale_name}")
    ssl, sfile = tensors.slice(scale_name)
    try:
        raw = ssl[:] if ssl.get_shape() else tensors.handles[sfile].get_tensor(scale_name)
        scale = fp8_checkpoint.scales(raw, shape, f"{sfile}: tensor {scale_name}")
    except (SafetensorError, OSError, RuntimeError) as exc:
        raise CheckpointError(f"{sfile}: cannot read tensor {scale_name} (truncated file?): {exc}") from exc
    return tensor, scale[expert_ids] if partial else scale


def _expert_ids_for(name: str, model: DiffusionGemma) -> list[int] | None:
    if ".experts." not in name:
        return None
    layer = int(name.split(".")[1])
    return model.layers[layer].experts.expert_ids


def _read_experts(sl: Any, expert_ids: list[int]) -> torch.Tensor:
    """Slice-read only the owned experts (contiguous runs read in one slice each)."""
    parts, run_start, prev = [], expert_ids[0], expert_ids[0]
    for e in [*expert_ids[1:], None]:
        if e is not None and e == prev + 1:
            prev = e
            continue
        parts.append(sl[run_start:prev + 1])
        if e is not None:
            run_start = prev = e
    return torch.cat(parts)


def _describe(files: dict[str, Path]) -> str:
    names = sorted({p.name for p in files.values()})
    parent = next(iter(files.values())).parent if files else Path(".")
    return str(parent / names[0]) if len(names) == 1 else f"{parent} ({len(names)} shards)"


# -- presets -----------------------------------------------------------------------------------------


def init_random_(model: DiffusionGemma, seed: int = 0, std: float = 0.02) -> None:
    """Deterministic random weights (normal(0, std) matrices, ones for norms and scales). An FP8 model draws the same
    numbers, rounds them to its dtype and quantizes them, so it is the quantization of the unquantized preset."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    state = model.state_dict(keep_vars=True)
    scales = {quant.scale_name(n) for n, t in state.items() if quant.is_fp8(t)}
    with torch.no_grad():
        for name, tensor in state.items():
            if name in scales:
                continue
            if tensor.dim() >= 2:
                # draw on CPU in chunks along dim 0 so the stream is device independent and bounded
                for i in range(0, tensor.shape[0], 16):
                    chunk = torch.empty(tensor[i:i + 16].shape, dtype=torch.float32)
                    chunk.normal_(0.0, std, generator=gen)
                    if quant.is_fp8(tensor):
                        quant.quantize_into_(tensor, state[quant.scale_name(name)],
                                                    chunk.to(model.dtype), start=i)
                    else:
                        tensor[i:i + 16].copy_(chunk)
            else:
                tensor.fill_(1.0)


def _load_preset(name: str, dtype: torch.dtype, device: torch.device, expert_ids: list[int] | None,
                 seed: int, plan: quant.QuantizationPlan | None = None) -> LoadedModel:
    config = PRESETS[name]
    model = _empty_model(config, dtype, device, expert_ids, plan)
    init_random_(model, seed)
    model.eval()
    asset = ASSETS / name
    tokenizer = _maybe_tokenizer(asset) if asset.is_dir() else None
    return LoadedModel(model=model, config=config,
                       generation=GenerationDefaults(eos_token_ids=config.text.eos_token_id,
                                                     pad_token_id=config.text.pad_token_id),
                       tokenizer=tokenizer, source=f"preset:{name}")


# -- writing -------------------------------------------------------------------------------------------


def save(model: DiffusionGemma, out_dir: str | Path, generation: GenerationDefaults | None = None) -> None:
    """Write config.json, model.safetensors and generation_config.json in the Hugging Face layout
    (text weights under ``model.decoder.``, encoder layer scalars under ``model.encoder.language_model.``); an FP8
    model is written in the FP8 checkpoint layout ``load`` reads (``dgserve.model.fp8_checkpoint``)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        ckpt = _checkpoint_name_candidates(name)[0]
        tensors[ckpt] = tensor.detach().to("cpu").contiguous()
    tmp = out / "model.safetensors.tmp"
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    tmp.replace(out / "model.safetensors")
    config = model.config.to_hf_dict()
    if any(quant.is_fp8(t) for t in tensors.values()):
        config["quantization_config"] = fp8_checkpoint.compressed_tensors_config()
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    gen = generation or GenerationDefaults(eos_token_ids=model.config.text.eos_token_id)
    s = gen.sampling
    gen_json = {
        "max_new_tokens": gen.max_new_tokens, "max_denoising_steps": s.max_denoising_steps,
        "sampler_config": {"entropy_bound": s.entropy_bound, "_cls_name": "EntropyBoundSamplerConfig"},
        "t_min": s.t_min, "t_max": s.t_max, "stability_threshold": s.stability_threshold,
        "confidence_threshold": s.confidence_threshold,
        "eos_token_id": list(gen.eos_token_ids), "pad_token_id": gen.pad_token_id,
        "return_dict_in_generate": True,
    }
    (out / "generation_config.json").write_text(json.dumps(gen_json, indent=2) + "\n")
