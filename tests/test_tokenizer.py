"""Tokenizer layer: round trips, BOS handling, chat templates, errors, streaming decode, the tiny asset.

transformers serves as an oracle for ids and rendered templates (a test-only dependency).
"""

from __future__ import annotations

import json
import random
import shutil
from datetime import datetime
from pathlib import Path

import pytest
import tokenizers
from tokenizers import decoders, models, normalizers

from dgserve.model.config import PRESETS
from dgserve.model.tokenizer import (
    IncrementalDecoder,
    Tokenizer,
    TokenizerError,
    check_no_image_tokens,
)
from dgserve.model.tokenizer_build import (
    GEMMA_STYLE_CHAT_TEMPLATE,
    TINY_CORPUS,
    TINY_RANDOM_ASSET_DIR,
    TINY_RANDOM_SPECIAL_TOKENS,
    build_tiny_random,
    train_byte_level_bpe,
    write_tokenizer_dir,
)

MIXED_TEXT = "Café au lait, naïve — 你好，世界! 東京 🙂👍🏽 emoji 🇫🇷 and ∑ math.\n\tEnd 😀"

CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "  What is 2+2?  "},
    {"role": "assistant", "content": "4."},
    {"role": "user", "content": [{"type": "text", "text": "And in French? 🙂"}]},
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_dir(TINY_RANDOM_ASSET_DIR)


def _copy_asset(dst: Path, config: dict | None = None, template: str | None = None) -> Path:
    """A tokenizer dir with the asset's tokenizer.json, and the given config / chat_template.jinja."""
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copy(TINY_RANDOM_ASSET_DIR / "tokenizer.json", dst / "tokenizer.json")
    if config is not None:
        (dst / "tokenizer_config.json").write_text(json.dumps(config))
    if template is not None:
        (dst / "chat_template.jinja").write_text(template)
    return dst


# -- the tiny-random asset


def test_asset_matches_preset(tok: Tokenizer) -> None:
    assert tok.vocab_size == 512 == PRESETS["tiny-random"].text.vocab_size
    assert [tok.token_to_id(t) for t in TINY_RANDOM_SPECIAL_TOKENS] == [0, 1, 2, 3, 4, 5]
    assert (tok.pad_id, tok.eos_id, tok.bos_id, tok.image_id) == (0, 1, 2, 5)
    text = PRESETS["tiny-random"].text
    assert (tok.pad_id, tok.bos_id) == (text.pad_token_id, text.bos_token_id)
    assert tok.eos_id in text.eos_token_id
    assert tok.add_bos_token
    assert sum(f.stat().st_size for f in TINY_RANDOM_ASSET_DIR.iterdir()) < 100_000


def test_committed_asset_equals_fresh_regeneration(tmp_path: Path) -> None:
    build_tiny_random(tmp_path)
    committed = sorted(p.name for p in TINY_RANDOM_ASSET_DIR.iterdir())
    assert sorted(p.name for p in tmp_path.iterdir()) == committed
    for name in committed:
        assert (tmp_path / name).read_bytes() == (TINY_RANDOM_ASSET_DIR / name).read_bytes(), (
            f"{name} is stale: regenerate with `python -m dgserve.model.tokenizer_build`"
        )


def test_train_byte_level_bpe_is_deterministic() -> None:
    texts = TINY_CORPUS.split("\n\n")
    a = train_byte_level_bpe(texts, 400, ["<pad>", "<eos>", "<bos>"])
    b = train_byte_level_bpe(iter(texts), 400, ["<pad>", "<eos>", "<bos>"])
    assert a.to_str(pretty=True) == b.to_str(pretty=True)
    assert a.get_vocab_size() == 400
    assert [a.token_to_id(t) for t in ["<pad>", "<eos>", "<bos>"]] == [0, 1, 2]
    c = train_byte_level_bpe(texts, 400, ["<bos>", "<pad>", "<eos>"])
    assert [c.token_to_id(t) for t in ["<bos>", "<pad>", "<eos>"]] == [0, 1, 2]


