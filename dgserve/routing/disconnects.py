"""A client that goes away before its answer is complete is routine: it costs one info line in the log, not a
traceback. The exceptions a disconnect surfaces as (Starlette's, anyio's closed streams, and whatever the host
adds: under Ray Serve the cancelled request task), alone or wrapped in the exception groups of anyio task groups,
are recognised and dropped here, outside the app's routes and inside its error handler.
"""

from __future__ import annotations

import contextlib
import logging

import anyio
from starlette.requests import ClientDisconnect
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

logger = logging.getLogger(__name__)

DISCONNECTS: tuple[type[BaseException], ...] = (ClientDisconnect, anyio.BrokenResourceError,
                                                anyio.ClosedResourceError)


def is_disconnect(exc: BaseException, kinds: tuple[type[BaseException], ...]) -> bool:
    """``exc`` is one of ``kinds``, or an exception group made of nothing else."""
    if isinstance(exc, BaseExceptionGroup):
        return all(is_disconnect(e, kinds) for e in exc.exceptions)
    return isinstance(exc, kinds)


class QuietDisconnects:
    """ASGI middleware: a request that fails because its client disconnected is logged in one info line."""

    def __init__(self, app: ASGIApp, extra: tuple[type[BaseException], ...] = ()) -> None:
        self.app = app
        self.kinds = DISCONNECTS + tuple(extra)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started |= message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:
            if not is_disconnect(exc, self.kinds):
                raise
            logger.info("client disconnected before %s %s was answered (%s)", scope.get("method"), scope.get("path"),
                        type(exc).__name__)
            if not started:  # outer middleware may insist on a response; nobody will read it
                with contextlib.suppress(Exception):
                    await Response(status_code=499)(scope, receive, send)
