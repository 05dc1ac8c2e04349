"""The ingress's ``ChatBackend``: the checkpoint's prompt encoding and the engine's typed errors, over an engine
client that runs in this process (``AsyncEngine``: the API without Ray, what the schema fuzzer drives) or is the
``ModelReplica`` deployment (``ServeEngineClient``, with failover).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol

from dgserve.config import ImageSettings, IngressSlice
from dgserve.engine.engine import Engine, EngineConfig
from dgserve.engine.loop import AsyncEngine
from dgserve.engine.request import (
    CanvasEvent,
    EngineOverloaded,
    Event,
    FinalEvent,
    GenerationRequest,
    InvalidRequest,
    PromptImage,
    SamplingParams,
)
from dgserve.model.checkpoint import LoadedModel, ModelMetadata, load
from dgserve.model.vision_checkpoint import VisionMode
from dgserve.routing.images import ImageURL
from dgserve.routing.ingress_app import OverloadedError
from dgserve.routing.prompts import InvalidPromptError, PromptEncoder
from dgserve.routing.tool_calls import template_supports_tools


class EngineClient(Protocol):
    """What the backend needs from an engine, wherever it runs."""

    def generate(self, request: GenerationRequest) -> AsyncIterator[Event]:
        """The request's events up to one FinalEvent; ``InvalidRequest`` or ``EngineOverloaded`` before the first."""

    async def ready(self) -> bool: ...


class EngineChatBackend:
    """Tokenizes with the checkpoint's tokenizer, generates through ``client``, and turns the engine's typed
    refusals into the ingress's (400 / 429)."""

    def __init__(self, client: EngineClient, metadata: ModelMetadata, model_id: str, *, retry_after_s: float = 1.0,
                 close: Callable[[], None] | None = None, images: ImageSettings | None = None,
                 vision_off: bool = False) -> None:
        _require_tokenizer(metadata)
        self.client = client
        self._meta = metadata
        self._prompts = PromptEncoder(metadata.config, metadata.tokenizer, metadata.vision, images, vision_off)
        self._model_id = model_id
        self._retry_after_s = retry_after_s
        self._close = close

    @classmethod
    def in_process(cls, loaded: LoadedModel, engine_config: EngineConfig | None = None,
                   model_id: str | None = None, images: ImageSettings | None = None,
                   vision_off: bool = False) -> EngineChatBackend:
        """An engine in this process, running on its own worker thread (``shutdown()`` stops it)."""
        metadata = ModelMetadata(loaded.config, loaded.generation, loaded.tokenizer, loaded.source,
                                 loaded.vision.spec if loaded.vision is not None else None)
        _require_tokenizer(metadata)
        aengine = AsyncEngine(Engine(loaded.model, loaded.generation, loaded.tokenizer, engine_config,
                                     vision=loaded.vision))
        model_id = model_id or loaded.source.removeprefix("preset:").rstrip("/").split("/")[-1]
        return cls(aengine, metadata, model_id, close=aengine.shutdown, images=images, vision_off=vision_off)

    @classmethod
    def load(cls, path: str, *, dtype: str = "float32", device: str = "cpu", engine_config: EngineConfig | None = None,
             model_id: str | None = None, vision: VisionMode = "auto",
             images: ImageSettings | None = None) -> EngineChatBackend:
        return cls.in_process(load(path, dtype=dtype, device=device, vision=vision), engine_config,
                              model_id or path.rstrip("/").split("/")[-1], images=images, vision_off=vision == "off")

    @classmethod
    def over_serve(cls, handle, metadata: ModelMetadata, config: IngressSlice,
                   on_failover: Callable[[], None] | None = None) -> EngineChatBackend:
        """The ``ModelReplica`` deployment behind ``handle``, failing requests over as ``config.router`` says."""
        from dgserve.routing.serve_client import ServeEngineClient  # Ray: only where a Serve handle exists

        client = ServeEngineClient(handle, max_failovers=config.router.max_failovers,
                                   failover_backoff_s=config.router.failover_backoff_s, on_failover=on_failover)
        return cls(client, metadata, config.model.model_id, images=config.images,
                   vision_off=config.model.vision == "off")

    @property
    def model_id(self) -> str:
        return self._model_id

    @property
    def max_context(self) -> int:
        return self._meta.config.text.max_position_embeddings

    @property
    def sampling_defaults(self) -> SamplingParams:
        return self._meta.generation.sampling

    async def tokenize_prompt(self, prompt: str | list[int]) -> list[int]:
        return self._prompts.encode(prompt)

    @property
    def supports_tools(self) -> bool:
        """The checkpoint's chat template has a tool format (declarations, calls, results)."""
        return template_supports_tools(self._meta.tokenizer.chat_template)

    async def tokenize_chat(self, messages: list[dict[str, Any]], **options: Any) -> list[int]:
        return self._prompts.encode_chat(messages, **options)

    async def tokenize_chat_with_images(self, messages: list[dict[str, Any]], images: list[ImageURL], **options: Any
                                        ) -> tuple[list[int], tuple[PromptImage, ...]]:
        return await self._prompts.encode_chat_with_images(messages, images, **options)

    def detokenize(self, ids: list[int]) -> str:
        return self._prompts.decode(ids)

    def token_text(self, token_id: int) -> str:
        return self._prompts.token_text(token_id)

    async def ready(self) -> bool:
        return await self.client.ready()

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Event]:
        events = self.client.generate(request)
        started = False  # a committed canvas went out: from here on, refusals are the stream's end, not a 4xx
        try:
            while True:
                try:
                    event = await anext(events)
                except StopAsyncIteration:
                    return
                except EngineOverloaded as exc:
                    if started:
                        raise
                    raise OverloadedError(self._retry_after_s) from exc
                except InvalidRequest as exc:
                    if started:
                        raise
                    raise InvalidPromptError.from_engine(exc) from exc
                if isinstance(event, FinalEvent) and event.overloaded and not started:
                    # the queue filled between the admission check and the worker thread's add_request
                    raise OverloadedError(self._retry_after_s)
                started |= isinstance(event, CanvasEvent)
                yield event
                if isinstance(event, FinalEvent):
                    return
        finally:
            await events.aclose()

    def shutdown(self) -> None:
        if self._close is not None:
            self._close()


def _require_tokenizer(metadata: ModelMetadata) -> None:
    if metadata.tokenizer is None:
        raise ValueError(f"{metadata.source}: the checkpoint has no tokenizer; the API needs one")
