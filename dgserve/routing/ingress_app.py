"""dgserve's OpenAI-compatible HTTP API as a plain FastAPI app, free of Ray.

``build_fastapi_app(backend, settings)`` needs only a ``ChatBackend`` (tokenize, generate, readiness), so it
runs in-process against a fake backend in tests, and the Ray Serve ingress deployment mounts it over a
backend that talks to the RequestRouter.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass
from functools import partial
from typing import Annotated, Any, Protocol, TypeVar

import anyio
from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from dgserve.config import IngressSettings
from dgserve.engine.request import CanvasEvent, Event, FinalEvent, GenerationRequest, PromptImage, SamplingParams
from dgserve.routing.choices import ChoiceState, ChoiceUpdate, merged
from dgserve.routing.disconnects import QuietDisconnects
from dgserve.routing.errors import OpenAIHTTPError, describe_validation_errors, error_response, install_error_handlers
from dgserve.routing.images import ImageURL
from dgserve.routing.limits import InFlightLimitMiddleware
from dgserve.routing.openai_protocol import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionChunk,
    CompletionRequest,
    CompletionResponse,
    DraftChunk,
    ErrorResponse,
    FinishReason,
    FunctionCallDelta,
    ModelCard,
    ModelList,
    PromptTokensDetails,
    ToolCallDelta,
    Usage,
)
from dgserve.routing.prompts import InvalidPromptError
from dgserve.routing.replies import ChatReply, CompletionReply, Reply
from dgserve.routing.sse import (
    CLEANUP_TIMEOUT_S,
    DONE,
    EventStreamResponse,
    add_component_schemas,
    sse_data,
    stream_response_doc,
)
from dgserve.routing.structured import OutputPlan, plan_output
from dgserve.routing.tool_calls import ToolFormatError, template_messages

logger = logging.getLogger(__name__)
T = TypeVar("T")


class OverloadedError(Exception):
    """A backend cannot take the request now; raised by ``generate`` or its first ``__anext__`` -> 429."""

    def __init__(self, retry_after: float = 1.0, message: str = "The server is overloaded; retry later.") -> None:
        super().__init__(message)
        self.retry_after = retry_after


class ChatBackend(Protocol):
    """What the ingress needs from the model side; the Ray deployment implements it over a router handle."""

    @property
    def model_id(self) -> str: ...

    @property
    def max_context(self) -> int:
        """Most prompt + completion tokens one request may use."""

    @property
    def sampling_defaults(self) -> SamplingParams:
        """The checkpoint's sampler settings (generation_config.json) that request fields override."""

    async def tokenize_prompt(self, prompt: str | list[int]) -> list[int]:
        """Prompt token ids for /v1/completions (text encoded, ids checked); ValueError for bad input."""

    async def tokenize_chat(self, messages: list[dict[str, Any]], **options: Any) -> list[int]:
        """``[{"role", "content"}]`` rendered by the checkpoint's chat template, generation prompt appended,
        then encoded; ValueError for a conversation the template rejects. ``options`` (only when a request sets
        them): ``tools``, ``add_generation_prompt``, ``template_kwargs``. A backend may also offer
        ``supports_tools``, ``detokenize(ids)`` and ``token_text(id)`` (tool calls, echo of token-id prompts,
        logprobs)."""

    async def tokenize_chat_with_images(self, messages: list[dict[str, Any]], images: list[ImageURL],
                                        **options: Any) -> tuple[list[int], tuple[PromptImage, ...]]:
        """As ``tokenize_chat``, for messages holding one ``{"type": "image"}`` part per entry of ``images``: the
        images loaded and preprocessed, each placeholder expanded; ValueError for bad images or a text-only
        deployment."""

    def generate(self, request: GenerationRequest) -> AsyncIterator[Event]:
        """The request's events, always ending with one FinalEvent. ``aclose()`` on the iterator (or cancelling
        the task awaiting it) cancels the engine request."""

    async def ready(self) -> bool: ...


Authorizer = Callable[[str | None], Awaitable[bool]]
"""API-key hook: gets the Bearer token (None when absent) and says whether the request may proceed."""

_BEARER = HTTPBearer(auto_error=False, description="API key, when the server is started with one.")
_SAMPLER_FIELDS = ("entropy_bound", "max_denoising_steps", "t_max", "t_min")
_ERROR_DOCS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": text} for status, text in {
        400: "Invalid request: bad or unknown field, unsupported feature, prompt over the context limit.",
        404: "Unknown model.", 408: "Request timeout.", 413: "Request body too large.",
        429: "Overloaded: retry after the Retry-After header's seconds.",
    }.items()
}


