"""Admission limits of the ingress that are counted, not validated: in-flight generation requests, overall
(``IngressSettings.max_concurrent_requests``) and per API key (``AuthSettings.max_concurrent_per_key``, applied
by ``dgserve.routing.auth.APIKeyMiddleware``). Past a limit the answer is a 429 with Retry-After, given before
the request body is read, so shedding load costs the server almost nothing.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from starlette.types import ASGIApp, Receive, Scope, Send

from dgserve.routing.errors import error_response


class ConcurrencyLimiter:
    """In-flight requests per name, at most ``limit`` each. One event loop: no locking needed."""

    def __init__(self, limit: int) -> None:
        assert limit >= 1
        self.limit = limit
        self._in_flight: dict[str, int] = {}

    def try_acquire(self, name: str) -> bool:
        n = self._in_flight.get(name, 0)
        if n >= self.limit:
            return False
        self._in_flight[name] = n + 1
        return True

    def release(self, name: str) -> None:
        n = self._in_flight.get(name, 0) - 1
        assert n >= 0, f"release without acquire for {name}"
        if n:
            self._in_flight[name] = n
        else:
            self._in_flight.pop(name, None)

    def in_flight(self, name: str) -> int:
        return self._in_flight.get(name, 0)


def retry_after_headers(seconds: float) -> dict[str, str]:
    seconds = max(seconds, 0.0)
    return {"Retry-After": str(max(1, math.ceil(seconds))), "retry-after-ms": str(round(seconds * 1000))}


def is_generation(scope: Scope) -> bool:
    """POST under /v1 (completions, chat completions): the requests that occupy an engine."""
    return scope["type"] == "http" and scope["method"] == "POST" and is_api_path(scope)


def is_api_path(scope: Scope) -> bool:
    path: str = scope.get("path", "")
    root: str = scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root):]
    return path == "/v1" or path.startswith("/v1/")


class InFlightLimitMiddleware:
    """At most ``max_in_flight`` generation requests at once through this ingress; the rest get a 429 with
    Retry-After at once (the slot frees when a response, streamed or not, has been sent)."""

    def __init__(self, app: ASGIApp, max_in_flight: int, retry_after_s: float = 1.0,
                 on_reject: Callable[[int], None] | None = None) -> None:
        self.app = app
        self.limiter = ConcurrencyLimiter(max_in_flight)
        self.retry_after_s = retry_after_s
        self.on_reject = on_reject

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not is_generation(scope):
            await self.app(scope, receive, send)
            return
        if not self.limiter.try_acquire(""):
            if self.on_reject is not None:
                self.on_reject(429)
            await error_response(429, f"The server is at its limit of {self.limiter.limit} concurrent requests; "
                                 "retry later.", code="server_overloaded",
                                 headers=retry_after_headers(self.retry_after_s))(scope, receive, send)
            return
        try:
            await self.app(scope, receive, send)
        finally:
            self.limiter.release("")