def test_write_tokenizer_dir_rejects_unknown_special_token(tmp_path: Path) -> None:
    raw = train_byte_level_bpe(["hello world"], 300, ["<pad>", "<eos>", "<bos>"])
    with pytest.raises(ValueError, match="'<image>' is not in the tokenizer's vocabulary"):
        write_tokenizer_dir(raw, tmp_path, GEMMA_STYLE_CHAT_TEMPLATE, image="<image>")


# -- encode / decode


@pytest.mark.parametrize(
    "text", ["", "hello", " leading and trailing  ", MIXED_TEXT, "line1\nline2\r\n\x00tab\t", "a" * 300]
)
def test_round_trip(tok: Tokenizer, text: str) -> None:
    assert tok.decode(tok.encode(text, add_bos=False)) == text
    assert tok.decode(tok.encode(text)) == text  # BOS is skipped as a special token


def test_special_token_text_maps_to_its_id(tok: Tokenizer) -> None:
    ids = tok.encode("<start_of_turn>user\nhi<end_of_turn>", add_bos=False)
    assert ids[0] == 3 and ids[-1] == 4
    assert tok.decode(ids) == "user\nhi"
    assert tok.decode(ids, skip_special_tokens=False) == "<start_of_turn>user\nhi<end_of_turn>"


def test_bos_added_once(tok: Tokenizer) -> None:
    plain = tok.encode("hello", add_bos=False)
    assert tok.encode("hello") == [tok.bos_id, *plain]
    assert tok.encode("hello", add_bos=True) == [tok.bos_id, *plain]
    assert tok.encode("<bos>hello") == [tok.bos_id, *plain]  # not doubled
    assert tok.encode("") == [tok.bos_id]


def test_encode_chat_has_single_bos(tok: Tokenizer) -> None:
    ids = tok.encode_chat(CHAT)
    assert ids[0] == tok.bos_id and ids.count(tok.bos_id) == 1
    assert ids == tok.encode(tok.apply_chat_template(CHAT), add_bos=False)
    assert tok.decode(ids, skip_special_tokens=False) == tok.apply_chat_template(CHAT)


def test_add_bos_token_false_in_config(tmp_path: Path) -> None:
    d = _copy_asset(tmp_path, {"bos_token": "<bos>", "add_bos_token": False})
    t = Tokenizer.from_dir(d)
    assert t.encode("hi") == t.encode("hi", add_bos=False)
    assert t.encode("hi", add_bos=True)[0] == t.bos_id


def test_without_config_there_is_no_bos(tmp_path: Path) -> None:
    t = Tokenizer.from_dir(_copy_asset(tmp_path))
    assert (t.bos_id, t.eos_id, t.pad_id, t.image_id) == (None, None, None, None)
    assert not t.add_bos_token
    assert t.encode("hi") == t.encode("hi", add_bos=False)
    with pytest.raises(TokenizerError, match="no bos_token"):
        t.encode("hi", add_bos=True)


def test_special_tokens_as_added_token_dicts(tmp_path: Path) -> None:
    def added(content: str) -> dict:
        return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "special": True}

    config = {"bos_token": added("<bos>"), "eos_token": added("<eos>"), "pad_token": added("<pad>")}
    t = Tokenizer.from_dir(_copy_asset(tmp_path, config, template="{{ bos_token }}|{{ eos_token }}"))
    assert (t.bos_id, t.eos_id, t.pad_id) == (2, 1, 0)
    assert t.apply_chat_template([{"role": "user", "content": "x"}]) == "<bos>|<eos>"


# -- chat templates


