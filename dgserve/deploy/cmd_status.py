"""``dgserve status``: Serve applications, deployments, replicas and health on a Ray cluster (dashboard REST API).

Exit status 0 when every listed application is RUNNING, 1 otherwise (none deployed, deploying, failed), so
scripts and readiness checks can use it.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from dgserve.deploy.cli_support import UsageError
from dgserve.deploy.dashboard_api import DashboardClient


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
        lines.append(f"{name}  {a['status']}  route {a['route_prefix']}")
        if a["message"] and a["status"] != "RUNNING":
            lines.append(f"  message: {a['message'].splitlines()[0][:300]}")
        width = max((len(d) for d in a["deployments"]), default=0)
        for dname, d in a["deployments"].items():
            target = "?" if d["target"] is None else d["target"]
            others = ", ".join(f"{n} {s}" for s, n in d["replica_states"].items() if s != "RUNNING")
            lines.append(f"  {dname:<{width}}  {d['status']:<11}  replicas {d['running']}/{target} running"
                         + (f" ({others})" if others else ""))
            if d["message"] and d["status"] != "HEALTHY":
                lines.append(f"    {d['message'].splitlines()[0][:300]}")
    if summary["proxies"]:
        states = Counter(summary["proxies"].values())
        lines.append("proxies: " + ", ".join(f"{n} {s}" for s, n in sorted(states.items())))
    return lines


def run(args: StatusArgs) -> int:
    client = DashboardClient(args.address, timeout_s=args.timeout)
    summary = summarize(client.get_applications(), args.app)
    if args.json_output:
        print(json.dumps(summary, indent=2))
    else:
        print("\n".join(format_summary(summary, client.address)))
    apps = summary["applications"].values()
    return 0 if apps and all(a["status"] == "RUNNING" for a in apps) else 1


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("status", help="show Serve applications, replicas and health on a Ray cluster",
                       description="Show Serve applications, deployments, replicas and health. Exit status 0 when "
                                   "every application is RUNNING, 1 otherwise.")
    p.add_argument("--address", help="Ray dashboard address, e.g. http://HEAD:8265 "
                                     "(default: $RAY_DASHBOARD_ADDRESS or http://127.0.0.1:8265)")
    p.add_argument("--app", help="only this application")
    p.add_argument("--json", dest="json_output", action="store_true", help="print the summary as JSON")
    p.add_argument("--timeout", type=float, default=10.0, metavar="SECONDS", help="HTTP timeout")
    p.set_defaults(handler=lambda fields: run(StatusArgs(**fields)))
