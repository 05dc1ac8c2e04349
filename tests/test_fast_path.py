"""The fast execution mode on CPU: the same model as exact mode within 1e-4, and the engine with it (prefix-cache
hits, chunked prefill, preemption, cancellation, determinism). Its CPU proxies (no host syncs, op counts, graph
breaks) are in test_fast_proxies.py; EP=2 over gloo in test_ep.py."""

from __future__ import annotations

import hf_oracle
import pytest
import torch

from dgserve.engine import fast_step as fs
from dgserve.engine.counter_rng import hash32, randint, stream_keys, uniforms
from dgserve.engine.denoising import EntropyBound, inverse_cdf_sample
from dgserve.engine.engine import Engine, EngineConfig
from dgserve.engine.kv_pages import KVPagePool, PagedKV
from dgserve.engine.request import CanvasEvent, DraftEvent, FinalEvent, GenerationRequest
from dgserve.engine.runner import FastRunner, Row
from dgserve.model.checkpoint import load
from dgserve.model.generation_config import SamplingParams
from dgserve.model.kv import Segment

SPEC_NAMES = list(hf_oracle.SPECS)
SAMPLING = SamplingParams(max_denoising_steps=6)


def _slots(table, space: str, positions: range, block_size: int) -> torch.Tensor:
    blocks = table.full if space == "full" else table.sliding
    return torch.tensor([blocks[p // block_size] * block_size + p % block_size for p in positions])


def _fast_prefill(runner: FastRunner, model, table, slot: int, prompt: list[int]) -> None:
    """Prefill ``prompt`` through fast steps, one row of at most a canvas per step."""
    c = model.config.canvas_length
    pos = 0
    while pos < len(prompt):
        n = min(c, len(prompt) - pos)
        runner.run([Row(fs.PREFILL, slot, pos, table, n, prompt[pos:pos + n])])
        pos += n
        table.mark_written(pos)


@pytest.mark.parametrize("name", SPEC_NAMES)
def test_fast_forward_matches_exact(reference_checkpoints, name):
    """On the parity configs (exact mode equals transformers bit for bit there): one denoising step's logits in
    fast mode are within 1e-4 of exact mode, with and without self-conditioning, over a prompt longer than the
    sliding window; and the K/V fast prefill chunks and a fast commit write match exact mode's within 1e-4."""
    _, path = reference_checkpoints[name]
    loaded = load(path)
    model, cfg = loaded.model, loaded.config
    c, window = cfg.canvas_length, cfg.text.sliding_window
    pool = KVPagePool.from_budget(cfg, 64 << 20, block_size=4, dtype=model.dtype, max_seqs=4, scratch_tokens=c)
    runner = FastRunner(model, pool, num_slots=4)
    g = torch.Generator().manual_seed(1)
    n_prompt = 3 * window + 1
    prompt = torch.randint(3, cfg.text.vocab_size, (n_prompt,), generator=g).tolist()
    canvas = torch.randint(0, cfg.text.vocab_size, (c,), generator=g)
    soft = model.soft_embeddings(torch.softmax(torch.randn(c, cfg.text.vocab_size, generator=g) * 3, -1))

    exact_table = pool.new_table()
    assert pool.ensure_capacity(exact_table, n_prompt + 2 * c)
    kv = PagedKV(pool, {0: exact_table})
    with torch.inference_mode():
        model(torch.tensor(prompt), [Segment("encode", 0, n_prompt, 0)], kv)
        exact = [model.logits(model(canvas, [Segment("denoise", 0, c, n_prompt)], kv, s)) for s in (None, soft)]
        model(canvas, [Segment("encode", 0, c, n_prompt)], kv)  # commit the canvas

    fast_table = pool.new_table()
    assert pool.ensure_capacity(fast_table, n_prompt + 2 * c)
    with torch.inference_mode():
        _fast_prefill(runner, model, fast_table, 1, prompt)
        runner.state.canvas[1] = canvas
        for s, want in zip((None, soft), exact, strict=True):
            runner.state.soft[1] = 0 if s is None else s
            row = Row(fs.DENOISE, 1, n_prompt, fast_table, c, fresh=False, cur_step=3, sampling=SAMPLING)
            layout = fs.StepLayout.build(model, pool.block_size, runner.context_bucket([row]))
            x = fs.step_inputs(model, layout, torch.from_numpy(runner._pack([row], 1, layout)), runner.state,
                               runner.scratch)
            got = model.logits(model.forward_canvases(x.batch, pool.k_flat, pool.v_flat)[0])
            torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
        runner.state.argmax[1] = canvas
        runner.run([Row(fs.COMMIT, 1, n_prompt, fast_table, c)])
    n = n_prompt + c
    for layer in range(cfg.text.num_hidden_layers):
        space = pool.layer_space[layer]
        start = 0 if space == "full" else n - (window - 1)
        for pages in (pool.k_flat, pool.v_flat):
            a = pages[layer][_slots(exact_table, space, range(start, n), pool.block_size)]
            b = pages[layer][_slots(fast_table, space, range(start, n), pool.block_size)]
            torch.testing.assert_close(b, a, rtol=0, atol=1e-4)


def test_counter_rng_is_exact_and_uniform():
    """The hash is the published lowbias32 (known values), 32-bit exact in int64 arithmetic; uniforms lie in
    (0, 1) with the right mean; randint covers [0, high) evenly; streams differ."""
    x = torch.tensor([0, 1, 0xDEADBEEF, 0xFFFFFFFF])
    ref = []
    for v in x.tolist():  # the reference algorithm in Python integers
        v ^= v >> 16
        v = (v * 0x7FEB352D) & 0xFFFFFFFF
        v ^= v >> 15
        v = (v * 0x846CA68B) & 0xFFFFFFFF
        v ^= v >> 16
        ref.append(v)
    assert hash32(x).tolist() == ref
    seeds = torch.arange(4)
    keys = stream_keys(seeds, torch.zeros(4), torch.zeros(4), torch.zeros(4), 2)
    u = uniforms(keys, 4096)
    assert float(u.min()) > 0 and float(u.max()) < 1
    assert abs(float(u.mean()) - 0.5) < 0.01
    r = randint(keys, 4096, 10)
    counts = torch.bincount(r.reshape(-1), minlength=10)
    assert int(r.min()) == 0 and int(r.max()) == 9 and int(counts.min()) > 1400
    other = stream_keys(seeds, torch.zeros(4), torch.zeros(4), torch.zeros(4), 3)
    assert not torch.equal(keys, other) and len(set(keys.tolist())) == 4


def test_inverse_cdf_sampling_follows_the_distribution():
    """Frequencies of inverse-CDF draws match the probabilities (a vocabulary spanning several blocks, a
    zero-probability token never drawn)."""
    g = torch.Generator().manual_seed(0)
    vocab = 3000
    probs = torch.softmax(torch.randn(vocab, generator=g) * 2, -1)
    probs[5] = 0
    probs = probs / probs.sum()
    n = 200_000
    u = torch.rand(n, generator=g)
    picks = inverse_cdf_sample(probs.expand(n, vocab), u, block=256)
    freq = torch.bincount(picks, minlength=vocab).double() / n
    assert int(freq[5]) == 0
    top = probs.argsort(descending=True)[:20]
    assert float((freq[top] - probs[top].double()).abs().max()) < 0.01


def test_entropy_bound_plugin_matches_reference_rule():
    """Acceptance keeps the k lowest-entropy positions with sum(H) - max(H) <= bound, batched per row."""
    entropy = torch.tensor([[0.5, 0.01, 0.02, 0.9, 0.03], [0.2, 0.2, 0.2, 0.2, 0.2]])
    accepted = EntropyBound().accept(entropy, torch.tensor([0.05, 0.5]))
    assert accepted.tolist() == [[False, True, True, False, True], [True, True, True, False, False]]


def _requests(vocab: int, n: int, seed: int = 0, system: list[int] | None = None, max_prompt: int = 60,
              max_tokens: int = 90) -> list[GenerationRequest]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        plen = int(torch.randint(3, max_prompt, (1,), generator=g))
        prompt = [*(system or []), *torch.randint(6, vocab, (plen,), generator=g).tolist()]
        n_out = int(torch.randint(10, max_tokens, (1,), generator=g))
        out.append(GenerationRequest(prompt_ids=prompt, max_tokens=n_out, seed=1000 + i, sampling=SAMPLING,
                                     request_id=f"r{i}", ignore_eos=True))
    return out


def _drive(engine: Engine, requests: list[GenerationRequest], stagger: int = 1, cancel: dict[int, str] | None = None):
    tokens: dict[str, list[int]] = {}
    finals: dict[str, FinalEvent] = {}
    drafts = 0
    pending = list(requests)
    step = 0
    while pending or engine.has_work():
        if pending and step % stagger == 0:
            engine.add_request(pending.pop(0))
        if cancel and step in cancel:
            for ev in engine.cancel(cancel[step]):
                finals[ev.request_id] = ev
        for ev in engine.step():
            if isinstance(ev, CanvasEvent):
                tokens.setdefault(ev.request_id, []).extend(ev.token_ids)
            elif isinstance(ev, FinalEvent):
                finals[ev.request_id] = ev
            elif isinstance(ev, DraftEvent):
                drafts += 1
        step += 1
        assert step < 20_000
    return tokens, finals, drafts


@pytest.fixture(scope="module")
def tiny():
    return load("tiny-random")


def test_fast_engine_serves_staggered_requests_deterministically(tiny):
    """12 staggered requests of different lengths complete with their max_tokens; the same workload again gives
    the same tokens; each step ran one forward with several canvases, copying once each way."""
    cfg = EngineConfig(execution="fast", kv_cache_memory=32 << 20)
    engine = Engine(tiny.model, tiny.generation, None, cfg)
    reqs = _requests(tiny.config.text.vocab_size, 12)
    tokens, finals, _ = _drive(engine, reqs)
    for r in reqs:
        assert finals[r.request_id].finish_reason == "length"
        assert len(tokens[r.request_id]) == r.max_tokens
    assert engine.runner is not None
    assert engine.runner.transfers_to_host == engine.runner.transfers_to_device == engine.forwards
    assert max(engine.canvases_in_forward) >= 4
    again, _, _ = _drive(Engine(tiny.model, tiny.generation, None, cfg), _requests(tiny.config.text.vocab_size, 12))
    assert again == tokens
    assert engine.pool.num_used_blocks("full") == engine.prefix_cache.num_cached_blocks()


def test_fast_engine_prefix_cache_chunked_prefill_preemption_and_cancellation(tiny):
    """A long shared system prompt (prefilled in canvas-sized chunks, then served from the prefix cache), a KV
    budget small enough to preempt, a cancelled request, and drafts: everything completes, the cancelled
    request's pages come back, and a seeded request's text equals its text in a roomy engine with nothing else
    running (preemption restarts a canvas with the same counter-based draws)."""
    vocab = tiny.config.text.vocab_size
    system = torch.randint(6, vocab, (100,), generator=torch.Generator().manual_seed(5)).tolist()
    reqs = _requests(vocab, 10, seed=3, system=system, max_tokens=300)
    reqs[2].draft_every = 2
    probe = Engine(tiny.model, tiny.generation, None, EngineConfig(execution="fast", kv_cache_memory=1 << 20))
    per_request = (160 + 5 * tiny.config.canvas_length) * probe.pool.bytes_per_token("full")
    # room for about two requests' prompts and answers at a time (the full space gets half the budget)
    tight = Engine(tiny.model, tiny.generation, None, EngineConfig(execution="fast", kv_cache_memory=int(
        2 * per_request / 0.5), max_running=8))
    tokens, finals, drafts = _drive(tight, reqs, stagger=1, cancel={9: "r4"})
    assert finals["r4"].finish_reason == "cancelled"
    for r in reqs:
        if r.request_id != "r4":
            assert finals[r.request_id].finish_reason == "length", finals[r.request_id]
            assert len(tokens[r.request_id]) == r.max_tokens
    assert tight.prefix_cache.stats.hit_tokens > 0
    assert tight.preemptions > 0
    assert drafts > 0
    assert tight.pool.num_used_blocks("full") == tight.prefix_cache.num_cached_blocks()
    for r in (reqs[0], reqs[7]):
        roomy = Engine(tiny.model, tiny.generation, None, EngineConfig(execution="fast", kv_cache_memory=32 << 20))
        alone, _, _ = _drive(roomy, [r])
        assert alone[r.request_id] == tokens[r.request_id]


def test_execution_flag_reaches_generate_run_and_batch(capsys):
    """``--execution`` on the three commands: generate runs the request through the fast engine (or the exact
    single-request loop), run and batch put it in their engine configuration."""
    import json

    from dgserve.deploy import cmd_batch, cmd_generate, cmd_run
    from dgserve.deploy.batch import BatchJob

    for mode in ("fast", "exact"):
        args = cmd_generate.GenerateArgs(prompt="sort 5 2 8 1", chat=True, seed=3, json_output=True, execution=mode)
        assert cmd_generate.run(args) == 0
        out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert out["text"] == "1 2 5 8" and out["finish_reason"] == "stop", (mode, out)
    config = cmd_run._deploy_config(cmd_run.RunArgs(execution="fast"))
    assert config.engine.execution == "fast"
    assert cmd_run._deploy_config(cmd_run.RunArgs()).engine.execution == "auto"
    assert BatchJob(model="tiny", input="in.jsonl", output="out.jsonl", execution="fast").execution == "fast"
    parser = __import__("argparse").ArgumentParser()
    sub = parser.add_subparsers()
    for module in (cmd_generate, cmd_run, cmd_batch):
        module.add_parser(sub)
    assert parser.parse_args(["run", "--execution", "fast"]).execution == "fast"
    assert parser.parse_args(["batch", "--input", "a", "--output", "b", "--execution", "exact"]).execution == "exact"


def _mixed_rows(pool: KVPagePool, c: int, kinds: tuple[int, ...]) -> list[Row]:
    """One row per kind, each its own slot and table: commits and denoised canvases after an 8-token prefix
    (its KV whatever the pool holds), prefills of 5 tokens at position 0; fresh canvases (state-independent)."""
    rows = []
    for slot, kind in enumerate(kinds):
        table = pool.new_table()
        assert pool.ensure_capacity(table, 8 + c)
        if kind == fs.PREFILL:
            rows.append(Row(kind, slot, 0, table, 5, [7, 8, 9, 10, 11 + slot]))
            continue
        table.mark_written(8)
        rows.append(Row(kind, slot, 8, table, c, fresh=True, cur_step=SAMPLING.max_denoising_steps,
                        sampling=SAMPLING, seed=40 + slot))
    return rows


def test_only_denoised_rows_run_the_sampler(tiny):
    """In a step mixing commits, prefills and denoised canvases, the tied embedding is read by the token lookup
    and two GEMMs per denoised canvas only (not per row), and the denoised rows' outputs are bit-identical to a
    step whose sampler ran over every row."""
    from bench.op_log import OpLog

    model, c = tiny.model, tiny.config.canvas_length
    pool = KVPagePool.from_budget(tiny.config, 16 << 20, block_size=4, dtype=model.dtype, max_seqs=8,
                                  scratch_tokens=c)
    rows = _mixed_rows(pool, c, (fs.COMMIT, fs.DENOISE, fs.PREFILL, fs.DENOISE))
    runner = FastRunner(model, pool, num_slots=8)
    assert runner.vocab_chunk >= 2  # tiny's vocabulary: several canvases per pass
    log = OpLog()
    with log:
        runner.run(rows)
    assert log.uses[id(model.embed_tokens.weight)] == 1 + 2  # one pass over both denoised canvases
    runner.vocab_chunk = 1  # one canvas per pass, as the published model runs: the same GEMM shapes below
    log = OpLog()
    with log:
        got = runner.run(rows)
    assert log.uses[id(model.embed_tokens.weight)] == 1 + 2 * 2
    every = FastRunner(model, pool, num_slots=8)
    every.vocab_chunk = 1
    every.step_fn = lambda *a, vocab_rows=None, **k: fs.fast_step(*a, **k)  # the sampler over all rows
    want = every.run(rows)
    assert got.shape == want.shape == (4, 2 + c)
    for i in (1, 3):
        assert (got[i] == want[i]).all()


def test_sampler_pass_over_several_canvases_equals_one_canvas_at_a_time(tiny):
    """The plain torch sampler over three canvases at once (per-row temperatures, uniforms and greedy switches)
    gives each canvas what a pass over it alone gives: entropies and soft embeddings within 1e-5 (the GEMM
    shapes differ, so BLAS may round differently), the same argmax and samples but for a rounding-boundary
    flip."""
    model, c = tiny.model, tiny.config.canvas_length
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(3, c, tiny.config.text.hidden_size, generator=g)
    temp = torch.tensor([0.4, 0.7, 1.0])
    u = torch.rand(3, c, generator=g)
    greedy = torch.tensor([False, True, False])
    with torch.inference_mode():
        joint = fs.canvas_vocab_pass(model, hidden.reshape(3 * c, -1), temp[:, None].expand(3, c).reshape(-1, 1),
                                     u.reshape(-1), greedy[:, None].expand(3, c).reshape(-1))
        alone = [fs.canvas_vocab_pass(model, hidden[i], temp[i], u[i], greedy[i]) for i in range(3)]
    for k in range(2):  # sample, argmax
        want = torch.stack([a[k] for a in alone]).reshape(-1)
        assert (joint[k] == want).float().mean() >= 0.99
    torch.testing.assert_close(joint[2], torch.stack([a[2] for a in alone]).reshape(-1), rtol=0, atol=1e-5)
    torch.testing.assert_close(joint[3], torch.cat([a[3] for a in alone]), rtol=0, atol=1e-5)
    assert (joint[0].reshape(3, c)[1] == joint[1].reshape(3, c)[1]).all()  # the greedy canvas takes its argmax
    assert fs.vocab_chunk(256, 262_144) == 1 and fs.vocab_chunk(64, 32_768) == 8


@pytest.mark.parametrize("static", [False, True])
def test_runner_puts_denoised_rows_first_and_returns_rows_in_order(tiny, static):
    """The device program sees the denoised rows first (the sampler runs over a leading count of them: exactly
    theirs when eager, their row bucket under static shapes, with the step padded to its bucket), and the
    runner hands the output rows back in the engine's order."""
    model, c = tiny.model, tiny.config.canvas_length
    pool = KVPagePool.from_budget(tiny.config, 16 << 20, block_size=4, dtype=model.dtype, max_seqs=8,
                                  scratch_tokens=c)
    kinds = (fs.PREFILL, fs.DENOISE, fs.COMMIT, fs.DENOISE, fs.DENOISE)
    rows = _mixed_rows(pool, c, kinds)
    runner = FastRunner(model, pool, num_slots=8, static_shapes=static)  # bucketed shapes, as graphs need
    seen = {}

    def stub(model, algorithm, layout, inp, state, k_pages, v_pages, scratch, variant, vocab_rows, **_):
        seen.update(kinds=inp[:, fs.F_KIND].tolist(), vocab_rows=vocab_rows)
        return inp[:, :fs.HEADER].clone()  # echo each row's header

    runner.step_fn = stub
    out = runner.run(rows)
    if static:
        assert seen == {"kinds": [fs.DENOISE] * 3 + [fs.PREFILL, fs.COMMIT] + [fs.PAD] * 3, "vocab_rows": 4}
    else:
        assert seen == {"kinds": [fs.DENOISE] * 3 + [fs.PREFILL, fs.COMMIT], "vocab_rows": 3}
    assert out[:, fs.F_SLOT].tolist() == [r.slot for r in rows]
    assert out[:, fs.F_KIND].tolist() == list(kinds)


def test_first_denoising_step_rides_with_its_commit(tiny):
    """A commit and the first denoising step of the sequence's next canvas share one forward: the denoised row
    reads the committed canvas' K/V written by the same layer (each layer writes before any row gathers). Its
    hidden states equal those of the same step run after the commit, within 1e-5 (the KV pages are cleared
    between the two runs, so stale K/V could not stand in); an engine serving one request then runs exactly
    one forward per denoising step: the prefill and each commit ride along."""
    model, cfg = tiny.model, tiny.config
    c = cfg.canvas_length
    pool = KVPagePool.from_budget(cfg, 16 << 20, block_size=4, dtype=model.dtype, max_seqs=4, scratch_tokens=c)
    runner = FastRunner(model, pool, num_slots=4)
    table = pool.new_table()
    assert pool.ensure_capacity(table, 8 + 2 * c)
    table.mark_written(8)
    runner.state.argmax[0] = torch.randint(6, cfg.text.vocab_size, (c,), generator=torch.Generator().manual_seed(2))
    commit = Row(fs.COMMIT, 0, 8, table, c)
    first = Row(fs.DENOISE, 0, 8 + c, table, c, fresh=True, cur_step=SAMPLING.max_denoising_steps,
                sampling=SAMPLING, seed=11)

    def hidden(rows: list[Row]) -> torch.Tensor:
        layout = runner._layout(rows)
        inp = torch.from_numpy(runner._pack(rows, len(rows), layout))
        with torch.inference_mode():
            x = fs.step_inputs(model, layout, inp, runner.state, runner.scratch)
            return model.forward_canvases(x.batch, pool.k_flat, pool.v_flat)

    for pages in (*pool.k_flat, *pool.v_flat):
        pages.zero_()
    hidden([commit])
    apart = hidden([first])[0]
    for pages in (*pool.k_flat, *pool.v_flat):
        pages.zero_()
    together = hidden([commit, first])[1]
    torch.testing.assert_close(together, apart, rtol=0, atol=1e-5)

    steps = 5
    engine = Engine(model, tiny.generation, None, EngineConfig(execution="fast", kv_cache_memory=16 << 20))
    sampling = SamplingParams(max_denoising_steps=steps, stability_threshold=None, confidence_threshold=None)
    tokens, finals, _ = _drive(engine, [GenerationRequest(prompt_ids=[7, 8, 9], max_tokens=3 * c, seed=4,
                                                          ignore_eos=True, sampling=sampling, request_id="one")])
    assert len(tokens["one"]) == 3 * c and finals["one"].finish_reason == "length"
    assert engine.forwards == 3 * steps
    assert list(engine.canvases_in_forward) == [1] * (3 * steps)