def test_gemma_style_rendering(tok: Tokenizer) -> None:
    expected = (
        "<bos><start_of_turn>user\nYou are terse.\n\nWhat is 2+2?<end_of_turn>\n"
        "<start_of_turn>model\n4.<end_of_turn>\n"
        "<start_of_turn>user\nAnd in French? 🙂<end_of_turn>\n"
    )
    assert tok.apply_chat_template(CHAT, add_generation_prompt=False) == expected
    assert tok.apply_chat_template(CHAT) == expected + "<start_of_turn>model\n"
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == (
        "<bos><start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n"
    )
    # A lone system message still reaches the model, as a user turn.
    assert tok.apply_chat_template([{"role": "system", "content": "sys"}], add_generation_prompt=False) == (
        "<bos><start_of_turn>user\nsys<end_of_turn>\n"
    )
    # None-valued keys read as missing, as in transformers (OpenAI clients send content=None).
    assert tok.apply_chat_template([{"role": "user", "content": "hi", "tool_calls": None}]) == (
        tok.apply_chat_template([{"role": "user", "content": "hi"}])
    )


def test_raise_exception_in_template(tok: Tokenizer) -> None:
    bad = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(TokenizerError, match="Conversation roles must alternate user/assistant"):
        tok.apply_chat_template(bad)
    image = [{"role": "user", "content": [{"type": "image", "url": "x.png"}]}]
    with pytest.raises(TokenizerError, match="content part type 'image' is not supported"):
        tok.apply_chat_template(image)


def test_template_failures_become_tokenizer_errors(tmp_path: Path, tok: Tokenizer) -> None:
    with pytest.raises(TokenizerError, match="empty list of messages"):
        tok.apply_chat_template([])
    with pytest.raises(TokenizerError, match="chat template failed on these messages: TypeError"):
        Tokenizer.from_dir(_copy_asset(tmp_path, {}, "{{ 'a' + 1 }}")).apply_chat_template(CHAT)
    with pytest.raises(TokenizerError, match="must be JSON data"):
        tok.apply_chat_template([{"role": "user", "content": object()}])


def test_template_environment(tmp_path: Path) -> None:
    template = (
        "{{ messages | tojson }}|{{ strftime_now('%Y') }}|{% for m in messages %}{% if loop.first %}"
        "{% continue %}{% endif %}{{ m.content }}{% endfor %}|{{ image_token }}|{{ pad_token }}"
    )
    d = _copy_asset(tmp_path, {"bos_token": "<bos>", "pad_token": "<pad>", "image_token": "<image>"}, template)
    msgs = [{"role": "user", "content": "<a & b> é"}, {"role": "assistant", "content": "x"}]
    out = Tokenizer.from_dir(d).apply_chat_template(msgs)
    assert out == f"{json.dumps(msgs, ensure_ascii=False)}|{datetime.now().year}|x|<image>|<pad>"


def test_template_sandbox(tmp_path: Path) -> None:
    escape = "{% set ns = namespace(a=1) %}{% set ns.__class__ = 1 %}"
    t = Tokenizer.from_dir(_copy_asset(tmp_path / "a", {}, escape))
    with pytest.raises(TokenizerError, match="cannot set namespace attribute"):
        t.apply_chat_template([{"role": "user", "content": "x"}])
    t = Tokenizer.from_dir(_copy_asset(tmp_path / "b", {}, "{{ messages.__class__.__mro__ }}"))
    with pytest.raises(TokenizerError, match="chat template failed"):
        t.apply_chat_template([{"role": "user", "content": "x"}])


def test_template_precedence(tmp_path: Path) -> None:
    from_config = Tokenizer.from_dir(_copy_asset(tmp_path / "a", {"chat_template": "config"}))
    assert from_config.apply_chat_template([{"role": "user", "content": "x"}]) == "config"
    both = Tokenizer.from_dir(_copy_asset(tmp_path / "b", {"chat_template": "config"}, "jinja"))
    assert both.apply_chat_template([{"role": "user", "content": "x"}]) == "jinja"
    listed = [{"name": "tool_use", "template": "tools"}, {"name": "default", "template": "default"}]
    old = Tokenizer.from_dir(_copy_asset(tmp_path / "c", {"chat_template": listed}))
    assert old.chat_template == "default"


def test_no_chat_template(tmp_path: Path) -> None:
    t = Tokenizer.from_dir(_copy_asset(tmp_path, {"bos_token": "<bos>"}))
    with pytest.raises(TokenizerError, match="the checkpoint has no chat template") as e:
        t.encode_chat([{"role": "user", "content": "hi"}])
    assert str(tmp_path) in str(e.value)


