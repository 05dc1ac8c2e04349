"""How a committed canvas ends a request (``dgserve.engine.finish``), and the single-request loop agreeing with
the engine on it."""

from __future__ import annotations

import pytest

from dgserve.engine.finish import canvas_outcome, text_ids

EOS, PAD = (1,), 0


@pytest.mark.parametrize(("canvas", "room", "ids", "finish", "counted"), [
    ([5, 6, 7, 1, 0, 0], 10, [5, 6, 7], "stop", 3),  # EOS within the budget
    ([5, 6, 7, 1, 0, 0], 3, [5, 6, 7], "stop", 3),  # EOS right after the budget: nothing was cut
    ([5, 6, 7, 1, 0, 0], 2, [5, 6], "length", 2),  # text before EOS cut off
    ([5, 0, 0, 1, 9, 9], 1, [5], "stop", 1),  # only pad ids between the cut and EOS
    ([5, 6, 7, 8, 9, 9], 6, [5, 6, 7, 8, 9, 9], "length", 6),  # the budget is spent, the text goes on
    ([5, 6, 7, 8, 9, 9], 10, [5, 6, 7, 8, 9, 9], None, 6),  # another canvas
    ([5, 0, 6, 0, 0, 0], 10, [5, 0, 6, 0, 0, 0], None, 2),  # pad ids are kept but not counted
    ([0, 0, 0, 0, 0, 0], 10, [0, 0, 0, 0, 0, 0], "stop", 0),  # a canvas of padding ends the text
    ([0, 0, 0, 0, 0, 0], 4, [0, 0, 0, 0], "stop", 0),
    ([0, 0, 1, 0, 0, 0], 10, [0, 0], "stop", 0),
])
def test_canvas_outcome(canvas, room, ids, finish, counted) -> None:
    out = canvas_outcome(canvas, room, EOS, PAD)
    assert (out.token_ids, out.finish, out.completion_tokens) == (ids, finish, counted)


def test_ignore_eos_ignores_eos_and_padding_and_no_pad_id_counts_everything() -> None:
    assert canvas_outcome([0, 0, 1, 0], 10, EOS, PAD, ignore_eos=True).finish is None
    assert canvas_outcome([0, 0, 0, 0], 4, EOS, PAD, ignore_eos=True).finish == "length"
    out = canvas_outcome([0, 0, 0, 0], 10, EOS, None)
    assert out.finish is None and out.completion_tokens == 4
    assert text_ids([0, 5, 0, 6], PAD) == [5, 6] and text_ids([0, 5], None) == [0, 5]


def test_single_request_loop_stops_on_a_pad_canvas_as_the_engine_does() -> None:
    from dgserve.engine.single import generate_single
    from dgserve.model.checkpoint import load
    from dgserve.train.paths import TINY_DIR

    if not (TINY_DIR / "model.safetensors").is_file():
        pytest.skip("tiny not trained yet")
    loaded = load("tiny")
    ids = loaded.tokenizer.encode_chat([{"role": "user", "content": "Write a long story about a king."}])
    kwargs = {"max_tokens": 128, "seed": 22, "sampling": loaded.generation.sampling,
              "eos_token_ids": loaded.generation.eos_token_ids}
    reference_like = generate_single(loaded.model, ids, **kwargs)  # no pad id: canvas after canvas of padding
    ours = generate_single(loaded.model, ids, pad_token_id=loaded.generation.pad_token_id, **kwargs)
    assert reference_like.finish_reason == "length" and reference_like.stats.canvases == 4
    assert ours.finish_reason == "stop" and ours.stats.canvases == 2
    assert ours.token_ids == reference_like.token_ids[:64]
    assert ours.stats.completion_tokens == 22 and ours.stats.new_tokens == 64


@pytest.mark.parametrize("execution", ["exact", "fast"])
def test_both_execution_modes_honour_greedy_and_the_finish_rules(execution) -> None:
    from dgserve.engine.engine import Engine, EngineConfig
    from dgserve.engine.request import CanvasEvent, FinalEvent, GenerationRequest
    from dgserve.model.checkpoint import load
    from dgserve.train.paths import TINY_DIR

    if not (TINY_DIR / "model.safetensors").is_file():
        pytest.skip("tiny not trained yet")
    loaded = load("tiny")
    engine = Engine(loaded.model, loaded.generation, loaded.tokenizer,
                    EngineConfig(kv_cache_memory=16 << 20, execution=execution))
    sort = loaded.tokenizer.encode_chat([{"role": "user", "content": "sort 9 1 8 2 7 3"}])
    greedy = loaded.generation.sampling.model_copy(update={"greedy": True})
    for i, max_tokens in enumerate([32, 32, 2]):
        engine.add_request(GenerationRequest(sort, max_tokens=max_tokens, sampling=greedy, request_id=f"g{i}"))
    events = engine.run_until_done()
    text = {f"g{i}": "".join(e.text for e in events if isinstance(e, CanvasEvent) and e.request_id == f"g{i}")
            for i in range(3)}
    finish = {e.request_id: e.finish_reason for e in events if isinstance(e, FinalEvent)}
    assert text["g0"] == text["g1"] and text["g0"].strip() == "1 2 3 7 8 9"  # unseeded, yet the same
    assert finish == {"g0": "stop", "g1": "stop", "g2": "length"} and text["g2"].strip() == "1 2"
