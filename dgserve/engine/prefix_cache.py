"""Prefix cache: block-aligned token prefixes mapped to KV blocks already written, so that a new
request sharing a prompt prefix (system prompt, earlier turns) reuses those pages instead of
recomputing them. Blocks held only by the cache are evicted least recently used first.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from dgserve.engine.kv_pages import BlockTable, KVPagePool, Space
from dgserve.engine.prefix_keys import ROOT_KEY, hash_block


@dataclass(eq=False)
class CachedBlock:
    key: bytes
    full: int
    sliding: int | None  # None once evicted (or never held): the full block stays usable further back


@dataclass(frozen=True)
class PrefixMatch:
    """The cached leading blocks of a prompt. ``sliding_blocks`` is aligned with ``full_blocks`` and is
    None outside the trailing window (the only sliding blocks a continuation can read)."""

    prompt_len: int
    num_tokens: int
    keys: tuple[bytes, ...] = ()
    full_blocks: tuple[int, ...] = ()
    sliding_blocks: tuple[int | None, ...] = ()
    sliding_start: int = 0  # first block index whose sliding block is attached

    @property
    def num_blocks(self) -> int:
        return len(self.full_blocks)


@dataclass
class PrefixCacheStats:
    hits: int = 0  # attached lookups that reused at least one block
    misses: int = 0
    hit_tokens: int = 0  # prompt tokens served from the cache
    queried_tokens: int = 0  # prompt tokens of all attached lookups
    inserted_blocks: int = 0
    evicted_blocks: int = 0  # full blocks (whole entries)
    evicted_sliding_blocks: int = 0  # sliding blocks, incl. those of evicted entries

    @property
    def hit_rate(self) -> float:
        """Fraction of queried prompt tokens served from the cache."""
        return self.hit_tokens / self.queried_tokens if self.queried_tokens else 0.0

    def as_dict(self) -> dict[str, float | int]:
        return {"hits": self.hits, "misses": self.misses, "hit_tokens": self.hit_tokens,
                "queried_tokens": self.queried_tokens, "hit_rate": round(self.hit_rate, 4),
                "inserted_blocks": self.inserted_blocks, "evicted_blocks": self.evicted_blocks,
                "evicted_sliding_blocks": self.evicted_sliding_blocks}


class PrefixCache:
    """Block-aligned prefixes of a pool's sequences, each cached block holding its own reference.

    Constructing it registers it as the pool's evictor, so ``KVPagePool.ensure_capacity`` evicts
    cache-only blocks before giving up. Eviction is LRU; ``on_free`` re-touches a finished chain from
    its tail to its root, so that tails go before the prefixes they hang from.
    """

    def __init__(self, pool: KVPagePool) -> None:
        self.pool = pool
        self.block_size = pool.block_size
        # Insertion order is recency order (oldest first) for the full blocks of all entries ...
        self._entries: OrderedDict[bytes, CachedBlock] = OrderedDict()
        # ... and, separately, for the entries still holding a sliding block.
        self._sliding_lru: OrderedDict[bytes, None] = OrderedDict()
        # Per live table: the keys of its leading blocks already attached or inserted (dropped when it is freed).
        self._chains: dict[BlockTable, list[bytes]] = {}
        self.stats = PrefixCacheStats()
        pool.set_evictor(self)

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def hit_rate(self) -> float:
        return self.stats.hit_rate

    def num_cached_blocks(self, space: Space = "full") -> int:
        return len(self._entries) if space == "full" else len(self._sliding_lru)

    def chain(self, table: BlockTable) -> list[bytes]:
        """Keys of ``table``'s leading blocks that this cache knows (attached or inserted)."""
        return list(self._chains.get(table, ()))

    # -- lookup --
    def match(self, prompt_ids: Sequence[int], window: int | None = None, min_tail: int | None = None,
              avoid: Sequence[tuple[int, int]] = ()) -> PrefixMatch:
        """Longest cached block chain of the prompt that a forward can continue from.

        At least ``min_tail`` prompt tokens (default 1) are left to compute, and the sliding blocks
        covering the last ``window - 1`` positions of the match must be cached too (``window`` defaults to
        the model's). The match never ends strictly inside one of the ``avoid`` spans (a prompt's images, which
        are encoded in one forward each). Side-effect free: stats and recency are recorded by :meth:`attach`.

        Why the engine asks for a whole block of tail: the tail is computed as one chunk of rows after the
        cached ones, where a request without a cache hit computes the same rows inside a longer chunk. CPU
        matrix kernels give every row the same bits whatever the row count *except* for very few rows (one
        row takes a matrix-vector path that rounds differently), and a one-ulp difference in the prompt's
        K/V can flip a sampled token. A block of tail keeps a cache hit's output equal to a cold run's in the
        cases tested, at the cost of at most one block of recomputation per request.
        """
        bs = self.block_size
        tail = 1 if min_tail is None else max(1, min_tail)
        max_blocks = max(0, (len(prompt_ids) - tail) // bs)
        entries: list[CachedBlock] = []
        parent = ROOT_KEY
        for j in range(max_blocks):
            key = hash_block(parent, prompt_ids[j * bs:(j + 1) * bs])
            entry = self._entries.get(key)
            if entry is None:
                break
            entries.append(entry)
            parent = key
        window = self.pool.window if window is None else window
        if not self.pool.sliding_layers:
            window = None
        m = self._longest_with_window(entries, window) if window is not None else len(entries)
        while m and any(a < m * bs < b for a, b in avoid):
            m = self._longest_with_window(entries[:m - 1], window) if window is not None else m - 1
        first = self._window_first_block(m, window)
        entries = entries[:m]
        return PrefixMatch(
            prompt_len=len(prompt_ids), num_tokens=m * bs, keys=tuple(e.key for e in entries),
            full_blocks=tuple(e.full for e in entries),
            sliding_blocks=tuple(e.sliding if j >= first else None for j, e in enumerate(entries)),
            sliding_start=first if window is not None else 0)

    def _window_first_block(self, num_blocks: int, window: int | None) -> int:
        """First block holding one of the last ``window - 1`` positions of a ``num_blocks`` prefix."""
        if window is None:
            return num_blocks
        return max(0, num_blocks * self.block_size - (window - 1)) // self.block_size

    def _longest_with_window(self, entries: list[CachedBlock], window: int) -> int:
        # missing_before[m]: the last block index < m whose sliding block is not cached (-1: none).
        missing_before = [-1] * (len(entries) + 1)
        last = -1
        for j, e in enumerate(entries):
            if e.sliding is None:
                last = j
            missing_before[j + 1] = last
        for m in range(len(entries), 0, -1):
            if missing_before[m] < self._window_first_block(m, window):
                return m
        return 0

    def attach(self, table: BlockTable, match: PrefixMatch) -> None:
        """Give a fresh table references to the matched blocks and record the lookup in the stats.

        Call it for every admitted request (an empty match counts as a miss), right after
        :meth:`match`: an allocation in between may evict the matched blocks.
        """
        s = self.stats
        s.queried_tokens += match.prompt_len
        if match.num_blocks == 0:
            s.misses += 1
            return
        s.hits += 1
        s.hit_tokens += match.num_tokens
        for j, key in enumerate(match.keys):
            entry = self._entries.get(key)
            assert entry is not None and entry.full == match.full_blocks[j] and (
                match.sliding_blocks[j] is None or entry.sliding == match.sliding_blocks[j]), (
                "stale PrefixMatch: its blocks were evicted between match() and attach()")
        self.pool.attach_prefix(table, match.full_blocks, match.sliding_blocks, match.sliding_start)
        if self.pool.sliding_layers:
            for key in match.keys[match.sliding_start:]:
                self._sliding_lru.move_to_end(key)
        self._chains[table] = list(match.keys)
        for key in reversed(match.keys):
            self._entries.move_to_end(key)

    # -- registration --
    def insert(self, token_ids: Sequence[int], table: BlockTable) -> int:
        """Register the table's complete, written blocks of ``token_ids`` (prompt, then committed
        tokens); returns how many blocks were newly cached.

        Call it before ``release_out_of_window`` to keep the sliding blocks too (a match needs the
        ones in its trailing window). Successive calls for one table must pass growing prefixes of the
        same ids; only blocks not registered before are hashed.
        """
        bs = self.block_size
        n_blocks = min(len(token_ids), table.num_tokens) // bs
        chain = self._chains.setdefault(table, [])
        start = len(chain)
        parent = chain[-1] if start else ROOT_KEY
        added = 0
        for j in range(start, n_blocks):
            key = hash_block(parent, token_ids[j * bs:(j + 1) * bs])
            sliding = table.sliding[j] if j < len(table.sliding) else None
            entry = self._entries.get(key)
            if entry is None:
                # Another sequence may have cached the same prefix in other blocks: the first one wins.
                entry = CachedBlock(key, table.full[j], None)
                self.pool.hold("full", [entry.full])
                self._entries[key] = entry
                added += 1
            if entry.sliding is None and sliding is not None:
                entry.sliding = sliding
                self.pool.hold("sliding", [sliding])
            if entry.sliding is not None:
                # Forward order: the blocks nearest the chain's end (what a match needs) go last.
                self._sliding_lru[key] = None
                self._sliding_lru.move_to_end(key)
            chain.append(key)
            parent = key
        for key in reversed(chain[start:]):
            self._entries.move_to_end(key)
        self.stats.inserted_blocks += added
        return added

    def on_free(self, table: BlockTable) -> None:
        """Refresh the recency of a finishing sequence's chain (called by ``KVPagePool.free``)."""
        for key in reversed(self._chains.pop(table, ())):
            if key in self._entries:
                self._entries.move_to_end(key)

    # -- eviction --
    def num_evictable(self, space: Space = "full") -> int:
        # A linear scan: eviction only runs when the pool is out of free blocks.
        refcount = self.pool.refcount
        if space == "full":
            return sum(1 for e in self._entries.values() if refcount("full", e.full) == 1)
        return sum(1 for key in self._sliding_lru if refcount("sliding", self._entries[key].sliding) == 1)  # type: ignore[arg-type]

    def evict(self, n_blocks: int, space: Space = "full") -> int:
        """Free up to ``n_blocks`` blocks of ``space`` held only by the cache, least recently used
        first; returns how many were freed. Evicting a full block drops its entry (and sliding block);
        evicting a sliding block keeps the entry, usable where it is outside a match's window."""
        if n_blocks <= 0:
            return 0
        refcount = self.pool.refcount
        if space == "full":
            victims = []
            for entry in self._entries.values():
                if refcount("full", entry.full) == 1:
                    victims.append(entry)
                    if len(victims) == n_blocks:
                        break
            for entry in victims:
                del self._entries[entry.key]
                self.pool.release("full", [entry.full])
                self._drop_sliding(entry)
            self.stats.evicted_blocks += len(victims)
            return len(victims)
        victim_keys = []
        for key in self._sliding_lru:
            if refcount("sliding", self._entries[key].sliding) == 1:  # type: ignore[arg-type]
                victim_keys.append(key)
                if len(victim_keys) == n_blocks:
                    break
        for key in victim_keys:
            self._drop_sliding(self._entries[key])
        return len(victim_keys)

    def _drop_sliding(self, entry: CachedBlock) -> None:
        if entry.sliding is None:
            return
        self.stats.evicted_sliding_blocks += self.pool.release("sliding", [entry.sliding])
        entry.sliding = None
        del self._sliding_lru[entry.key]

    def clear(self) -> int:
        """Evict everything only the cache holds; returns the number of full blocks freed."""
        self.evict(len(self._sliding_lru), "sliding")
        return self.evict(len(self._entries), "full")


__all__ = ["CachedBlock", "PrefixCache", "PrefixCacheStats", "PrefixMatch"]