class ClientDisconnected(Exception):
    """The client went away before the answer was ready."""


class BodySizeLimitMiddleware:
    """Answers 413 for request bodies over ``max_bytes``: by Content-Length, or by counting a chunked body."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.message = f"The request body is larger than the server's limit of {max_bytes} bytes."

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await error_response(413, self.message, code="request_too_large")(scope, receive, send)
            return
        seen = 0

        async def counting_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise HTTPException(413, self.message)  # FastAPI re-raises HTTPExceptions from body reads
            return message

        await self.app(scope, counting_receive, send)


def build_fastapi_app(backend: ChatBackend, settings: IngressSettings | None = None, *,
                      authorize: Authorizer | None = None,
                      disconnect_errors: tuple[type[BaseException], ...] = ()) -> FastAPI:
    """The OpenAI-compatible app over ``backend``; ``authorize`` (optional) checks Bearer API keys on /v1;
    ``disconnect_errors``: what else, besides Starlette's and anyio's, a client disconnect raises in the host."""
    settings = settings or IngressSettings()
    routes = _OpenAIRoutes(backend, settings)
    app = FastAPI(title="dgserve", version="0.1.0", description=_API_DESCRIPTION)
    install_error_handlers(app)
    app.add_exception_handler(OverloadedError, _overloaded)  # type: ignore[arg-type]
    app.add_exception_handler(ClientDisconnected, _client_gone)  # type: ignore[arg-type]
    app.add_exception_handler(InvalidPromptError, _invalid_prompt)  # type: ignore[arg-type]
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=settings.max_body_bytes)
    if settings.max_concurrent_requests is not None:
        app.add_middleware(InFlightLimitMiddleware, max_in_flight=settings.max_concurrent_requests)
    app.add_middleware(QuietDisconnects, extra=disconnect_errors)
    v1 = {"dependencies": [Depends(_bearer_check(authorize))] if authorize else [],
          "responses": {**_ERROR_DOCS, 401: {"model": ErrorResponse, "description": "Missing or bad API key."}}
          if authorize else _ERROR_DOCS}
    app.add_api_route(
        "/v1/completions", routes.completions, methods=["POST"], response_model=CompletionResponse, **v1,
        summary="Text completion (JSON, or SSE with stream: true)", openapi_extra=_stream_doc(
            CompletionChunk, '{"id":"cmpl-1","object":"text_completion","created":0,"model":"m",'
            '"choices":[{"index":0,"text":"Hello","finish_reason":null,"logprobs":null}]}'))
    app.add_api_route(
        "/v1/chat/completions", routes.chat_completions, methods=["POST"], response_model=ChatCompletionResponse,
        **v1, summary="Chat completion (JSON, or SSE with stream: true)", openapi_extra=_stream_doc(
            ChatCompletionChunk, '{"id":"chatcmpl-1","object":"chat.completion.chunk","created":0,"model":"m",'
            '"choices":[{"index":0,"delta":{"content":"Hello"},"finish_reason":null,"logprobs":null}]}'))
    app.add_api_route("/v1/models", routes.list_models, methods=["GET"], response_model=ModelList, **v1)
    app.add_api_route("/v1/models/{model}", routes.get_model, methods=["GET"], response_model=ModelCard, **v1)
    app.add_api_route("/health", routes.health, methods=["GET"], summary="Liveness: always 200")
    app.add_api_route("/ready", routes.ready, methods=["GET"], summary="Readiness: 200, or 503 while the "
                      "backend cannot serve", responses={503: {"model": ErrorResponse}})

    base_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        return add_component_schemas(base_openapi(), [CompletionChunk, ChatCompletionChunk, DraftChunk])

    app.openapi = openapi  # type: ignore[method-assign]
    return app


class _OpenAIRoutes:
    def __init__(self, backend: ChatBackend, settings: IngressSettings) -> None:
        self.backend = backend
        self.settings = settings
        self.started = int(time.time())

    async def completions(self, body: CompletionRequest, request: Request) -> Response:
        self._check_model(body.model)
        prompts = []
        for prompt in body.prompt_inputs:
            ids = await _tokenized(self.backend.tokenize_prompt(prompt), "prompt")
            echo = "" if not body.echo else prompt if isinstance(prompt, str) else self._text(ids)
            prompts.append((ids, echo))
        reply = CompletionReply(id=f"cmpl-{uuid.uuid4().hex}", model=self.backend.model_id,
                                include_usage=body.include_usage, continuous_usage=body.continuous_usage)
        return await self._serve(request, body, prompts, reply, "prompt", OutputPlan())

    async def chat_completions(self, body: ChatCompletionRequest, request: Request) -> Response:
        self._check_model(body.model)
        plan = plan_output(body, bool(getattr(self.backend, "supports_tools", False)))
        try:
            messages = template_messages(body.messages) if plan.template_tools is not None or any(
                m.tool_calls or m.role == "tool" for m in body.messages) else [m.for_template() for m in body.messages]
        except ToolFormatError as exc:
            raise OpenAIHTTPError(400, str(exc), param="messages", code="invalid_prompt") from None
        options: dict[str, Any] = {}
        if plan.template_tools:
            options["tools"] = plan.template_tools
        if not body.add_generation_prompt:
            options["add_generation_prompt"] = False
        if body.chat_template_kwargs:
            options["template_kwargs"] = body.chat_template_kwargs
        images: tuple[PromptImage, ...] = ()
        if urls := [ImageURL(url, where) for url, where in body.image_urls()]:
            with_images = getattr(self.backend, "tokenize_chat_with_images", None)
            if with_images is None:
                raise OpenAIHTTPError(400, "content parts of type 'image_url' are not supported by this server: it "
                                      "serves text only", param="messages", code="invalid_prompt")
            # fetching and decoding images can take a while: stop if the client goes away
            prompt_ids, images = await _guarded(request, _tokenized(with_images(messages, urls, **options),
                                                                    "messages"), None, None)
        else:
            prompt_ids = await _tokenized(self.backend.tokenize_chat(messages, **options), "messages")
        reply = ChatReply(id=f"chatcmpl-{uuid.uuid4().hex}", model=self.backend.model_id,
                          include_usage=body.include_usage, continuous_usage=body.continuous_usage)
        return await self._serve(request, body, [(prompt_ids, "")], reply, "messages", plan, images)

    async def list_models(self) -> ModelList:
        return ModelList(data=[ModelCard(id=self.backend.model_id, created=self.started)])

    async def get_model(self, model: str) -> ModelCard:
        self._check_model(model)
        return ModelCard(id=self.backend.model_id, created=self.started)

    async def health(self) -> dict[str, str]:
        return {"status": "ok"}

    async def ready(self) -> Response:
        try:
            ok = await self.backend.ready()
        except Exception:
            logger.exception("backend readiness check failed")
            ok = False
        if ok:
            return JSONResponse({"status": "ready"})
        return error_response(503, "The model is not ready to serve yet.", code="not_ready")

    def _check_model(self, model: str) -> None:
        if model != self.backend.model_id:
            raise OpenAIHTTPError(404, f"The model '{model}' does not exist; this server serves "
                                  f"'{self.backend.model_id}'.", param="model", code="model_not_found")

    def _text(self, ids: list[int]) -> str:
        detokenize = getattr(self.backend, "detokenize", None)
        return detokenize(ids) if detokenize is not None else ""

    def _token_text(self) -> Callable[[int], str]:
        token_text = getattr(self.backend, "token_text", None)
        return token_text if token_text is not None else str

    async def _serve(self, request: Request, body: CompletionRequest | ChatCompletionRequest,
                     prompts: list[tuple[list[int], str]], reply: Reply, prompt_param: str, plan: OutputPlan,
                     images: tuple[PromptImage, ...] = ()) -> Response:
        """Generate every choice (each prompt of the batch, ``n`` samples each) and answer with all of them."""
        timeout = self.settings.request_timeout_s
        deadline = None if timeout is None else asyncio.get_running_loop().time() + timeout
        sampling = self._sampling(body)
        top = _top_logprobs(body)
        if body.stream_drafts and len(prompts) * body.n > 1:
            raise OpenAIHTTPError(400, "stream_drafts needs a single choice (one prompt, n = 1): drafts carry no "
                                  "choice index", param="stream_drafts")
        specs: list[tuple[GenerationRequest, ChoiceState]] = []
        for p, (ids, echo) in enumerate(prompts):
            max_tokens = self._max_tokens(body, len(ids), prompt_param)
            if body.min_tokens > max_tokens:
                raise OpenAIHTTPError(400, f"min_tokens ({body.min_tokens}) is more than max_tokens ({max_tokens})",
                                      param="min_tokens")
            # ignore_eos asks, as in vLLM, for max_tokens tokens of output: pad ids are not output here (they are
            # neither text nor counted), so neither EOS nor padding is sampled
            min_tokens = max_tokens if body.ignore_eos else body.min_tokens
            for j in range(body.n):
                index = p * body.n + j
                specs.append((GenerationRequest(
                    prompt_ids=ids, max_tokens=max_tokens, seed=_choice_seed(body.seed, j), sampling=sampling,
                    stop=body.stop_strings, ignore_eos=body.ignore_eos,
                    draft_every=(body.draft_every or self.settings.default_draft_every) if body.stream_drafts else 0,
                    request_id=reply.id if len(prompts) * body.n == 1 else f"{reply.id}-{index}",
                    fit_max_tokens=body.requested_max_tokens is None, images=images, min_tokens=min_tokens,
                    logprobs=top, include_stop_str=body.include_stop_str_in_output,
                    skip_special_tokens=body.skip_special_tokens and not plan.keep_special_tokens,
                    constraint=plan.constraint),
                    ChoiceState(index, plan.tool_mode, plan.tool_name, top, self._token_text(), echo)))
        usage = _UsageCount(sum(len(ids) for ids, _ in prompts), [s for _, s in specs], body.n)
        streams: list[AsyncIterator[Event]] = []
        try:
            for generation, _ in specs:
                streams.append(self.backend.generate(generation))
            if not body.stream:
                finals = await _guarded(request, _collect_all(streams, [s for _, s in specs]), deadline, timeout)
                results = []
                for (_, state), final in zip(specs, finals, strict=True):
                    _, reason = state.finish(final, _finish_reason(final))
                    results.append(state.result(reason))
                return JSONResponse(reply.response(results, usage.total(finals)).model_dump())
            firsts = await _guarded(request, _firsts(streams), deadline, timeout)
        except BaseException:
            await _aclose_all(streams)
            raise
        lines = _sse(reply, [s for _, s in specs], streams, firsts, deadline, timeout, drafts=body.stream_drafts,
                     usage=usage)
        return EventStreamResponse(lines, on_close=partial(_aclose_all, streams))

    def _max_tokens(self, body: CompletionRequest | ChatCompletionRequest, n_prompt: int, param: str) -> int:
        limit = self.backend.max_context
        room = limit - n_prompt
        asked = body.requested_max_tokens
        if room < 1:
            raise OpenAIHTTPError(400, f"This model's maximum context length is {limit} tokens, and your prompt "
                                  f"has {n_prompt} tokens, leaving no room for the completion. Please shorten "
                                  "the prompt.", param=param, code="context_length_exceeded")
        prompt_cap, cap = self.settings.max_prompt_tokens, self.settings.max_tokens_limit
        if prompt_cap is not None and n_prompt > prompt_cap:
            raise OpenAIHTTPError(400, f"Your prompt has {n_prompt} tokens; this server accepts at most {prompt_cap} "
                                  "prompt tokens per request. Please shorten the prompt.", param=param,
                                  code="prompt_too_long")
        if cap is not None and asked is not None and asked > cap:
            raise OpenAIHTTPError(400, f"max_tokens is {asked}; this server generates at most {cap} tokens per "
                                  "request. Please lower max_tokens.", param="max_tokens", code="max_tokens_too_large")
        if asked is None:
            return min(self.settings.default_max_tokens or room, room, cap or room)
        if asked > room:
            raise OpenAIHTTPError(400, f"This model's maximum context length is {limit} tokens. However, you "
                                  f"requested {n_prompt + asked} tokens ({n_prompt} in the prompt, {asked} for the "
                                  "completion). Please reduce the prompt or max_tokens.", param="max_tokens",
                                  code="context_length_exceeded")
        return asked

    def _sampling(self, body: CompletionRequest | ChatCompletionRequest) -> SamplingParams:
        base = self.backend.sampling_defaults
        update: dict[str, Any] = {k: v for k in _SAMPLER_FIELDS if (v := getattr(body, k)) is not None}
        if body.top_k is not None and body.top_k > 0:
            update["top_k"] = body.top_k
        if body.top_p is not None and body.top_p < 1.0:
            update |= {"top_k": 1} if body.top_p == 0 else {"top_p": body.top_p}
        if body.min_p:
            update["min_p"] = body.min_p
        if body.token_bias:
            update["logit_bias"] = body.token_bias
        if body.temperature == 0:  # greedy denoising; acceptance keeps the checkpoint's schedule
            update["greedy"] = True
        elif body.temperature is not None:  # temperature scales the checkpoint's t_max -> t_min schedule
            update |= {"t_max": base.t_max * body.temperature, "t_min": base.t_min * body.temperature}
        if not update and isinstance(base, SamplingParams):
            return base
        try:  # re-validated as the engine's type: the backend's defaults may be another SamplingParams class
            return SamplingParams.model_validate({**base.model_dump(), **update})
        except ValidationError as exc:
            message, param = describe_validation_errors(list(exc.errors()))
            fallback = "temperature" if body.temperature is not None else "t_max"
            raise OpenAIHTTPError(400, message, param=param or fallback) from None


async def _tokenized(ids: Awaitable[T], param: str) -> T:
    """``ids`` (prompt ids, or prompt ids and images), with a tokenizer's or image loader's ValueError as a 400."""
    try:
        prompt = await ids
    except ValueError as exc:
        raise OpenAIHTTPError(400, str(exc) or f"invalid {param}", param=param, code="invalid_prompt") from None
    if not (prompt[0] if isinstance(prompt, tuple) else prompt):
        raise OpenAIHTTPError(400, f"The {param} is empty after tokenization.", param=param, code="invalid_prompt")
    return prompt


def _top_logprobs(body: CompletionRequest | ChatCompletionRequest) -> int | None:
    """How many alternatives per token to report (None: no logprobs)."""
    if isinstance(body, CompletionRequest):
        return body.logprobs
    if body.top_logprobs is not None and not body.logprobs:
        raise OpenAIHTTPError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    return (body.top_logprobs or 0) if body.logprobs else None


def _choice_seed(seed: int | None, sample: int) -> int | None:
    """The seed of sample ``sample`` of ``n``: the request's own for the first, distinct derived ones for the others,
    so a seeded request with ``n`` > 1 is reproducible and its first choice is the ``n = 1`` answer."""
    if seed is None or sample == 0:
        return seed
    mixed = (seed * 0x9E3779B97F4A7C15 + sample * 0xBF58476D1CE4E5B9) & ((1 << 64) - 1)
    return (mixed ^ (mixed >> 31)) & ((1 << 63) - 1)


@dataclass
class _UsageCount:
    """Usage of all choices: the prompts once each, the completions of every choice."""

    prompt_tokens: int
    states: list[ChoiceState]
    n: int

    def so_far(self) -> Usage:
        done = sum(s.completion_tokens for s in self.states)
        return Usage(prompt_tokens=self.prompt_tokens, completion_tokens=done, total_tokens=self.prompt_tokens + done)

    def total(self, finals: list[FinalEvent | None]) -> Usage:
        usage = self.so_far()
        # each prompt's cache hit once (its first sample's)
        cached = sum(f.stats.cached_prompt_tokens for f in finals[::self.n] if f is not None)
        usage.prompt_tokens_details = PromptTokensDetails(cached_tokens=cached)
        return usage


def _finish_reason(final: FinalEvent) -> FinishReason:
    """``stop``/``length`` pass through; an engine ``error`` or ``cancelled`` becomes an OpenAIHTTPError."""
    if final.finish_reason in ("stop", "length"):
        return final.finish_reason
    if final.finish_reason == "cancelled":
        raise OpenAIHTTPError(503, "The request was cancelled by the server before it finished; retry it.",
                              code="request_cancelled")
    raise OpenAIHTTPError(500, f"Generation failed: {final.error or 'unknown engine error'}", code="engine_error")


def _timeout_error(timeout: float | None) -> OpenAIHTTPError:
    return OpenAIHTTPError(408, f"The request did not finish within the server's {timeout:g} s timeout.",
                           code="request_timeout")


async def _next_event(events: AsyncIterator[Event], deadline: float | None) -> Event:
    try:
        async with asyncio.timeout_at(deadline):
            return await anext(events)
    except StopAsyncIteration:
        raise RuntimeError("the backend's event stream ended without a FinalEvent") from None


async def _collect(events: AsyncIterator[Event], state: ChoiceState) -> FinalEvent:
    """One choice of a non-streaming request, up to its final event."""
    while not isinstance(event := await _next_event(events, None), FinalEvent):
        if isinstance(event, CanvasEvent):  # drafts are for streams only
            state.canvas(event)
    return event


async def _collect_all(streams: list[AsyncIterator[Event]], states: list[ChoiceState]) -> list[FinalEvent]:
    return list(await asyncio.gather(*(_collect(e, s) for e, s in zip(streams, states, strict=True))))


async def _firsts(streams: list[AsyncIterator[Event]]) -> list[Event]:
    """Each stream's first event: refusals (429, 400) come before any byte of the answer is sent."""
    return list(await asyncio.gather(*(_next_event(e, None) for e in streams)))


