"""``dgserve status``: Serve applications, deployments, replicas and health on a Ray cluster (dashboard REST API).

Without an address and with no dashboard on this machine (``dgserve run``'s embedded Ray has none), it asks the
local Ray's Serve controller instead. Exit status 0 when every listed application is RUNNING, 1 otherwise (none
deployed, deploying, failed), so scripts and readiness checks can use it.
"""

from __future__ import annotations

import argparse
import json
import os
from collections import Counter
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from dgserve.deploy.cli_support import UsageError
from dgserve.deploy.dashboard_api import DashboardClient, DashboardError
from dgserve.deploy.local_runs import LocalRun, live_runs


class StatusArgs(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    address: str | None = None
    app: str | None = None
    json_output: bool = False
    timeout: float = Field(10.0, gt=0.0)


def summarize(details: dict[str, Any], app: str | None = None) -> dict[str, Any]:
    """A compact view of ``ServeInstanceDetails``: per application its status and, per deployment, replica
    states and the target count."""
    apps = details.get("applications") or {}
    if app is not None:
        if app not in apps:
            known = ", ".join(sorted(apps)) or "none"
            raise UsageError(f"no application named {app!r} (running: {known})")
        apps = {app: apps[app]}
    out: dict[str, Any] = {"applications": {}, "proxies": {}}
    for name, a in sorted(apps.items()):
        deps = {}
        for dname, d in sorted((a.get("deployments") or {}).items()):
            replicas = d.get("replicas") or []
            states = Counter(r.get("state", "UNKNOWN") for r in replicas)
            deps[dname] = {
                "status": d.get("status", "UNKNOWN"),
                "running": states.get("RUNNING", 0),
                "target": d.get("target_num_replicas"),
                "replica_states": dict(sorted(states.items())),
                "message": (d.get("message") or "").strip(),
            }
        out["applications"][name] = {
            "status": a.get("status", "UNKNOWN"), "route_prefix": a.get("route_prefix"),
            "message": (a.get("message") or "").strip(), "deployments": deps,
        }
    for node, p in sorted((details.get("proxies") or {}).items()):
        out["proxies"][node] = p.get("status", "UNKNOWN")
    return out


def format_summary(summary: dict[str, Any], address: str) -> list[str]:
    apps = summary["applications"]
    if not apps:
        return [f"no Serve applications on {address}"]
    lines = []
    for name, a in apps.items():
        route = f"  route {a['route_prefix']}" if a["route_prefix"] else ""
        lines.append(f"{name}  {a['status']}{route}")
        if a["message"] and a["status"] != "RUNNING":
            lines.append(f"  message: {a['message'].splitlines()[0][:300]}")
        width = max((len(d) for d in a["deployments"]), default=0)
        for dname, d in a["deployments"].items():
            count = d["running"] if d["target"] is None else f"{d['running']}/{d['target']}"
            others = ", ".join(f"{n} {s}" for s, n in d["replica_states"].items() if s != "RUNNING")
            lines.append(f"  {dname:<{width}}  {d['status']:<11}  replicas {count} running"
                         + (f" ({others})" if others else ""))
            if d["message"] and d["status"] != "HEALTHY":
                lines.append(f"    {d['message'].splitlines()[0][:300]}")
    if summary["proxies"]:
        states = Counter(summary["proxies"].values())
        lines.append("proxies: " + ", ".join(f"{n} {s}" for s, n in sorted(states.items())))
    return lines


def local_serve_details(run: LocalRun) -> dict[str, Any]:
    """The Serve state of a ``dgserve run`` (``serve.status()``, joining its Ray as a driver: the embedded Ray has
    no dashboard), in the shape of the dashboard's ``ServeInstanceDetails`` as far as ``summarize`` reads it."""
    import logging

    if run.ray_auth_mode:  # a driver sends the token (~/.ray/auth_token) only in that mode, read as ray is imported
        os.environ.setdefault("RAY_AUTH_MODE", run.ray_auth_mode)
    import ray
    from ray import serve

    try:
        ray.init(address=run.ray_address, logging_level=logging.ERROR, log_to_driver=False)
    except ConnectionError as exc:
        raise UsageError(f"cannot join the Ray of dgserve run (pid {run.pid}) at {run.ray_address}: {exc}") from None
    try:
        status = serve.status()
    finally:
        ray.shutdown()

    def name(state: Any) -> str:  # Serve's status enums, or their string values
        return str(getattr(state, "value", state))

    apps = {}
    for app_name, app in status.applications.items():
        deployments = {
            dname: {"status": name(d.status), "message": d.message, "target_num_replicas": None,
                    "replicas": [{"state": name(state)} for state, n in d.replica_states.items() for _ in range(n)]}
            for dname, d in app.deployments.items()}
        apps[app_name] = {"status": name(app.status), "message": app.message, "deployments": deployments}
    return {"applications": apps, "proxies": {node: {"status": name(p)} for node, p in status.proxies.items()}}


def _sources(args: StatusArgs) -> list[tuple[str, dict[str, Any]]]:
    """(where, ServeInstanceDetails) of the dashboard, or else of each ``dgserve run`` on this machine."""
    client = DashboardClient(args.address, timeout_s=args.timeout)
    try:
        return [(client.address, client.get_applications())]
    except DashboardError as exc:
        if args.address or os.environ.get("RAY_DASHBOARD_ADDRESS"):
            raise
        runs = live_runs()
        if not runs:
            raise UsageError(f"{exc}; no `dgserve run` is serving on this machine either. For a cluster, pass "
                             "--address http://HEAD:8265 (its dashboard)") from None
    return [(f"dgserve run (pid {r.pid}) at {r.url}", local_serve_details(r)) for r in runs]


def run(args: StatusArgs) -> int:
    summaries = [(where, summarize(details, args.app)) for where, details in _sources(args)]
    if args.json_output:
        out = summaries[0][1] if len(summaries) == 1 else {where: s for where, s in summaries}
        print(json.dumps(out, indent=2))
    else:
        for where, summary in summaries:
            print("\n".join(([f"{where}:"] if len(summaries) > 1 else []) + format_summary(summary, where)))
    apps = [a for _, summary in summaries for a in summary["applications"].values()]
    return 0 if apps and all(a["status"] == "RUNNING" for a in apps) else 1


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("status", help="show Serve applications, replicas and health on a Ray cluster",
                       description="Show Serve applications, deployments, replicas and health. Exit status 0 when "
                                   "every application is RUNNING, 1 otherwise.")
    p.add_argument("--address", help="Ray dashboard address, e.g. http://HEAD:8265 (default: $RAY_DASHBOARD_ADDRESS, "
                                     "else http://127.0.0.1:8265, else the Ray that `dgserve run` started here)")
    p.add_argument("--app", help="only this application")
    p.add_argument("--json", dest="json_output", action="store_true", help="print the summary as JSON")
    p.add_argument("--timeout", type=float, default=10.0, metavar="SECONDS", help="HTTP timeout")
    p.set_defaults(handler=lambda fields: run(StatusArgs(**fields)))
