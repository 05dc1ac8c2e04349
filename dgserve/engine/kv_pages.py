"""The engine's paged KV cache: preallocated K/V pages in two page spaces (full-attention layers keep
every position, sliding-window layers only what the window still sees), refcounted blocks, per-sequence
block tables, and :class:`PagedKV`, the per-forward ``KVView`` the model reads and writes through.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

import torch

from dgserve.model.config import ModelConfig

log = logging.getLogger(__name__)

Space = Literal["full", "sliding"]


class BlockAllocator:
    """Free list and reference counts of the blocks of one page space."""

    def __init__(self, num_blocks: int) -> None:
        assert num_blocks >= 0
        self.num_blocks = num_blocks
        # A stack: the most recently freed block is reused first (its pages are likeliest to be in cache).
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))
        self._refs: list[int] = [0] * num_blocks

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def refcount(self, block: int) -> int:
        return self._refs[block]

    def allocate(self, n: int) -> list[int]:
        """Take ``n`` free blocks, each with one reference."""
        assert 0 <= n <= len(self._free), f"allocating {n} blocks with {len(self._free)} free"
        if n == 0:
            return []
        blocks = self._free[-n:]
        del self._free[-n:]
        blocks.reverse()
        for b in blocks:
            self._refs[b] = 1
        return blocks

    def incref(self, blocks: Iterable[int]) -> None:
        for b in blocks:
            assert self._refs[b] > 0, f"taking a reference to free block {b}"
            self._refs[b] += 1

    def decref(self, blocks: Iterable[int]) -> int:
        """Drop one reference to each block; returns how many blocks became free."""
        freed = 0
        for b in blocks:
            refs = self._refs[b]
            assert refs > 0, f"releasing free block {b}"
            self._refs[b] = refs - 1
            if refs == 1:
                self._free.append(b)
                freed += 1
        return freed


@dataclass(frozen=True, slots=True)
class BlockCount:
    full: int
    sliding: int

    def of(self, space: Space) -> int:
        return self.full if space == "full" else self.sliding


@dataclass(eq=False)
class BlockTable:
    """The blocks holding one sequence's cache.

    ``full[j]`` / ``sliding[j]`` hold positions ``[j * block_size, (j + 1) * block_size)``. Leading
    sliding blocks the window can no longer see are released and read ``None``; ``sliding_start`` is the
    index of the first one still held. ``layer_len[layer]`` counts the positions written in that layer
    (the model writes layer by layer within a forward); ``num_tokens`` is the cached length ``L``.
    Tables compare by identity so that a scheduler may key dicts by them.
    """

    num_layers: int
    full: list[int] = field(default_factory=list)
    sliding: list[int | None] = field(default_factory=list)
    sliding_start: int = 0
    layer_len: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.layer_len:
            self.layer_len = [0] * self.num_layers
        assert len(self.layer_len) == self.num_layers

    @property
    def num_tokens(self) -> int:
        """Positions ``[0, num_tokens)`` are written in every layer."""
        return min(self.layer_len)

    def mark_written(self, length: int) -> None:
        """Every layer now holds positions ``[0, length)`` (the fast path writes all layers in one step)."""
        assert length >= self.num_tokens, f"marking {length} written, below the {self.num_tokens} already written"
        self.layer_len = [length] * self.num_layers


class BlockEvictor(Protocol):
    """What the pool asks of a prefix cache when an allocation would otherwise fail."""

    def evict(self, n_blocks: int, space: Space = "full") -> int:
        """Free up to ``n_blocks`` blocks of ``space`` held only by the cache; returns how many."""
        ...

    def num_evictable(self, space: Space = "full") -> int:
        """Blocks of ``space`` that :meth:`evict` could free now."""
        ...

    def on_free(self, table: BlockTable) -> None:
        """A sequence is about to drop its references (lets the cache refresh recency)."""
        ...


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def block_bytes(config: ModelConfig, space: Space, block_size: int, dtype: torch.dtype) -> int:
    """K+V bytes of one block of ``space`` over all of that space's layers."""
    t = config.text
    per_token = sum(
        t.layer_kv_heads(i) * t.layer_head_dim(i)
        for i in range(t.num_hidden_layers) if t.is_sliding(i) == (space == "sliding")
    )
    return 2 * per_token * block_size * _element_size(dtype)


