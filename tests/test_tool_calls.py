"""Tool calling in DiffusionGemma's (Gemma 4's) chat format, on a small checkpoint whose tokenizer and template carry
it (tests/tool_checkpoint.py): prompt renderings equal the reference template's (recorded in
tests/data/gemma4_tool_renderings.json) and transformers' rendering of the same template; the parser reads
model-shaped outputs (token ids in canvases, decoded as the engine decodes them); and the API returns OpenAI
``tool_calls``, whole and streamed, over an engine that emits such outputs (random weights call no tools)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from tool_checkpoint import RENDERINGS, build_tool_checkpoint

from dgserve.engine.request import CanvasEvent, Event, FinalEvent, GenerationRequest, RequestStats
from dgserve.routing.chat_backend import EngineChatBackend
from dgserve.routing.ingress_app import build_fastapi_app
from dgserve.routing.openai_protocol import ChatCompletionRequest
from dgserve.routing.tool_calls import ToolCallParser, parse_call, template_messages

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city.",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "description": "The city."},
        "unit": {"type": "string", "description": "Degrees.", "enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "description": "How many days."}}, "required": ["city"]}}}
SEARCH = {"type": "function", "function": {
    "name": "search", "description": "Search the web.",
    "parameters": {"type": "object", "properties": {
        "query": {"type": "string", "description": "Words."},
        "filters": {"type": "object", "description": "Filters.", "properties": {
            "site": {"type": "string", "description": "A site."}}, "required": ["site"]},
        "tags": {"type": "array", "description": "Tags.", "items": {"type": "string"}},
        "safe": {"type": "boolean", "description": "Safe search.", "nullable": True}}, "required": ["query", "tags"]}}}


def _call(id_: str, name: str, arguments: dict[str, Any] | str) -> dict[str, Any]:
    args = arguments if isinstance(arguments, str) else json.dumps(arguments)
    return {"id": id_, "type": "function", "function": {"name": name, "arguments": args}}


CASES: dict[str, dict[str, Any]] = {
    "declarations": {"messages": [{"role": "system", "content": "You are helpful."},
                                  {"role": "user", "content": "Weather in Paris?"}], "tools": [WEATHER, SEARCH]},
    "no_system": {"messages": [{"role": "user", "content": "Weather in Paris?"}], "tools": [WEATHER]},
    "call_and_result": {"messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            _call("c1", "get_weather", {"city": "Paris", "days": 2, "unit": "celsius"})]},
        {"role": "tool", "tool_call_id": "c1",
         "content": json.dumps({"temperature": 21.5, "sky": "clear", "ok": True, "hours": [1, 2]})}],
        "tools": [WEATHER]},
    "two_calls_text_result": {"messages": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Paris and Rome?"},
        {"role": "assistant", "content": "", "tool_calls": [
            _call("a", "get_weather", '{"city": "Paris"}'),
            _call("b", "search", {"query": "rome weather", "tags": ["x", "y"], "filters": {"site": "a.b"}})]},
        {"role": "tool", "tool_call_id": "a", "content": "sunny"},
        {"role": "tool", "tool_call_id": "b", "content": json.dumps({"hits": 3})},
        {"role": "assistant", "content": "Paris is sunny."}, {"role": "user", "content": "Thanks!"}],
        "tools": [WEATHER, SEARCH]},
    "thinking": {"messages": [{"role": "user", "content": "hi"}], "tools": [WEATHER],
                 "chat_template_kwargs": {"enable_thinking": True}},
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tool_checkpoint(tmp_path_factory.mktemp("tools") / "ckpt")


@pytest.fixture(scope="module")
def backend(checkpoint: Path):
    local = EngineChatBackend.load(str(checkpoint))
    try:
        yield local
    finally:
        local.shutdown()


@pytest.mark.anyio
@pytest.mark.parametrize("case", list(CASES))
async def test_prompt_rendering_matches_the_reference_template(backend, checkpoint, case) -> None:
    """What dgserve renders for an OpenAI conversation with tools (its messages turned into the template's form,
    the checkpoint's template rendered in dgserve's sandbox) is, character for character, what the reference
    template renders for it; transformers renders the checkpoint's template the same way."""
    from transformers import AutoTokenizer

    expected = json.loads(RENDERINGS.read_text())[case]
    spec = CASES[case]
    body = ChatCompletionRequest.model_validate({"model": "m", **spec})
    messages = template_messages(body.messages)
    tools = [t.model_dump(exclude_none=True) for t in body.tools or []]
    ids = await backend.tokenize_chat(messages, tools=tools, template_kwargs=spec.get("chat_template_kwargs"))
    assert backend.supports_tools
    assert backend._prompts._tokenizer.decode(ids, skip_special_tokens=False) == expected
    hf = AutoTokenizer.from_pretrained(str(checkpoint))
    plain = [{k: v for k, v in m.items() if v is not None} for m in messages]
    assert hf.apply_chat_template(plain, tools=tools, tokenize=False, add_generation_prompt=True,
                                  **spec.get("chat_template_kwargs", {})) == expected


