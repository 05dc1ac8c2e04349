"""Running the installed ``dgserve`` console script as a user does, for the CLI-level tests."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path


def dgserve(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    exe = shutil.which("dgserve", path=str(Path(sys.executable).parent)) or shutil.which("dgserve")
    cmd = [exe] if exe else [sys.executable, "-m", "dgserve.deploy.cli"]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=300, cwd=cwd,
                          env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_ADDRESS": "", **(env or {})})


def one_line_error(proc: subprocess.CompletedProcess, command: str) -> str:
    """The single stderr line of a refused command (status 2, no traceback, Ray never started)."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"dgserve {command}: "), proc.stderr
    assert "Traceback" not in proc.stderr and "Ray" not in proc.stdout
    return lines[0]