async def _sse(reply: Reply, states: list[ChoiceState], streams: list[AsyncIterator[Event]], firsts: list[Event],
               deadline: float | None, timeout: float | None, *, drafts: bool, usage: _UsageCount
               ) -> AsyncIterator[str]:
    """The SSE lines of one stream, every choice's chunks as its canvases commit. Failures after the stream started
    become an error event, never a silent truncation; [DONE] always ends it."""
    for state in states:
        for line in reply.opening(state.index, usage.so_far()):
            yield line
        if state.echo:
            yield reply.content(state.index, state.echo, usage=usage.so_far())
    canvases = [0] * len(states)
    finals: list[FinalEvent | None] = [None] * len(states)
    try:
        async with asyncio.timeout_at(deadline):
            async for i, event in merged(streams, firsts):
                state = states[i]
                if isinstance(event, CanvasEvent):
                    canvases[i] += 1
                    for line in _choice_lines(reply, state, state.canvas(event), usage):
                        yield line
                elif isinstance(event, FinalEvent):
                    finals[i] = event
                    update, reason = state.finish(event, _finish_reason(event))
                    for line in _choice_lines(reply, state, update, usage):
                        yield line
                    yield reply.finish(state.index, reason, usage.so_far())
                elif drafts:
                    yield reply.draft(event, canvases[i])
        if reply.include_usage:
            yield reply.usage(usage.total(finals))
    except OpenAIHTTPError as exc:
        yield sse_data(exc.body)
    except TimeoutError:
        yield sse_data(_timeout_error(timeout).body)
    except Exception:
        logger.exception("stream %s failed", reply.id)
        yield sse_data(OpenAIHTTPError(500, "Internal error while streaming.", code="internal_error").body)
    yield DONE


