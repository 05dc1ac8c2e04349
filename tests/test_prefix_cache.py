"""Prefix cache: stable chained block keys, match/attach/insert, the sliding-window rule, LRU
eviction (also under allocation pressure), and hit-rate stats."""

from __future__ import annotations

import hashlib
import struct

import pytest
import torch

from dgserve.engine.kv_pages import BlockTable, KVPagePool, PagedKV
from dgserve.engine.prefix_cache import PrefixCache
from dgserve.engine.prefix_keys import ROOT_KEY, affinity_key, block_keys, hash_block
from dgserve.model.config import TINY_RANDOM, ModelConfig

CFG = TINY_RANDOM  # layers: sliding, full, sliding, full; window 16
W = CFG.text.sliding_window
BS = 4
SLIDING, FULL = 0, 1


def make_cache(num_full: int = 64, num_sliding: int = 64, config: ModelConfig = CFG) -> PrefixCache:
    return PrefixCache(KVPagePool(config, num_full, num_sliding, block_size=BS, dtype=torch.float32))


def fake_kv(pool: KVPagePool, layer: int, ids: list[int], start: int) -> tuple[torch.Tensor, torch.Tensor]:
    """K/V that identify (token, position, layer), so a read shows which blocks it came from."""
    base = torch.tensor(ids, dtype=torch.float32) * 1000 + torch.arange(start, start + len(ids)) + layer / 4
    k = base[:, None, None].expand(len(ids), *pool.k_flat[layer].shape[1:]).clone()
    return k, -k


def encode(pool: KVPagePool, table: BlockTable, ids: list[int], start: int) -> None:
    assert pool.ensure_capacity(table, start + len(ids))
    view = PagedKV(pool, {0: table})
    for layer in range(pool.num_layers):
        view.write(layer, 0, start, *fake_kv(pool, layer, ids, start))


def prefill(cache: PrefixCache, ids: list[int], chunk: int = 8, insert: bool = True) -> BlockTable:
    """Admit a prompt the way the engine does: match, attach, then chunks (insert before release)."""
    pool = cache.pool
    table = pool.new_table()
    cache.attach(table, cache.match(ids))
    pos = table.num_tokens
    while pos < len(ids):
        n = min(chunk, len(ids) - pos)
        encode(pool, table, ids[pos:pos + n], pos)
        pos += n
        if insert:
            cache.insert(ids[:pos], table)
        pool.release_out_of_window(table)
    return table


