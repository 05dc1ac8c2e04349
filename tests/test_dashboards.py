"""Grafana dashboards: catalogue-only PromQL (checked by promtool when installed), export, and provisioning
against a local stand-in for Grafana's HTTP API (no Grafana server can be installed here)."""

from __future__ import annotations

import base64
import json
import re
import shutil
import socket
import subprocess
import sys
from importlib.util import find_spec
from typing import Any

import pytest

from dgserve.deploy import dashboards as dash
from dgserve.deploy.cli import main
from dgserve.replicas.metrics import METRIC_NAMES, all_exported_names, exported_names

PROMQL_FUNCS = {"sum", "avg", "max", "min", "count", "rate", "increase", "histogram_quantile", "vector",
                "scalar", "label_values", "by", "or", "and", "unless", "ignoring", "on", "group_left",
                "group_right", "without"}


def _metric_names(expr: str) -> set[str]:
    """Identifiers in a PromQL expression that are not functions, keywords, labels or durations."""
    body = re.sub(r'"[^"]*"', '""', expr)  # label values
    body = re.sub(r"label_values\((.*),\s*\w+\)", r"\1", body)  # Grafana's label_values(series, label)
    body = re.sub(r"\{[^}]*\}", "{}", body)  # matchers (label names)
    body = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", "", body)  # grouping label lists
    body = re.sub(r"\[[^\]]*\]", "[]", body)  # range durations
    words = set(re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*", body))
    return {w for w in words if w not in PROMQL_FUNCS and not re.fullmatch(r"\d+\w*", w)}


# -- the catalogue and the queries --------------------------------------------------------------------------------


def test_exported_names_follow_ray_conventions():
    assert exported_names("dgserve_generated_tokens") == ("ray_dgserve_generated_tokens_total",)
    assert exported_names("dgserve_queue_depth") == ("ray_dgserve_queue_depth",)
    assert exported_names("dgserve_request_latency_seconds") == (
        "ray_dgserve_request_latency_seconds_bucket", "ray_dgserve_request_latency_seconds_sum",
        "ray_dgserve_request_latency_seconds_count")
    assert all(n.startswith("dgserve_") for n in METRIC_NAMES)


def test_every_query_uses_only_catalogued_metrics():
    known = all_exported_names()
    queries = dash.all_panel_queries()
    assert len(queries) >= 30
    used: set[str] = set()
    for d in dash.dashboards().values():
        for title, expr in dash.iter_panel_queries(d):
            names = _metric_names(expr)
            assert names, f"{d['uid']} / {title}: no metric in {expr!r}"
            assert names <= known, f"{d['uid']} / {title}: unknown metrics {names - known}"
            used |= names
        for q in dash.variable_queries(d):
            assert _metric_names(q) <= known, q
    for q in queries:
        assert "$" not in q, f"unsubstituted variable in {q!r}"
    # every catalogued metric is on some dashboard (histograms through any of their series)
    unused = [n for n in METRIC_NAMES if not set(exported_names(n)) & used]
    assert not unused, f"metrics on no dashboard: {unused}"


def test_substitution():
    q = dash.substitute('rate(x{model=~"$model", l=~"${layer}", z="${layer:regex}"}[$__rate_interval])',
                        {"model": "a|b", "layer": "3", "__rate_interval": "30s"})
    assert q == 'rate(x{model=~"a|b", l=~"3", z="3"}[30s])'
    assert all('model=~"tiny"' in q for q in dash.all_panel_queries({"model": "tiny"}) if "model" in q)


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed (Debian package prometheus)")
def test_promtool_parses_every_panel_query(tmp_path):
    rules = {"groups": [{"name": "dgserve-dashboards", "rules": [
        {"record": f"dgserve:panel:{i}", "expr": q} for i, q in enumerate(dash.all_panel_queries())]}]}
    (tmp_path / "rules.json").write_text(json.dumps(rules))
    res = subprocess.run(["promtool", "check", "rules", str(tmp_path / "rules.json")], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    # and the check does catch a broken expression
    rules["groups"][0]["rules"].append({"record": "dgserve:bad", "expr": "sum(rate(x[1m])"})
    (tmp_path / "bad.json").write_text(json.dumps(rules))
    bad = subprocess.run(["promtool", "check", "rules", str(tmp_path / "bad.json")], capture_output=True, text=True)
    assert bad.returncode != 0


def test_dashboard_structure():
    ds = dash.dashboards()
    assert set(ds) == {"dgserve-overview", "dgserve-engine", "dgserve-experts"}
    for d in ds.values():
        ids = [p["id"] for p in d["panels"]]
        assert len(ids) == len(set(ids))
        for p in d["panels"]:
            g = p["gridPos"]
            assert g["x"] >= 0 and g["x"] + g["w"] <= 24
            assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
    assert any(p["type"] == "heatmap" for p in ds["dgserve-experts"]["panels"])
    json.dumps(ds)  # plain JSON


# -- export ------------------------------------------------------------------------------------------------------


def test_export_writes_json(tmp_path, capsys):
    assert main(["dashboards", "--export", str(tmp_path / "out")]) == 0
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert files == ["dgserve-engine.json", "dgserve-experts.json", "dgserve-overview.json"]
    loaded = json.loads((tmp_path / "out" / "dgserve-overview.json").read_text())
    assert loaded == dash.overview()
    assert "wrote" in capsys.readouterr().out


def test_usage_errors(capsys):
    assert main(["dashboards"]) == 2
    assert "--grafana-url" in capsys.readouterr().err
    assert main(["dashboards", "--grafana-url", "http://g:3000", "--token", "t", "--user", "u", "--password", "p"]) == 2
    assert "either --token or --user" in capsys.readouterr().err
    assert main(["dashboards", "--grafana-url", "grafana:3000"]) == 2
    assert "http(s)://" in capsys.readouterr().err


# -- provisioning against a Grafana stand-in ---------------------------------------------------------------------

# Provisioning needs the optional grafana-client and the test-only pytest-httpserver; the tests above do not.
needs_grafana = pytest.mark.skipif(
    find_spec("grafana_client") is None or find_spec("pytest_httpserver") is None,
    reason="needs grafana-client (dgserve[grafana]) and pytest-httpserver")

TOKEN = "glsa_good"
BASIC = ("admin", "s3cret")


class FakeGrafana:
    """Just enough of Grafana's HTTP API (folders, data sources, dashboards), with its status codes, to
    check what provisioning sends; every call is recorded."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self.folders: dict[str, dict] = {}
        self.datasources: dict[str, dict] = {}
        self.dashboards: dict[str, dict] = {}

    @staticmethod
    def _json(body: object, status: int = 200) -> Any:
        from werkzeug import Response  # pytest-httpserver's dependency

        return Response(json.dumps(body), status=status, content_type="application/json")

    def _authorized(self, request: Any) -> bool:
        auth = request.headers.get("Authorization", "")
        basic = "Basic " + base64.b64encode(f"{BASIC[0]}:{BASIC[1]}".encode()).decode()
        return auth in (f"Bearer {TOKEN}", basic)

    def handle(self, request: Any) -> Any:
        method, path = request.method, request.path
        self.calls.append((method, path))
        if not self._authorized(request):
            return self._json({"message": "Invalid API key"}, 401)
        body = request.get_json(silent=True)
        if m := re.fullmatch(r"/api/folders/([\w-]+)", path):
            uid = m.group(1)
            if method == "GET":
                return self._json(self.folders[uid]) if uid in self.folders else self._json(
                    {"message": "folder not found"}, 404)
            if method == "PUT":
                self.folders[uid]["title"] = body["title"]
                return self._json(self.folders[uid])
        if path == "/api/folders" and method == "POST":
            if body["uid"] in self.folders:
                return self._json({"message": "a folder with the same uid already exists"}, 409)
            self.folders[body["uid"]] = {"uid": body["uid"], "title": body["title"], "id": len(self.folders) + 1}
            return self._json(self.folders[body["uid"]])
        if m := re.fullmatch(r"/api/datasources/uid/([\w-]+)", path):
            uid = m.group(1)
            if uid not in self.datasources:
                return self._json({"message": "Data source not found"}, 404)
            if method == "GET":
                return self._json(self.datasources[uid])
            if method == "PUT":
                self.datasources[uid] = {**body, "id": self.datasources[uid]["id"]}
                return self._json({"message": "Datasource updated", "datasource": self.datasources[uid]})
        if m := re.fullmatch(r"/api/datasources/name/(.+)", path):
            found = [d for d in self.datasources.values() if d["name"] == m.group(1)]
            return self._json(found[0]) if found else self._json({"message": "Data source not found"}, 404)
        if path == "/api/datasources" and method == "POST":
            if any(d["name"] == body["name"] for d in self.datasources.values()):
                return self._json({"message": "data source with the same name already exists"}, 409)
            self.datasources[body["uid"]] = {**body, "id": len(self.datasources) + 1}
            return self._json({"message": "Datasource added", "datasource": self.datasources[body["uid"]]})
        if m := re.fullmatch(r"/api/dashboards/uid/([\w-]+)", path):
            uid = m.group(1)
            if uid not in self.dashboards:
                return self._json({"message": "Dashboard not found"}, 404)
            return self._json({"dashboard": self.dashboards[uid]["dashboard"], "meta": {}})
        if path == "/api/dashboards/db" and method == "POST":
            d = body["dashboard"]
            assert body["overwrite"] is True and body["folderUid"], body
            prev = self.dashboards.get(d["uid"])
            version = prev["version"] + 1 if prev else 1
            self.dashboards[d["uid"]] = {"dashboard": {**d, "version": version}, "folderUid": body["folderUid"],
                                         "version": version}
            return self._json({"status": "success", "uid": d["uid"], "version": version,
                               "url": f"/d/{d['uid']}/{d['uid']}"})
        return self._json({"message": f"stand-in has no {method} {path}"}, 404)


@pytest.fixture
def grafana(httpserver):
    fake = FakeGrafana()
    httpserver.expect_request(re.compile(r"/api/.*")).respond_with_handler(fake.handle)
    fake.url = httpserver.url_for("/").rstrip("/")
    return fake


@needs_grafana
def test_provision_creates_then_updates(grafana, capsys):
    args = ["dashboards", "--grafana-url", grafana.url, "--token", TOKEN, "--prometheus-url", "http://prom:9090"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert "folder 'dgserve': created" in first and "datasource 'dgserve Prometheus': created" in first
    assert first.count("dashboard") == 3 and "created" in first
    assert set(grafana.dashboards) == {"dgserve-overview", "dgserve-engine", "dgserve-experts"}
    assert grafana.folders["dgserve"]["title"] == "dgserve"
    ds = grafana.datasources[dash.DATASOURCE_UID]
    assert ds["url"] == "http://prom:9090" and ds["type"] == "prometheus"
    saved = grafana.dashboards["dgserve-overview"]
    assert saved["folderUid"] == "dgserve"
    var = next(v for v in saved["dashboard"]["templating"]["list"] if v["name"] == "datasource")
    assert var["current"]["value"] == dash.DATASOURCE_UID
    assert saved["dashboard"]["id"] is None

    # second run: same objects updated, nothing duplicated
    posts_before = [c for c in grafana.calls if c == ("POST", "/api/folders") or c == ("POST", "/api/datasources")]
    assert main([*args[:-1], "http://prom2:9090"]) == 0
    second = capsys.readouterr().out
    assert "folder 'dgserve': unchanged" in second and "datasource 'dgserve Prometheus': updated" in second
    assert second.count(": updated") == 4 and "created" not in second
    posts_after = [c for c in grafana.calls if c == ("POST", "/api/folders") or c == ("POST", "/api/datasources")]
    assert posts_after == posts_before
    assert len(grafana.folders) == 1 and len(grafana.datasources) == 1 and len(grafana.dashboards) == 3
    assert grafana.datasources[dash.DATASOURCE_UID]["url"] == "http://prom2:9090"
    assert grafana.dashboards["dgserve-overview"]["version"] == 2


@needs_grafana
def test_provision_basic_auth_without_datasource_and_folder_rename(grafana, capsys):
    assert main(["dashboards", "--grafana-url", grafana.url, "--user", BASIC[0], "--password", BASIC[1]]) == 0
    assert not grafana.datasources and len(grafana.dashboards) == 3
    var = next(v for v in grafana.dashboards["dgserve-engine"]["dashboard"]["templating"]["list"]
               if v["name"] == "datasource")
    assert var["current"] == {}  # Grafana's default Prometheus data source
    assert main(["dashboards", "--grafana-url", grafana.url, "--user", BASIC[0], "--password", BASIC[1],
                 "--folder", "LLM serving"]) == 0
    assert grafana.folders["dgserve"]["title"] == "LLM serving" and len(grafana.folders) == 1
    assert "folder 'LLM serving': updated" in capsys.readouterr().out


@needs_grafana
def test_provision_adopts_a_datasource_with_our_name(grafana, capsys):
    grafana.datasources["abc"] = {"uid": "abc", "name": dash.DATASOURCE_NAME, "type": "prometheus", "url": "x",
                                  "id": 7}
    assert main(["dashboards", "--grafana-url", grafana.url, "--token", TOKEN,
                 "--prometheus-url", "http://p:9090"]) == 0
    assert set(grafana.datasources) == {"abc"} and grafana.datasources["abc"]["url"] == "http://p:9090"
    var = next(v for v in grafana.dashboards["dgserve-experts"]["dashboard"]["templating"]["list"]
               if v["name"] == "datasource")
    assert var["current"]["value"] == "abc"


@needs_grafana
def test_bad_token_is_one_clear_line(grafana, capsys):
    assert main(["dashboards", "--grafana-url", grafana.url, "--token", "wrong"]) == 2
    out = capsys.readouterr()
    err = out.err.strip()
    assert "\n" not in err and "Traceback" not in err
    assert "401 Unauthorized" in err and "--token" in err and grafana.url in err
    assert not grafana.dashboards and grafana.calls == [("GET", "/api/folders/dgserve")]


@needs_grafana
def test_forbidden_and_server_errors(httpserver, capsys):
    httpserver.expect_request("/api/folders/dgserve").respond_with_json({"message": "Access denied"}, status=403)
    assert main(["dashboards", "--grafana-url", httpserver.url_for("/").rstrip("/"), "--token", "t"]) == 2
    assert "403 Forbidden" in capsys.readouterr().err
    httpserver.clear()
    httpserver.expect_request("/api/folders/dgserve").respond_with_json({"message": "database is locked"},
                                                                        status=500)
    assert main(["dashboards", "--grafana-url", httpserver.url_for("/").rstrip("/"), "--token", "t"]) == 2
    err = capsys.readouterr().err
    assert "500" in err and "database is locked" in err and "\n" not in err.strip()


@needs_grafana
def test_unreachable_grafana(capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends: nothing listens there
    assert main(["dashboards", "--grafana-url", f"http://127.0.0.1:{port}", "--token", "t", "--timeout", "2"]) == 2
    err = capsys.readouterr().err
    assert "cannot reach Grafana" in err and "\n" not in err.strip()


def test_missing_grafana_client_says_how_to_install(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "grafana_client", None)  # import fails as if not installed
    assert main(["dashboards", "--grafana-url", "http://127.0.0.1:9", "--token", "t"]) == 2
    assert "dgserve[grafana]" in capsys.readouterr().err
    # export needs nothing extra
    assert main(["dashboards", "--export", str(tmp_path)]) == 0
