"""JSON output by constrained denoising: a JSON schema (or any JSON object) compiled by xgrammar into a matcher that
says, after the tokens accepted so far, which tokens may come next; and the check that turns schema keywords the
grammar cannot enforce into a clear refusal instead of silently looser output.

The engine uses it left to right (``dgserve.engine.constrained``): a step masks each position by the grammar state
of the tokens before it, so only a contiguous run of positions from the first undecided one can be sampled and
accepted in a step; every committed prefix is then valid.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch

# What the grammar enforces; anything else in a schema is refused (xgrammar would ignore it without a word).
_ENFORCED = {
    "type", "properties", "required", "additionalProperties", "items", "prefixItems", "enum", "const", "anyOf",
    "oneOf", "allOf", "$ref", "$defs", "definitions", "minItems", "maxItems", "minLength", "maxLength", "pattern",
    "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "format",
}
_ANNOTATIONS = {"title", "description", "default", "examples", "$schema", "$id", "$comment", "deprecated", "readOnly",
                "writeOnly", "nullable", "strict"}
_FORMATS = {"date", "time", "date-time", "email", "uuid", "uri", "ipv4", "ipv6", "hostname", "duration"}
_CHILD_SCHEMAS = ("items", "additionalProperties")
_CHILD_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_CHILD_MAPS = ("properties", "$defs", "definitions")
ANY_JSON_OBJECT = "any JSON object"
CACHE_SIZE = 64  # compiled grammars kept (by schema)


class UnsupportedSchema(ValueError):
    """A schema keyword (or value) constrained denoising cannot enforce; ``path`` names where it is."""

    def __init__(self, message: str, path: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = path


def check_schema(schema: Any, path: str = "schema") -> None:
    """Raise ``UnsupportedSchema`` for the first keyword the grammar would not enforce."""
    if isinstance(schema, bool):
        return
    if not isinstance(schema, dict):
        raise UnsupportedSchema(f"a schema must be a JSON object, not {type(schema).__name__}", path)
    for key, value in schema.items():
        if key in _ANNOTATIONS:
            continue
        if key not in _ENFORCED:
            raise UnsupportedSchema(f"the keyword {key!r} is not supported by constrained decoding (supported: "
                                    f"{', '.join(sorted(_ENFORCED))})", path)
        if key == "$ref" and not (isinstance(value, str) and value.startswith("#")):
            raise UnsupportedSchema(f"only local $ref ('#/...') is supported, not {value!r}", path)
        if key == "format" and value not in _FORMATS:
            raise UnsupportedSchema(f"the string format {value!r} is not supported (supported: "
                                    f"{', '.join(sorted(_FORMATS))})", path)
        if key == "pattern" and isinstance(value, str) and ("(?=" in value or "(?!" in value or "(?<" in value):
            raise UnsupportedSchema("lookaround in a pattern is not supported", path)
        if key in _CHILD_SCHEMAS and isinstance(value, dict | bool):
            check_schema(value, f"{path}.{key}")
        elif key in _CHILD_LISTS:
            if not isinstance(value, list):
                raise UnsupportedSchema(f"{key} must be a list of schemas", path)
            for i, child in enumerate(value):
                check_schema(child, f"{path}.{key}[{i}]")
        elif key in _CHILD_MAPS:
            if not isinstance(value, dict):
                raise UnsupportedSchema(f"{key} must map names to schemas", path)
            for name, child in value.items():
                check_schema(child, f"{path}.{key}.{name}")


@dataclass(frozen=True)
class JsonConstraint:
    """What a request's output must be: JSON valid for ``schema`` (a JSON string), or any JSON object (None)."""

    schema: str | None = None

    @property
    def key(self) -> str:
        return self.schema if self.schema is not None else ANY_JSON_OBJECT


class GrammarUnavailable(RuntimeError):
    """The grammar engine (xgrammar) is not installed."""


class Grammars:
    """Compiles constraints for one tokenizer (cached) and hands out matchers."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_ids: tuple[int, ...]) -> None:
        try:
            import xgrammar as xgr
        except ImportError as exc:  # pragma: no cover - a test extra and a dependency; guards partial installs
            raise GrammarUnavailable("JSON output needs the xgrammar package (pip install xgrammar)") from exc
        self._xgr = xgr
        vocab = tokenizer.vocabulary()
        special = tokenizer.special_ids()
        encoded = [""] * vocab_size
        for text, i in vocab.items():
            # special tokens (pad, turn markers...) are no text: an empty entry is one the grammar never allows
            if i < vocab_size and i not in special:
                encoded[i] = text
        self.info = xgr.TokenizerInfo(encoded, vocab_type=_vocab_type(xgr, tokenizer.decoder_kind()),
                                      vocab_size=vocab_size, stop_token_ids=list(stop_ids),
                                      add_prefix_space=False)
        self.vocab_size = vocab_size
        self._compiler = xgr.GrammarCompiler(self.info, max_threads=1)
        self._cache: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()

    def compile(self, constraint: JsonConstraint) -> Any:
        with self._lock:
            grammar = self._cache.get(constraint.key)
            if grammar is None:
                if constraint.schema is None:
                    grammar = self._compiler.compile_json_schema(json.dumps({"type": "object"}), any_whitespace=False)
                else:
                    grammar = self._compiler.compile_json_schema(constraint.schema, any_whitespace=False)
                self._cache[constraint.key] = grammar
                if len(self._cache) > CACHE_SIZE:
                    self._cache.popitem(last=False)
            else:
                self._cache.move_to_end(constraint.key)
            return grammar

    def matcher(self, constraint: JsonConstraint) -> Matcher:
        return Matcher(self._xgr, self._xgr.GrammarMatcher(self.compile(constraint)), self.vocab_size)


class Matcher:
    """The grammar state after the tokens accepted so far."""

    def __init__(self, xgr: Any, matcher: Any, vocab_size: int) -> None:
        self._xgr = xgr
        self._m = matcher
        self._bitmask = xgr.allocate_token_bitmask(1, vocab_size)
        self._vocab = vocab_size

    def allowed(self) -> torch.Tensor:
        """``[V]`` bool: the tokens the grammar allows next."""
        self._m.fill_next_token_bitmask(self._bitmask)
        bits = self._bitmask[0]  # int32 words, bit j of word w = token 32 w + j
        shifts = torch.arange(32, dtype=torch.int32)
        mask = ((bits[:, None] >> shifts) & 1).bool().reshape(-1)
        return mask[:self._vocab]

    def accept(self, token: int) -> bool:
        return bool(self._m.accept_token(token))

    @property
    def done(self) -> bool:
        """The output is complete (the stop token was accepted)."""
        return bool(self._m.is_terminated())


def _vocab_type(xgr: Any, decoder: str) -> Any:
    return {"byte_level": xgr.VocabType.BYTE_LEVEL, "byte_fallback": xgr.VocabType.BYTE_FALLBACK}.get(
        decoder, xgr.VocabType.RAW)
