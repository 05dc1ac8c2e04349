"""Third-party clients against a live ``dgserve run`` (the console script, its own embedded Ray, a real HTTP port,
the shipped ``tiny`` model): LangChain's ``ChatOpenAI`` (invoke, stream, batch, bind_tools, with_structured_output
with each method) and ``OpenAI`` (batch with its default batch size of 20, i.e. list prompts), and litellm
(completion, streaming, list prompts through text_completion). The clients are the test extras' versions."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from dgserve_process import DgserveRun, dgserve_run
from pydantic import BaseModel, Field

from dgserve.train.paths import TINY_DIR

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not (TINY_DIR / "model.safetensors").is_file(), reason="tiny not trained yet")]

SORT = "sort 9 1 8 2 7 3"  # seed 7: '1 2 3 7 8 9'


class Person(BaseModel):
    """A person of the story."""

    name: str = Field(max_length=12, description="The person's name.")
    age: int = Field(ge=0, le=150, description="Age in years.")


class Anything(BaseModel):
    """json_mode sends no schema (only 'some JSON object'), so the tiny model cannot know these fields: defaults."""

    name: str = "nobody"
    age: int = 0


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DgserveRun]:
    with pytest.MonkeyPatch.context() as env, dgserve_run(["--threads", "1"], tmp_path_factory.mktemp("run")) as run:
        env.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # litellm reads its price list from the package: offline
        yield run


def chat_model(server: DgserveRun, **kwargs):
    from langchain_openai import ChatOpenAI

    return ChatOpenAI(base_url=f"{server.base}/v1", api_key="none", model="tiny", max_retries=0, timeout=300,
                      **kwargs)


def test_langchain_chat_invoke_stream_batch(server) -> None:
    llm = chat_model(server, temperature=0, max_completion_tokens=32)
    answer = llm.invoke(SORT)
    assert answer.content.strip() == "1 2 3 7 8 9"
    assert answer.response_metadata["finish_reason"] == "stop"
    assert answer.usage_metadata["output_tokens"] == 6
    assert "".join(chunk.content for chunk in llm.stream(SORT)) == answer.content
    batch = llm.batch([SORT, "sort 5 2 8 1", "sort 4 3"])
    assert batch[0].content.strip() == "1 2 3 7 8 9" and len(batch) == 3
    assert all(m.content for m in batch)


def test_langchain_bind_tools(server) -> None:
    from langchain_core.tools import tool

    @tool
    def record_person(name: str, age: int) -> str:
        """Record a person of the story."""
        return f"{name} ({age})"

    llm = chat_model(server, seed=3, max_completion_tokens=96)
    free = llm.bind_tools([record_person]).invoke("Tell me about a king.")  # tool_choice auto: the model decides
    assert isinstance(free.content, str) and free.response_metadata["finish_reason"] in ("stop", "length")
    # a forced call is generated under the tool's parameters schema; Person bounds its string, so the tiny model
    # (whose strings rarely close by themselves) ends the call within max_tokens
    for choice in ("Person", "any"):
        forced = llm.bind_tools([Person], tool_choice=choice).invoke("Record the king.")
        (call,) = forced.tool_calls
        assert call["name"] == "Person" and forced.response_metadata["finish_reason"] == "tool_calls"
        person = Person.model_validate(call["args"])
        assert record_person.invoke({"name": person.name, "age": person.age})


@pytest.mark.parametrize("method", ["json_schema", "function_calling", "json_mode"])
def test_langchain_with_structured_output(server, method) -> None:
    if method == "json_mode":
        # the schema only reaches the model through the prompt; this prompt and seed give the tiny model's '{}'
        structured = chat_model(server, seed=2, max_completion_tokens=64).with_structured_output(Anything,
                                                                                                 method=method)
        got = structured.invoke("sort 5 2 8 1")
        assert isinstance(got, Anything)
        return
    structured = chat_model(server, seed=5, max_completion_tokens=96).with_structured_output(Person, method=method)
    got = structured.invoke("Describe a king.")
    assert isinstance(got, Person)  # parsed and validated into the schema
    assert len(got.name) <= 12 and 0 <= got.age <= 150


def test_langchain_openai_llm_batch_sends_list_prompts(server) -> None:
    from langchain_openai import OpenAI

    llm = OpenAI(base_url=f"{server.base}/v1", api_key="none", model="tiny", max_tokens=12, max_retries=0,
                 timeout=300, seed=4)
    assert llm.batch_size == 20  # the default: 25 prompts go as two requests with lists of 20 and 5 prompts
    prompts = [f"sort {i} {9 - i} {(3 * i) % 10}" for i in range(25)]
    results = llm.batch(prompts)
    assert len(results) == 25 and all(isinstance(r, str) for r in results)
    assert results[7] == llm.invoke(prompts[7])  # a list prompt's choice is that prompt's own answer
    generated = llm.generate(prompts[:3])
    assert [len(g) for g in generated.generations] == [1, 1, 1]


def test_litellm_completion_stream_and_list_prompts(server) -> None:
    import litellm

    common = {"model": "openai/tiny", "api_base": f"{server.base}/v1", "api_key": "none", "max_tokens": 32}
    messages = [{"role": "user", "content": SORT}]
    reply = litellm.completion(messages=messages, seed=7, **common)
    assert reply.choices[0].message.content.strip() == "1 2 3 7 8 9"
    assert reply.usage.completion_tokens == 6
    stream = litellm.completion(messages=messages, seed=7, stream=True, **common)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == reply.choices[0].message.content
    prompts = ["Q: sort 9 4 7\nA:", "And the king said unto", "In the beginning"]
    text = litellm.text_completion(prompt=prompts, seed=1, **common)
    assert [c.index for c in text.choices] == [0, 1, 2]
    single = litellm.text_completion(prompt=prompts[1], seed=1, **common)
    assert text.choices[1].text == single.choices[0].text
    assert json.loads(text.model_dump_json())["usage"]["prompt_tokens"] > 0
