"""`dgserve build` / `deploy` / `status`: the Serve config file, and the dashboard REST API (against a local
HTTP stand-in that records what it is sent)."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from dgserve.config import DeployConfig
from dgserve.deploy.cli import main
from dgserve.deploy.serve_config import build_serve_config, load_deploy_config
from dgserve.routing.app import APP_IMPORT_PATH, MODEL_DEPLOYMENT

AUTOSCALED = {"model": {"path": "tiny-random"},
              "replicas": {"autoscaling": {"min_replicas": 1, "max_replicas": 3}, "ep_size": 2, "num_gpus": 1}}


def _build(tmp_path: Path, settings: dict, name: str = "serve.yaml") -> tuple[int, Path]:
    cfg = tmp_path / "deploy.yaml"
    cfg.write_text(yaml.safe_dump(settings))
    out = tmp_path / name
    return main(["build", "--config", str(cfg), "-o", str(out)]), out


@pytest.mark.parametrize("settings", [{}, {"replicas": {"num_replicas": 3, "num_cpus": 0.5}}, AUTOSCALED,
                                      {"http": {"host": "0.0.0.0", "port": 9000}, "route_prefix": "/llm"}])
def test_build_output_validates_against_serve_schema(tmp_path, settings):
    rc, out = _build(tmp_path, settings)
    assert rc == 0
    data = yaml.safe_load(out.read_text())
    schema = ServeDeploySchema.model_validate(data)
    app = schema.applications[0]
    config = DeployConfig.from_args(settings)
    assert app.import_path == APP_IMPORT_PATH
    assert app.name == config.name and app.route_prefix == config.route_prefix
    assert DeployConfig.from_args(app.args) == config  # the args round-trip to the same config
    assert data["http_options"] == {"host": config.http.host, "port": config.http.port}
    (model,) = [d for d in app.deployments if d.name == MODEL_DEPLOYMENT]
    opts = model.ray_actor_options
    assert (opts.num_cpus, opts.num_gpus) == (config.replicas.num_cpus, config.replicas.num_gpus)
    assert model.max_ongoing_requests == config.replicas.max_ongoing_requests
    if config.replicas.autoscaling is None:
        assert model.num_replicas == config.replicas.num_replicas * config.replicas.ep_size
    else:  # Serve counts replicas; a gang of ep_size ranks is ep_size replicas
        assert model.autoscaling_config["min_replicas"] == 2 and model.autoscaling_config["max_replicas"] == 6
        assert model.autoscaling_config["policy"]["policy_function"].startswith("dgserve.")


@pytest.mark.parametrize("settings", [{}, AUTOSCALED, {"replicas": {"num_replicas": 2, "ep_size": 4}},
                                      {"router": {"prefix_affinity": False}}])
def test_written_options_are_what_build_app_applies(settings):
    """A config file's ``deployments`` replace the code's options: each deployment of the application that
    ``app_builder`` builds must carry exactly the options ``dgserve build`` writes (the autoscaling override must
    name the throughput policy, or Serve would fall back to its own)."""
    from dgserve.routing.app import build_app

    config = DeployConfig.from_args(settings)
    written = {d["name"]: d for d in build_serve_config(config)["applications"][0]["deployments"]}
    schema = {d.name: d for d in ServeDeploySchema.model_validate(build_serve_config(config)).applications[0]
              .deployments}
    ingress = build_app(config)._bound_deployment
    (replica,) = [a._bound_deployment for a in ingress.init_args if hasattr(a, "_bound_deployment")]
    built = {ingress.name: ingress, replica.name: replica}
    assert set(written) == set(built) == {"Ingress", MODEL_DEPLOYMENT}
    for name, dep in built.items():
        opts = written[name]
        cfg = dep._deployment_config
        assert schema[name].max_ongoing_requests == cfg.max_ongoing_requests == opts["max_ongoing_requests"]
        assert dep.ray_actor_options == opts["ray_actor_options"]
        if "num_replicas" in opts:
            assert cfg.num_replicas == opts["num_replicas"] and cfg.autoscaling_config is None
        else:
            scaling = cfg.autoscaling_config
            assert (scaling.min_replicas, scaling.max_replicas) == (opts["autoscaling_config"]["min_replicas"],
                                                                   opts["autoscaling_config"]["max_replicas"])
            assert scaling.policy.policy_function == "dgserve.routing.autoscaling:ThroughputAutoscalingPolicy"
    model = written[MODEL_DEPLOYMENT]
    router = built[MODEL_DEPLOYMENT]._deployment_config.request_router_config
    assert router.request_router_class == model["request_router_config"]["request_router_class"]
    assert router.request_router_kwargs == model["request_router_config"]["request_router_kwargs"]
    assert router.request_router_kwargs["prefix_affinity"] == config.router.prefix_affinity
    gang = built[MODEL_DEPLOYMENT]._deployment_config.gang_scheduling_config
    if config.replicas.ep_size > 1:
        assert gang.gang_size == model["gang_scheduling_config"]["gang_size"] == config.replicas.ep_size
    else:
        assert gang is None and "gang_scheduling_config" not in model


def test_build_json_output_and_stdout(tmp_path, capsys):
    rc, out = _build(tmp_path, {"name": "a"}, name="serve.json")
    assert rc == 0
    data = json.loads(out.read_text())
    assert data == build_serve_config(DeployConfig(name="a"))
    assert main(["build", "--config", str(tmp_path / "deploy.yaml")]) == 0
    assert yaml.safe_load(capsys.readouterr().out) == data


def test_build_reads_and_merges_helm_values_files(tmp_path, capsys):
    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump({"image": {"tag": "x"}, "dgserve": {"replicas": {"num_replicas": 2},
                                                                          "model": {"dtype": "bfloat16"}}}))
    assert load_deploy_config(values).replicas.num_replicas == 2
    mine = tmp_path / "mine.yaml"
    mine.write_text(yaml.safe_dump({"dgserve": {"replicas": {"num_cpus": 3}, "model": {"served_name": "m"}}}))
    merged = load_deploy_config([values, mine])
    assert (merged.replicas.num_replicas, merged.replicas.num_cpus) == (2, 3.0)
    assert (merged.model.dtype, merged.model.served_name) == ("bfloat16", "m")
    out = tmp_path / "serve.yaml"
    assert main(["build", "--config", str(values), "--config", str(mine), "-o", str(out)]) == 0
    assert yaml.safe_load(out.read_text()) == build_serve_config(merged)


@pytest.mark.parametrize(("content", "suffix", "message"), [
    ("replicas: {num_replicas: 0}\n", ".yaml", "replicas.num_replicas: Input should be greater than or equal to 1"),
    ("replicas: {num_replica: 2}\n", ".yaml", "replicas.num_replica: unknown field"),
    ("model: {dtype: float8}\n", ".yaml", "model.dtype: Input should be"),
    ("replicas: {autoscaling: {min_replicas: 4, max_replicas: 2}}\n", ".yaml", "max_replicas (2) < min_replicas"),
    ("replicas: {ep_num_redundant: 2, ep_placement: contiguous}\n", ".yaml", "it needs ep_placement: load_aware"),
    ("replicas: [\n", ".yaml", "not valid YAML"),
    ('{"name": "x",}', ".json", "line 1: not valid JSON"),
    ("- a\n- b\n", ".yaml", "expected a mapping"),
    ("", ".yaml", "the file is empty"),
])
def test_bad_config_is_one_clear_line_and_leaves_no_output(tmp_path, capsys, content, suffix, message):
    cfg = tmp_path / f"deploy{suffix}"
    cfg.write_text(content)
    out = tmp_path / "serve.yaml"
    assert main(["build", "--config", str(cfg), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(cfg) in err and message in err, err
    assert "Traceback" not in err
    assert not out.exists() and list(tmp_path.iterdir()) == [cfg]  # no output, no stray temp file


def test_failed_build_keeps_the_previous_output(tmp_path, capsys):
    rc, out = _build(tmp_path, {"name": "first"})
    assert rc == 0
    before = out.read_text()
    (tmp_path / "bad.yaml").write_text("http: {port: 70000}\n")
    assert main(["build", "--config", str(tmp_path / "bad.yaml"), "-o", str(out)]) == 2
    assert "http.port" in capsys.readouterr().err
    assert out.read_text() == before
    assert main(["build", "--config", str(tmp_path / "missing.yaml"), "-o", str(out)]) == 2
    assert "missing.yaml: no such file" in capsys.readouterr().err


# -- deploy / status against a stand-in of the dashboard's Serve API -------------------------------------------

class _Dashboard:
    """Answers GET/PUT /api/serve/applications/ like Ray's dashboard; records every PUT body."""

    def __init__(self) -> None:
        self.puts: list[dict] = []
        self.details: dict = {"controller_info": {}, "proxies": {}, "applications": {}}
        self.put_status = 200
        self.put_error = ""
        self.after_put: list[str] = ["RUNNING"]  # app statuses returned by successive GETs after a PUT
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, code: int, body: bytes, ctype: str = "application/json") -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                if self.path != "/api/serve/applications/":
                    return self._send(404, b"not found", "text/plain")
                owner._advance()
                self._send(200, json.dumps(owner.details).encode())

            def do_PUT(self):
                if self.path != "/api/serve/applications/":
                    return self._send(404, b"not found", "text/plain")
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                owner.puts.append(body)
                if owner.put_status != 200:
                    return self._send(owner.put_status, owner.put_error.encode(), "text/plain")
                owner._apply(body)
                self._send(200, b"")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._pending: list[str] = []
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def _apply(self, body: dict) -> None:
        apps = {}
        for app in body["applications"]:
            old = self.details["applications"].get(app["name"])
            apps[app["name"]] = old if old and old["deployed_app_config"] == app else self._app(app, "DEPLOYING")
        self.details["applications"] = apps
        self._pending = list(self.after_put)

    def _advance(self) -> None:
        if self._pending:
            status = self._pending.pop(0)
            for app in self.details["applications"].values():
                if app["status"] != "RUNNING" or status != "RUNNING":
                    app["status"] = status
                    app["message"] = "replica failed to start: CUDA out of memory" if status == "DEPLOY_FAILED" \
                        else ""

    @staticmethod
    def _app(app: dict, status: str) -> dict:
        deps = {}
        for name in ("Ingress", "ModelReplica"):
            n = next((d.get("num_replicas", 1) for d in app.get("deployments", []) if d["name"] == name), 1)
            deps[name] = {"name": name, "status": "HEALTHY", "message": "", "target_num_replicas": n,
                          "replicas": [{"replica_id": f"{name}-{i}", "state": "RUNNING"} for i in range(n)]}
        return {"name": app["name"], "route_prefix": app.get("route_prefix"), "status": status, "message": "",
                "deployed_app_config": app, "deployments": deps}

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def dashboard():
    d = _Dashboard()
    yield d
    d.close()


