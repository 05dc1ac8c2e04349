"""The ingress's ``ChatBackend`` over the ``ModelReplica`` deployment handle, with mid-request failover.

A request's state that matters is its committed token ids and the sampler's RNG state at the last canvas
boundary (carried by every ``CanvasEvent``). If the replica serving a stream dies or becomes unreachable,
the request is resubmitted (through the router, so to another replica) with prompt + committed tokens and
that RNG state: the client's stream continues with no error, no duplicated and no lost text. Bounded
retries, then an error event.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncIterator
from typing import Any

from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, ReplicaUnavailableError

from dgserve.deploy.config import DeployConfig
from dgserve.engine.engine import EngineOverloaded
from dgserve.engine.request import CanvasEvent, Event, FinalEvent, GenerationRequest, PromptImage, RequestStats
from dgserve.model.checkpoint import ModelMetadata
from dgserve.model.generation_config import SamplingParams
from dgserve.routing.images import ImageURL
from dgserve.routing.ingress_app import InvalidPromptError, OverloadedError
from dgserve.routing.prompts import PromptEncoder

log = logging.getLogger(__name__)

_REPLICA_GONE = (RayActorError, ReplicaUnavailableError)


def _cause(exc: BaseException) -> BaseException:
    return getattr(exc, "cause", None) or exc


class ReplicaBackend:
    def __init__(self, handle, metadata: ModelMetadata, config: DeployConfig, on_failover=None) -> None:
        self._handle = handle.options(stream=True, method_name="generate")
        self._stats_handle = handle.options(method_name="engine_stats")
        self._meta = metadata
        self._config = config
        self._on_failover = on_failover
        if metadata.tokenizer is None:
            raise ValueError(f"{config.model.path}: the checkpoint has no tokenizer; the API needs one")
        self._prompts = PromptEncoder(metadata.config, metadata.tokenizer, metadata.vision, config.images,
                                      vision_off=config.model.vision == "off")

    @property
    def model_id(self) -> str:
        return self._config.model.model_id

    @property
    def max_context(self) -> int:
        return self._meta.config.text.max_position_embeddings

    @property
    def sampling_defaults(self) -> SamplingParams:
        return self._meta.generation.sampling

    async def tokenize_prompt(self, prompt: str | list[int]) -> list[int]:
        return self._prompts.encode(prompt)

    async def tokenize_chat(self, messages: list[dict[str, str]]) -> list[int]:
        return self._prompts.encode_chat(messages)

    async def tokenize_chat_with_images(self, messages: list[dict[str, Any]], images: list[ImageURL]
                                        ) -> tuple[list[int], tuple[PromptImage, ...]]:
        return await self._prompts.encode_chat_with_images(messages, images)

    async def ready(self) -> bool:
        try:
            await self._stats_handle.remote()
            return True
        except Exception:  # no replica answers yet
            return False

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Event]:
        committed: list[int] = list(request.committed_ids)
        rng_state = request.rng_state
        failovers = 0
        yielded = False
        while True:
            attempt = dataclasses.replace(request, committed_ids=list(committed), rng_state=rng_state,
                                          max_tokens=request.max_tokens - (len(committed)
                                                                           - len(request.committed_ids)))
            stream = self._handle.remote(attempt)
            try:
                async for ev in stream:
                    if isinstance(ev, CanvasEvent):
                        committed.extend(ev.token_ids)
                        rng_state = ev.rng_state
                        yielded = True
                        yield ev
                    elif isinstance(ev, FinalEvent):
                        if ev.overloaded and not yielded:
                            raise OverloadedError(retry_after=1.0)
                        if ev.finish_reason == "error" and ev.retryable:
                            # the replica's side failed (its expert-parallel group broke): not this request's fault
                            raise _RetryableFailure(ev.error or "replica failed")
                        ev.stats.new_tokens = len(committed) - len(request.committed_ids)
                        ev.stats.prompt_tokens = len(request.prompt_ids)
                        yield ev
                        return
                    else:
                        yield ev
                # a stream that ends without a final event: the replica went away mid-stream
                raise ReplicaUnavailableError("stream ended without a final event")
            except (*_REPLICA_GONE, _RetryableFailure) as exc:
                failovers += 1
                if failovers > self._config.router.max_failovers:
                    yield FinalEvent(request.request_id, "error", RequestStats(prompt_tokens=len(request.prompt_ids)),
                                     f"replica failed {failovers} times; last: {type(exc).__name__}: {exc}")
                    return
                delay = failover_delay(failovers, self._config.router.failover_backoff_s)
                log.warning("request %s: replica lost after %d committed tokens (%s: %s); resubmitting in %.2f s",
                            request.request_id, len(committed), type(exc).__name__, exc, delay)
                if self._on_failover is not None:
                    self._on_failover()
                await asyncio.sleep(delay)
                continue
            except BackPressureError as exc:
                if yielded:
                    raise
                raise OverloadedError(retry_after=1.0) from exc
            except Exception as exc:
                cause = _cause(exc)
                if isinstance(cause, EngineOverloaded) and not yielded:
                    raise OverloadedError(retry_after=1.0) from exc
                if isinstance(cause, ValueError) and not yielded:
                    raise InvalidPromptError(str(cause)) from exc
                raise


class _RetryableFailure(Exception):
    """A replica ended a request with a retryable error event (see ``FinalEvent.retryable``)."""


def failover_delay(failovers: int, backoff_s: float, cap_s: float = 2.0) -> float:
    """Wait before the ``failovers``-th resubmission: none for the first (another replica is usually up),
    then ``backoff_s`` doubling up to ``cap_s`` (the replacement of a whole expert-parallel gang takes
    seconds; resubmitting at once would only hit the failed group's surviving ranks again)."""
    if failovers <= 1 or backoff_s <= 0:
        return 0.0
    return min(cap_s, backoff_s * 2 ** (failovers - 2))
