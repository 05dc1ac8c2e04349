"""Observability and autoscaling against the real thing: Prometheus (Debian's package) scraping Ray's
metrics port while the app serves load, and the throughput policy scaling a deployment 1 -> 2 -> 1."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request

import httpx
import pytest

from dgserve.config import DeployConfig
from dgserve.deploy.dashboards import all_panel_queries

pytestmark = pytest.mark.slow


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def prometheus(ray_session, tmp_path_factory):
    exe = shutil.which("prometheus")
    if exe is None:
        pytest.skip("Debian's prometheus package is not installed (.ci/run installs it)")
    root = tmp_path_factory.mktemp("prometheus")
    target = f"127.0.0.1:{ray_session.dgserve_metrics_port}"
    (root / "prometheus.yml").write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        f"scrape_configs:\n  - job_name: ray\n    static_configs:\n      - targets: ['{target}']\n")
    port = _free_port()
    proc = subprocess.Popen([exe, f"--config.file={root / 'prometheus.yml'}", f"--storage.tsdb.path={root / 'data'}",
                             f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url + "/-/ready", timeout=1)
            break
        except OSError:
            time.sleep(0.2)
    yield url
    proc.terminate()
    proc.wait(timeout=10)


def _query(url: str, expr: str) -> list:
    q = urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(f"{url}/api/v1/query?{q}", timeout=10) as resp:
        body = json.loads(resp.read())
    assert body["status"] == "success", body
    return body["data"]["result"]


@pytest.fixture
def deploy_app(serve_http):
    """``deploy_app(name, args) -> url`` at ``/name``; the apps are deleted when the test ends, failed or not."""
    from ray import serve

    from dgserve.routing.app import build_app

    names: list[str] = []

    def run(name: str, args: dict) -> str:
        names.append(name)
        config = DeployConfig.from_args({"name": name, "route_prefix": f"/{name}", "model": {"path": "tiny-random"},
                                         **args})  # the requests below name tiny-random
        serve.run(build_app(config), name=name, route_prefix=f"/{name}")
        return f"{serve_http}/{name}"

    yield run
    for name in names:
        serve.delete(name)


async def _load(url: str, n: int, max_tokens: int, concurrency: int, model: str = "tiny-random",
                image_every: int = 0) -> list[int]:
    """``n`` completions; with ``image_every``, every that many a chat with an image instead."""
    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=300) as client:
        async def one(i: int) -> int:
            async with sem:
                if image_every and i % image_every == 0:
                    image = {"type": "image_url", "image_url": {"url": _png_url(i)}}
                    r = await client.post(url + "/v1/chat/completions", json={
                        "model": model, "messages": [{"role": "user", "content": [image]}], "max_tokens": max_tokens,
                        "seed": i})
                else:
                    r = await client.post(url + "/v1/completions", json={
                        "model": model, "prompt": f"shared system prompt {i % 3}", "max_tokens": max_tokens,
                        "seed": i})
                return r.status_code
        return await asyncio.gather(*(one(i) for i in range(n)))


def _png_url(seed: int) -> str:
    import base64
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (40 + seed % 7, 32), (seed % 256, 90, 160)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def test_every_dashboard_query_returns_data(deploy_app, prometheus, vision_reference):
    # a checkpoint with a vision tower, so that the image panels have data too
    url = deploy_app("metrics-app", {
        "model": {"path": str(vision_reference[1]), "served_name": "vision"},
        "replicas": {"num_replicas": 1, "num_cpus": 0.5},
        "engine": {"kv_cache_memory": 16 << 20, "max_running": 4, "max_waiting": 2}})
    codes = asyncio.run(_load(url, 16, 64, concurrency=8, model="vision", image_every=4))
    assert 200 in codes
    queries = all_panel_queries()
    assert len(queries) > 10
    missing = list(queries)
    deadline = time.time() + 90
    while missing and time.time() < deadline:
        missing = [q for q in missing if not _query(prometheus, q)]
        if missing:
            # keep rates non-zero while Prometheus catches up
            asyncio.run(_load(url, 4, 32, concurrency=4, model="vision", image_every=2))
            time.sleep(1)
    assert not missing, f"{len(missing)} panel queries returned no data, e.g. {missing[:3]}"


def test_load_ramp_scales_1_to_2_and_back(deploy_app):
    """The policy's input is what the test controls, not the machine's speed: the engine runs one request at a
    time (``max_running`` 1), so while ``CLIENTS`` clients keep sending requests, the replica reports a queue of
    them, and queued canvases alone ask for more than one replica at any measured capacity (the replica is
    saturated, so it produces about its capacity, and the queue's drain rate comes on top). The load runs until
    the second replica is up (or a generous deadline passes), then stops; with no queue and no production the
    policy asks for one replica again."""
    from ray import serve

    clients = 6
    url = deploy_app("autoscale", {
        "replicas": {"num_cpus": 0.25, "capacity_prior_tokens_per_s": 50.0,
                     "autoscaling": {"min_replicas": 1, "max_replicas": 2, "target_utilization": 0.5,
                                     "smoothing_window_s": 4.0, "upscale_delay_s": 2.0,
                                     "downscale_delay_s": 6.0, "metrics_interval_s": 0.5}},
        "engine": {"kv_cache_memory": 16 << 20, "max_running": 1}})

    def replicas() -> int:
        status = serve.status().applications["autoscale"].deployments["ModelReplica"]
        return sum(n for state, n in status.replica_states.items() if str(state).endswith("RUNNING"))

    assert replicas() == 1

    async def load_until_scaled_up(deadline_s: float) -> tuple[int, list[int]]:
        scaled = asyncio.Event()
        codes: list[int] = []
        async with httpx.AsyncClient(timeout=300) as client:
            async def one_client(k: int) -> None:
                i = 0
                while not scaled.is_set():
                    r = await client.post(url + "/v1/completions", json={
                        "model": "tiny-random", "prompt": f"load {k}", "max_tokens": 64, "seed": 1000 * k + i})
                    codes.append(r.status_code)
                    i += 1

            workers = [asyncio.create_task(one_client(k)) for k in range(clients)]
            stop_at = time.monotonic() + deadline_s
            peak = 1
            while peak < 2 and time.monotonic() < stop_at and not any(w.done() for w in workers):
                peak = max(peak, await asyncio.to_thread(replicas))
                await asyncio.sleep(0.5)
            scaled.set()
            await asyncio.gather(*workers)  # each finishes its request in flight, then stops
        return peak, codes

    peak, codes = asyncio.run(load_until_scaled_up(deadline_s=300))
    assert codes and set(codes) == {200}, sorted(set(codes))
    assert peak == 2, "the deployment did not scale up within 300 s of sustained load"
    deadline = time.monotonic() + 180
    while replicas() > 1 and time.monotonic() < deadline:
        time.sleep(1)
    assert replicas() == 1, "the deployment did not scale back down within 180 s of the load stopping"
