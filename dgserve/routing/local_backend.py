"""A ``ChatBackend`` over an in-process ``AsyncEngine``: the OpenAI API without Ray.

``build_fastapi_app(LocalBackend.load("tiny-random"))`` is a complete server in one process: what the
schema fuzzer drives, and a way to serve a checkpoint locally the way ``dgserve generate`` runs it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from dgserve.engine.engine import AsyncEngine, Engine, EngineConfig, EngineOverloaded
from dgserve.engine.request import CanvasEvent, Event, FinalEvent, GenerationRequest, PromptImage
from dgserve.model.checkpoint import LoadedModel, load
from dgserve.model.generation_config import SamplingParams
from dgserve.model.vision_checkpoint import VisionMode
from dgserve.routing.image_prompts import ImageSettings
from dgserve.routing.images import ImageURL
from dgserve.routing.ingress_app import InvalidPromptError, OverloadedError
from dgserve.routing.prompts import PromptEncoder


class LocalBackend:
    """Tokenizes with the checkpoint's tokenizer and generates on an engine running in this process."""

    def __init__(self, loaded: LoadedModel, engine_config: EngineConfig | None = None,
                 model_id: str | None = None, retry_after_s: float = 1.0, images: ImageSettings | None = None,
                 vision_off: bool = False) -> None:
        if loaded.tokenizer is None:
            raise ValueError(f"{loaded.source}: the checkpoint has no tokenizer; the API needs one")
        self._loaded = loaded
        self._prompts = PromptEncoder(loaded.config, loaded.tokenizer,
                                      loaded.vision.spec if loaded.vision is not None else None, images, vision_off)
        self._model_id = model_id or loaded.source.removeprefix("preset:").rstrip("/").split("/")[-1]
        self._retry_after_s = retry_after_s
        self.engine = Engine(loaded.model, loaded.generation, loaded.tokenizer, engine_config, vision=loaded.vision)
        self.aengine = AsyncEngine(self.engine)

    @classmethod
    def load(cls, path: str, *, dtype: str = "float32", device: str = "cpu",
             engine_config: EngineConfig | None = None, model_id: str | None = None,
             vision: VisionMode = "auto", images: ImageSettings | None = None) -> LocalBackend:
        return cls(load(path, dtype=dtype, device=device, vision=vision), engine_config,
                   model_id or path.rstrip("/").split("/")[-1], images=images, vision_off=vision == "off")

    @property
    def model_id(self) -> str:
        return self._model_id

    @property
    def max_context(self) -> int:
        return self._loaded.config.text.max_position_embeddings

    @property
    def sampling_defaults(self) -> SamplingParams:
        return self._loaded.generation.sampling

    async def tokenize_prompt(self, prompt: str | list[int]) -> list[int]:
        return self._prompts.encode(prompt)

    async def tokenize_chat(self, messages: list[dict[str, str]]) -> list[int]:
        return self._prompts.encode_chat(messages)

    async def tokenize_chat_with_images(self, messages: list[dict[str, Any]], images: list[ImageURL]
                                        ) -> tuple[list[int], tuple[PromptImage, ...]]:
        return await self._prompts.encode_chat_with_images(messages, images)

    async def ready(self) -> bool:
        return self.aengine._thread.is_alive()

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Event]:
        events = self.aengine.generate(request)
        yielded = False
        try:
            try:
                first = await anext(events)
            except EngineOverloaded as exc:
                raise OverloadedError(self._retry_after_s) from exc
            except ValueError as exc:
                raise InvalidPromptError(str(exc)) from exc
            event: Event = first
            while True:
                if isinstance(event, FinalEvent) and event.overloaded and not yielded:
                    # the queue filled between the check and the worker thread's add_request
                    raise OverloadedError(self._retry_after_s)
                yielded |= isinstance(event, CanvasEvent)
                yield event
                if isinstance(event, FinalEvent):
                    return
                event = await anext(events)
        finally:
            await events.aclose()

    def shutdown(self) -> None:
        self.aengine.shutdown()
