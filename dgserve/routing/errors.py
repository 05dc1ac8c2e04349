"""OpenAI-style errors for the ingress: one exception type, the JSON body every 4xx/5xx carries
(``{"error": {"message", "type", "param", "code"}}``), and the handlers that turn FastAPI's own errors
(validation, unknown routes, crashes) into that shape.
"""

from __future__ import annotations

import logging
import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from dgserve.routing.openai_protocol import ErrorDetail, ErrorResponse

logger = logging.getLogger(__name__)

_TYPES = {401: "authentication_error", 403: "permission_error", 408: "timeout_error", 429: "rate_limit_error"}
_FIELD = re.compile(r"^[A-Za-z_]\w*$")
_UNION_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


def error_type(status: int) -> str:
    return _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")


class OpenAIHTTPError(Exception):
    """An error answered as OpenAI does: ``status`` plus an ``ErrorResponse`` body."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 kind: str | None = None, headers: dict[str, str] | None = None) -> None:
        # a message may quote client input: make it encodable (a lone surrogate would fail the JSON encoder)
        message = message.encode("utf-8", "backslashreplace").decode("utf-8")
        super().__init__(message)
        self.status = status
        self.headers = headers
        self.body = ErrorResponse(error=ErrorDetail(
            message=message, type=kind or error_type(status), param=param, code=code))

    def response(self) -> JSONResponse:
        return JSONResponse(self.body.model_dump(), status_code=self.status, headers=self.headers)


def error_response(status: int, message: str, *, param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return OpenAIHTTPError(status, message, param=param, code=code, headers=headers).response()


def describe_validation_errors(errors: list[dict]) -> tuple[str, str | None]:
    """A readable message and the offending top-level field for pydantic/FastAPI validation errors."""
    # A failed union reports every member; the explicit checks (value errors) say what is actually wrong.
    chosen = [e for e in errors if e.get("type") == "value_error"] or errors
    by_path: dict[str, list[str]] = {}  # path -> what is wrong there (union members joined with "or")
    param: str | None = None
    for err in chosen:
        parts = [str(p) for p in err.get("loc", ()) if _is_field(p)]
        if parts and parts[0] == "body":
            parts = parts[1:]
        path = ".".join(parts)
        kind, msg = err.get("type"), str(err.get("msg", "invalid value")).removeprefix("Value error, ")
        if kind == "json_invalid":
            path, msg = "", f"The request body is not valid JSON: {err.get('ctx', {}).get('error', msg)}"
        else:
            param = param or (parts[0] if parts else None)
        if kind == "extra_forbidden":
            path, msg = "", f"Unrecognized request argument supplied: {path}"
        elif kind == "missing":
            path, msg = "", f"Missing required argument: {path}" if path else "A JSON request body is required"
        if msg not in (found := by_path.setdefault(path, [])):
            found.append(msg)
    text = "; ".join(f"{path}: {' or '.join(msgs)}" if path else "; ".join(msgs) for path, msgs in by_path.items())
    return text or "invalid request", param


def _is_json(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


def _is_field(part: object) -> bool:
    """Whether a pydantic error-location part names a field or index (not a union member like ``str``)."""
    return isinstance(part, int) or (bool(_FIELD.match(str(part))) and part not in _UNION_TAGS)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(OpenAIHTTPError)
    async def _openai_error(_: Request, exc: OpenAIHTTPError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = list(exc.errors())
        if any(tuple(e.get("loc", ())) == ("body",) and isinstance(e.get("input"), bytes) for e in errors):
            # FastAPI parses the body as JSON only for a JSON Content-Type; otherwise validation sees raw bytes
            content_type = request.headers.get("content-type")
            got = f"this request's Content-Type is {content_type!r}" if content_type else "this request has none"
            return error_response(400, f"The request body must be JSON sent with Content-Type: application/json "
                                  f"({got}).", code="invalid_content_type")
        message, param = describe_validation_errors(errors)
        return error_response(400, message, param=param)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = "request_too_large" if exc.status_code == 413 else None
        cause = exc.__cause__
        if isinstance(cause, UnicodeDecodeError):  # FastAPI's "There was an error parsing the body"
            return error_response(400, f"The request body is not valid UTF-8 (byte 0x{cause.object[cause.start]:02x} "
                                  f"at offset {cause.start}); send JSON encoded as UTF-8.", code="invalid_encoding")
        return error_response(exc.status_code, str(exc.detail), code=code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _crash(_: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error in the ingress", exc_info=exc)
        return error_response(500, "internal server error", code="internal_error")
