"""Test-only: ``dgserve run`` as a user runs it (the console script, an embedded Ray of its own, a real HTTP port),
started in its own session and stopped with Ctrl-C; the whole log must be free of tracebacks."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class DgserveRun:
    base: str  # http://127.0.0.1:PORT
    cmd: list[str]  # the dgserve console script (to run other subcommands beside it)
    env: dict[str, str]
    log: Path


@contextlib.contextmanager
def dgserve_run(args: list[str], tmp_path: Path, startup_s: float = 240) -> Iterator[DgserveRun]:
    """Run ``dgserve run ARGS --port P`` (its cache under ``tmp_path``); yields once it is serving; on exit, Ctrl-C
    and checks that it shut down cleanly: exit code 0, "shutting down" printed, no traceback, run unregistered."""
    port = free_port()
    exe = shutil.which("dgserve", path=str(Path(sys.executable).parent)) or shutil.which("dgserve")
    cmd = [exe] if exe else [sys.executable, "-m", "dgserve.deploy.cli"]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_ADDRESS": "", "XDG_CACHE_HOME": str(tmp_path),
           "RAY_DASHBOARD_ADDRESS": ""}
    log = tmp_path / "dgserve-run.log"
    with open(log, "w") as logf:
        proc = subprocess.Popen([*cmd, "run", *args, "--port", str(port)], env=env, stdout=logf,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + startup_s
        while "press Ctrl-C to stop" not in log.read_text():  # printed once the app is deployed and running
            assert proc.poll() is None, f"dgserve run exited {proc.returncode}:\n{log.read_text()[-4000:]}"
            assert time.monotonic() < deadline, f"not up in {startup_s:g} s:\n{log.read_text()[-4000:]}"
            time.sleep(1.0)
        yield DgserveRun(f"http://127.0.0.1:{port}", cmd, env, log)
    finally:
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: shuts Serve and the embedded Ray down
        try:
            rc = proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
    assert rc == 0, log.read_text()[-4000:]
    printed = log.read_text()
    assert "shutting down" in printed
    assert "Traceback" not in printed and "graceful_shutdown failed" not in printed, printed[-6000:]
    assert list((tmp_path / "dgserve" / "runs").glob("*.json")) == []  # the run unregistered itself
