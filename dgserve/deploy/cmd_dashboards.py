"""``dgserve dashboards``: write dgserve's Grafana dashboards as JSON, or provision them into a Grafana.

Provisioning creates or updates, by fixed uids, a folder, a Prometheus data source (with
``--prometheus-url``) and the dashboards, so running it again updates in place. It talks to Grafana's HTTP
API through ``grafana-client``, an optional extra (``pip install 'dgserve[grafana]'``) imported only here.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from dgserve.deploy import dashboards as dash
from dgserve.deploy.cli_support import UsageError

INSTALL_HINT = "pip install 'dgserve[grafana]'"


class GrafanaProvisioningError(UsageError):
    """Grafana refused or could not be reached; the message is one line that says what to check."""


class DashboardsArgs(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    grafana_url: str | None = None
    token: str | None = Field(None, min_length=1)
    user: str | None = Field(None, min_length=1)
    password: str | None = None
    prometheus_url: str | None = None
    export: str | None = Field(None, min_length=1)
    folder: str = Field(dash.FOLDER_TITLE, min_length=1)
    timeout: float = Field(10.0, gt=0.0)

    @field_validator("grafana_url", "prometheus_url")
    @classmethod
    def _http_url(cls, v: str | None) -> str | None:
        if v is not None:
            u = urlparse(v)
            if u.scheme not in ("http", "https") or not u.netloc:
                raise ValueError(f"{v!r} is not an http(s):// URL")
        return v

    @model_validator(mode="after")
    def _check(self) -> DashboardsArgs:
        if self.grafana_url is None and self.export is None:
            raise UsageError("say what to do: --grafana-url URL to provision, --export DIR to write JSON (or both)")
        if self.grafana_url is None and (self.token or self.user or self.prometheus_url):
            raise UsageError("--token, --user and --prometheus-url need --grafana-url")
        if self.token and (self.user or self.password):
            raise UsageError("give either --token or --user/--password, not both")
        if (self.user is None) != (self.password is None):
            raise UsageError("--user and --password go together")
        return self


@dataclass(frozen=True)
class Provisioned:
    kind: str  # folder, datasource, dashboard
    name: str
    action: str  # created, updated
    detail: str = ""


def _grafana_modules() -> tuple[Any, Any, Any]:
    try:
        import grafana_client
        import grafana_client.client as gclient
        import niquests
    except ImportError:
        raise UsageError(f"provisioning Grafana needs the optional grafana-client package: {INSTALL_HINT} "
                         "(--export DIR works without it)") from None
    return grafana_client, gclient, niquests


class _Grafana:
    """The few Grafana calls provisioning makes, with errors turned into one-line messages."""

    def __init__(self, url: str, credential: str | tuple[str, str] | None, timeout: float) -> None:
        grafana_client, self._gc, self._niquests = _grafana_modules()
        self.url = url.rstrip("/")
        self.api = grafana_client.GrafanaApi.from_url(self.url, credential=credential, timeout=timeout)

    def call(self, doing: str, fn: Any, *args: Any, missing_ok: bool = False, conflict_ok: bool = False) -> Any:
        """Run one API call; ``None`` for a 404 (``missing_ok``) or a 409 (``conflict_ok``)."""
        gc = self._gc
        try:
            return fn(*args)
        except gc.GrafanaUnauthorizedError:
            raise GrafanaProvisioningError(
                f"Grafana at {self.url} refused the credentials (401 Unauthorized) while {doing}: "
                "check --token, or --user/--password") from None
        except gc.GrafanaClientError as exc:
            if exc.status_code == 404 and missing_ok:
                return None
            if exc.status_code == 409 and conflict_ok:
                return None
            if exc.status_code == 403:
                raise GrafanaProvisioningError(
                    f"Grafana at {self.url} does not allow {doing} (403 Forbidden): the token or user needs the "
                    "Admin role (data sources, folders) or Editor (dashboards)") from None
            raise GrafanaProvisioningError(
                f"Grafana at {self.url} answered {exc.status_code} while {doing}: {_message(exc)}") from None
        except gc.GrafanaTimeoutError:
            raise GrafanaProvisioningError(f"Grafana at {self.url} did not answer in time while {doing}") from None
        except gc.GrafanaException as exc:
            status = f" {exc.status_code}" if exc.status_code else ""
            raise GrafanaProvisioningError(
                f"Grafana at {self.url} failed{status} while {doing}: {_message(exc)}") from None
        except self._niquests.exceptions.RequestException as exc:
            raise GrafanaProvisioningError(
                f"cannot reach Grafana at {self.url} ({type(exc).__name__}); is --grafana-url right?") from None


def _message(exc: Any) -> str:
    text = getattr(exc, "message", "") or str(exc)
    return " ".join(str(text).split())[:300]


def provision(grafana: _Grafana, *, folder_title: str = dash.FOLDER_TITLE,
              prometheus_url: str | None = None) -> list[Provisioned]:
    """Create or update the folder, the data source (if ``prometheus_url``) and the dashboards."""
    api = grafana.api
    done: list[Provisioned] = []

    folder = grafana.call("reading the dgserve folder", api.folder.get_folder, dash.FOLDER_UID, missing_ok=True)
    if folder is None:
        grafana.call(f"creating folder {folder_title!r}", api.folder.create_folder, folder_title, dash.FOLDER_UID)
        done.append(Provisioned("folder", folder_title, "created"))
    elif folder.get("title") != folder_title:
        grafana.call(f"renaming folder to {folder_title!r}", api.folder.update_folder, dash.FOLDER_UID,
                     folder_title, None, True)
        done.append(Provisioned("folder", folder_title, "updated"))
    else:
        done.append(Provisioned("folder", folder_title, "unchanged"))

    ds_uid = ds_name = None
    if prometheus_url is not None:
        ds_uid, ds_name = dash.DATASOURCE_UID, dash.DATASOURCE_NAME
        body = {"uid": ds_uid, "name": ds_name, "type": "prometheus", "access": "proxy", "url": prometheus_url,
                "isDefault": False, "jsonData": {"httpMethod": "POST"}}
        existing = grafana.call("reading the data source", api.datasource.get_datasource_by_uid, ds_uid,
                                missing_ok=True)
        if existing is None:
            created = grafana.call(f"creating data source {ds_name!r}", api.datasource.create_datasource, body,
                                   conflict_ok=True)
            if created is None:  # a data source of that name but another uid exists: adopt it
                other = grafana.call(f"reading data source {ds_name!r}", api.datasource.get_datasource_by_name,
                                     ds_name)
                ds_uid = other["uid"]
                grafana.call(f"updating data source {ds_name!r}", api.datasource.update_datasource_by_uid, ds_uid,
                             {**body, "uid": ds_uid})
                done.append(Provisioned("datasource", ds_name, "updated", prometheus_url))
            else:
                done.append(Provisioned("datasource", ds_name, "created", prometheus_url))
        else:
            grafana.call(f"updating data source {ds_name!r}", api.datasource.update_datasource_by_uid, ds_uid, body)
            done.append(Provisioned("datasource", ds_name, "updated", prometheus_url))

    for uid, d in dash.dashboards().items():
        if ds_uid is not None and ds_name is not None:
            d = dash.with_datasource(d, ds_uid, ds_name)
        had = grafana.call(f"reading dashboard {uid}", api.dashboard.get_dashboard, uid, missing_ok=True)
        payload = {"dashboard": {**d, "id": None, "version": None}, "folderUid": dash.FOLDER_UID, "overwrite": True,
                   "message": "provisioned by dgserve dashboards"}
        res = grafana.call(f"saving dashboard {uid}", api.dashboard.update_dashboard, payload) or {}
        detail = f"{grafana.url}{res['url']}" if isinstance(res, dict) and res.get("url") else ""
        done.append(Provisioned("dashboard", d["title"], "created" if had is None else "updated", detail))
    return done


def run(args: DashboardsArgs) -> int:
    if args.export is not None:
        for p in dash.export(args.export):
            print(f"wrote {p}")
    if args.grafana_url is not None:
        credential: str | tuple[str, str] | None = args.token
        if args.user is not None and args.password is not None:
            credential = (args.user, args.password)
        grafana = _Grafana(args.grafana_url, credential, args.timeout)
        for item in provision(grafana, folder_title=args.folder, prometheus_url=args.prometheus_url):
            print(f"{item.kind} {item.name!r}: {item.action}" + (f" ({item.detail})" if item.detail else ""))
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    g = sub.add_parser("dashboards", help="export or provision dgserve's Grafana dashboards",
                       description="Write dgserve's Grafana dashboards as JSON (--export) and/or create or update "
                                   "them, their folder and a Prometheus data source in a Grafana (--grafana-url; "
                                   f"needs {INSTALL_HINT}).")
    g.add_argument("--grafana-url", help="Grafana base URL, e.g. http://grafana:3000")
    g.add_argument("--token", help="Grafana service-account token (Admin role to create folders/data sources)")
    g.add_argument("--user", help="Grafana user (basic auth; with --password)")
    g.add_argument("--password", help="Grafana password")
    g.add_argument("--prometheus-url", help="also create/update a Prometheus data source with this URL, "
                                            "and make it the dashboards' default")
    g.add_argument("--export", metavar="DIR", help="write one <uid>.json per dashboard into DIR")
    g.add_argument("--folder", default=dash.FOLDER_TITLE, help=f"folder title (default {dash.FOLDER_TITLE})")
    g.add_argument("--timeout", type=float, default=10.0, help="seconds per Grafana API call (default 10)")
    g.set_defaults(handler=lambda fields: run(DashboardsArgs(**fields)))