def _serve_yaml(tmp_path: Path, **settings) -> Path:
    rc, out = _build(tmp_path, {"model": {"path": "tiny-random"}, **settings})
    assert rc == 0
    return out


def test_deploy_puts_the_built_config(tmp_path, dashboard, capsys):
    serve_yaml = _serve_yaml(tmp_path, replicas={"num_replicas": 2})
    assert main(["deploy", str(serve_yaml), "--address", dashboard.url, "--wait", "5"]) == 0
    assert dashboard.puts == [yaml.safe_load(serve_yaml.read_text())]
    ServeDeploySchema.model_validate(dashboard.puts[0])
    err = capsys.readouterr().err
    assert f"deployed dgserve to {dashboard.url}" in err and "dgserve: RUNNING" in err


def test_deploy_accepts_a_deploy_config_and_keeps_other_applications(tmp_path, dashboard, capsys):
    other = {"name": "other", "route_prefix": "/other", "import_path": "x:app"}
    dashboard.details["applications"]["other"] = _Dashboard._app(other, "RUNNING")
    cfg = tmp_path / "deploy.yaml"
    cfg.write_text("replicas: {num_replicas: 1}\n")
    assert main(["deploy", str(cfg), "--address", dashboard.url.removeprefix("http://")]) == 0
    (body,) = dashboard.puts
    assert [a["name"] for a in body["applications"]] == ["dgserve", "other"]
    assert body["applications"][1] == other
    assert body["applications"][0] == build_serve_config(DeployConfig())["applications"][0]
    assert "kept running: other" in capsys.readouterr().err
    # --replace-all drops it
    assert main(["deploy", str(cfg), "--address", dashboard.url, "--replace-all"]) == 0
    assert [a["name"] for a in dashboard.puts[-1]["applications"]] == ["dgserve"]