def split_budget(config: ModelConfig, budget_bytes: int, block_size: int = 16,
                 dtype: torch.dtype = torch.bfloat16, max_seqs: int = 64,
                 max_chunk: int | None = None) -> BlockCount:
    """Block counts of :meth:`KVPagePool.from_budget` (a pure function: nothing is allocated)."""
    if budget_bytes <= 0:
        raise ValueError(f"KV cache budget must be positive, got {budget_bytes} bytes")
    if max_seqs < 1:
        raise ValueError(f"max_seqs must be >= 1, got {max_seqs}")
    chunk = config.canvas_length if max_chunk is None else max_chunk
    if chunk < 1:
        raise ValueError(f"max_chunk must be >= 1, got {max_chunk}")
    t = config.text
    full_bytes = block_bytes(config, "full", block_size, dtype)
    sliding_bytes = block_bytes(config, "sliding", block_size, dtype)
    per_seq = 0
    if sliding_bytes:
        # A window of W - 1 cached positions plus one chunk or canvas, on any block alignment.
        per_seq = math.ceil((t.sliding_window - 1 + max(chunk, config.canvas_length)) / block_size) + 1
    wanted = max_seqs * per_seq
    # the full space keeps room for every sequence's chunk and canvas (at most half the budget); the sliding
    # space takes what max_seqs windows need out of the rest
    full_floor = min(budget_bytes // 2, max_seqs * full_bytes * math.ceil((chunk + config.canvas_length) / block_size))
    num_sliding = min(wanted, (budget_bytes - full_floor) // sliding_bytes) if sliding_bytes else 0
    num_full = (budget_bytes - num_sliding * sliding_bytes) // full_bytes
    if num_full < 1 or num_sliding < per_seq:
        need = max(2 * per_seq * sliding_bytes, per_seq * sliding_bytes + full_bytes)
        raise ValueError(
            f"KV cache budget of {budget_bytes} bytes is too small: one sequence needs at least {need} "
            f"bytes ({per_seq} sliding blocks of {sliding_bytes} B for a window of {t.sliding_window} plus a "
            f"chunk of {chunk}, and full blocks of {full_bytes} B); raise the budget or lower max_chunk")
    if num_sliding < wanted:
        log.warning("KV budget too small for max_seqs: %d sliding blocks hold the windows of %d sequences, not "
                    "max_seqs=%d", num_sliding, num_sliding // per_seq, max_seqs)
    return BlockCount(num_full, num_sliding)


class KVPagePool:
    """Preallocated K/V pages of every attention layer, in a full and a sliding page space.

    Layer ``i``'s pages are ``k_pages[i]`` / ``v_pages[i]``, shaped ``[num_blocks, block_size, kvh, hd]``
    with the block count and dims of the layer's space. Storage is allocated once, up front.
    """

    def __init__(self, config: ModelConfig, num_full_blocks: int, num_sliding_blocks: int,
                 block_size: int = 16, dtype: torch.dtype = torch.bfloat16,
                 device: torch.device | str = "cpu", scratch_tokens: int = 0) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        if num_full_blocks < 0 or num_sliding_blocks < 0:
            raise ValueError(f"block counts must be >= 0, got full={num_full_blocks} sliding={num_sliding_blocks}")
        t = config.text
        self.config = config
        self.block_size = block_size
        self.dtype = dtype
        self.device = torch.device(device)
        self.num_layers = t.num_hidden_layers
        self.layer_space: tuple[Space, ...] = tuple(
            "sliding" if t.is_sliding(i) else "full" for i in range(self.num_layers))
        self.full_layers = tuple(i for i, s in enumerate(self.layer_space) if s == "full")
        self.sliding_layers = tuple(i for i, s in enumerate(self.layer_space) if s == "sliding")
        # None when the model has no sliding layers: then nothing is ever windowed.
        self.window: int | None = t.sliding_window if self.sliding_layers else None
        if not self.sliding_layers:
            num_sliding_blocks = 0
        self.allocators: dict[Space, BlockAllocator] = {
            "full": BlockAllocator(num_full_blocks), "sliding": BlockAllocator(num_sliding_blocks)}
        self._block_bytes: dict[Space, int] = {
            s: block_bytes(config, s, block_size, dtype) for s in ("full", "sliding")}
        self.k_pages: list[torch.Tensor] = []
        self.v_pages: list[torch.Tensor] = []
        # Scratch blocks after each space's blocks, never allocated: the fast path writes the K/V of rows that keep
        # none there and points masked gathers at them (zeroed, so a masked key is never NaN).
        self.scratch_blocks = -(-scratch_tokens // block_size)
        for i, space in enumerate(self.layer_space):
            shape = (self.allocators[space].num_blocks + self.scratch_blocks, block_size, t.layer_kv_heads(i),
                     t.layer_head_dim(i))
            # Uninitialised on purpose: reads of never-written positions are caught by the block tables.
            self.k_pages.append(torch.empty(shape, dtype=dtype, device=self.device))
            self.v_pages.append(torch.empty(shape, dtype=dtype, device=self.device))
            if self.scratch_blocks:
                self.k_pages[-1][-self.scratch_blocks:].zero_()
                self.v_pages[-1][-self.scratch_blocks:].zero_()
        # [num_blocks * block_size, kvh, hd] views: a token's slot is block * block_size + offset.
        self.k_flat = [p.view(-1, *p.shape[2:]) for p in self.k_pages]
        self.v_flat = [p.view(-1, *p.shape[2:]) for p in self.v_pages]
        self.evictor: BlockEvictor | None = None

    def scratch_slot(self, space: Space) -> int:
        """The first scratch slot of ``space`` (``scratch_tokens`` consecutive slots from there)."""
        return self.allocators[space].num_blocks * self.block_size

    @classmethod
    def from_budget(cls, config: ModelConfig, budget_bytes: int, block_size: int = 16,
                    dtype: torch.dtype = torch.bfloat16, device: torch.device | str = "cpu",
                    max_seqs: int = 64, max_chunk: int | None = None, scratch_tokens: int = 0) -> KVPagePool:
        """Split ``budget_bytes`` between the two spaces.

        The sliding space gets enough blocks for ``max_seqs`` sequences each holding a window plus one
        prefill chunk or canvas (``max_chunk`` defaults to the canvas length), as long as the full space keeps
        a chunk and a canvas for each of them (at most half the budget); the full space gets the rest.
        Raises ValueError when the budget cannot hold one sequence.
        """
        split = split_budget(config, budget_bytes, block_size, dtype, max_seqs, max_chunk)
        return cls(config, split.full, split.sliding, block_size=block_size, dtype=dtype, device=device,
                   scratch_tokens=scratch_tokens)

    # -- accounting --
    def block_bytes(self, space: Space) -> int:
        return self._block_bytes[space]

    def num_blocks(self, space: Space) -> int:
        return self.allocators[space].num_blocks

    def num_free_blocks(self, space: Space) -> int:
        return self.allocators[space].num_free

    def num_used_blocks(self, space: Space) -> int:
        return self.allocators[space].num_used

    def num_available_blocks(self, space: Space) -> int:
        """Free blocks plus those the prefix cache could evict."""
        free = self.allocators[space].num_free
        return free + (self.evictor.num_evictable(space) if self.evictor is not None else 0)

    def capacity_bytes(self) -> int:
        return sum(self.allocators[s].num_blocks * self._block_bytes[s] for s in ("full", "sliding"))

    def bytes_used(self) -> int:
        return sum(self.allocators[s].num_used * self._block_bytes[s] for s in ("full", "sliding"))

    def bytes_per_token(self, space: Space | None = None) -> int:
        """K+V bytes one position takes in every layer (or only in ``space``'s layers).

        Within the window a token costs the total; beyond it only the full-layer share stays.
        """
        spaces: tuple[Space, ...] = ("full", "sliding") if space is None else (space,)
        return sum(self._block_bytes[s] for s in spaces) // self.block_size

    def token_capacity(self) -> int:
        """Positions the full space can hold (over all sequences and the prefix cache)."""
        return self.allocators["full"].num_blocks * self.block_size

    # -- sharing blocks (the prefix cache) --
    def set_evictor(self, evictor: BlockEvictor) -> None:
        assert self.evictor is None, "the pool already has a prefix cache"
        self.evictor = evictor

    def refcount(self, space: Space, block: int) -> int:
        return self.allocators[space].refcount(block)

    def hold(self, space: Space, blocks: Iterable[int]) -> None:
        """Take one more reference to blocks already in use (they stay allocated until every holder lets go)."""
        self.allocators[space].incref(blocks)

    def release(self, space: Space, blocks: Iterable[int]) -> int:
        """Drop one reference to each block; returns how many became free."""
        return self.allocators[space].decref(blocks)

    def attach_prefix(self, table: BlockTable, full: Sequence[int], sliding: Sequence[int | None],
                      sliding_start: int) -> None:
        """Make a fresh ``table`` start with written blocks that others hold (a prefix-cache hit): positions
        ``[0, len(full) * block_size)``; ``sliding`` is aligned with ``full``, held from ``sliding_start``."""
        assert not table.full and not table.sliding and table.num_tokens == 0, "attach_prefix needs a fresh table"
        self.hold("full", full)
        table.full = list(full)
        if self.sliding_layers:
            self.hold("sliding", sliding[sliding_start:])  # type: ignore[arg-type]
            table.sliding = list(sliding)
            table.sliding_start = sliding_start
        table.layer_len = [len(full) * self.block_size] * table.num_layers

    # -- allocation --
    def new_table(self) -> BlockTable:
        return BlockTable(self.num_layers)

    def blocks_needed(self, new_len: int, table: BlockTable | None = None) -> BlockCount:
        """Blocks per space that ``ensure_capacity(table, new_len)`` would allocate (None: a new sequence)."""
        n = -(-new_len // self.block_size)
        full = max(0, n - (len(table.full) if table is not None else 0))
        sliding = 0
        if self.sliding_layers:
            sliding = max(0, n - (len(table.sliding) if table is not None else 0))
        return BlockCount(full, sliding)

    def can_allocate(self, new_len: int, table: BlockTable | None = None) -> bool:
        """Whether ``ensure_capacity`` would succeed (counting blocks the prefix cache would evict)."""
        need = self.blocks_needed(new_len, table)
        for space in ("full", "sliding"):
            wanted = need.of(space)
            # The eviction count scans the cache, so only ask for it when the free list is short.
            if wanted > self.allocators[space].num_free and wanted > self.num_available_blocks(space):
                return False
        return True

    def ensure_capacity(self, table: BlockTable, new_len: int) -> bool:
        """Make ``table`` hold positions ``[0, new_len)`` in both spaces, evicting cached blocks if needed.

        All or nothing: on False no block was allocated (the prefix cache may have evicted some).
        """
        need = self.blocks_needed(new_len, table)
        if not self.can_allocate(new_len, table):
            return False
        # Full first: evicting a cached full block also frees its sliding block.
        for space in ("full", "sliding"):
            deficit = need.of(space) - self.allocators[space].num_free
            if deficit > 0 and self.evictor is not None:
                self.evictor.evict(deficit, space)
        if any(need.of(s) > self.allocators[s].num_free for s in ("full", "sliding")):
            return False
        table.full.extend(self.allocators["full"].allocate(need.full))
        table.sliding.extend(self.allocators["sliding"].allocate(need.sliding))
        return True

    def release_out_of_window(self, table: BlockTable, cached_len: int | None = None) -> int:
        """Release the sliding blocks lying entirely below ``cached_len - (W - 1)``; returns how many.

        Call after each prefill chunk / commit. ``cached_len`` defaults to ``table.num_tokens``.
        """
        if self.window is None:
            return 0
        length = table.num_tokens if cached_len is None else cached_len
        assert length <= table.num_tokens, f"cached_len {length} > written length {table.num_tokens}"
        end = min(max(0, length - (self.window - 1)) // self.block_size, len(table.sliding))
        start = table.sliding_start
        if end <= start:
            return 0
        self.allocators["sliding"].decref(table.sliding[start:end])  # type: ignore[arg-type]
        table.sliding[start:end] = [None] * (end - start)
        table.sliding_start = end
        return end - start

    def free(self, table: BlockTable) -> None:
        """Drop all of the sequence's references; blocks others still hold (shared, cached) survive."""
        if self.evictor is not None:
            self.evictor.on_free(table)
        self.allocators["full"].decref(table.full)
        self.allocators["sliding"].decref(b for b in table.sliding if b is not None)
        table.full.clear()
        table.sliding.clear()
        table.sliding_start = 0
        table.layer_len = [0] * table.num_layers


class PagedKV:
    """The :class:`~dgserve.model.kv.KVView` of one forward over paged storage.

    ``tables`` maps the segments' ``seq`` to block tables that already hold every position the forward
    writes (``ensure_capacity`` before the forward). Writes append at each layer's end; reads of released
    sliding blocks or of never-written positions fail an assertion.
    """

    def __init__(self, pool: KVPagePool, tables: Mapping[int, BlockTable]) -> None:
        self.pool = pool
        self.tables = tables
        # Every layer of a space uses the same block ids and, mostly, the same ranges: build index
        # tensors once per forward.
        self._block_ids: dict[tuple[Space, int], torch.Tensor] = {}
        self._slots: dict[tuple[Space, int, int, int], torch.Tensor] = {}

    def length(self, seq: int) -> int:
        return self.tables[seq].num_tokens

    def write(self, layer: int, seq: int, position: int, k: torch.Tensor, v: torch.Tensor) -> None:
        table = self.tables[seq]
        n = k.shape[0]
        assert position == table.layer_len[layer], (
            f"seq {seq} layer {layer}: write at {position}, but writes must append at {table.layer_len[layer]}")
        assert v.shape == k.shape and k.shape[1:] == self.pool.k_flat[layer].shape[1:], (k.shape, v.shape)
        if n == 0:
            return
        slots = self._slot_ids(self.pool.layer_space[layer], seq, position, position + n)
        self.pool.k_flat[layer].index_copy_(0, slots, k.to(self.pool.dtype))
        self.pool.v_flat[layer].index_copy_(0, slots, v.to(self.pool.dtype))
        table.layer_len[layer] = position + n

    def read(self, layer: int, seq: int, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        table = self.tables[seq]
        assert 0 <= start <= end <= table.layer_len[layer], (
            f"seq {seq} layer {layer}: reading [{start}, {end}) but only [0, {table.layer_len[layer]}) is written")
        slots = self._slot_ids(self.pool.layer_space[layer], seq, start, end)
        return self.pool.k_flat[layer].index_select(0, slots), self.pool.v_flat[layer].index_select(0, slots)

    def _slot_ids(self, space: Space, seq: int, start: int, end: int) -> torch.Tensor:
        key = (space, seq, start, end)
        slots = self._slots.get(key)
        if slots is not None:
            return slots
        table = self.tables[seq]
        bs = self.pool.block_size
        blocks = table.full if space == "full" else table.sliding
        if end > start:
            assert (end - 1) // bs < len(blocks), (
                f"seq {seq}: position {end - 1} has no {space} block (call ensure_capacity before the forward)")
            assert space == "full" or start // bs >= table.sliding_start, (
                f"seq {seq}: position {start} lies in a released sliding block (window starts at block "
                f"{table.sliding_start})")
        ids = self._block_ids.get((space, seq))
        if ids is None:
            ids = torch.tensor([-1 if b is None else b for b in blocks], dtype=torch.long, device=self.pool.device)
            self._block_ids[(space, seq)] = ids
        pos = torch.arange(start, end, device=self.pool.device)
        slots = ids[pos // bs] * bs + pos % bs
        self._slots[key] = slots
        return slots


__all__ = ["BlockAllocator", "BlockCount", "BlockEvictor", "BlockTable", "KVPagePool", "PagedKV", "Space",
           "block_bytes", "split_budget"]
