"""Fixtures of the reliability suites: per-test Serve apps that are removed afterwards, and the fixed-seed solo
oracle. Helpers are in ``reliability.harness``."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from reliability.harness import MODEL, delete_app, deploy, one_torch_thread


@pytest.fixture
def serve_app(serve_http) -> Iterator[Callable[[str, dict], str]]:
    """``serve_app(name, overrides) -> url``: deploy at ``/name``; every app is deleted when the test ends
    (the session's Ray is shared with other tests and has little CPU)."""
    names: list[str] = []

    def run(name: str, overrides: dict) -> str:
        names.append(name)
        return deploy(serve_http, name, f"/{name}", overrides)

    yield run
    for name in names:
        delete_app(name)


@pytest.fixture(scope="session")
def solo() -> Callable[..., str]:
    """``solo(prompt, max_tokens, seed, steps=None)``: the text a fixed-seed request produces alone, on the
    in-process single-request generator (``steps``: the request's max_denoising_steps)."""
    from dgserve.engine.single import generate_single
    from dgserve.model.checkpoint import load

    lm = load(MODEL)
    cache: dict[tuple[str, int, int, int | None], str] = {}

    def run(prompt: str, max_tokens: int, seed: int, steps: int | None = None) -> str:
        key = (prompt, max_tokens, seed, steps)
        if key not in cache:
            sampling = lm.generation.sampling
            if steps is not None:
                sampling = sampling.model_copy(update={"max_denoising_steps": steps})
            with one_torch_thread():
                out = generate_single(lm.model, lm.tokenizer.encode(prompt), max_tokens=max_tokens, seed=seed,
                                      sampling=sampling, eos_token_ids=lm.generation.eos_token_ids)
            cache[key] = lm.tokenizer.decode(out.token_ids)
        return cache[key]

    return run
