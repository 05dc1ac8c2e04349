"""API keys for the ingress: loading named keys, constant-time checking, and the per-key concurrency limit.

Keys come from a file (one ``name:key`` per line, ``#`` comments; the Helm chart mounts a Secret there) and/or
an environment variable (``name:key,name2:key2``). Only SHA-256 digests of the keys are kept, every check
compares against every key (no early exit), and the key's *name* is what logs and metrics see. Ray-free:
``APIKeyMiddleware`` wraps any ASGI app.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from dgserve.routing.errors import error_response
from dgserve.routing.limits import ConcurrencyLimiter, is_api_path, retry_after_headers

logger = logging.getLogger(__name__)

MIN_KEY_LENGTH = 16
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")  # also a metric label value
_BEARER = re.compile(rb"^\s*bearer\s+(\S+)\s*$", re.IGNORECASE)
INVALID_KEY_MESSAGE = "Invalid or missing API key: send 'Authorization: Bearer <key>'."


class APIKeyError(ValueError):
    """The configured API keys cannot be used; the message says where and how to fix it (never the key)."""


class _AuthConfig(Protocol):
    api_keys_file: str | None
    api_keys_env: str | None


@dataclass(frozen=True)
class APIKey:
    name: str
    digest: bytes = field(repr=False)  # SHA-256 of the key: the key itself is not kept


def _digest(secret: str | bytes) -> bytes:
    return hashlib.sha256(secret.encode() if isinstance(secret, str) else secret).digest()


def parse_keys(entries: list[tuple[str, str]], source: str) -> list[APIKey]:
    """``[(where, "name:key")]`` -> keys; ``where`` ("line 3") locates errors in ``source``."""
    keys: list[APIKey] = []
    for where, entry in entries:
        name, sep, secret = entry.partition(":")
        name, secret = name.strip(), secret.strip()
        if not sep or not secret:
            raise APIKeyError(f"{source}, {where}: expected 'name:key' (a key name, a colon, then the key)")
        if not _NAME.match(name):
            raise APIKeyError(f"{source}, {where}: key name {name!r} must be 1-64 characters of letters, digits "
                              "and _ . @ - (it labels logs and metrics)")
        if len(secret) < MIN_KEY_LENGTH or any(c.isspace() or c == "," for c in secret):
            raise APIKeyError(f"{source}, {where}: the key named {name!r} must be at least {MIN_KEY_LENGTH} "
                              "characters with no spaces or commas (e.g. `openssl rand -hex 24`)")
        keys.append(APIKey(name, _digest(secret)))
    return keys


def keys_from_text(text: str, source: str) -> list[APIKey]:
    """A key file's content: one ``name:key`` per line; blank lines and lines starting with ``#`` skipped."""
    entries = [(f"line {i}", line.strip()) for i, line in enumerate(text.splitlines(), 1)
               if line.strip() and not line.lstrip().startswith("#")]
    return parse_keys(entries, source)


def keys_from_env_value(value: str, source: str) -> list[APIKey]:
    """An environment variable's value: ``name:key,name2:key2``."""
    entries = [(f"entry {i}", part.strip()) for i, part in enumerate(value.split(","), 1) if part.strip()]
    return parse_keys(entries, source)


