"""API keys and request limits of the ingress: key files and variables (and their error messages), constant-time
identification, the 401/429 answers, per-key concurrency, the max_tokens and prompt caps, and what is logged.
In-process over a test double, plus one Serve deployment with a key file (and one with a broken key file).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from types import SimpleNamespace

import httpx
import pytest

from dgserve.engine.request import CanvasEvent, Event, FinalEvent, GenerationRequest, RequestStats, SamplingParams
from dgserve.routing import auth
from dgserve.routing.auth import APIKeyError, APIKeyMiddleware, APIKeyStore, keys_from_env_value, keys_from_text
from dgserve.routing.ingress_app import IngressSettings, InvalidPromptError, build_fastapi_app

KEY_A = "sk-alpha-0123456789abcdef"
KEY_B = "sk-bravo-0123456789abcdef"
MODEL = "m"


def settings(file: str | None = None, env: str | None = None) -> SimpleNamespace:
    return SimpleNamespace(api_keys_file=file, api_keys_env=env)


# ------------------------------------------------------------------------------------------- key loading


def test_key_file_with_comments_and_env_merge(tmp_path):
    f = tmp_path / "keys"
    f.write_text(f"# team keys\n\nalpha:{KEY_A}\n  # indented comment\nbravo : {KEY_B}  \n")
    store = APIKeyStore.from_settings(settings(str(f), "DG_KEYS"), environ={"DG_KEYS": "ci-bot:sk-ci-0123456789abcdef"})
    assert store is not None and store.names == ("alpha", "bravo", "ci-bot")
    assert store.identify(KEY_A) == "alpha" and store.identify(KEY_B) == "bravo"
    assert store.identify("sk-ci-0123456789abcdef") == "ci-bot"
    assert store.identify("sk-alpha-0123456789abcdeX") is None
    assert store.identify("") is None and store.identify(None) is None
    assert KEY_A not in repr(store) and KEY_A not in repr(store._keys)


def test_no_settings_means_no_authentication():
    assert APIKeyStore.from_settings(settings()) is None


@pytest.mark.parametrize(("text", "fragment"), [
    (f"alpha {KEY_A}\n", "line 1: expected 'name:key'"),
    (f"# c\nalpha:{KEY_A}\nbravo:\n", "line 3: expected 'name:key'"),
    ("alpha:short\n", "'alpha' must be at least 16 characters"),
    (f"al pha:{KEY_A}\n", "key name 'al pha'"),
    (f"alpha:{KEY_A}\nalpha:{KEY_B}\n", "two API keys are named 'alpha'"),
    (f"alpha:{KEY_A}\nbravo:{KEY_A}\n", "alpha and bravo are identical"),
    ("# only comments\n", "holds no keys"),
])
def test_bad_key_file_messages_never_echo_keys(tmp_path, text, fragment):
    f = tmp_path / "keys"
    f.write_text(text)
    with pytest.raises(APIKeyError) as info:
        APIKeyStore.from_settings(settings(str(f)))
    message = str(info.value)
    assert fragment in message
    assert KEY_A not in message and KEY_B not in message and ":short" not in message


def test_missing_file_and_empty_variable(tmp_path):
    with pytest.raises(APIKeyError, match=r"no such file \(mount the key Secret"):
        APIKeyStore.from_settings(settings(str(tmp_path / "absent")))
    with pytest.raises(APIKeyError, match="DG_KEYS is unset or empty"):
        APIKeyStore.from_settings(settings(env="DG_KEYS"), environ={})
    with pytest.raises(APIKeyError, match="entry 2: expected 'name:key'"):
        keys_from_env_value(f"alpha:{KEY_A},oops", "$DG_KEYS")
    assert [k.name for k in keys_from_text(f"a:{KEY_A}\n#b:{KEY_B}", "f")] == ["a"]


def test_every_key_is_compared_whatever_matches(monkeypatch):
    store = APIKeyStore(keys_from_env_value(f"a:{KEY_A},b:{KEY_B},c:sk-charlie-0123456789abcdef", "env"))
    calls: list[tuple[bytes, bytes]] = []
    real = auth.hmac.compare_digest

    def counting(x: bytes, y: bytes) -> bool:
        calls.append((x, y))
        return real(x, y)

    monkeypatch.setattr(auth.hmac, "compare_digest", counting)
    for token, name in ((KEY_A, "a"), (KEY_B, "b"), ("nope" * 8, None), (None, None)):
        calls.clear()
        assert store.identify(token) == name
        assert len(calls) == 3  # no early exit on a match or a miss
        assert {len(x) for pair in calls for x in pair} == {32}  # fixed-length digests, not the raw tokens


# ------------------------------------------------------------------------------------- HTTP, in-process


class GateBackend:
    """TEST DOUBLE for ChatBackend: one canvas per request, held until ``release`` is set."""

    model_id = MODEL
    max_context = 64
    sampling_defaults = SamplingParams()

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.release.set()
        self.requests: list[GenerationRequest] = []
        self.started = 0
        self._progress = asyncio.Condition()
        self.refuse: str | None = None  # raise InvalidPromptError with this message from generate

    async def tokenize_prompt(self, prompt: str | list[int]) -> list[int]:
        return list(prompt) if isinstance(prompt, list) else [ord(c) % 100 for c in prompt]

    async def tokenize_chat(self, messages: list[dict[str, str]]) -> list[int]:
        return [1, 2, 3]

    async def ready(self) -> bool:
        return True

    async def wait_started(self, n: int) -> None:
        """Until ``n`` requests have reached ``generate``."""
        async with self._progress:
            await self._progress.wait_for(lambda: self.started >= n)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Event]:
        if self.refuse:
            raise InvalidPromptError(self.refuse)
        self.requests.append(request)
        async with self._progress:
            self.started += 1
            self._progress.notify_all()
        await self.release.wait()
        yield CanvasEvent(request.request_id, [5, 6], "ok", 0)
        yield FinalEvent(request.request_id, "length", RequestStats(new_tokens=2))


def keyed_app(backend: GateBackend, max_concurrent: int = 2, ingress: IngressSettings | None = None,
              seen: list | None = None):
    store = APIKeyStore(keys_from_env_value(f"alpha:{KEY_A},bravo:{KEY_B}", "env"))
    app = build_fastapi_app(backend, ingress, authorize=store.authorize)
    app.add_middleware(APIKeyMiddleware, keys=store, max_concurrent=max_concurrent,
                       on_response=(lambda name, status: seen.append((name, status))) if seen is not None else None)
    return app


def client(app) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t", timeout=30)


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


BODY = {"model": MODEL, "prompt": "hi", "max_tokens": 4}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.anyio
async def test_missing_or_wrong_key_is_openai_401_and_open_routes_stay_open(caplog):
    seen: list = []
    caplog.set_level(logging.INFO, logger="dgserve.routing.auth")
    async with client(keyed_app(GateBackend(), seen=seen)) as c:
        for headers in ({}, bearer("sk-wrong-0123456789abcdef"), {"Authorization": KEY_A},
                        {"Authorization": f"Basic {KEY_A}"}):
            r = await c.post("/v1/completions", json=BODY, headers=headers)
            assert r.status_code == 401, headers
            assert r.json()["error"] == {"message": auth.INVALID_KEY_MESSAGE, "type": "authentication_error",
                                         "param": None, "code": "invalid_api_key"}
            assert r.headers["www-authenticate"] == "Bearer"
        # unauthenticated callers learn nothing about validation: a malformed body is still a 401
        assert (await c.post("/v1/completions", content=b"{not json")).status_code == 401
        assert (await c.get("/v1/models")).status_code == 401
        assert (await c.get("/v1/models", headers=bearer(KEY_A))).json()["data"][0]["id"] == MODEL
        r = await c.post("/v1/completions", json=BODY, headers=bearer(KEY_B))
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == "ok"
        assert (await c.post("/v1/completions", json=BODY, headers={"authorization": f"bearer {KEY_B}"})
                ).status_code == 200  # the scheme is case-insensitive
        assert (await c.get("/health")).status_code == 200
        assert (await c.get("/ready")).status_code == 200
        assert (await c.get("/metrics")).status_code == 404  # metrics are Ray's port, never the API's
        schema = (await c.get("/openapi.json")).json()
    assert "401" in schema["paths"]["/v1/completions"]["post"]["responses"]
    assert schema["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    assert ("bravo", 200) in seen and (None, 401) in seen
    logged = caplog.text
    assert "api key bravo: POST /v1/completions -> 200" in logged
    assert KEY_A not in logged and KEY_B not in logged


@pytest.mark.anyio
async def test_concurrent_requests_per_key_are_capped_with_429():
    backend = GateBackend()
    backend.release.clear()
    async with client(keyed_app(backend, max_concurrent=2)) as c:
        held = [asyncio.create_task(c.post("/v1/completions", json=BODY, headers=bearer(KEY_A))) for _ in range(2)]
        await asyncio.wait_for(backend.wait_started(2), 30)
        r = await c.post("/v1/completions", json=BODY, headers=bearer(KEY_A))
        assert r.status_code == 429
        assert r.headers["retry-after"] == "1"
        assert r.json()["error"]["type"] == "rate_limit_error"
        assert r.json()["error"]["code"] == "too_many_concurrent_requests"
        assert "'alpha'" in r.json()["error"]["message"] and KEY_A not in r.text
        assert (await c.get("/v1/models", headers=bearer(KEY_A))).status_code == 200  # only generation counts
        other = asyncio.create_task(c.post("/v1/completions", json=BODY, headers=bearer(KEY_B)))
        await asyncio.wait_for(backend.wait_started(3), 30)  # another key is not limited by alpha's requests
        backend.release.set()
        assert [t.status_code for t in await asyncio.gather(*held, other)] == [200, 200, 200]
        # the slots were released when the responses finished
        assert (await c.post("/v1/completions", json=BODY, headers=bearer(KEY_A))).status_code == 200


@pytest.mark.anyio
async def test_max_tokens_and_prompt_caps_and_refused_prompts():
    backend = GateBackend()
    ingress = IngressSettings(max_tokens_limit=16, max_prompt_tokens=10, max_body_bytes=2000)
    async with client(build_fastapi_app(backend, ingress)) as c:
        r = await c.post("/v1/completions", json={**BODY, "max_tokens": 17})
        assert r.status_code == 400 and r.json()["error"]["code"] == "max_tokens_too_large"
        assert r.json()["error"]["param"] == "max_tokens"
        r = await c.post("/v1/completions", json={**BODY, "prompt": "x" * 11})
        assert r.status_code == 400 and r.json()["error"]["code"] == "prompt_too_long"
        r = await c.post("/v1/completions", json={**BODY, "prompt": "x" * 2100})
        assert r.status_code == 413
        assert (await c.post("/v1/completions", json={"model": MODEL, "prompt": "x" * 10})).status_code == 200
        assert backend.requests[-1].max_tokens == 16  # the default is capped too (the context would allow 54)
        assert (await c.post("/v1/completions", json={**BODY, "max_tokens": 16})).status_code == 200
        backend.refuse = "prompt of 9 tokens cannot fit in the KV cache (8 tokens)"
        for stream in (False, True):
            r = await c.post("/v1/completions", json={**BODY, "stream": stream})
            assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_prompt", r.text
            assert "KV cache" in r.json()["error"]["message"]
    defaults = IngressSettings()
    assert defaults.max_tokens_limit == 8192 and defaults.max_prompt_tokens is None
    assert defaults.request_timeout_s == 600.0 and defaults.max_body_bytes == 4 * 2**20


# -------------------------------------------------------------------------------------------- on Serve


@pytest.mark.slow
def test_serve_app_with_key_file(serve_http, tmp_path):
    from ray import serve
    from reliability.harness import delete_app, deploy

    keys = tmp_path / "api-keys"
    keys.write_text(f"# mounted from a Secret\nalpha:{KEY_A}\n")
    try:
        url = deploy(serve_http, "keyed", "/keyed", {"auth": {"api_keys_file": str(keys),
                                                             "max_concurrent_per_key": 4}})
        body = {"model": "tiny-random", "prompt": "hi", "max_tokens": 4, "seed": 1}
        r = httpx.post(url + "/v1/completions", json=body, timeout=60)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        r = httpx.post(url + "/v1/completions", json=body, headers=bearer(KEY_A), timeout=60)
        assert r.status_code == 200
        assert httpx.get(url + "/health", timeout=30).status_code == 200
        assert httpx.get(url + "/metrics", timeout=30).status_code == 404
    finally:
        delete_app("keyed")
    keys.write_text("alpha:tooshort\n")
    try:
        with pytest.raises(RuntimeError, match="Ingress"):
            deploy(serve_http, "badkeys", "/badkeys", {"auth": {"api_keys_file": str(keys)}})
        message = serve.status().applications["badkeys"].deployments["Ingress"].message
        assert "APIKeyError" in message and f"auth.api_keys_file {keys}, line 1" in message, message
        assert "tooshort" not in message
    finally:
        delete_app("badkeys")
