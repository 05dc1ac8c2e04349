"""Test-only: a small checkpoint whose tokenizer and chat template carry DiffusionGemma's (Gemma 4's) tool format:
the tiny-random architecture with random weights, a byte-level BPE with Gemma 4's turn and tool special tokens, and
tests/data/gemma4_tools_chat_template.jinja (its renderings are checked against the reference template's in
tests/test_tool_calls.py). Random weights call no tools by themselves: tests feed it model-shaped outputs."""

from __future__ import annotations

from pathlib import Path

from dgserve.model.checkpoint import GenerationDefaults, init_random_, save
from dgserve.model.config import PRESETS
from dgserve.model.diffusion_gemma import DiffusionGemma
from dgserve.model.tokenizer_build import TINY_CORPUS, train_byte_level_bpe, write_tokenizer_dir

DATA = Path(__file__).parent / "data"
TEMPLATE = DATA / "gemma4_tools_chat_template.jinja"
RENDERINGS = DATA / "gemma4_tool_renderings.json"
SPECIAL = ["<pad>", "<eos>", "<bos>", "<|turn>", "<turn|>", "<|tool>", "<tool|>", "<|tool_call>", "<tool_call|>",
           "<|tool_response>", "<tool_response|>", '<|"|>', "<|channel>", "<channel|>", "<|think|>", "<image>"]
VOCAB = 512
TURN_END = SPECIAL.index("<turn|>")  # Gemma 4 ends a model turn with it: an EOS id beside <eos>


def build_tool_checkpoint(out: Path) -> Path:
    tok = train_byte_level_bpe(TINY_CORPUS.split("\n\n"), VOCAB, SPECIAL)
    write_tokenizer_dir(tok, out, TEMPLATE.read_text(), image="<image>")
    base = PRESETS["tiny-random"]
    config = base.model_copy(update={"text": base.text.model_copy(update={"eos_token_id": (1, TURN_END)})})
    model = DiffusionGemma(config)
    init_random_(model, seed=0)
    save(model, out, GenerationDefaults(eos_token_ids=(1, TURN_END), pad_token_id=0))
    return out