# -- errors naming the file


def test_missing_tokenizer_json(tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match=r"tokenizer\.json not found") as e:
        Tokenizer.from_dir(tmp_path)
    assert str(tmp_path / "tokenizer.json") in str(e.value)


def test_corrupt_tokenizer_json(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_text('{"version": "1.0", "model": ')
    with pytest.raises(TokenizerError, match="is not a valid Hugging Face tokenizer file") as e:
        Tokenizer.from_dir(tmp_path)
    assert str(tmp_path / "tokenizer.json") in str(e.value)


def test_corrupt_tokenizer_config(tmp_path: Path) -> None:
    d = _copy_asset(tmp_path)
    (d / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(TokenizerError, match=r"tokenizer_config.json is not valid JSON"):
        Tokenizer.from_dir(d)
    (d / "tokenizer_config.json").write_text('{"bos_token": 7}')
    with pytest.raises(TokenizerError, match="bos_token must be a string"):
        Tokenizer.from_dir(d)
    (d / "tokenizer_config.json").write_text('{"add_bos_token": "yes"}')
    with pytest.raises(TokenizerError, match="add_bos_token must be true or false"):
        Tokenizer.from_dir(d)


def test_special_token_not_in_vocab(tmp_path: Path) -> None:
    d = _copy_asset(tmp_path, {"bos_token": "<s>"})
    with pytest.raises(TokenizerError, match=r"bos_token '<s>' is not in the vocabulary of tokenizer.json"):
        Tokenizer.from_dir(d)


def test_template_syntax_error_names_file(tmp_path: Path) -> None:
    d = _copy_asset(tmp_path, {}, "line one\n{% if %}")
    with pytest.raises(TokenizerError, match=r"chat_template.jinja: chat template syntax error at line 2"):
        Tokenizer.from_dir(d)


def test_image_tokens_rejected(tok: Tokenizer) -> None:
    ids = tok.encode("look: <image> here")
    with pytest.raises(TokenizerError, match=r"contains image tokens .*dgserve serves the text model only"):
        check_no_image_tokens(ids, tok.image_id)
    check_no_image_tokens(tok.encode("no picture"), tok.image_id)
    check_no_image_tokens(ids, None)


# -- streaming decode


def _stream(tok: Tokenizer, pieces: list[list[int]], skip: bool = True) -> list[str]:
    dec = IncrementalDecoder(tok, skip_special_tokens=skip)
    return [dec.push(p) for p in pieces] + [dec.flush()]


def test_incremental_decoder_holds_back_partial_characters(tok: Tokenizer) -> None:
    ids = tok.encode("🙂", add_bos=False)
    assert len(ids) > 1  # the emoji is not one token in the tiny vocab
    dec = tok.incremental_decoder()
    assert [dec.push([i]) for i in ids[:-1]] == [""] * (len(ids) - 1)
    assert dec.push(ids[-1:]) == "🙂"
    assert dec.flush() == ""


def test_incremental_decoder_every_split_point(tok: Tokenizer) -> None:
    for text, skip in [(MIXED_TEXT, True), ("<start_of_turn>model\n東京 🙂<end_of_turn>", False)]:
        ids = tok.encode(text)
        full = tok.decode(ids, skip_special_tokens=skip)
        n = len(ids)
        for i in range(n + 1):
            for j in range(i, n + 1):
                deltas = _stream(tok, [ids[:i], ids[i:j], ids[j:]], skip)
                assert "".join(deltas) == full, (i, j)
                assert all("\ufffd" not in d for d in deltas), (i, j, deltas)
        deltas = _stream(tok, [[i] for i in ids], skip)
        assert "".join(deltas) == full and deltas[-1] == ""


def _byte_fallback_tokenizer() -> Tokenizer:
    # Gemma's own scheme: "▁" for spaces, characters outside the vocab spelled as <0xNN> byte tokens.
    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2}
    vocab.update({f"<0x{b:02X}>": 3 + b for b in range(256)})
    for c in "▁abcdefghijklmnopqrstuvwxyzé":
        vocab.setdefault(c, len(vocab))
    merges = [("▁", "a"), ("▁", "b")]
    vocab.update({a + b: len(vocab) + i for i, (a, b) in enumerate(merges)})
    backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, fuse_unk=True))
    backend.normalizer = normalizers.Replace(" ", "▁")
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    backend.add_special_tokens(["<pad>", "<eos>", "<bos>"])
    return Tokenizer(backend, special_tokens={"bos_token": "<bos>", "eos_token": "<eos>"})