OUTPUTS = [
    ('Let me check.<|tool_call>call:get_weather{city:<|"|>Paris<|"|>,days:2}<tool_call|>',
     "Let me check.", [("get_weather", {"city": "Paris", "days": 2})]),
    ('<|tool_call>call:search{filters:{site:<|"|>a.b<|"|>},query:<|"|>rome, {weather}<|"|>,safe:false,'
     'tags:[<|"|>x<|"|>,<|"|>y<|"|>],limit:2.5,none:null}<tool_call|><|tool_call>call:get_weather{city:<|"|>Rome'
     '<|"|>}<tool_call|>', "",
     [("search", {"filters": {"site": "a.b"}, "query": "rome, {weather}", "safe": False, "tags": ["x", "y"],
                  "limit": 2.5, "none": None}), ("get_weather", {"city": "Rome"})]),
    ("No tools needed: it is sunny.", "No tools needed: it is sunny.", []),
    ('Oops <|tool_call>call:get_weather{city:<|"|>Pa<tool_call|> then', 'Oops <|tool_call>call:get_weather{city:<|"|>'
     'Pa<tool_call|> then', []),  # malformed: left as the model wrote it
    ('Unfinished <|tool_call>call:get_weather{city:', 'Unfinished <|tool_call>call:get_weather{city:', []),
]


@pytest.mark.parametrize(("output", "content", "calls"), OUTPUTS)
@pytest.mark.parametrize("canvas", [3, 8, 64])
def test_the_parser_reads_model_shaped_outputs(backend, output, content, calls, canvas) -> None:
    """The output as the engine delivers it: token ids committed ``canvas`` at a time, each canvas decoded with
    special tokens kept (the markers are special tokens), the text fed to the parser as it arrives."""
    tok = backend._prompts._tokenizer
    ids = tok.encode(output, add_bos=False)
    decoder = tok.incremental_decoder(skip_special_tokens=False)
    parser = ToolCallParser()
    got_content, got_calls = "", []
    for i in range(0, len(ids), canvas):
        parsed = parser.feed(decoder.push(ids[i:i + canvas]))
        got_content += parsed.content
        got_calls += parsed.calls
    got_content += parser.feed(decoder.flush()).content + parser.finish()
    assert got_content == content
    assert [(c.function.name, json.loads(c.function.arguments)) for c in got_calls] == calls
    assert len({c.id for c in got_calls}) == len(got_calls)


def test_parse_call_rejects_what_is_not_a_call() -> None:
    assert parse_call('call:f{a:<|"|>x<|"|>}') == ("f", {"a": "x"})
    for bad in ("f{a:1}", "call:{a:1}", "call:f{a:1", "call:f{a:1}}", 'call:f{a:<|"|>x}', "call:f{a:tru}"):
        assert parse_call(bad) is None, bad


class ScriptedEngine:
    """TEST DOUBLE for the engine client under EngineChatBackend: answers every request with ``output`` encoded by
    the checkpoint's tokenizer, committed 8 tokens per canvas and decoded as the engine decodes (the request's
    skip_special_tokens), then EOS. Records the requests."""

    def __init__(self, tokenizer: Any, output: str) -> None:
        self.tok = tokenizer
        self.output = output
        self.requests: list[GenerationRequest] = []

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Event]:
        self.requests.append(request)
        ids = self.tok.encode(self.output, add_bos=False)
        decoder = self.tok.incremental_decoder(request.skip_special_tokens)
        chunks = [ids[i:i + 8] for i in range(0, len(ids), 8)]
        for i, chunk in enumerate(chunks):
            text = decoder.push(chunk) + (decoder.flush() if i == len(chunks) - 1 else "")
            yield CanvasEvent(request.request_id, chunk, text, i)
        yield FinalEvent(request.request_id, "stop", RequestStats(prompt_tokens=len(request.prompt_ids)))

    async def ready(self) -> bool:
        return True


@pytest.mark.anyio
@pytest.mark.parametrize("stream", [False, True])
async def test_the_api_returns_openai_tool_calls(backend, stream) -> None:
    output = OUTPUTS[0][0] + '<|tool_call>call:get_weather{city:<|"|>Rome<|"|>,unit:<|"|>celsius<|"|>}<tool_call|>'
    scripted = ScriptedEngine(backend._prompts._tokenizer, output)
    api = EngineChatBackend(scripted, backend._meta, "tools-test")
    client = openai.AsyncOpenAI(base_url="http://test/v1", api_key="none", max_retries=0, http_client=httpx.AsyncClient(
        transport=httpx.ASGITransport(build_fastapi_app(api)), base_url="http://test"))
    messages = [{"role": "user", "content": "Weather in Paris and Rome?"}]
    if stream:
        chunks = [c async for c in await client.chat.completions.create(
            model="tools-test", messages=messages, tools=[WEATHER], stream=True)]
        content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        calls: dict[int, dict[str, str]] = {}
        for c in chunks:
            for d in (c.choices[0].delta.tool_calls or []) if c.choices else []:
                call = calls.setdefault(d.index, {"id": "", "name": "", "arguments": ""})
                call["id"] += d.id or ""
                call["name"] += d.function.name or ""
                call["arguments"] += d.function.arguments or ""
        finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        got = [(c["name"], json.loads(c["arguments"])) for _, c in sorted(calls.items())]
        ids = [c["id"] for c in calls.values()]
    else:
        reply = await client.chat.completions.create(model="tools-test", messages=messages, tools=[WEATHER])
        message = reply.choices[0].message
        content, finish = message.content, [reply.choices[0].finish_reason]
        got = [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls or []]
        ids = [c.id for c in message.tool_calls or []]
    assert content == "Let me check."
    assert got == [("get_weather", {"city": "Paris", "days": 2}), ("get_weather", {"city": "Rome", "unit": "celsius"})]
    assert finish == ["tool_calls"] and all(i.startswith("call_") for i in ids) and len(set(ids)) == 2
    (request,) = scripted.requests
    prompt = backend._prompts._tokenizer.decode(request.prompt_ids, skip_special_tokens=False)
    assert "<|tool>declaration:get_weather{" in prompt and not request.skip_special_tokens


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"
