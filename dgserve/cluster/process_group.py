"""``torch.distributed`` process groups for expert-parallel ranks (no Ray needed here).

An :class:`EPGroup` bundles the data group the MoE all-to-alls run on (NCCL on CUDA, gloo on CPU)
and a CPU gloo *control* group for the lockstep driver's small per-step flags, so a rank idling
between steps never spins a GPU stream. Both carry the collective timeout: a collective that does
not complete in time raises (gloo) or aborts the process (NCCL's watchdog) instead of hanging.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 60.0


@dataclass
class EPGroup:
    rank: int
    world_size: int
    backend: str  # "gloo" or "nccl" (the data group)
    device: torch.device
    timeout_s: float
    group: dist.ProcessGroup | None  # data group (None: the default group)
    control: dist.ProcessGroup | None  # CPU gloo group for lockstep flags (None: the default group)
    store: dist.Store | None = None  # the rendezvous store (rank 0 serves it; kept alive with the group)

    def destroy(self) -> None:
        """Tear the process group down (peers blocked in a collective then fail fast)."""
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # already broken: nothing left to release
                log.debug("destroy_process_group failed", exc_info=True)


def default_backend(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def create_store(host: str, rank: int, world_size: int, port: int = 0,
                 timeout_s: float = DEFAULT_TIMEOUT_S) -> dist.TCPStore:
    """Rank 0 binds a TCPStore (``port=0``: the OS picks a free port, read it from ``store.port``);
    other ranks connect to ``host:port``."""
    return dist.TCPStore(host, port, world_size, is_master=rank == 0, timeout=timedelta(seconds=timeout_s),
                         wait_for_workers=False)


def init_ep_group(rank: int, world_size: int, store: dist.Store, *, device: torch.device | str = "cpu",
                  backend: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S) -> EPGroup:
    """Initialise the default process group from a rendezvous store and a control group beside it."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    backend = backend or default_backend(device)
    if backend == "nccl":
        if device.type != "cuda":
            raise ValueError("the nccl backend needs a CUDA device; use gloo on CPU")
        torch.cuda.set_device(device)
    timeout = timedelta(seconds=timeout_s)
    kwargs = {"device_id": device} if backend == "nccl" else {}
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout, **kwargs)
    control = None if backend == "gloo" else dist.new_group(backend="gloo", timeout=timeout)
    log.info("EP rank %d/%d joined (%s on %s, timeout %.0fs)", rank, world_size, backend, device, timeout_s)
    return EPGroup(rank=rank, world_size=world_size, backend=backend, device=device, timeout_s=timeout_s,
                   group=None, control=control, store=store)


def sub_group(base: EPGroup, timeout_s: float) -> EPGroup:
    """A fresh pair of groups over the same ranks with another timeout (COLLECTIVE: every rank calls it)."""
    timeout = timedelta(seconds=timeout_s)
    group = dist.new_group(backend=base.backend, timeout=timeout)
    control = group if base.backend == "gloo" else dist.new_group(backend="gloo", timeout=timeout)
    return EPGroup(rank=base.rank, world_size=base.world_size, backend=base.backend, device=base.device,
                   timeout_s=timeout_s, group=group, control=control, store=base.store)


__all__ = ["DEFAULT_TIMEOUT_S", "EPGroup", "create_store", "default_backend", "init_ep_group", "sub_group"]
