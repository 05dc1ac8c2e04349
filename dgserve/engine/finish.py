"""How a committed canvas ends (or continues) a request: EOS, a canvas of nothing but padding, or max_tokens.

One pure function shared by the batching engine and the single-request loop, so both give the same token ids,
the same finish reason and the same count of generated tokens for the same canvas.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from dgserve.engine.sampler import first_eos


@dataclass(frozen=True)
class CanvasOutcome:
    token_ids: list[int]  # the canvas's ids that join the output: up to EOS, at most the max_tokens budget left
    finish: Literal["stop", "length"] | None  # None: the request goes on with another canvas
    completion_tokens: int  # of token_ids, those that are text: pad ids excluded (what the API's usage counts)


def canvas_outcome(committed: Sequence[int], room: int, eos_ids: Sequence[int], pad_id: int | None,
                   ignore_eos: bool = False) -> CanvasOutcome:
    """The outcome of committing ``committed`` with ``room`` tokens of max_tokens left.

    Pad ids stay in the token ids, as the reference keeps them in its sequences (and in the KV cache it
    conditions the next canvas on), but they are not counted as generated text. A canvas of nothing but pad
    ids is the model's way of ending without EOS (the reference would pad canvas after canvas up to
    max_new_tokens): it ends the request with ``stop``, unless ``ignore_eos``. ``length`` means max_tokens cut
    something off: generated non-pad ids before EOS beyond the budget, or a budget spent with the text
    unfinished. A text that ends (EOS) right at the budget is complete: ``stop``.
    """
    eos_at = None if ignore_eos else first_eos(list(committed), tuple(eos_ids))
    end = len(committed) if eos_at is None else eos_at
    ids = list(committed[:min(end, room)])
    cut = any(t != pad_id for t in committed[len(ids):end])
    finish: Literal["stop", "length"] | None
    if cut:
        finish = "length"
    elif eos_at is not None or (not ignore_eos and pad_id is not None and all(t == pad_id for t in committed)):
        finish = "stop"
    elif len(ids) >= room:
        finish = "length"
    else:
        finish = None
    return CanvasOutcome(ids, finish, sum(1 for t in ids if t != pad_id))


def text_ids(ids: Sequence[int], pad_id: int | None) -> list[int]:
    """The ids that are decoded to text: pad ids never reach it, whatever the tokenizer thinks is special."""
    return [t for t in ids if t != pad_id]
