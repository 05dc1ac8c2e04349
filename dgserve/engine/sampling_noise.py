"""Drawing the sampler's multinomial noise ahead of time, on another CPU thread.

The reference samples each denoising step with ``torch.multinomial(probs, 1, generator=gen)``, which for
one sample draws ``Exp(1)`` noise ``q`` of the same shape as ``probs`` from ``gen`` and returns
``argmax(probs / q)``. On a CPU those draws are a sequential stream: for a canvas of 64 positions over a
32k vocabulary, ~50 ms on one core per step, a sixth of a step at the ``bench-cpu`` size, while the other
core idles. The noise does not depend on the logits, only on the generator's state, and between one step's
renoising draw and the next step's sampling nothing else touches a request's generator. So the engine asks
for the next step's noise as soon as a step is done, a worker thread draws it while the forward passes run,
and the sampler takes ``argmax(probs / q)``: the same random stream consumed in the same order, the same
tokens as ``torch.multinomial`` (tested), less time on the critical path.

Only on CPU (a GPU draws the noise in parallel in microseconds) and within a memory bound (the noise is
``canvas x vocab`` fp32 per canvas in flight).
"""

from __future__ import annotations

import concurrent.futures
import threading

import torch

# Noise kept in flight at most (bytes): beyond it the sampler draws inline, as torch.multinomial does.
DEFAULT_BUDGET_BYTES = 64 << 20


def draw_noise(shape: tuple[int, int], gen: torch.Generator) -> torch.Tensor:
    """The Exp(1) noise ``torch.multinomial(probs, 1, generator=gen)`` draws for ``probs`` of ``shape``."""
    return torch.empty(shape, dtype=torch.float32, device=gen.device).exponential_(1, generator=gen)


def sample_with_noise(probs: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """``torch.multinomial(probs, 1).squeeze(-1)`` given the noise it would have drawn."""
    return (probs / noise).argmax(dim=-1)


class NoisePrefetcher:
    """One worker thread drawing each request's next-step noise in submission order."""

    def __init__(self, budget_bytes: int = DEFAULT_BUDGET_BYTES) -> None:
        self.budget_bytes = budget_bytes
        self._in_flight = 0
        self._lock = threading.Lock()
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="dgserve-noise")

    def submit(self, shape: tuple[int, int], gen: torch.Generator) -> concurrent.futures.Future | None:
        """Start drawing; None (draw inline later) when the budget is spent. The caller must not use ``gen``
        again before :meth:`take` returns."""
        nbytes = shape[0] * shape[1] * 4
        with self._lock:
            if self._in_flight + nbytes > self.budget_bytes:
                return None
            self._in_flight += nbytes
        fut = self._pool.submit(draw_noise, shape, gen)
        fut.nbytes = nbytes  # type: ignore[attr-defined]
        return fut

    def take(self, fut: concurrent.futures.Future) -> torch.Tensor:
        """Wait for the noise (and the generator's state after it)."""
        try:
            return fut.result()
        finally:
            self.release(fut)

    def release(self, fut: concurrent.futures.Future) -> None:
        """Forget a draw whose noise will not be used (its request ended); waits for it to finish."""
        nbytes = getattr(fut, "nbytes", 0)
        if nbytes:
            fut.result()
            fut.nbytes = 0  # type: ignore[attr-defined]
            with self._lock:
                self._in_flight -= nbytes

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True)