def _choice_lines(reply: Reply, state: ChoiceState, update: ChoiceUpdate, usage: _UsageCount) -> list[str]:
    """The chunks of what a committed canvas (or a choice's end) added: content, then tool-call deltas."""
    lines = []
    so_far = usage.so_far()
    if update.content or update.logprobs:
        offset = len(state.echo) + len(state.text) - len(update.content)
        lines.append(reply.content(state.index, update.content, update.logprobs, offset, so_far))
    if isinstance(reply, ChatReply):
        deltas = []
        if update.call_started is not None:
            call = update.call_started
            deltas.append(ToolCallDelta(index=0, id=call.id, type="function",
                                        function=FunctionCallDelta(name=call.function.name, arguments="")))
        if update.arguments:
            deltas.append(ToolCallDelta(index=0, function=FunctionCallDelta(arguments=update.arguments)))
        first = len(state.calls) - len(update.calls)
        for k, call in enumerate(update.calls):
            deltas.append(ToolCallDelta(index=first + k, id=call.id, type="function", function=FunctionCallDelta(
                name=call.function.name, arguments=call.function.arguments)))
        if deltas:
            lines.append(reply.tool_calls(state.index, deltas, so_far))
    return lines


async def _guarded(request: Request, work: Coroutine[Any, Any, T], deadline: float | None,
                   timeout: float | None) -> T:
    """``await work``, unless the client disconnects first (ClientDisconnected) or the deadline passes (408);
    either way ``work`` is cancelled."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_disconnected(request))
    try:
        wait = None if deadline is None else max(0.0, deadline - asyncio.get_running_loop().time())
        await asyncio.wait({task, watch}, timeout=wait, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in (watch, task):
            t.cancel()
        with anyio.move_on_after(CLEANUP_TIMEOUT_S, shield=True):
            await asyncio.gather(watch, task, return_exceptions=True)
    if not task.cancelled():
        return task.result()
    if not watch.cancelled():
        raise ClientDisconnected
    raise _timeout_error(timeout)


async def _disconnected(request: Request) -> None:
    """Returns when the client disconnects (the body has been read, so nothing else arrives)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _aclose(events: AsyncIterator[Event]) -> None:
    """Tell the backend we are done with ``events`` (a no-op if it already finished)."""
    aclose = getattr(events, "aclose", None)
    if aclose is None:
        return
    with anyio.move_on_after(CLEANUP_TIMEOUT_S, shield=True):
        try:
            await aclose()
        except Exception:
            logger.exception("closing a backend event stream failed")