def test_deploy_refuses_to_shadow_another_applications_route(tmp_path, dashboard, capsys):
    dashboard.details["applications"]["web"] = _Dashboard._app({"name": "web", "route_prefix": "/"}, "RUNNING")
    assert main(["deploy", str(_serve_yaml(tmp_path)), "--address", dashboard.url]) == 2
    assert "'web' already serves route prefix '/'" in capsys.readouterr().err
    assert dashboard.puts == []


def test_deploy_wait_reports_a_failed_deployment(tmp_path, dashboard, capsys):
    dashboard.after_put = ["DEPLOYING", "DEPLOY_FAILED"]
    assert main(["deploy", str(_serve_yaml(tmp_path)), "--address", dashboard.url, "--wait", "10"]) == 1
    err = capsys.readouterr().err
    assert "'dgserve' is DEPLOY_FAILED: replica failed to start: CUDA out of memory" in err


def test_deploy_dashboard_rejection_is_reported(tmp_path, dashboard, capsys):
    dashboard.put_status, dashboard.put_error = 400, "ValidationError: something the server disliked"
    assert main(["deploy", str(_serve_yaml(tmp_path)), "--address", dashboard.url]) == 2
    err = capsys.readouterr().err
    assert "HTTP 400: ValidationError: something the server disliked" in err and "Traceback" not in err


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_address_is_a_clear_error(tmp_path, capsys):
    address = f"http://127.0.0.1:{_closed_port()}"
    assert main(["deploy", str(_serve_yaml(tmp_path)), "--address", address, "--timeout", "3"]) == 2
    err = capsys.readouterr().err
    assert f"cannot reach the Ray dashboard at {address}" in err and "Traceback" not in err
    assert main(["status", "--address", address]) == 2
    assert "cannot reach the Ray dashboard" in capsys.readouterr().err
    assert main(["status", "--address", "ray://head:10001"]) == 2
    assert "Ray Client address" in capsys.readouterr().err


