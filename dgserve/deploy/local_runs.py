"""The ``dgserve run`` servers up on this machine, so that ``dgserve status`` finds their embedded Ray (started
without a dashboard) with no address to type: while it serves, each run keeps a small JSON file with its Ray
address and URL under ``$XDG_CACHE_HOME/dgserve/runs/`` (default ``~/.cache``), named by its process id.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class LocalRun:
    pid: int
    ray_address: str  # the GCS address a driver joins
    url: str  # the API's base URL
    app: str  # the Serve application name
    ray_auth_mode: str | None = None  # RAY_AUTH_MODE the cluster runs with ("token": drivers must send the token)


def runs_dir() -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "dgserve" / "runs"


def register(run: LocalRun) -> Path:
    folder = runs_dir()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{run.pid}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(run)))
    tmp.replace(path)
    return path


def unregister(pid: int) -> None:
    (runs_dir() / f"{pid}.json").unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def live_runs() -> list[LocalRun]:
    """The runs whose process is still there, oldest first; files of runs that died without cleaning up are
    removed."""
    out = []
    folder = runs_dir()
    for path in sorted(folder.glob("*.json"), key=lambda p: p.stat().st_mtime) if folder.is_dir() else []:
        try:
            run = LocalRun(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            continue  # half-written or foreign: not ours to judge
        if _alive(run.pid):
            out.append(run)
        else:
            with contextlib.suppress(OSError):
                path.unlink()
    return out
