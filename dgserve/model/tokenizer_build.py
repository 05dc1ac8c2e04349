"""Build small byte-level BPE tokenizers in the Hugging Face checkpoint layout, for tests and presets.

``python -m dgserve.model.tokenizer_build`` regenerates the ``tiny-random`` preset's tokenizer asset.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Iterable
from pathlib import Path

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from dgserve.model.tokenizer import CHAT_TEMPLATE_FILE, TOKENIZER_CONFIG_FILE, TOKENIZER_FILE

logger = logging.getLogger(__name__)

# Gemma's turn format: BOS, then "<start_of_turn>{user|model}\n{content}<end_of_turn>\n" per turn. A
# system message has no turn of its own; it is folded into the first user turn. Text content only.
GEMMA_STYLE_CHAT_TEMPLATE = r"""{%- macro render_content(content) -%}
    {%- if content is string -%}
        {{ content | trim }}
    {%- elif content is iterable and content is not mapping -%}
        {%- for part in content -%}
            {%- if part['type'] == 'text' -%}
                {{ part['text'] | trim }}
            {%- else -%}
                {{ raise_exception("content part type '" ~ part['type'] ~ "' is not supported: text only") }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("message content must be a string or a list of text parts") }}
    {%- endif -%}
{%- endmacro -%}
{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- set first_user_prefix = render_content(messages[0]['content']) ~ '\n\n' -%}
    {%- set loop_messages = messages[1:] -%}
    {%- if not loop_messages -%}
        {{ '<start_of_turn>user\n' ~ render_content(messages[0]['content']) ~ '<end_of_turn>\n' }}
    {%- endif -%}
{%- else -%}
    {%- set first_user_prefix = '' -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif -%}
    {%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}
    {{ '<start_of_turn>' ~ role ~ '\n' ~ (first_user_prefix if loop.first else '') }}
    {{- render_content(message['content']) }}
    {{- '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{ '<start_of_turn>model\n' }}
{%- endif -%}
"""

TINY_RANDOM_SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>", "<image>"]
TINY_RANDOM_VOCAB_SIZE = 512
TINY_RANDOM_ASSET_DIR = Path(__file__).parent / "assets" / "tiny-random"

# Training text for the tiny tokenizer: plain English plus a little accented text and chat markup,
# so the merges cover common words, multi-byte characters and turn headers.
TINY_CORPUS = """\
The river town wakes slowly. Before the sun clears the hills, the baker has lit the ovens and the
first boats are already moving on the water. By seven the market square is full of voices: people
asking for bread, for apples, for the news, and for the weather, which is always the same question
and never has the same answer.

A model that writes text one token at a time has to commit to every word before it sees the next.
A diffusion model works the other way around. It starts from a canvas of noise and refines the whole
block at once, step after step, until the tokens it is sure about stay fixed and the rest are drawn
again. When the canvas is good enough, it is committed, and the model moves on to the next block.

Serving such a model means keeping many requests in flight. Each request has a prompt, a cache of
keys and values for the text it has already seen, and a canvas that is still being denoised. The
scheduler decides which requests run in the next step, the router decides which replica gets a new
request, and the server streams the committed text back to the client as soon as it is ready.

She ordered a café au lait and a croissant, then sat by the window with a naïve hope that the rain
would stop. It did not. The waiter, who had seen a thousand such mornings, brought her a second cup
without being asked. "Good coffee is the only reliable thing in this city," he said, and smiled.

Questions and answers:
<start_of_turn>user
What is the capital of France?<end_of_turn>
<start_of_turn>model
The capital of France is Paris.<end_of_turn>
<start_of_turn>user
Write a short poem about the sea.<end_of_turn>
<start_of_turn>model
The sea is grey, the sea is wide, it carries the moon on every tide.<end_of_turn>

Numbers and code: 0 1 2 3 4 5 6 7 8 9 10 100 1000 2024 3.14 x = y + 1; if (a < b) { return a; }
def main(): print("hello, world") # the first program everyone writes
"""


def train_byte_level_bpe(texts: Iterable[str], vocab_size: int, special_tokens: list[str]) -> tokenizers.Tokenizer:
    """Train a GPT-2-style byte-level BPE; ``special_tokens`` get ids 0.. in order.

    Deterministic: the same texts give a byte-identical ``tokenizer.json`` (merge ties are broken by
    the pair itself, not by hash order).
    """
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer)
    for i, token in enumerate(special_tokens):
        assert tok.token_to_id(token) == i, (token, tok.token_to_id(token))
    return tok


def write_tokenizer_dir(
    tok: tokenizers.Tokenizer,
    out_dir: str | Path,
    chat_template: str,
    bos: str = "<bos>",
    eos: str = "<eos>",
    pad: str = "<pad>",
    image: str | None = None,
) -> None:
    """Write ``tokenizer.json``, ``tokenizer_config.json`` and ``chat_template.jinja`` as Gemma does.

    The tokenizer.json post-processor prepends BOS (Gemma's layout), so ``tokenizers`` and
    transformers users get the same ids as :class:`dgserve.model.tokenizer.Tokenizer`.
    """
    for name, token in (("bos", bos), ("eos", eos), ("pad", pad), ("image", image)):
        if token is not None and tok.token_to_id(token) is None:
            raise ValueError(f"{name} token {token!r} is not in the tokenizer's vocabulary")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = tokenizers.Tokenizer.from_str(tok.to_str())  # do not change the caller's post-processor
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, tok.token_to_id(bos))]
    )
    (out / TOKENIZER_FILE).write_bytes(tok.to_str(pretty=True).encode("utf-8") + b"\n")
    config: dict[str, object] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos,
        "eos_token": eos,
        "pad_token": pad,
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
    }
    if image is not None:
        config["image_token"] = image
    (out / TOKENIZER_CONFIG_FILE).write_bytes((json.dumps(config, indent=2) + "\n").encode("utf-8"))
    (out / CHAT_TEMPLATE_FILE).write_bytes(chat_template.encode("utf-8"))


def build_tiny_random(out_dir: str | Path = TINY_RANDOM_ASSET_DIR) -> None:
    """Write the ``tiny-random`` preset's tokenizer directory."""
    tok = train_byte_level_bpe(TINY_CORPUS.split("\n\n"), TINY_RANDOM_VOCAB_SIZE, TINY_RANDOM_SPECIAL_TOKENS)
    assert tok.get_vocab_size() == TINY_RANDOM_VOCAB_SIZE, tok.get_vocab_size()
    write_tokenizer_dir(tok, out_dir, GEMMA_STYLE_CHAT_TEMPLATE, image="<image>")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Regenerate the tiny-random preset's tokenizer asset.")
    parser.add_argument("--out", type=Path, default=TINY_RANDOM_ASSET_DIR, help="output directory")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    build_tiny_random(args.out)
    logger.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
