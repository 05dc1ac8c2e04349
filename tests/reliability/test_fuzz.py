"""Schema fuzzing: schemathesis generates requests from the app's own OpenAPI schema, valid and invalid, for every
operation, and checks each response: no 5xx, a documented status code and content type, documented headers,
a body that matches the documented schema (for streams: every SSE event, by the schema's event description),
invalid requests rejected, and auth enforced.

The app is the real ingress (``build_fastapi_app``) with API keys, over a real engine in-process
(``EngineChatBackend.load`` on the tiny random model), driven through ASGI: no Ray, no sockets. Half of the generated
requests name the served model, so generation really runs rather than stopping at the 404.

Not checked: schemathesis's ``positive_data_acceptance`` (a schema-valid request must get a 2xx). The schema
cannot express every rule (``top_p`` < 1, ``n`` > 1, t_min above t_max, an unknown model id are schema-valid
and rightly a 400/404), so that check would flag documented behaviour.
"""

from __future__ import annotations

import collections
import time

import pytest
from reliability.harness import FULL, MODEL, one_torch_thread, record, size

from dgserve.engine.engine import EngineConfig
from dgserve.routing.auth import APIKeyMiddleware, APIKeyStore, keys_from_env_value
from dgserve.routing.chat_backend import EngineChatBackend
from dgserve.routing.ingress_app import IngressSettings, build_fastapi_app

pytestmark = pytest.mark.slow
schemathesis = pytest.importorskip("schemathesis")

KEY = "sk-fuzz-0123456789abcdef"
# examples per operation and generation mode: 3 operations with parameters x 2 modes (+ the fixed ones)
EXAMPLES = size(60, 250)


@pytest.fixture(scope="module")
def fuzz_app():
    backend = EngineChatBackend.load(MODEL, engine_config=EngineConfig(kv_cache_memory=16 << 20, max_waiting=64))
    keys = APIKeyStore(keys_from_env_value(f"fuzzer:{KEY}", "test"))
    # short limits keep each generated request cheap: at most two canvases, five seconds
    app = build_fastapi_app(backend, IngressSettings(max_tokens_limit=64, request_timeout_s=5.0),
                            authorize=keys.authorize)
    app.add_middleware(APIKeyMiddleware, keys=keys, max_concurrent=8)
    with one_torch_thread():  # the engine's forwards run on this process's torch threads
        yield app
    backend.shutdown()


def _with_served_model(case, use_it: bool):
    """Point half of the generated requests at the served model (a random id is just a 404)."""
    if use_it:
        if isinstance(case.body, dict) and "model" in case.body:
            case.body["model"] = MODEL
        if case.path_parameters and "model" in case.path_parameters:
            case.path_parameters["model"] = MODEL
    return case


def _fuzz_operation(op, mode, statuses: collections.Counter, streams: list[int]) -> None:
    """Run ``EXAMPLES`` generated requests of one operation and mode; counts statuses and SSE responses."""
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import strategies as st
    from schemathesis import checks

    headers = {"Authorization": f"Bearer {KEY}"}
    strategy = st.tuples(op.as_strategy(generation_mode=mode), st.booleans()).map(
        lambda pair: _with_served_model(*pair))

    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=not FULL,
              phases=[Phase.generate, Phase.shrink], suppress_health_check=list(HealthCheck))
    @given(case=strategy)
    def run(case) -> None:
        response = case.call(headers=headers)
        statuses[(op.path, response.status_code)] += 1
        streams[0] += "text/event-stream" in str(response.headers.get("content-type"))
        assert response.status_code < 500, (case.body, response.text[:500])
        case.validate_response(response, headers=headers, excluded_checks=[checks.positive_data_acceptance])

    run()


# Valid requests that generate, streamed in every shape, validated the same way (the fuzzer rarely hits one:
# a random value in any of the many optional fields usually makes a request a 400).
SHAPES = [
    ("/v1/completions", {"prompt": "hi", "max_tokens": 40, "seed": 1}),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 40, "seed": 1, "stream": True,
                         "stream_options": {"include_usage": True}}),
    ("/v1/completions", {"prompt": [20, 21, 22], "max_tokens": 8, "stream": True, "stream_drafts": True,
                         "draft_every": 2, "max_denoising_steps": 6}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}),
    ("/v1/chat/completions", {"messages": [{"role": "system", "content": "be brief"},
                                           {"role": "user", "content": [{"type": "text", "text": "hi"}]}],
                              "max_completion_tokens": 40, "stream": True, "stream_drafts": True,
                              "stream_options": {"include_usage": True}, "temperature": 0.7}),
]


def _check_shapes(schema, statuses: collections.Counter, streams: list[int]) -> None:
    from schemathesis import checks

    headers = {"Authorization": f"Bearer {KEY}"}
    for path, body in SHAPES:
        case = schema[path]["POST"].Case(body={"model": MODEL, **body})
        response = case.call(headers=headers)
        assert response.status_code == 200, (body, response.text[:300])
        statuses[(path, 200)] += 1
        streams[0] += "text/event-stream" in str(response.headers.get("content-type"))
        case.validate_response(response, headers=headers, excluded_checks=[checks.positive_data_acceptance])


def test_schema_fuzzing(fuzz_app):
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode

    schema = schemathesis.openapi.from_asgi("/openapi.json", fuzz_app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {(op.method.upper(), op.path) for op in operations} == {
        ("POST", "/v1/completions"), ("POST", "/v1/chat/completions"), ("GET", "/v1/models"),
        ("GET", "/v1/models/{model}"), ("GET", "/health"), ("GET", "/ready")}
    statuses: collections.Counter[tuple[str, int]] = collections.Counter()
    streams = [0]
    started = time.perf_counter()
    _check_shapes(schema, statuses, streams)
    for op in operations:
        for mode in GenerationMode:
            try:
                _fuzz_operation(op, mode, statuses, streams)
            except Unsatisfiable:  # an operation without parameters has no invalid requests to generate
                assert mode == GenerationMode.NEGATIVE and op.method.upper() == "GET" and "{" not in op.path
    cases = sum(statuses.values())
    by_status: collections.Counter[int] = collections.Counter()
    for (_, status), n in statuses.items():
        by_status[status] += n
    record("fuzzing", cases=cases, seconds=round(time.perf_counter() - started, 1), sse_responses=streams[0],
           statuses=dict(sorted(by_status.items())), operations=len(operations))
    assert cases >= size(200, 1000)
    assert by_status[200] > len(SHAPES) and streams[0] >= 3  # generation (JSON and streamed) really ran
    assert not [s for s in by_status if s >= 500]