async def _aclose_all(streams: list[AsyncIterator[Event]]) -> None:
    for events in streams:
        await _aclose(events)


def _bearer_check(authorize: Authorizer) -> Callable[..., Awaitable[None]]:
    async def check(credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_BEARER)]) -> None:
        if not await authorize(credentials.credentials if credentials else None):
            raise OpenAIHTTPError(401, "Invalid or missing API key: send 'Authorization: Bearer <key>'.",
                                  code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    return check


async def _client_gone(_: Request, __: ClientDisconnected) -> Response:
    return Response(status_code=499)  # nginx's "client closed request"; nobody reads it


async def _invalid_prompt(_: Request, exc: InvalidPromptError) -> JSONResponse:
    # raised by the backend when the engine refuses the prompt (e.g. larger than the KV cache), before any output
    return error_response(400, str(exc) or "The prompt cannot be served.", param=exc.param, code=exc.code)


async def _overloaded(_: Request, exc: OverloadedError) -> JSONResponse:
    seconds = max(exc.retry_after, 0.0)
    headers = {"Retry-After": str(max(1, math.ceil(seconds))), "retry-after-ms": str(round(seconds * 1000))}
    return error_response(429, str(exc), code="server_overloaded", headers=headers)


def _stream_doc(chunk: type[BaseModel], example_chunk: str) -> dict[str, Any]:
    example = f"data: {example_chunk}\n\n" + DONE
    return {"responses": {"200": stream_response_doc(chunk, DraftChunk, example)}}


_API_DESCRIPTION = """\
OpenAI-compatible API for DiffusionGemma, a block-diffusion language model: text is produced one canvas (a
block of tokens) at a time, each canvas denoised in several steps.

* **Streaming** sends one chunk per committed canvas, in OpenAI's chunk format, ending with `data: [DONE]`;
  `stream_options.include_usage` adds a final chunk with empty `choices` and the `usage`.
* **Diffusion parameters** (dgserve extensions, optional): `entropy_bound`, `max_denoising_steps`, `t_max`,
  `t_min`, `ignore_eos`; `seed` makes output reproducible. `temperature` scales the t_max -> t_min schedule.
* **Sampling filters** (`top_p`, `top_k`, `min_p`, `logit_bias`) apply to every denoising step's distribution;
  penalties are accepted at their neutral value only (a canvas is sampled in parallel).
* **Choices**: a list of prompts on /v1/completions and `n` give indexed choices (streamed with their indices).
* **logprobs**: each returned token's log-probability under the distribution of the denoising step that accepted
  it (the last step that kept that token at its position), with that step's top alternatives.
* **Tools** in the checkpoint's chat format (DiffusionGemma: Gemma 4's), parsed back into `tool_calls`; a forced
  `tool_choice` and `response_format` JSON are enforced by constrained denoising (a grammar masks each position).
* **Images** (a model with a vision tower): chat `image_url` parts with `data:image/png|jpeg|webp;base64,...`
  URLs; http(s) URLs only from hosts the operator allows (off by default). Bad images, or more images, pixels
  or bytes than the server's limits, are a 400 naming the part.
* **Drafts** (opt-in, `stream_drafts: true`): provisional snapshots of the canvas being denoised, sent as
  `event: draft` SSE events whose JSON has `object` `"text_completion.draft"` or `"chat.completion.chunk.draft"`,
  empty `choices` and the snapshot under `dgserve.draft`. They are never part of the committed text: OpenAI
  clients see a chunk with no choices (like the usage chunk), and EventSource only delivers them to a "draft"
  listener.
* **Errors** are OpenAI-style `{"error": {"message", "type", "param", "code"}}`; overload is a 429 with
  `Retry-After`.
"""
