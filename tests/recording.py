"""Test doubles that observe the engine from outside the production code: an engine subclass that keeps every
denoising step's logits per request, and an EP replica that runs it and saves them per finished request."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import torch

from dgserve.engine.engine import Engine
from dgserve.engine.request import Event, FinalEvent, GenerationRequest
from dgserve.replicas.ep_rank import EPModelReplica


class RecordingEngine(Engine):
    """Keeps ``logits[request_id]``: every denoising step's logits, in order (exact mode)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.logits: dict[str, list[torch.Tensor]] = {}

    def denoised(self, request_id: str, step: int, hidden: torch.Tensor) -> None:
        self.logits.setdefault(request_id, []).append(self.model.logits(hidden).cpu())


class RecordingEPReplica(EPModelReplica):
    """An EP rank whose engine records logits; each finished request's are saved as ``record_dir/<id>.pt``."""

    engine_class = RecordingEngine

    def __init__(self, config, *, record_dir: str, torch_threads: int | None = None) -> None:
        super().__init__(config, torch_threads=torch_threads)
        self._record_dir = Path(record_dir)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Event]:
        async for ev in super().generate(request):
            if isinstance(ev, FinalEvent):
                recorded = self.engine.logits.pop(ev.request_id, [])
                torch.save(recorded, self._record_dir / f"{ev.request_id}.pt")
            yield ev
