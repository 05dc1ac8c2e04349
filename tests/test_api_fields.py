"""The fields real clients send (issue 20), end to end in one process: the FastAPI app over a real engine with the
shipped ``tiny`` model, driven over HTTP with httpx and the ``openai`` client: vLLM's extension fields, list prompts
and ``n`` (streamed and not), ``echo``, logprobs, usage with stop strings, and JSON output by constrained denoising.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import jsonschema
import pytest
from local_api import chat as chat_body
from local_api import http, oai, stream_chunks, tiny_backend

from dgserve.model.checkpoint import load_metadata
from dgserve.routing.chat_backend import EngineChatBackend
from dgserve.train.paths import TINY_DIR

pytestmark = [pytest.mark.anyio,
              pytest.mark.skipif(not (TINY_DIR / "model.safetensors").is_file(), reason="tiny not trained yet")]

SORT = "sort 9 1 8 2 7 3"  # seed 7: '1 2 3 7 8 9', then EOS
TOKENIZER = load_metadata("tiny").tokenizer
PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age", "kind"], "properties": {
    "name": {"type": "string", "maxLength": 12}, "age": {"type": "integer", "minimum": 0, "maximum": 150},
    "kind": {"enum": ["king", "queen", "knight"]}}}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def backend() -> Iterator[EngineChatBackend]:
    with tiny_backend(16 << 20) as local:
        yield local


def chat(content: str = SORT, **extra: Any) -> dict[str, Any]:
    return chat_body(content, **extra)



# ------------------------------------------------------------------------------------ 1. vLLM's fields


async def test_guidellm_style_streams_get_usage_on_every_chunk(backend) -> None:
    """guidellm sends stream_options.continuous_usage_stats, ignore_eos and stop: null on every streaming request."""
    body = {"model": "tiny", "prompt": "And the king said unto", "max_tokens": 40, "seed": 1, "ignore_eos": True,
            "stop": None, "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    async with http(backend) as client:
        chunks = await stream_chunks(client, "/v1/completions", body)
        chat_chunks = await stream_chunks(client, "/v1/chat/completions", chat(**{k: v for k, v in body.items()
                                                                                    if k not in ("model", "prompt")}))
    for got in (chunks, chat_chunks):
        assert all(c["usage"] is not None for c in got)
        counts = [c["usage"]["completion_tokens"] for c in got]
        # grows as canvases commit; ignore_eos: max_tokens tokens of output (no EOS, no padding sampled)
        assert counts == sorted(counts) and counts[-1] == 40
        last = got[-1]
        assert last["choices"] == [] and counts[-2] == counts[-1]  # the usage chunk: the total, as the last canvas'
        assert last["usage"]["total_tokens"] == last["usage"]["prompt_tokens"] + counts[-1]


async def test_vllm_fields_with_their_meanings(backend) -> None:
    async with http(backend) as client:
        plain = (await client.post("/v1/chat/completions", json=chat(seed=7, max_tokens=32))).json()
        longer = (await client.post("/v1/chat/completions", json=chat(seed=7, max_tokens=32, min_tokens=12))).json()
        neutral = await client.post("/v1/chat/completions", json=chat(
            seed=7, max_tokens=32, top_k=-1, min_p=0.0, repetition_penalty=1.0, reasoning_effort="none",
            skip_special_tokens=True, add_generation_prompt=True, chat_template_kwargs={"unused": 1},
            include_stop_str_in_output=False, presence_penalty=0.0))
        no_prompt = await client.post("/v1/chat/completions", json=chat(seed=7, max_tokens=4,
                                                                         add_generation_prompt=False))
    assert plain["usage"]["completion_tokens"] == 6
    assert longer["usage"]["completion_tokens"] >= 12  # EOS and padding are not sampled before min_tokens
    assert neutral.status_code == 200 and neutral.json()["choices"] == plain["choices"]
    assert no_prompt.status_code == 200
    assert no_prompt.json()["usage"]["prompt_tokens"] < plain["usage"]["prompt_tokens"]  # no "<start_of_turn>model"


async def test_the_schema_at_docs_documents_the_fields(backend) -> None:
    async with http(backend) as client:
        spec = (await client.get("/openapi.json")).json()
    fields = spec["components"]["schemas"]["ChatCompletionRequest"]["properties"]
    for name in ("top_k", "min_p", "repetition_penalty", "min_tokens", "skip_special_tokens",
                 "include_stop_str_in_output", "add_generation_prompt", "chat_template_kwargs", "reasoning_effort",
                 "logprobs", "top_logprobs", "tools", "tool_choice", "response_format", "n", "logit_bias"):
        assert fields[name].get("description"), name
    assert "continuous_usage_stats" in spec["components"]["schemas"]["StreamOptions"]["properties"]


# ---------------------------------------------------------------------- 2. list prompts, n, echo


async def test_list_prompts_and_n_give_indexed_choices(backend) -> None:
    prompts = ["Q: sort 9 4 7\nA:", "And the king said unto", "In the beginning"]
    body = {"model": "tiny", "prompt": prompts, "n": 2, "max_tokens": 24, "seed": 3}
    async with http(backend) as client:
        r = (await client.post("/v1/completions", json=body)).json()
        again = (await client.post("/v1/completions", json=body)).json()
        chunks = await stream_chunks(client, "/v1/completions", {**body, "stream_options": {"include_usage": True}})
        alone = [(await client.post("/v1/completions", json={**body, "prompt": p, "n": 1})).json() for p in prompts]
    assert [c["index"] for c in r["choices"]] == list(range(6))
    assert r["choices"] == again["choices"]  # seeded: reproducible
    for p, single in enumerate(alone):  # the first sample of each prompt is that prompt's n = 1 answer
        assert r["choices"][2 * p]["text"] == single["choices"][0]["text"]
    assert any(r["choices"][2 * p]["text"] != r["choices"][2 * p + 1]["text"] for p in range(3))  # distinct seeds
    streamed = {i: "" for i in range(6)}
    finishes = {}
    for c in chunks[:-1]:
        for choice in c["choices"]:
            streamed[choice["index"]] += choice["text"]
            if choice["finish_reason"]:
                finishes[choice["index"]] = choice["finish_reason"]
    assert [streamed[i] for i in range(6)] == [c["text"] for c in r["choices"]]
    assert finishes == {c["index"]: c["finish_reason"] for c in r["choices"]}
    usage = r["usage"]
    assert usage["prompt_tokens"] == sum(u["usage"]["prompt_tokens"] for u in alone)  # each prompt once
    assert usage == chunks[-1]["usage"]
    assert usage["completion_tokens"] > 0


async def test_token_id_prompt_lists(backend) -> None:
    ids = [TOKENIZER.encode(p) for p in ("Q: sort 9 4 7\nA:", "In the beginning")]
    async with http(backend) as client:
        batch = (await client.post("/v1/completions", json={"model": "tiny", "prompt": ids, "seed": 1,
                                                           "max_tokens": 12, "echo": True})).json()
        texts = [(await client.post("/v1/completions", json={"model": "tiny", "prompt": TOKENIZER.decode(p),
                                                             "seed": 1, "max_tokens": 12})).json() for p in ids]
    assert [c["index"] for c in batch["choices"]] == [0, 1]
    for choice, p, single in zip(batch["choices"], ids, texts, strict=True):
        assert choice["text"] == TOKENIZER.decode(p) + single["choices"][0]["text"]  # echo of an id prompt: its text


async def test_chat_n_streamed_and_not(backend) -> None:
    client = oai(backend)
    reply = await client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": SORT}], n=3,
                                                 seed=7, max_tokens=32)
    stream = await client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": SORT}], n=3,
                                                  seed=7, max_tokens=32, stream=True,
                                                  stream_options={"include_usage": True})
    texts = {i: "" for i in range(3)}
    usage = None
    async for chunk in stream:
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
        usage = chunk.usage or usage
    assert [c.index for c in reply.choices] == [0, 1, 2]
    assert reply.choices[0].message.content.strip() == "1 2 3 7 8 9"  # seed 7's answer: the n = 1 choice
    assert [texts[i] for i in range(3)] == [c.message.content for c in reply.choices]
    assert usage is not None and usage.completion_tokens == reply.usage.completion_tokens


async def test_echo_puts_the_prompt_first(backend) -> None:
    prompt = "Q: sort 9 4 7\nA:"
    async with http(backend) as client:
        plain = (await client.post("/v1/completions", json={"model": "tiny", "prompt": prompt, "seed": 0,
                                                            "max_tokens": 8})).json()
        echoed = (await client.post("/v1/completions", json={"model": "tiny", "prompt": prompt, "seed": 0,
                                                             "max_tokens": 8, "echo": True})).json()
        chunks = await stream_chunks(client, "/v1/completions", {"model": "tiny", "prompt": prompt, "seed": 0,
                                                                  "max_tokens": 8, "echo": True})
    assert echoed["choices"][0]["text"] == prompt + plain["choices"][0]["text"]
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == echoed["choices"][0]["text"]
    assert echoed["usage"] == plain["usage"]


# --------------------------------------------------------------------------------------- logprobs


async def test_logprobs_through_the_api(backend) -> None:
    async with http(backend) as client:
        r = (await client.post("/v1/completions", json={"model": "tiny", "prompt": "And the king said unto",
                                                        "seed": 2, "max_tokens": 20, "logprobs": 3})).json()
        chunks = await stream_chunks(client, "/v1/chat/completions", chat(seed=7, max_tokens=32, logprobs=True,
                                                                          top_logprobs=2))
        reply = (await client.post("/v1/chat/completions", json=chat(seed=7, max_tokens=32, logprobs=True,
                                                                     top_logprobs=2))).json()
    lp = r["choices"][0]["logprobs"]
    text = r["choices"][0]["text"]
    assert "".join(lp["tokens"]) == text and len(lp["tokens"]) == r["usage"]["completion_tokens"]
    assert lp["text_offset"] == [sum(len(t) for t in lp["tokens"][:i]) for i in range(len(lp["tokens"]))]
    assert all(v <= 0 for v in lp["token_logprobs"]) and all(1 <= len(t) <= 3 for t in lp["top_logprobs"])
    content = reply["choices"][0]["logprobs"]["content"]
    assert "".join(t["token"] for t in content) == reply["choices"][0]["message"]["content"]
    assert all(len(t["top_logprobs"]) == 2 and t["bytes"] == list(t["token"].encode()) for t in content)
    streamed = [t for c in chunks if c["choices"] and c["choices"][0].get("logprobs")
                for t in c["choices"][0]["logprobs"]["content"]]
    assert streamed == content  # per committed canvas, the same values


# ----------------------------------------------------------------------------- usage with stop strings


@pytest.mark.parametrize(("stop", "include", "text"), [
    ("3", False, "1 2 "), ("3", True, "1 2 3"), ("1", False, ""), (["8", " 7"], False, "1 2 3")])
async def test_usage_counts_what_is_returned_with_stop_strings(backend, stop, include, text) -> None:
    async with http(backend) as client:
        full = (await client.post("/v1/chat/completions", json=chat(seed=7, max_tokens=32))).json()
        cut = (await client.post("/v1/chat/completions", json=chat(seed=7, max_tokens=32, stop=stop,
                                                                   include_stop_str_in_output=include))).json()
        chunks = await stream_chunks(client, "/v1/chat/completions", chat(
            seed=7, max_tokens=32, stop=stop, include_stop_str_in_output=include,
            stream_options={"include_usage": True}))
    assert full["choices"][0]["message"]["content"] == "1 2 3 7 8 9"
    assert cut["choices"][0]["message"]["content"] == text and cut["choices"][0]["finish_reason"] == "stop"
    # the fewest generated tokens whose text covers what is returned (the tiny tokenizer: one per digit or space)
    ids = TOKENIZER.encode("1 2 3 7 8 9", add_bos=False)
    expected = next(j for j in range(len(ids) + 1) if len(TOKENIZER.decode(ids[:j])) >= len(text))
    assert cut["usage"]["completion_tokens"] == expected
    assert chunks[-1]["usage"]["completion_tokens"] == expected


# ---------------------------------------------------------------------------- JSON output


async def test_json_schema_output_is_valid_for_50_seeded_requests(backend) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    valid = 0
    async with http(backend) as client:
        for seed in range(50):
            r = await client.post("/v1/chat/completions", json=chat("Describe a king.", seed=seed, max_tokens=96,
                                                                    response_format=fmt))
            text = r.json()["choices"][0]["message"]["content"]
            jsonschema.validate(json.loads(text), PERSON)
            valid += 1
        # any JSON object: nothing bounds its strings, and the tiny model's rarely close, so most run to max_tokens
        # (a valid prefix, "length"); this prompt and seed close at once
        obj = await client.post("/v1/chat/completions", json=chat("sort 5 2 8 1", seed=2, max_tokens=64,
                                                                  response_format={"type": "json_object"}))
        streamed = await stream_chunks(client, "/v1/chat/completions", chat(
            "Describe a king.", seed=3, max_tokens=96, response_format=fmt))
    assert valid == 50
    assert obj.json()["choices"][0]["finish_reason"] == "stop"
    assert isinstance(json.loads(obj.json()["choices"][0]["message"]["content"]), dict)
    jsonschema.validate(json.loads("".join(c["choices"][0]["delta"].get("content") or ""
                                           for c in streamed if c["choices"])), PERSON)


async def test_fast_mode_serves_constrained_and_plain_requests_side_by_side() -> None:
    """A fast-mode engine runs constrained canvases through the exact forward and everything else as fast rows
    (commits and prefills carrying their next canvas' first step): 12 concurrent requests, half of them
    JSON-constrained, share steps; every constrained output validates, every plain one ends."""
    import asyncio

    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    with tiny_backend(16 << 20, execution="fast") as fast:
        async with http(fast) as client:
            bodies = [chat("Describe a king.", seed=seed, max_tokens=96, response_format=fmt) if seed % 2 else
                      chat(SORT, seed=seed, max_tokens=80) for seed in range(12)]
            replies = await asyncio.gather(*[client.post("/v1/chat/completions", json=b) for b in bodies])
    for body, reply in zip(bodies, replies, strict=True):
        assert reply.status_code == 200, reply.text
        choice = reply.json()["choices"][0]
        assert choice["finish_reason"] in ("stop", "length")
        if "response_format" in body:
            jsonschema.validate(json.loads(choice["message"]["content"]), PERSON)


async def test_forced_tool_choice_returns_a_call_under_its_schema(backend) -> None:
    tool = {"type": "function", "function": {"name": "record_person", "description": "Record a person.",
                                             "parameters": PERSON}}
    other = {"type": "function", "function": {"name": "noop", "parameters": {"type": "object", "properties": {}}}}
    client = oai(backend)
    named = await client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "A king."}], tools=[tool, other], seed=4, max_tokens=96,
        tool_choice={"type": "function", "function": {"name": "record_person"}})
    required = await client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "A king."}], tools=[tool, other], seed=4, max_tokens=96,
        tool_choice="required")
    for reply in (named, required):
        (call,) = reply.choices[0].message.tool_calls
        assert reply.choices[0].finish_reason == "tool_calls" and reply.choices[0].message.content is None
        if call.function.name == "record_person":
            jsonschema.validate(json.loads(call.function.arguments), PERSON)
        else:
            assert call.function.name == "noop" and isinstance(json.loads(call.function.arguments), dict)
    assert named.choices[0].message.tool_calls[0].function.name == "record_person"