def test_deploy_rejects_an_invalid_serve_config(tmp_path, dashboard, capsys):
    bad = tmp_path / "serve.yaml"
    bad.write_text(yaml.safe_dump({"applications": [{"name": "x", "import_path": "nocolon"}]}))
    assert main(["deploy", str(bad), "--address", dashboard.url]) == 2
    err = capsys.readouterr().err
    assert "not a valid Ray Serve config" in err and "applications.0.import_path" in err
    assert dashboard.puts == []


def test_status_shows_applications_replicas_and_health(tmp_path, dashboard, capsys):
    assert main(["status", "--address", dashboard.url]) == 1  # nothing deployed
    assert "no Serve applications" in capsys.readouterr().out
    assert main(["deploy", str(_serve_yaml(tmp_path, replicas={"num_replicas": 2})), "--address",
                 dashboard.url]) == 0
    capsys.readouterr()
    assert main(["status", "--address", dashboard.url]) == 0
    out = capsys.readouterr().out
    assert "dgserve  RUNNING  route /" in out
    assert "ModelReplica  HEALTHY      replicas 2/2 running" in out and "Ingress" in out
    dashboard.details["applications"]["dgserve"]["status"] = "UNHEALTHY"
    dashboard.details["applications"]["dgserve"]["deployments"]["ModelReplica"]["replicas"][1]["state"] = "STARTING"
    assert main(["status", "--address", dashboard.url, "--json"]) == 1
    summary = json.loads(capsys.readouterr().out)
    assert summary["applications"]["dgserve"]["deployments"]["ModelReplica"]["replica_states"] == {
        "RUNNING": 1, "STARTING": 1}
    assert main(["status", "--address", dashboard.url, "--app", "nope"]) == 2
    assert "no application named 'nope' (running: dgserve)" in capsys.readouterr().err


# -- the real thing: `serve run serve.yaml` on a local Ray -------------------------------------------------------

def _free_port() -> int:
    return _closed_port()


def _serve_cli() -> list[str]:
    exe = shutil.which("serve", path=str(Path(sys.executable).parent)) or shutil.which("serve")
    return [exe] if exe else [sys.executable, "-c", "import sys; from ray.serve.scripts import cli; sys.exit(cli())"]