def prompt(seed: int, n: int) -> list[int]:
    return torch.randint(3, CFG.text.vocab_size, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_block_keys_are_stable_and_chained() -> None:
    expected = hashlib.blake2b(b"", digest_size=16)
    expected.update(struct.pack("<4q", 1, 2, 3, 4))
    k1 = hash_block(ROOT_KEY, [1, 2, 3, 4])
    assert k1 == expected.digest()  # independent of the process (no hash() salt) and of the host
    keys = block_keys([1, 2, 3, 4, 5, 6, 7, 8, 9], 4)  # the partial last block has no key
    assert keys == [k1, hash_block(k1, [5, 6, 7, 8])]
    assert hash_block(ROOT_KEY, [5, 6, 7, 8]) != keys[1]  # same tokens, different prefix
    assert block_keys([5, 6, 7, 8], 4, parent=k1) == keys[1:]


def test_affinity_key_names_the_cached_block_of_the_prefix() -> None:
    """The router's key is the cache key of the last whole block within the hashed prefix."""
    ids = list(range(1, 40))
    assert affinity_key(ids, 4, 16) == block_keys(ids, 4)[3].hex()
    assert affinity_key(ids, 4, 18) == affinity_key(ids, 4, 16)  # a partial block adds nothing
    assert affinity_key(ids, 4, 1000) == block_keys(ids, 4)[-1].hex()
    assert affinity_key(ids[:3], 4, 16) is None and affinity_key(ids, 4, 3) is None  # no whole block


def test_match_attach_insert_reuses_blocks() -> None:
    cache = make_cache()
    pool = cache.pool
    a_ids = prompt(0, 20)
    a = prefill(cache, a_ids)
    assert len(cache) == 5 and cache.chain(a) == block_keys(a_ids, BS)
    a_full = list(a.full)
    pool.free(a)
    assert pool.num_used_blocks("full") == 5  # the cache keeps its own references

    b_ids = [*a_ids, *prompt(1, 6)]
    match = cache.match(b_ids)
    assert match.num_tokens == 20 and list(match.full_blocks) == a_full
    assert match.sliding_start == (20 - (W - 1)) // BS  # only the trailing window's sliding blocks
    assert match.sliding_blocks[:match.sliding_start] == (None,)
    b = pool.new_table()
    cache.attach(b, match)
    assert b.num_tokens == 20 and b.full == a_full and b.sliding_start == 1
    assert all(pool.allocators["full"].refcount(blk) == 2 for blk in b.full)
    view = PagedKV(pool, {0: b})
    for layer in range(pool.num_layers):
        start = 5 if pool.layer_space[layer] == "sliding" else 0  # a forward after L=20 reads sliding positions >= 5
        k, v = view.read(layer, 0, start, 20)
        k_ref, v_ref = fake_kv(pool, layer, a_ids[start:20], start)
        assert torch.equal(k, k_ref) and torch.equal(v, v_ref)
    with pytest.raises(AssertionError, match="released"):
        view.read(SLIDING, 0, 0, 20)

    encode(pool, b, b_ids[20:], 20)
    assert cache.insert(b_ids, b) == 1  # block 5 ([20, 24)); the partial block [24, 26) is not cached
    assert cache.insert(b_ids, b) == 0
    assert len(cache) == 6
    pool.free(b)
    assert all(pool.allocators["full"].refcount(blk) == 1 for blk in a_full)


def test_never_matches_the_whole_prompt() -> None:
    cache = make_cache()
    ids = prompt(0, 24)
    cache.pool.free(prefill(cache, ids))
    assert cache.match(ids).num_tokens == 20  # at least one token left to compute
    assert cache.match(ids[:21]).num_tokens == 20
    assert cache.match(ids[:20]).num_tokens == 16
    assert cache.match(ids[:1]).num_tokens == 0
    assert cache.match([]).num_tokens == 0


def test_same_block_after_a_different_prefix_does_not_match() -> None:
    cache = make_cache()
    x, y, z = prompt(0, 4), prompt(1, 4), prompt(2, 4)
    tail = prompt(3, 20)
    cache.pool.free(prefill(cache, x + y + tail))
    assert cache.match(z + y + tail).num_tokens == 0
    assert cache.match(x + z + tail).num_tokens == 4
    assert cache.match(x + y + tail[:5]).num_tokens == 12


def test_match_needs_the_sliding_blocks_of_its_trailing_window() -> None:
    cache = make_cache()
    pool = cache.pool
    ids = prompt(0, 32)
    # Insert only at the end: the early sliding blocks are already out of the window then.
    a = prefill(cache, ids, chunk=8, insert=False)
    assert a.sliding_start == (32 - (W - 1)) // BS == 4
    cache.insert(ids, a)
    pool.free(a)
    assert len(cache) == 8 and cache.num_cached_blocks("sliding") == 4  # blocks 4..7
    extended = [*ids, 7]
    assert cache.match(extended).num_tokens == 32  # window [17, 32) lies in blocks 4..7
    # Diverging at position 24: a 24-token match would need the sliding blocks of [9, 24) (2..5).
    diverged = [*ids[:24], *prompt(1, 5)]
    assert cache.match(diverged).num_tokens == 0
    assert cache.match(diverged, window=2).num_tokens == 24  # a 1-position window needs block 5 only

    # Insert after every chunk (before releasing): every sliding block stays cached.
    cache2 = make_cache()
    cache2.pool.free(prefill(cache2, ids, chunk=8, insert=True))
    assert cache2.num_cached_blocks("sliding") == 8
    assert cache2.match(diverged).num_tokens == 24


def test_attached_blocks_are_not_evictable_until_freed() -> None:
    cache = make_cache()
    pool = cache.pool
    ids = prompt(0, 16)
    pool.free(prefill(cache, ids))
    assert cache.num_evictable("full") == 4
    b = pool.new_table()
    cache.attach(b, cache.match([*ids, 1]))
    assert cache.num_evictable("full") == 0 and cache.num_evictable("sliding") == 0
    assert cache.evict(4) == 0 and len(cache) == 4
    pool.free(b)
    assert cache.num_evictable("full") == 4
    assert cache.evict(10) == 4 and len(cache) == 0
    assert pool.num_used_blocks("full") == 0 and pool.num_used_blocks("sliding") == 0


def test_lru_evicts_least_recently_used_chains_tail_first() -> None:
    cache = make_cache()
    pool = cache.pool
    p1, p2, p3 = prompt(1, 8), prompt(2, 8), prompt(3, 8)
    for p in (p1, p2, p3):
        pool.free(prefill(cache, p))
    pool.free(prefill(cache, [*p1, 9]))  # p1 is used again: p2 is now the least recently used

    def matched(p: list[int]) -> int:
        return cache.match([*p, 9]).num_tokens

    assert cache.evict(1) == 1
    assert (matched(p1), matched(p2), matched(p3)) == (8, 4, 8)  # p2's tail went first
    assert cache.evict(1) == 1
    assert (matched(p1), matched(p2), matched(p3)) == (8, 0, 8)
    assert cache.evict(2) == 2
    assert (matched(p1), matched(p2), matched(p3)) == (8, 0, 0)
    assert cache.stats.evicted_blocks == 4


def test_ensure_capacity_evicts_cached_blocks_before_giving_up() -> None:
    cache = make_cache(num_full=6, num_sliding=64)
    pool = cache.pool
    pool.free(prefill(cache, prompt(0, 16)))
    assert pool.num_free_blocks("full") == 2 and len(cache) == 4
    b = pool.new_table()
    assert pool.can_allocate(16)
    assert pool.ensure_capacity(b, 16)  # 4 blocks: 2 free + 2 evicted
    assert len(cache) == 2 and cache.stats.evicted_blocks == 2
    # 3 more blocks: 0 free + 2 evictable is not enough, so nothing is evicted or allocated.
    c = pool.new_table()
    assert not pool.can_allocate(12)
    assert not pool.ensure_capacity(c, 12)
    assert len(cache) == 2 and c.full == [] and pool.num_free_blocks("full") == 0
    pool.free(b)
    assert pool.ensure_capacity(c, 12)


def test_sliding_pressure_evicts_only_sliding_blocks_far_from_chain_ends() -> None:
    cache = make_cache(num_full=64, num_sliding=12)
    pool = cache.pool
    ids = prompt(0, 32)
    pool.free(prefill(cache, ids, chunk=8, insert=True))
    assert cache.num_cached_blocks("sliding") == 8 and pool.num_free_blocks("sliding") == 4
    b = pool.new_table()
    assert pool.ensure_capacity(b, 32)  # 8 sliding blocks: 4 free + 4 evicted
    assert len(cache) == 8 and cache.num_cached_blocks("sliding") == 4  # full entries all kept
    assert cache.stats.evicted_sliding_blocks == 4 and cache.stats.evicted_blocks == 0
    assert cache.match([*ids, 1]).num_tokens == 32  # the blocks of the trailing window survived
    assert cache.match([*ids[:16], 1]).num_tokens == 0  # but a match inside the chain cannot use them


def test_stats_and_hit_rate() -> None:
    cache = make_cache()
    ids = prompt(0, 16)
    cache.pool.free(prefill(cache, ids))  # miss: 16 tokens queried
    cache.pool.free(prefill(cache, [*ids, *prompt(1, 4)]))  # hit: 16 of 20
    cache.pool.free(prefill(cache, ids))  # hit: 12 of 16 (one token is always computed)
    cache.match(prompt(2, 16))  # match alone records nothing
    s = cache.stats
    assert (s.hits, s.misses, s.hit_tokens, s.queried_tokens) == (2, 1, 28, 52)
    assert cache.hit_rate == pytest.approx(28 / 52)
    assert s.as_dict()["hit_rate"] == round(28 / 52, 4)


def test_stale_match_is_caught_at_attach() -> None:
    cache = make_cache()
    ids = prompt(0, 16)
    cache.pool.free(prefill(cache, ids))
    match = cache.match([*ids, 1])
    cache.clear()
    with pytest.raises(AssertionError, match="stale"):
        cache.attach(cache.pool.new_table(), match)


def test_duplicate_prefixes_keep_the_first_blocks() -> None:
    cache = make_cache()
    pool = cache.pool
    ids = prompt(0, 16)
    a = prefill(cache, ids)
    # b computed the same prompt concurrently (admitted before a inserted anything), in its own blocks.
    b = pool.new_table()
    encode(pool, b, ids, 0)
    assert cache.insert(ids, b) == 0
    assert set(a.full).isdisjoint(b.full) and len(cache) == 4
    b_full = list(b.full)
    pool.free(b)
    assert all(pool.allocators["full"].refcount(blk) == 0 for blk in b_full)
    pool.free(a)
    assert pool.num_used_blocks("full") == 4 == cache.num_evictable("full")


def test_model_without_sliding_layers() -> None:
    text = CFG.text.model_copy(update={"layer_types": ("full_attention",) * CFG.text.num_hidden_layers})
    cache = make_cache(config=CFG.model_copy(update={"text": text}))
    ids = prompt(0, 32)
    cache.pool.free(prefill(cache, ids, insert=False))
    b = prefill(cache, ids)
    assert b.sliding == [] and len(cache) == 8
    cache.pool.free(b)
    assert cache.match([*ids[:24], 5]).num_tokens == 24  # no window rule without sliding layers
