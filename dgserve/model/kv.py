"""The model's view of the KV cache, and the packed batch layout one forward runs over.

A forward pass runs over a *packed* batch: the tokens of several segments laid end to end
(``[T]``), each segment either an ``encode`` segment (causal, appends its K/V to its sequence's
cache: prompt prefill chunks and committed canvases) or a ``denoise`` segment (a canvas:
bidirectional over itself, read-only attention to its sequence's cached prefix). The model asks
a :class:`KVView` for cached K/V by absolute position; how the cache stores them (contiguous
tensors here, paged blocks in the engine) is the view's business.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

import torch

SegmentKind = Literal["encode", "denoise"]


@dataclass(frozen=True, slots=True)
class Segment:
    kind: SegmentKind
    seq: int  # which sequence's cache (an index the KVView understands)
    length: int  # tokens of this segment in the packed batch
    position: int  # absolute position of the segment's first token; cache holds positions [0, position)
    # encode only: the absolute [start, end) positions of each image's soft tokens in this segment (whole images:
    # their embeddings come from the vision tower, and the encoder attends bidirectionally within each)
    image_spans: tuple[tuple[int, int], ...] = ()

    @property
    def image_tokens(self) -> int:
        return sum(end - start for start, end in self.image_spans)


class KVView(Protocol):
    """Per-forward access to the caches of the sequences in a packed batch.

    K/V tensors are ``[n, kv_heads, head_dim]`` for one layer and one sequence. Keys are stored after
    k-norm and RoPE, values after the scale-free v-norm.
    """

    def write(self, layer: int, seq: int, position: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store K/V of ``n`` new tokens at positions ``[position, position + n)``."""
        ...

    def read(self, layer: int, seq: int, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Return cached K/V for positions ``[start, end)``."""
        ...


class ContiguousKV:
    """A simple per-sequence cache of growing tensors: for ``dgserve generate`` and tests.

    Sliding-window layers are trimmed to the last ``window - 1`` positions after each write, which is
    all a later forward can read (the same retention as the reference's sliding cache layers).
    """

    def __init__(self, num_layers: int, sliding: list[bool], window: int) -> None:
        self._k: list[dict[int, torch.Tensor]] = [{} for _ in range(num_layers)]
        self._v: list[dict[int, torch.Tensor]] = [{} for _ in range(num_layers)]
        self._start: list[dict[int, int]] = [{} for _ in range(num_layers)]
        self._sliding = sliding
        self._window = window

    def length(self, seq: int) -> int:
        k = self._k[-1].get(seq)
        return 0 if k is None else self._start[-1][seq] + k.shape[0]

    def write(self, layer: int, seq: int, position: int, k: torch.Tensor, v: torch.Tensor) -> None:
        old_k = self._k[layer].get(seq)
        start = self._start[layer].get(seq, 0)
        if old_k is None:
            assert position == 0, "first write of a sequence must start at position 0"
            new_k, new_v = k, v
        else:
            assert position == start + old_k.shape[0], "writes must be contiguous"
            new_k = torch.cat([old_k, k])
            new_v = torch.cat([self._v[layer][seq], v])
        self._k[layer][seq], self._v[layer][seq] = new_k, new_v
        self._start[layer][seq] = start

    def read(self, layer: int, seq: int, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        k = self._k[layer][seq]
        base = self._start[layer][seq]
        assert base <= start <= end <= base + k.shape[0], (base, start, end, k.shape)
        return k[start - base:end - base], self._v[layer][seq][start - base:end - base]

    def trim(self) -> None:
        """Drop sliding-layer positions no later forward can see (call after each forward)."""
        keep = self._window - 1
        for layer, sliding in enumerate(self._sliding):
            if not sliding:
                continue
            for seq, k in self._k[layer].items():
                drop = k.shape[0] - keep
                if drop > 0:
                    self._k[layer][seq] = k[drop:].clone()
                    self._v[layer][seq] = self._v[layer][seq][drop:].clone()
                    self._start[layer][seq] += drop

    def drop(self, seq: int) -> None:
        for layer in range(len(self._k)):
            self._k[layer].pop(seq, None)
            self._v[layer].pop(seq, None)
            self._start[layer].pop(seq, None)

    def truncate(self, seq: int, length: int) -> None:
        """Forget positions >= length (used to discard a canvas encoded by mistake; tests only)."""
        for layer in range(len(self._k)):
            k = self._k[layer].get(seq)
            if k is None:
                continue
            base = self._start[layer][seq]
            self._k[layer][seq] = k[: max(0, length - base)]
            self._v[layer][seq] = self._v[layer][seq][: max(0, length - base)]

