"""What every CPU benchmark script records beside its figures, and how it reports them.

A run is wrapped in a :class:`BenchRun`: it notes the machine, the command, the date and the load
average before and after, flags a run as *contended* when other work was competing for the cores,
then prints a markdown table, and one JSON object as the last line of stdout (``--out FILE``
appends that object to FILE as one JSON line).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

# A run is contended when, during the run, processes other than the benchmark's own (it and its
# descendants, e.g. the Ray cluster it started) kept more than OTHERS_BUSY_LIMIT of all cores' time
# busy, or the hypervisor stole more than STEAL_LIMIT (both from /proc/stat). Without /proc/stat,
# the 1-minute load average decides: before the run above CONTENDED_SHARE x cores, or after it above
# the benchmark's threads + CONTENDED_SHARE x cores.
OTHERS_BUSY_LIMIT = 0.10
STEAL_LIMIT = 0.05
CONTENDED_SHARE = 0.5


def cpu_model() -> str:
    """The CPU's model name, as ``lscpu`` prints it (falls back to /proc/cpuinfo)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10, check=False).stdout
        for line in out.splitlines():
            if line.strip().lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {
        "cpu_model": cpu_model(), "cores": os.cpu_count() or 1, "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    return info


def load_average() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return [-1.0, -1.0, -1.0]


def cpu_ticks() -> tuple[int, int, int]:
    """Machine-wide (busy, steal, total) CPU ticks from /proc/stat ((0, 0, 0) where unavailable)."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError, IndexError):
        return 0, 0, 0
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    steal = fields[7] if len(fields) > 7 else 0
    total = sum(fields[:8])
    return total - idle - steal, steal, total


def _descendants_cpu_s() -> float:
    """CPU seconds of this process's live descendants (0 without psutil)."""
    try:
        import psutil
    except ImportError:
        return 0.0
    total = 0.0
    for child in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            t = child.cpu_times()
            total += t.user + t.system
    return total


def set_threads(threads: int) -> int:
    """Pin torch's intra-op threads (0 = one per core) and return the count used."""
    n = threads or os.cpu_count() or 1
    torch.set_num_threads(n)
    return n


@dataclass
class BenchRun:
    """One benchmark run's bookkeeping: create it first thing, call :meth:`finish` last."""

    benchmark: str
    argv: list[str] = field(default_factory=lambda: list(sys.argv))
    started_wall: float = field(default_factory=time.time)
    started: float = field(default_factory=time.perf_counter)
    cpu_started: float = field(default_factory=time.process_time)
    load_before: list[float] = field(default_factory=load_average)
    ticks_before: tuple[int, int, int] = field(default_factory=cpu_ticks)

    def progress(self, message: str) -> None:
        """A progress line on stderr (long runs on a slow machine should show they are alive)."""
        print(f"[{self.benchmark} +{time.perf_counter() - self.started:7.1f}s load {load_average()[0]}] {message}",
              file=sys.stderr, flush=True)

    def record_date(self) -> str:
        return datetime.datetime.fromtimestamp(self.started_wall, datetime.UTC).isoformat(timespec="seconds")

    def command(self) -> str:
        script = self.argv[0] if self.argv else self.benchmark
        with contextlib.suppress(ValueError):  # outside the working directory: keep it as given
            script = str(Path(script).resolve().relative_to(Path.cwd()))
        return shlex.join(["python", script, *self.argv[1:]])

    def contention(self) -> dict[str, Any]:
        """Contention so far: load averages, other processes' and the hypervisor's share of core time."""
        load_now = load_average()
        busy0, steal0, total0 = self.ticks_before
        busy1, steal1, total1 = cpu_ticks()
        ticks = max(1, total1 - total0)
        hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        own_ticks = (time.process_time() - self.cpu_started + _descendants_cpu_s()) * hz
        cores = os.cpu_count() or 1
        threads = torch.get_num_threads()
        others = max(0.0, busy1 - busy0 - own_ticks) / ticks if total0 else None
        steal = (steal1 - steal0) / ticks if total0 else None
        if others is not None and steal is not None:
            contended = others > OTHERS_BUSY_LIMIT or steal > STEAL_LIMIT
        else:  # no /proc/stat: judge by the load average
            contended = (self.load_before[0] > CONTENDED_SHARE * cores
                         or load_now[0] > min(threads, cores) + CONTENDED_SHARE * cores)
        return {"load_after": load_now, "contended": contended,
                "others_busy_share": None if others is None else round(others, 3),
                "steal_share": None if steal is None else round(steal, 3)}

    def finish(self, results: dict[str, Any], table: list[str], out: str | None = None,
               notes: list[str] | None = None, state: dict[str, Any] | None = None) -> dict[str, Any]:
        """Print the markdown ``table`` (lines) and the JSON record; append it to ``out``; return it.

        ``state``: a :meth:`contention` taken earlier, while the processes this run started (a Ray cluster)
        were still alive; their CPU time is counted as this run's own only while they live."""
        wall = time.perf_counter() - self.started
        state = state if state is not None else self.contention()
        load_after, contended = state["load_after"], state["contended"]
        cores = os.cpu_count() or 1
        record: dict[str, Any] = {
            "benchmark": self.benchmark,
            "command": self.command(),
            "date": self.record_date(),
            "machine": machine(),
            "load_before": self.load_before,
            "load_after": load_after,
            "contended": contended,
            # CPU seconds this process used per wall second per core: well under 1 while the cores
            # are shared (or while a single-threaded phase runs, or work runs in other processes)
            "cpu_share": round((time.process_time() - self.cpu_started) / max(wall, 1e-9) / cores, 3),
            # share of all cores' time that processes other than this one and its descendants (e.g. the
            # Ray cluster it started) kept busy during the run, and that the hypervisor stole
            "others_busy_share": state["others_busy_share"],
            "steal_share": state["steal_share"],
            "wall_s": round(wall, 2),
            "results": results,
        }
        if notes:
            record["notes"] = notes
        print()
        print(f"## {self.benchmark}  ({record['date']}, {record['machine']['cpu_model']}, "
              f"{cores} cores, load {self.load_before} -> {load_after}, others busy "
              f"{record['others_busy_share']}, steal {record['steal_share']}"
              f"{', CONTENDED' if contended else ''})")
        print()
        for line in table:
            print(line)
        for note in notes or []:
            print(f"- {note}")
        print()
        line = json.dumps(record, sort_keys=False)
        if out:
            path = Path(out)
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("a") as f:
                f.write(line + "\n")
        print(line, flush=True)
        return record


def md_table(header: list[str], rows: list[list[Any]]) -> list[str]:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:,.3g}" if abs(v) < 100 else f"{v:,.0f}"
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return lines


def last_json_line(stdout: str) -> dict[str, Any]:
    """The JSON record a bench script printed last (for tests and wrappers)."""
    for line in reversed(stdout.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise ValueError("no JSON record in the output")


__all__ = ["BenchRun", "cpu_model", "cpu_ticks", "last_json_line", "load_average", "machine", "md_table", "set_threads"]
