"""Paged KV cache: page pool budget, block tables, sliding-window release, refcounts, and PagedKV
against the reference ContiguousKV."""

from __future__ import annotations

import random

import pytest
import torch

from dgserve.engine.kv_pages import BlockTable, KVPagePool, PagedKV, block_bytes, split_budget
from dgserve.model.config import BENCH_CPU, DIFFUSIONGEMMA_26B_A4B, TINY_RANDOM, ModelConfig
from dgserve.model.kv import ContiguousKV

CFG = TINY_RANDOM  # layers: sliding, full, sliding, full; window 16
W = CFG.text.sliding_window
SLIDING, FULL = 0, 1


def make_pool(num_full: int = 64, num_sliding: int = 64, block_size: int = 4,
              config: ModelConfig = CFG) -> KVPagePool:
    return KVPagePool(config, num_full, num_sliding, block_size=block_size, dtype=torch.float32)


def random_kv(pool: KVPagePool, layer: int, n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (n, *pool.k_flat[layer].shape[1:])
    return torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)


def write_all_layers(pool: KVPagePool, table: BlockTable, n: int, gen: torch.Generator,
                     seq: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Append n positions to every layer of one sequence; returns the K/V written per layer."""
    assert pool.ensure_capacity(table, table.num_tokens + n)
    view = PagedKV(pool, {seq: table})
    written = []
    for layer in range(pool.num_layers):
        k, v = random_kv(pool, layer, n, gen)
        view.write(layer, seq, table.layer_len[layer], k, v)
        written.append((k, v))
    return written


def no_sliding_config() -> ModelConfig:
    text = CFG.text.model_copy(update={"layer_types": ("full_attention",) * CFG.text.num_hidden_layers})
    return CFG.model_copy(update={"text": text})


def test_pool_shapes_and_bytes() -> None:
    pool = make_pool(num_full=10, num_sliding=6, block_size=4)
    t = CFG.text
    assert pool.k_pages[SLIDING].shape == (6, 4, t.num_key_value_heads, t.head_dim)
    assert pool.k_pages[FULL].shape == (10, 4, t.num_global_key_value_heads, t.global_head_dim)
    assert pool.full_layers == (1, 3) and pool.sliding_layers == (0, 2)
    # fp32: full 2 layers * 1 head * 32 dims, sliding 2 layers * 2 heads * 16 dims; K and V
    assert pool.bytes_per_token("full") == 2 * 2 * 1 * 32 * 4
    assert pool.bytes_per_token("sliding") == 2 * 2 * 2 * 16 * 4
    assert pool.bytes_per_token() == pool.bytes_per_token("full") + pool.bytes_per_token("sliding")
    assert pool.capacity_bytes() == sum(p.numel() * p.element_size() for p in pool.k_pages + pool.v_pages)
    assert pool.bytes_used() == 0
    table = pool.new_table()
    assert pool.ensure_capacity(table, 9)  # 3 blocks in each space
    assert pool.num_used_blocks("full") == 3 and pool.num_used_blocks("sliding") == 3
    assert pool.num_free_blocks("full") == 7 and pool.num_free_blocks("sliding") == 3
    assert pool.bytes_used() == 3 * pool.block_bytes("full") + 3 * pool.block_bytes("sliding")
    assert pool.token_capacity() == 40


@pytest.mark.parametrize("config", [TINY_RANDOM, BENCH_CPU, DIFFUSIONGEMMA_26B_A4B], ids=["tiny", "bench", "26b"])
@pytest.mark.parametrize("budget_mib", [1, 64, 1024, 80 * 1024])
@pytest.mark.parametrize("max_seqs,max_chunk", [(1, None), (8, 512), (256, 2048)])
def test_split_budget_never_exceeds_budget(config: ModelConfig, budget_mib: int, max_seqs: int,
                                           max_chunk: int | None) -> None:
    budget = budget_mib * 2**20
    dtype, bs = torch.bfloat16, 16
    try:
        split = split_budget(config, budget, bs, dtype, max_seqs, max_chunk)
    except ValueError as exc:
        assert "too small" in str(exc)
        return
    full_b, sliding_b = block_bytes(config, "full", bs, dtype), block_bytes(config, "sliding", bs, dtype)
    used = split.full * full_b + split.sliding * sliding_b
    assert used <= budget
    assert budget - used < full_b  # nothing left that would fit one more full block
    t = config.text
    chunk = max(config.canvas_length if max_chunk is None else max_chunk, config.canvas_length)
    per_seq = -(-(t.sliding_window - 1 + chunk) // bs) + 1
    # the sliding space is sized from max_seqs, leaving the full space a chunk and a canvas per sequence (at
    # most half the budget)
    full_floor = min(budget // 2, max_seqs * full_b * -(-(chunk + config.canvas_length) // bs))
    assert split.sliding == min(max_seqs * per_seq, (budget - full_floor) // sliding_b)
    assert split.full * full_b >= full_floor - full_b
    assert split.sliding >= per_seq


def test_from_budget_allocates_that_split() -> None:
    budget = 300_000
    pool = KVPagePool.from_budget(CFG, budget, block_size=4, dtype=torch.float32, max_seqs=3, max_chunk=8)
    per_seq = -(-(W - 1 + max(8, CFG.canvas_length)) // 4) + 1
    assert pool.num_blocks("sliding") == 3 * per_seq
    assert pool.capacity_bytes() <= budget
    assert pool.capacity_bytes() > budget - pool.block_bytes("full")
    with pytest.raises(ValueError, match="too small"):
        KVPagePool.from_budget(CFG, 1000, block_size=4, dtype=torch.float32, max_seqs=1)


def test_round_trip_across_block_boundaries() -> None:
    pool = make_pool(block_size=4)
    gen = torch.Generator().manual_seed(0)
    table = pool.new_table()
    chunks = [3, 5, 7, 1]  # 16 positions, writes straddling every block boundary
    per_layer: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in range(pool.num_layers)]
    for n in chunks:
        for layer, kv in enumerate(write_all_layers(pool, table, n, gen)):
            per_layer[layer].append(kv)
    assert table.num_tokens == 16 and len(table.full) == 4 and len(table.sliding) == 4
    view = PagedKV(pool, {0: table})
    for layer in range(pool.num_layers):
        k_ref = torch.cat([k for k, _ in per_layer[layer]])
        v_ref = torch.cat([v for _, v in per_layer[layer]])
        for start, end in [(0, 16), (3, 9), (4, 8), (7, 7), (15, 16)]:
            k, v = view.read(layer, 0, start, end)
            assert torch.equal(k, k_ref[start:end]) and torch.equal(v, v_ref[start:end])


def test_blocks_not_contiguous_in_storage() -> None:
    # Interleave two sequences so each one's blocks are scattered through the pool.
    pool = make_pool(block_size=4)
    gen = torch.Generator().manual_seed(1)
    tables = {0: pool.new_table(), 1: pool.new_table()}
    ref: dict[int, list[torch.Tensor]] = {0: [], 1: []}
    for _ in range(4):
        for seq, table in tables.items():
            ref[seq].append(write_all_layers(pool, table, 4, gen, seq=seq)[FULL][0])
    assert tables[0].full != sorted(tables[0].full) or tables[0].full[1] != tables[0].full[0] + 1
    view = PagedKV(pool, tables)
    for seq in tables:
        assert torch.equal(view.read(FULL, seq, 0, 16)[0], torch.cat(ref[seq]))


def test_write_must_append_and_fit() -> None:
    pool = make_pool(block_size=4)
    gen = torch.Generator().manual_seed(2)
    table = pool.new_table()
    assert pool.ensure_capacity(table, 6)
    view = PagedKV(pool, {0: table})
    k, v = random_kv(pool, FULL, 3, gen)
    with pytest.raises(AssertionError, match="append"):
        view.write(FULL, 0, 1, k, v)
    view.write(FULL, 0, 0, k, v)
    with pytest.raises(AssertionError, match="append"):
        view.write(FULL, 0, 0, k, v)  # no overwrites: blocks may be shared
    k, v = random_kv(pool, FULL, 6, gen)
    with pytest.raises(AssertionError, match="ensure_capacity"):
        view.write(FULL, 0, 3, k, v)  # positions [3, 9) but only 2 blocks = 8 positions


def test_read_of_unwritten_positions_asserts() -> None:
    pool = make_pool(block_size=4)
    gen = torch.Generator().manual_seed(3)
    table = pool.new_table()
    write_all_layers(pool, table, 5, gen)
    assert pool.ensure_capacity(table, 10)
    view = PagedKV(pool, {0: table})
    with pytest.raises(AssertionError, match="written"):
        view.read(FULL, 0, 0, 6)
    k, v = random_kv(pool, SLIDING, 3, gen)
    view.write(SLIDING, 0, 5, k, v)
    assert torch.equal(view.read(SLIDING, 0, 5, 8)[0], k)  # this forward's own writes are readable
    with pytest.raises(AssertionError, match="written"):
        view.read(FULL, 0, 5, 8)  # ... but layer by layer
    assert table.num_tokens == 5


def test_ensure_capacity_is_all_or_nothing() -> None:
    pool = make_pool(num_full=5, num_sliding=100, block_size=4)
    a, b = pool.new_table(), pool.new_table()
    assert pool.ensure_capacity(a, 12)
    assert pool.ensure_capacity(a, 12)  # already held: nothing more
    assert pool.num_used_blocks("full") == 3
    assert not pool.can_allocate(12)
    assert not pool.ensure_capacity(b, 12)
    assert b.full == [] and b.sliding == []
    assert pool.num_free_blocks("full") == 2 and pool.num_free_blocks("sliding") == 97
    assert pool.can_allocate(8) and pool.ensure_capacity(b, 8)

    # Short of sliding blocks only: the full space must not be touched either.
    pool = make_pool(num_full=100, num_sliding=3, block_size=4)
    c = pool.new_table()
    assert pool.blocks_needed(16, c).sliding == 4
    assert not pool.ensure_capacity(c, 16)
    assert c.full == [] and pool.num_free_blocks("full") == 100 and pool.num_free_blocks("sliding") == 3


def test_release_out_of_window_frees_exactly_the_blocks_below_the_window() -> None:
    pool = make_pool(block_size=4)  # W = 16: a forward after L reads sliding positions >= L - 15
    gen = torch.Generator().manual_seed(4)
    table = pool.new_table()
    written = write_all_layers(pool, table, 30, gen)  # blocks 0..7
    held = list(table.sliding)
    free_before = pool.num_free_blocks("sliding")
    # 30 - 15 = 15: blocks 0, 1, 2 ([0, 12)) lie entirely below; block 3 ([12, 16)) holds 15.
    assert pool.release_out_of_window(table) == 3
    assert table.sliding == [None, None, None, *held[3:]] and table.sliding_start == 3
    assert pool.num_free_blocks("sliding") == free_before + 3
    assert pool.allocators["sliding"].num_free == free_before + 3
    assert all(pool.allocators["sliding"].refcount(b) == 0 for b in held[:3])  # type: ignore[arg-type]
    assert pool.release_out_of_window(table) == 0  # idempotent

    view = PagedKV(pool, {0: table})
    k, _ = view.read(SLIDING, 0, 12, 30)
    assert torch.equal(k, written[SLIDING][0][12:30])
    with pytest.raises(AssertionError, match="released"):
        view.read(SLIDING, 0, 11, 30)
    assert torch.equal(view.read(FULL, 0, 0, 30)[0], written[FULL][0])  # full layers keep everything

    write_all_layers(pool, table, 2, gen)  # L = 32: 17 -> block 4 starts at 16, so release block 3
    assert pool.release_out_of_window(table) == 1
    assert table.sliding_start == 4
    # An explicit shorter cached_len releases nothing more.
    assert pool.release_out_of_window(table, cached_len=20) == 0


def test_free_returns_everything() -> None:
    pool = make_pool(block_size=4)
    gen = torch.Generator().manual_seed(5)
    table = pool.new_table()
    write_all_layers(pool, table, 30, gen)
    pool.release_out_of_window(table)
    pool.free(table)
    assert pool.num_used_blocks("full") == 0 and pool.num_used_blocks("sliding") == 0
    assert pool.bytes_used() == 0
    assert table.full == [] and table.sliding == [] and table.num_tokens == 0


def test_shared_blocks_survive_free_of_one_sequence() -> None:
    pool = make_pool(block_size=4)
    gen = torch.Generator().manual_seed(6)
    a = pool.new_table()
    written = write_all_layers(pool, a, 8, gen)
    # b shares a's two blocks in both spaces (as the prefix cache's attach does).
    b = pool.new_table()
    pool.attach_prefix(b, a.full, a.sliding, a.sliding_start)
    assert b.num_tokens == 8
    assert pool.num_used_blocks("full") == 2
    pool.free(a)
    assert pool.num_used_blocks("full") == 2 and pool.num_used_blocks("sliding") == 2
    view = PagedKV(pool, {7: b})
    for layer in range(pool.num_layers):
        k, v = view.read(layer, 7, 0, 8)
        assert torch.equal(k, written[layer][0]) and torch.equal(v, written[layer][1])
    pool.free(b)
    assert pool.num_used_blocks("full") == 0 and pool.num_used_blocks("sliding") == 0


def test_model_without_sliding_layers() -> None:
    config = no_sliding_config()
    pool = make_pool(num_full=8, num_sliding=8, block_size=4, config=config)
    assert pool.window is None and pool.num_blocks("sliding") == 0
    gen = torch.Generator().manual_seed(7)
    table = pool.new_table()
    written = write_all_layers(pool, table, 20, gen)
    assert table.sliding == [] and pool.release_out_of_window(table) == 0
    assert torch.equal(PagedKV(pool, {0: table}).read(0, 0, 0, 20)[0], written[0][0])
    pool_b = KVPagePool.from_budget(config, 100_000, block_size=4, dtype=torch.float32, max_seqs=4)
    assert pool_b.num_blocks("sliding") == 0 and pool_b.capacity_bytes() <= 100_000


@pytest.mark.parametrize("seed,block_size", [(0, 1), (1, 3), (2, 4), (3, 16)])
def test_paged_matches_contiguous_randomized(seed: int, block_size: int) -> None:
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    pool = make_pool(num_full=4000 // block_size, num_sliding=4000 // block_size, block_size=block_size)
    sliding = [CFG.text.is_sliding(i) for i in range(pool.num_layers)]
    contig = ContiguousKV(pool.num_layers, sliding, W)
    tables: dict[int, BlockTable] = {}
    next_seq = 0
    for _ in range(40):
        if len(tables) < 2 or rng.random() < 0.2:
            tables[next_seq] = pool.new_table()
            next_seq += 1
        if len(tables) > 2 and rng.random() < 0.15:
            seq = rng.choice(list(tables))
            pool.free(tables.pop(seq))
            contig.drop(seq)
        # One forward: each sequence encodes a chunk (writes) or denoises a canvas (reads only).
        new = {seq: rng.choice([0, rng.randint(1, 20)]) for seq in tables}
        before = {seq: t.num_tokens for seq, t in tables.items()}
        for seq, n in new.items():
            assert pool.ensure_capacity(tables[seq], before[seq] + n)
        view = PagedKV(pool, tables)
        for layer in range(pool.num_layers):
            for seq, n in new.items():
                length = before[seq]
                if n:
                    k, v = random_kv(pool, layer, n, gen)
                    contig.write(layer, seq, length, k, v)
                    view.write(layer, seq, length, k, v)
                total = length + n
                if total == 0:
                    continue
                if sliding[layer]:
                    lo = max(0, length - (W - 1))
                    ranges = [(lo, total), (rng.randint(lo, total), total)]
                else:
                    start = rng.randint(0, total)
                    ranges = [(0, total), (start, rng.randint(start, total))]
                for start, end in ranges:
                    k_p, v_p = view.read(layer, seq, start, end)
                    k_c, v_c = contig.read(layer, seq, start, end)
                    assert torch.equal(k_p, k_c) and torch.equal(v_p, v_c), (seq, layer, start, end)
        contig.trim()
        for table in tables.values():
            pool.release_out_of_window(table)
            # Held sliding blocks never exceed a window plus one chunk.
            held = sum(b is not None for b in table.sliding)
            assert held <= -(-(W - 1 + 20) // pool.block_size) + 1
    for table in tables.values():
        pool.free(table)
    assert pool.num_used_blocks("full") == 0 and pool.num_used_blocks("sliding") == 0
