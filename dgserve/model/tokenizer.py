"""Text tokenizer and chat template for DiffusionGemma checkpoints (Hugging Face directory layout).

Wraps a ``tokenizers.Tokenizer`` with the checkpoint's special tokens, renders chat templates the
way transformers does, and turns streamed token ids back into text without splitting a character.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.utils
import tokenizers
from jinja2.sandbox import ImmutableSandboxedEnvironment

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"

_REPLACEMENT_CHAR = "\ufffd"
_REQUIRED_IN_VOCAB = ("bos_token", "eos_token", "pad_token")


class TokenizerError(ValueError):
    """A tokenizer directory, chat template or prompt that dgserve cannot use, caused by its input."""


class Tokenizer:
    """A checkpoint's tokenizer: ids <-> text, special token ids, and its chat template.

    BOS is added by this class rather than by the ``tokenizers`` post-processor, so ``encode`` never
    adds anything but a single BOS, and never a second one.
    """

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        special_tokens: Mapping[str, str] | None = None,
        add_bos_token: bool | None = None,
        chat_template: str | None = None,
        source: str = "<in-memory tokenizer>",
        template_source: str | None = None,
    ) -> None:
        # special_tokens maps config names ("bos_token", "eos_token", "image_token", ...) to token text.
        self._backend = backend
        self._source = source
        self._special_tokens = dict(special_tokens or {})
        self._ids: dict[str, int | None] = {}
        for name, text in self._special_tokens.items():
            token_id = backend.token_to_id(text)
            if token_id is None and name in _REQUIRED_IN_VOCAB:
                raise TokenizerError(
                    f"{source}: {name} {text!r} is not in the vocabulary of {TOKENIZER_FILE}; "
                    f"fix {TOKENIZER_CONFIG_FILE} or use the tokenizer.json that matches it"
                )
            self._ids[name] = token_id
        self._add_bos = self.bos_id is not None if add_bos_token is None else add_bos_token
        if self._add_bos and self.bos_id is None:
            raise TokenizerError(
                f"{source}: add_bos_token is true but {TOKENIZER_CONFIG_FILE} names no bos_token; "
                "set bos_token or add_bos_token: false"
            )
        self._chat_template = chat_template
        self._compiled_template = (
            None if chat_template is None else _compile_chat_template(chat_template, template_source or source)
        )

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Load ``tokenizer.json`` (+ optional ``tokenizer_config.json`` and ``chat_template.jinja``)."""
        root = Path(path)
        tok_path = root / TOKENIZER_FILE
        if not tok_path.is_file():
            raise TokenizerError(f"{tok_path} not found: a checkpoint directory needs a Hugging Face {TOKENIZER_FILE}")
        try:
            backend = tokenizers.Tokenizer.from_file(str(tok_path))
        except Exception as e:  # tokenizers raises a bare Exception for bad JSON / unknown schema
            raise TokenizerError(f"{tok_path} is not a valid Hugging Face tokenizer file: {e}") from e

        config: dict[str, Any] = {}
        config_path = root / TOKENIZER_CONFIG_FILE
        if config_path.is_file():
            try:
                config = json.loads(config_path.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise TokenizerError(f"{config_path} is not valid JSON: {e}") from e
            if not isinstance(config, dict):
                raise TokenizerError(f"{config_path} must hold a JSON object, got {type(config).__name__}")

        special_tokens: dict[str, str] = {}
        for key, value in config.items():
            # Like transformers, any "*_token" holding a token (not a flag like add_bos_token) counts.
            text = value.get("content") if isinstance(value, dict) else value
            if key.endswith("_token") and isinstance(text, str):
                special_tokens[key] = text
            elif key in _REQUIRED_IN_VOCAB and value is not None:
                raise TokenizerError(
                    f"{config_path}: {key} must be a string or an object with a string 'content', got {value!r}"
                )

        add_bos = config.get("add_bos_token")
        if add_bos is not None and not isinstance(add_bos, bool):
            raise TokenizerError(f"{config_path}: add_bos_token must be true or false, got {add_bos!r}")

        template_path = root / CHAT_TEMPLATE_FILE
        if template_path.is_file():
            chat_template: str | None = template_path.read_text(encoding="utf-8")
            template_source = str(template_path)
        else:
            chat_template = _pick_config_template(config.get("chat_template"), config_path)
            template_source = str(config_path)

        return cls(
            backend,
            special_tokens=special_tokens,
            add_bos_token=add_bos,
            chat_template=chat_template,
            source=str(root),
            template_source=template_source,
        )

    # -- ids and special tokens

    @property
    def bos_id(self) -> int | None:
        return self._ids.get("bos_token")

    @property
    def eos_id(self) -> int | None:
        return self._ids.get("eos_token")

    @property
    def pad_id(self) -> int | None:
        return self._ids.get("pad_token")

    @property
    def image_id(self) -> int | None:
        """Id of the config's ``image_token`` (the vision placeholder), if it has one."""
        return self._ids.get("image_token")

    @property
    def vocab_size(self) -> int:
        return self._backend.get_vocab_size(with_added_tokens=True)

    @property
    def add_bos_token(self) -> bool:
        return self._add_bos

    @property
    def chat_template(self) -> str | None:
        return self._chat_template

    @property
    def special_tokens(self) -> dict[str, str]:
        """Config name -> token text, e.g. ``{"bos_token": "<bos>", ...}``."""
        return dict(self._special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def vocabulary(self) -> dict[str, int]:
        """Token text (as the tokenizer's model spells it, e.g. byte-level ``Ġthe``) -> id, added tokens included."""
        return self._backend.get_vocab(with_added_tokens=True)

    def special_ids(self) -> set[int]:
        """Ids of the special added tokens (``<pad>``, ``<eos>``, turn and tool markers...)."""
        return {i for i, t in self._backend.get_added_tokens_decoder().items() if t.special}

    def decoder_kind(self) -> str:
        """How token text maps to bytes: ``byte_level`` (GPT-2 style), ``byte_fallback`` (SentencePiece with
        ``<0xXX>`` tokens, as Gemma's) or ``raw``."""
        spec = json.loads(self._backend.to_str()).get("decoder") or {}
        kinds = {d.get("type") for d in spec.get("decoders", [spec])}
        if "ByteLevel" in kinds:
            return "byte_level"
        return "byte_fallback" if "ByteFallback" in kinds else "raw"

    def id_to_token(self, token_id: int) -> str | None:
        return self._backend.id_to_token(token_id)

    # -- text <-> ids

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids of ``text``; special-token text in it (e.g. ``<start_of_turn>``) maps to its id.

        ``add_bos`` defaults to the config's ``add_bos_token``; a BOS already at the start of
        ``text`` is never doubled.
        """
        ids = self._backend.encode(text, add_special_tokens=False).ids
        if (self._add_bos if add_bos is None else add_bos) and (not ids or ids[0] != self.bos_id):
            if self.bos_id is None:
                raise TokenizerError(f"{self._source}: add_bos=True but the tokenizer has no bos_token")
            ids.insert(0, self.bos_id)
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def incremental_decoder(self, skip_special_tokens: bool = True) -> IncrementalDecoder:
        return IncrementalDecoder(self, skip_special_tokens=skip_special_tokens)

    # -- chat

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            tools: list[dict] | None = None, template_kwargs: Mapping[str, Any] | None = None) -> str:
        """Render ``messages`` (``{"role": ..., "content": ...}`` dicts) with the checkpoint's template; ``tools``
        (OpenAI function definitions) and ``template_kwargs`` (extra template variables, e.g. ``enable_thinking``)
        are passed to it as transformers passes them."""
        if self._compiled_template is None:
            raise TokenizerError(
                f"{self._source}: the checkpoint has no chat template (neither {CHAT_TEMPLATE_FILE} nor "
                f"'chat_template' in {TOKENIZER_CONFIG_FILE}); add one or send plain completions"
            )
        if not messages:
            raise TokenizerError("cannot apply the chat template to an empty list of messages")
        chat = []
        for message in messages:
            if not isinstance(message, Mapping):
                raise TokenizerError(f"chat messages must be dicts, got {message!r}")
            # Like transformers: a None value (OpenAI's content=None) reads as a missing key.
            chat.append({k: _plain(v) for k, v in message.items() if v is not None})
        # Like transformers, only set special tokens are visible, so `{{ bos_token }}` of a tokenizer
        # without one renders nothing rather than "None".
        try:
            return self._compiled_template.render(
                **self._special_tokens,
                **{str(k): _plain(v) for k, v in (template_kwargs or {}).items()},
                messages=chat,
                tools=_plain(tools) if tools else None,
                documents=None,
                add_generation_prompt=add_generation_prompt,
            )
        except TokenizerError:
            raise
        except Exception as e:  # a template is a program: any failure means it cannot take these messages
            raise TokenizerError(f"{self._source}: the chat template failed on these messages: {e!r}") from e

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True, tools: list[dict] | None = None,
                    template_kwargs: Mapping[str, Any] | None = None) -> list[int]:
        """Render the chat template and tokenize it; the template emits BOS, so none is added here."""
        return self.encode(self.apply_chat_template(messages, add_generation_prompt, tools, template_kwargs),
                           add_bos=False)


class IncrementalDecoder:
    """Turns token ids arriving in pieces into text deltas whose concatenation is ``decode(all_ids)``.

    Byte-level BPE can split one UTF-8 character across tokens, and so across pushes; decoding
    such a prefix yields U+FFFD, so only the incomplete tail is held back until a later push
    completes it. Each push decodes the ids since the last clean boundary, with the ids of the
    chunk before it as context (decoders such as SentencePiece's treat a string's start specially).
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []  # context ids, then ids not yet past a clean boundary
        self._read = 0  # len(context ids)
        self._sent = 0  # chars of the text after the context already returned

    def push(self, ids: Sequence[int]) -> str:
        self._ids.extend(ids)
        context = self._tok.decode(self._ids[: self._read], self._skip)
        text = self._tok.decode(self._ids, self._skip)
        complete = text.rstrip(_REPLACEMENT_CHAR)
        delta = complete[len(context) + self._sent :]
        if complete == text and len(text) > len(context):
            # A clean boundary: the ids after the context become the next push's context.
            self._ids = self._ids[self._read :]
            self._read, self._sent = len(self._ids), 0
        else:
            self._sent += len(delta)
        return delta

    def flush(self) -> str:
        """Everything still held back (an incomplete character decodes to U+FFFD, as ``decode`` does)."""
        context = self._tok.decode(self._ids[: self._read], self._skip)
        text = self._tok.decode(self._ids, self._skip)
        rest = text[len(context) + self._sent :]
        self._ids, self._read, self._sent = [], 0, 0
        return rest


def check_no_image_tokens(ids: Sequence[int], image_token_id: int | None) -> None:
    """Reject prompts carrying the vision placeholder token: the text model has no image encoder."""
    if image_token_id is None:
        return
    count = sum(1 for i in ids if i == image_token_id)
    if count:
        raise TokenizerError(
            f"prompt contains image tokens ({count} x id {image_token_id}); dgserve serves the text model "
            "only: send text content, without image parts or image placeholder tokens"
        )


# -- chat template rendering (same environment as transformers' render_jinja_template)


def _pick_config_template(value: Any, config_path: Path) -> str | None:
    # tokenizer_config.json holds a string, or (older checkpoints) a list of {"name", "template"}.
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        if isinstance(named.get("default"), str):
            return named["default"]
    raise TokenizerError(
        f"{config_path}: chat_template must be a string or a list with a 'default' entry, got {value!r:.200}"
    )


def _raise_exception(message: str) -> None:
    raise TokenizerError(f"chat template rejected the conversation: {message}")


def _tojson(
    x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None, sort_keys: bool = False
) -> str:
    # Jinja's own tojson HTML-escapes; chat templates expect plain JSON.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _TemplateNamespace(jinja2.utils.Namespace):
    # The sandbox guards attribute reads, not namespace writes: refuse underscore names so a
    # template cannot plant dunders (transformers does the same).
    def __init__(*args: Any, **kwargs: Any) -> None:
        self, attrs = args[0], dict(*args[1:], **kwargs)
        for name in attrs:
            _TemplateNamespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot set namespace attribute {name!r}")


def _compile_chat_template(template: str, source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["namespace"] = _TemplateNamespace
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise TokenizerError(f"{source}: chat template syntax error at line {e.lineno}: {e.message}") from e


def _plain(value: Any) -> Any:
    # Templates only ever see JSON-shaped data: no objects whose methods the sandbox cannot vet.
    # Subclasses (enums, ...) are cut back to the base type for the same reason.
    if value is None:
        return None
    for base in (str, bool, int, float):
        if isinstance(value, base):
            return base(value) if base is not str else str.__str__(value)
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    raise TokenizerError(f"chat message values must be JSON data (str, number, bool, list, dict), got {value!r}")
