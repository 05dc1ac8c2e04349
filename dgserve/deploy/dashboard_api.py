"""A small client for the Ray dashboard's Serve REST API (what ``serve deploy`` and ``serve status`` call).

``PUT /api/serve/applications/`` declares the cluster's whole set of Serve applications; ``GET`` returns their
state (``ServeInstanceDetails``). Plain ``urllib`` keeps the CLI free of extra HTTP dependencies; every failure
becomes a ``DashboardError`` whose message says what was wrong with the address or the request.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

DEFAULT_DASHBOARD = "http://127.0.0.1:8265"
APPLICATIONS_PATH = "/api/serve/applications/"


class DashboardError(ValueError):
    """The dashboard cannot be reached or refused a request."""


def resolve_address(address: str | None) -> str:
    """``--address``, else ``RAY_DASHBOARD_ADDRESS`` (as the ``serve`` CLI reads it), else the local default."""
    raw = (address or os.environ.get("RAY_DASHBOARD_ADDRESS") or DEFAULT_DASHBOARD).strip()
    if raw.startswith("ray://"):
        raise DashboardError(f"{raw}: a Ray Client address; give the dashboard's HTTP address instead, "
                             "e.g. http://HEAD:8265")
    if "://" not in raw:
        raw = "http://" + raw
    parsed = urllib.parse.urlparse(raw)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise DashboardError(f"{raw}: not an http(s) address; expected something like http://HEAD:8265")
    return raw.rstrip("/")


def _auth_headers() -> dict[str, str]:
    """Ray's token authentication (on by default since Ray 2.5x): the token from ``RAY_AUTH_TOKEN``, else the
    file ``RAY_AUTH_TOKEN_PATH``, else ``~/.ray/auth_token``, looked up in that order as Ray's own clients do."""
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if not token:
        env_path = os.environ.get("RAY_AUTH_TOKEN_PATH")
        path = Path(env_path) if env_path else Path.home() / ".ray" / "auth_token"
        try:
            token = path.read_text().strip()
        except FileNotFoundError:
            if env_path:
                raise DashboardError(f"RAY_AUTH_TOKEN_PATH={env_path}: no such file") from None
        except OSError as exc:
            raise DashboardError(f"{path}: cannot read the Ray auth token ({exc.strerror})") from None
    return {"Authorization": f"Bearer {token}"} if token else {}


class DashboardClient:
    def __init__(self, address: str | None = None, timeout_s: float = 30.0) -> None:
        self.address = resolve_address(address)
        self.timeout_s = timeout_s

    def _request(self, method: str, path: str, body: Any = None) -> Any:
        url = self.address + path
        data = None if body is None else json.dumps(body).encode()
        headers = {"Accept": "application/json", **_auth_headers()}
        if data is not None:
            headers["Content-Type"] = "application/json"
        req = urllib.request.Request(url, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode("utf-8", "replace").strip().splitlines()
            text = detail[-1][:500] if detail else exc.reason
            hint = ""
            if exc.code in (401, 403):
                hint = (" (the cluster uses token authentication: set RAY_AUTH_TOKEN to its token, from "
                        "`ray get-auth-token` on the head node)")
            elif exc.code == 404:
                hint = " (is this a Ray dashboard, and is it Ray >= 2.9?)"
            elif exc.code == 501:
                hint = " (the cluster lacks Serve: pip install 'ray[serve]' on the head node)"
            raise DashboardError(f"{method} {url}: HTTP {exc.code}: {text}{hint}") from None
        except urllib.error.URLError as exc:
            reason = exc.reason.strerror if isinstance(exc.reason, OSError) and exc.reason.strerror else exc.reason
            raise DashboardError(f"cannot reach the Ray dashboard at {self.address} ({reason}); is the cluster "
                                 "running, and is --address its dashboard (http://HEAD:8265)?") from None
        except TimeoutError:
            raise DashboardError(f"the Ray dashboard at {self.address} did not answer within "
                                 f"{self.timeout_s:g} s") from None
        except ConnectionError as exc:
            raise DashboardError(f"cannot reach the Ray dashboard at {self.address} ({exc})") from None
        if not raw.strip():
            return None
        try:
            return json.loads(raw)
        except json.JSONDecodeError:
            raise DashboardError(f"{method} {url}: the answer is not JSON; is {self.address} a Ray dashboard?") \
                from None

    def get_applications(self) -> dict[str, Any]:
        """``ServeInstanceDetails`` as a dict (``applications`` is empty when Serve is not running)."""
        out = self._request("GET", APPLICATIONS_PATH)
        if not isinstance(out, dict) or not isinstance(out.get("applications", {}), dict):
            raise DashboardError(f"GET {self.address}{APPLICATIONS_PATH}: unexpected answer; is it a Ray dashboard?")
        out.setdefault("applications", {})
        return out

    def put_applications(self, config: dict[str, Any]) -> None:
        """Declare the cluster's Serve applications (applications not in ``config`` are deleted by Serve)."""
        self._request("PUT", APPLICATIONS_PATH, config)
