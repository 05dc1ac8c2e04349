"""``dgserve deploy``: put a Serve config (from ``dgserve build``) onto a running Ray cluster via its dashboard.

Serve's REST API is declarative: the PUT replaces the cluster's whole set of applications. So that deploying
dgserve does not delete someone else's application, the applications already running under other names are
carried over unchanged unless ``--replace-all`` is given.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from dgserve.deploy.cli_support import UsageError, check_model_path
from dgserve.deploy.dashboard_api import DashboardClient
from dgserve.deploy.serve_config import build_serve_config, load_deploy_config, read_mapping, validate_serve_config


class DeployArgs(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    config_file: str
    address: str | None = None
    replace_all: bool = False
    wait: float = Field(0.0, ge=0.0)
    timeout: float = Field(30.0, gt=0.0)


def load_serve_config(path: str) -> dict[str, Any]:
    """A Serve config file, or a DeployConfig file (built on the fly, as ``dgserve build`` would)."""
    data = read_mapping(path)
    if "applications" not in data:
        config = load_deploy_config(path)
        check_model_path(config.model.path, path)
        data = build_serve_config(config)
    validate_serve_config(data, source=path)  # the dashboard would say the same, less clearly
    return data


def merge_with_running(config: dict[str, Any], details: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """``config`` plus the running applications it does not name (from their ``deployed_app_config``)."""
    ours = {app["name"] for app in config.get("applications", [])}
    ours_prefixes = {app.get("route_prefix") for app in config.get("applications", [])}
    kept, apps = [], list(config.get("applications", []))
    for name, app in details.get("applications", {}).items():
        deployed = app.get("deployed_app_config")
        if name in ours or not deployed:
            continue
        if deployed.get("route_prefix") in ours_prefixes:
            raise UsageError(f"application {name!r} already serves route prefix {deployed.get('route_prefix')!r}; "
                             "change route_prefix in the deployment config, or pass --replace-all to remove it")
        apps.append(deployed)
        kept.append(name)
    return {**config, "applications": apps}, kept


def wait_until_running(client: DashboardClient, names: list[str], wait_s: float) -> int:
    deadline = time.monotonic() + wait_s
    last = ""
    while True:
        apps = client.get_applications()["applications"]
        states = {n: (apps.get(n) or {}).get("status", "NOT_STARTED") for n in names}
        line = ", ".join(f"{n}: {s}" for n, s in states.items())
        if line != last:
            print(line, file=sys.stderr)
            last = line
        failed = [n for n, s in states.items() if s in ("DEPLOY_FAILED", "UNHEALTHY")]
        if failed:
            for n in failed:
                message = (apps.get(n) or {}).get("message", "").strip()
                print(f"dgserve deploy: application {n!r} is {states[n]}: {message or 'no message'}", file=sys.stderr)
            return 1
        if all(s == "RUNNING" for s in states.values()):
            return 0
        if time.monotonic() >= deadline:
            print(f"dgserve deploy: not RUNNING after {wait_s:g} s ({line}); see `dgserve status --address "
                  f"{client.address}`", file=sys.stderr)
            return 1
        time.sleep(min(1.0, max(0.05, deadline - time.monotonic())))


def run(args: DeployArgs) -> int:
    config = load_serve_config(args.config_file)
    client = DashboardClient(args.address, timeout_s=args.timeout)
    kept: list[str] = []
    if not args.replace_all:
        config, kept = merge_with_running(config, client.get_applications())
    client.put_applications(config)
    names = [app["name"] for app in config["applications"] if app["name"] not in kept]
    print(f"deployed {', '.join(names)} to {client.address}"
          + (f" (kept running: {', '.join(kept)})" if kept else ""), file=sys.stderr)
    if args.wait > 0:
        return wait_until_running(client, names, args.wait)
    print(f"check progress with: dgserve status --address {client.address}", file=sys.stderr)
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("deploy", help="deploy a Serve config onto a running Ray cluster",
                       description="Deploy a Serve config (from `dgserve build`, or a deployment config, built on "
                                   "the fly) through the Ray dashboard's REST API.")
    p.add_argument("config_file", metavar="CONFIG", help="serve.yaml from `dgserve build` (or a deploy.yaml)")
    p.add_argument("--address", help="Ray dashboard address, e.g. http://HEAD:8265 "
                                     "(default: $RAY_DASHBOARD_ADDRESS or http://127.0.0.1:8265)")
    p.add_argument("--replace-all", action="store_true",
                   help="remove Serve applications that the config does not name (default: keep them running)")
    p.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                   help="wait up to this long for the application to be RUNNING; exit 1 if it is not")
    p.add_argument("--timeout", type=float, default=30.0, metavar="SECONDS", help="per-request HTTP timeout")
    p.set_defaults(handler=lambda fields: run(DeployArgs(**fields)))