class APIKeyStore:
    """Named API keys; ``identify`` returns the name of the key a Bearer token matches, in constant time."""

    def __init__(self, keys: list[APIKey]) -> None:
        if not keys:
            raise APIKeyError("no API keys configured")
        names = [k.name for k in keys]
        dup = next((n for n in names if names.count(n) > 1), None)
        if dup is not None:
            raise APIKeyError(f"two API keys are named {dup!r}; names must be unique (they attribute requests)")
        digests = [k.digest for k in keys]
        if len(set(digests)) != len(digests):
            clash = [k.name for k in keys if digests.count(k.digest) > 1]
            raise APIKeyError(f"the keys named {' and '.join(clash)} are identical; give each client its own key")
        self._keys = tuple(keys)

    @classmethod
    def from_settings(cls, settings: _AuthConfig, environ: Mapping[str, str] | None = None) -> APIKeyStore | None:
        """Keys from ``settings.api_keys_file`` and ``settings.api_keys_env`` (both may be set); None when
        neither is (authentication off). Raises APIKeyError with a fix-it message for anything unusable."""
        environ = os.environ if environ is None else environ
        keys: list[APIKey] = []
        if settings.api_keys_file:
            path = Path(settings.api_keys_file)
            try:
                text = path.read_text(encoding="utf-8")
            except FileNotFoundError:
                raise APIKeyError(f"auth.api_keys_file {path}: no such file (mount the key Secret there, or unset "
                                  "api_keys_file to run without authentication)") from None
            except (OSError, UnicodeDecodeError) as exc:
                raise APIKeyError(f"auth.api_keys_file {path}: cannot read it ({type(exc).__name__}: "
                                  f"{getattr(exc, 'strerror', None) or 'not UTF-8 text'})") from None
            found = keys_from_text(text, f"auth.api_keys_file {path}")
            if not found:
                raise APIKeyError(f"auth.api_keys_file {path}: holds no keys (expected 'name:key' lines)")
            keys += found
        if settings.api_keys_env:
            var = settings.api_keys_env
            value = environ.get(var)
            if not value or not value.strip():
                raise APIKeyError(f"auth.api_keys_env: the environment variable {var} is unset or empty (set it to "
                                  "'name:key,name2:key2', or unset api_keys_env)")
            found = keys_from_env_value(value, f"auth.api_keys_env ${var}")
            if not found:
                raise APIKeyError(f"auth.api_keys_env: ${var} holds no keys (expected 'name:key,name2:key2')")
            keys += found
        return cls(keys) if keys else None

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(k.name for k in self._keys)

    def identify(self, token: str | bytes | None) -> str | None:
        """The name of the key ``token`` is, or None. Compares fixed-length digests against every key, so the
        time taken depends on neither the token nor which key (if any) it matches."""
        probe = _digest(token if token is not None else b"")
        found: str | None = None
        for key in self._keys:
            if hmac.compare_digest(probe, key.digest):
                found = key.name
        return found if token is not None else None

    async def authorize(self, token: str | None) -> bool:
        """The ingress's ``authorize`` hook."""
        return self.identify(token) is not None

    def __repr__(self) -> str:
        return f"APIKeyStore(names={list(self.names)})"


OnResponse = Callable[[str | None, int], None]
"""Called after each /v1 response with the key name (None: no valid key) and the HTTP status."""


class APIKeyMiddleware:
    """Guards the API routes (``/v1``): a missing or unknown key is a 401; a key already running
    ``max_concurrent`` generation requests (POST) gets a 429 with Retry-After. Everything else (``/health``,
    ``/ready``, the OpenAPI docs) passes untouched. Runs before the body is read, so an unauthenticated
    caller learns nothing about request validation."""

    def __init__(self, app: ASGIApp, keys: APIKeyStore, max_concurrent: int, retry_after_s: float = 1.0,
                 on_response: OnResponse | None = None, on_reject: Callable[[int], None] | None = None) -> None:
        self.app = app
        self.keys = keys
        self.limiter = ConcurrencyLimiter(max_concurrent)
        self.retry_after_s = retry_after_s
        self.on_response = on_response
        self.on_reject = on_reject  # this middleware's own refusals (401, 429)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not is_api_path(scope):
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        name = self.keys.identify(_bearer_token(scope))
        status = 500

        async def send_recording(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        acquired = refused = False
        try:
            if name is None:
                refused = True
                await error_response(401, INVALID_KEY_MESSAGE, code="invalid_api_key",
                                     headers={"WWW-Authenticate": "Bearer"})(scope, receive, send_recording)
                return
            if scope["method"] == "POST":
                acquired = self.limiter.try_acquire(name)
                if not acquired:
                    refused = True
                    headers = retry_after_headers(self.retry_after_s)
                    await error_response(
                        429, f"Too many concurrent requests for API key {name!r}: at most {self.limiter.limit} "
                        "may run at once; retry when one finishes.", code="too_many_concurrent_requests",
                        headers=headers)(scope, receive, send_recording)
                    return
            await self.app(scope, receive, send_recording)
        finally:
            if acquired:
                self.limiter.release(name)  # type: ignore[arg-type]
            logger.info("api key %s: %s %s -> %d in %.3fs", name or "<none>", scope["method"],
                        scope.get("path", ""), status, time.perf_counter() - started)
            try:
                if self.on_response is not None:
                    self.on_response(name, status)
                if refused and self.on_reject is not None:
                    self.on_reject(status)
            except Exception:  # attribution must never fail a request
                logger.exception("recording an API key's request failed")


def _bearer_token(scope: Scope) -> bytes | None:
    for key, value in scope.get("headers", ()):
        if key == b"authorization":
            match = _BEARER.match(value)
            return match.group(1) if match else None
    return None


def serve_key_counter(model_id: str) -> OnResponse:
    """``on_response`` that counts requests per key name and status in ``dgserve_api_key_requests``
    (a ``ray.serve.metrics`` counter; call inside a Serve replica)."""
    from ray.serve.metrics import Counter

    counter = Counter("dgserve_api_key_requests", description="API requests by key name and HTTP status "
                      "(key 'none': no valid key).", tag_keys=("model", "key", "status"))
    counter.set_default_tags({"model": model_id})

    def record(name: str | None, status: int) -> None:
        counter.inc(1.0, tags={"key": name or "none", "status": str(status)})

    return record