def _serve_run(serve_yaml: Path, port: int, request: dict, path: str, deadline_s: float = 240.0) -> dict:
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_enable_worker_prestart": "0",
           "RAY_prestart_worker_first_driver": "0"}
    log = serve_yaml.parent / "serve-run.log"
    with open(log, "w") as logf:
        proc = subprocess.Popen([*_serve_cli(), "run", str(serve_yaml)], env=env, stdout=logf,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + deadline_s
        while True:
            assert proc.poll() is None, f"serve run exited {proc.returncode}:\n{log.read_text()[-4000:]}"
            try:
                req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=json.dumps(request).encode(),
                                             headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(req, timeout=30) as resp:
                    return json.loads(resp.read())
            except OSError:
                assert time.monotonic() < deadline, f"no answer in {deadline_s} s:\n{log.read_text()[-4000:]}"
                time.sleep(1.0)
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.mark.slow
def test_serve_run_serves_a_request(tmp_path):
    if importlib.util.find_spec("dgserve.routing.app") is None:
        pytest.skip("dgserve.routing.app (app_builder) is not written yet")
    port = _free_port()
    rc, out = _build(tmp_path, {"model": {"path": "tiny-random"}, "http": {"port": port},
                                "replicas": {"num_replicas": 1, "num_cpus": 0.5},
                                "engine": {"kv_cache_memory": 64 << 20}})
    assert rc == 0
    answer = _serve_run(out, port, {"model": "tiny-random", "prompt": "hello", "max_tokens": 8, "seed": 1},
                        "/v1/completions")
    assert answer["object"] == "text_completion"
    assert answer["usage"]["completion_tokens"] <= 8


@pytest.mark.slow
def test_deploy_and_status_against_a_real_ray_dashboard(tmp_path, capsys):
    """`ray start --head` with its dashboard on free ports; `dgserve deploy --wait` puts the built config there,
    the endpoint answers, `dgserve status` reports it RUNNING."""
    if importlib.util.find_spec("dgserve.routing.app") is None:
        pytest.skip("dgserve.routing.app (app_builder) is not written yet")
    import tempfile

    gcs, dash, http = _free_port(), _free_port(), _free_port()
    temp_dir = tempfile.mkdtemp(prefix="dgr", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_enable_worker_prestart": "0",
           "RAY_prestart_worker_first_driver": "0"}
    ray_exe = shutil.which("ray", path=str(Path(sys.executable).parent)) or "ray"
    log = tmp_path / "ray-start.log"
    with open(log, "w") as logf:
        head = subprocess.Popen([ray_exe, "start", "--head", "--block", f"--port={gcs}", "--num-cpus=4",
                                 "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
                                 f"--temp-dir={temp_dir}", "--object-store-memory=134217728"],
                                env=env, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.monotonic() + 120
        while main(["status", "--address", address, "--timeout", "5"]) == 2:
            assert head.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, f"no dashboard at {address}:\n{log.read_text()[-3000:]}"
            time.sleep(1.0)
        rc, serve_yaml = _build(tmp_path, {"model": {"path": "tiny-random"}, "http": {"port": http},
                                           "replicas": {"num_replicas": 1, "num_cpus": 0.5},
                                           "engine": {"kv_cache_memory": 64 << 20}})
        assert rc == 0
        capsys.readouterr()
        assert main(["deploy", str(serve_yaml), "--address", address, "--wait", "240"]) == 0, \
            capsys.readouterr().err
        req = urllib.request.Request(f"http://127.0.0.1:{http}/v1/completions", headers={
            "Content-Type": "application/json"}, data=json.dumps(
            {"model": "tiny-random", "prompt": "hi", "max_tokens": 4, "seed": 1}).encode())
        with urllib.request.urlopen(req, timeout=60) as resp:
            assert json.loads(resp.read())["object"] == "text_completion"
        capsys.readouterr()
        assert main(["status", "--address", address]) == 0
        out = capsys.readouterr().out
        assert "dgserve  RUNNING  route /" in out and "replicas 1/1 running" in out
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()
        shutil.rmtree(temp_dir, ignore_errors=True)