def test_incremental_decoder_byte_fallback_every_split_point() -> None:
    tok = _byte_fallback_tokenizer()
    ids = tok.encode(" a 你好 🙂 b é🇫🇷x")
    full = tok.decode(ids)
    assert full == " a 你好 🙂 b é🇫🇷x"
    for i in range(len(ids) + 1):
        for j in range(i, len(ids) + 1):
            deltas = _stream(tok, [ids[:i], ids[i:j], ids[j:]])
            assert "".join(deltas) == full, (i, j)
            assert all("\ufffd" not in d for d in deltas), (i, j, deltas)


def test_incremental_decoder_random_splits(tok: Tokenizer) -> None:
    rng = random.Random(0)
    alphabet = [*"abc xyz\n", "é", "你", "好", "🙂", "👍🏽", "∑", "<eos>", "<start_of_turn>"]
    for _ in range(200):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        ids = tok.encode(text)
        cuts = sorted(rng.sample(range(len(ids) + 1), k=min(len(ids) + 1, rng.randint(0, 6))))
        pieces = [ids[a:b] for a, b in zip([0, *cuts], [*cuts, len(ids)], strict=True)]
        assert "".join(_stream(tok, pieces)) == tok.decode(ids)


def test_incremental_decoder_flushes_incomplete_tail(tok: Tokenizer) -> None:
    ids = tok.encode("ok 🙂", add_bos=False)
    dec = tok.incremental_decoder()
    assert dec.push(ids[:-1]) == "ok "
    assert dec.flush() == tok.decode(ids[:-1])[len("ok ") :]  # U+FFFD, exactly as decode() gives it
    assert dec.push(tok.encode("hi", add_bos=False)) == "hi"  # reusable after flush


# -- transformers as an oracle


def test_transformers_agrees(tmp_path: Path, tok: Tokenizer) -> None:
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(TINY_RANDOM_ASSET_DIR))
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(TINY_RANDOM_ASSET_DIR / "tokenizer.json"), bos_token="<bos>", add_bos_token=True
    )
    for text in ["", "hello world", MIXED_TEXT, "<start_of_turn>user\nhi<end_of_turn>"]:
        assert hf.encode(text) == tok.encode(text) == fast.encode(text)
        assert hf.encode(text, add_special_tokens=False) == tok.encode(text, add_bos=False)
        ids = tok.encode(text)
        assert hf.decode(ids, skip_special_tokens=True) == tok.decode(ids)
        assert hf.decode(ids) == tok.decode(ids, skip_special_tokens=False)
    short = [{"role": "user", "content": "Hello there"}]
    for chat in (CHAT, short):
        for gen in (True, False):
            rendered = hf.apply_chat_template(chat, tokenize=False, add_generation_prompt=gen)
            assert rendered == tok.apply_chat_template(chat, add_generation_prompt=gen)
            ids = hf.apply_chat_template(chat, tokenize=True, add_generation_prompt=gen, return_dict=False)
            assert ids == tok.encode_chat(chat, add_generation_prompt=gen)
    # Same precedence of chat_template.jinja over tokenizer_config.json.
    d = _copy_asset(tmp_path, {"tokenizer_class": "PreTrainedTokenizerFast", "chat_template": "config"}, "jinja")
    assert transformers.AutoTokenizer.from_pretrained(str(d)).apply_chat_template(
        short, tokenize=False
    ) == Tokenizer.from_dir(d).apply_chat_template(short)
