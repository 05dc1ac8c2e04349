"""``dgserve run``: deploy the OpenAI-compatible endpoint, on an embedded local Ray or an existing cluster."""

from __future__ import annotations

import argparse
import signal
import threading
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from dgserve.config import DEFAULT_MODEL
from dgserve.deploy.cli_support import UsageError


class RunArgs(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    model: str = DEFAULT_MODEL
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    replicas: int = Field(1, ge=1, le=1024)
    ep_size: int = Field(1, ge=1, le=64)
    address: str | None = None
    config: str | None = None
    dtype: str = "float32"
    kv_cache_memory: int | None = Field(None, ge=1 << 20)
    vision: Literal["auto", "off"] = "auto"


def _deploy_config(args: RunArgs):
    import yaml

    from dgserve.config import DeployConfig

    if args.config:
        path = Path(args.config)
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise UsageError(f"{path}: cannot read the deploy config: {exc}") from exc
        return DeployConfig.from_args(raw)
    return DeployConfig.from_args({
        "model": {"path": args.model, "dtype": args.dtype, "vision": args.vision},
        "replicas": {"num_replicas": args.replicas, "ep_size": args.ep_size, "num_cpus": 0.5},
        "engine": {"kv_cache_memory": args.kv_cache_memory},  # None: the engine's default size
        "http": {"host": args.host, "port": args.port},
    })


def run(args: RunArgs) -> int:
    from ray import serve

    from dgserve.cluster.local_ray import connect_ray, start_local_ray
    from dgserve.model.checkpoint import load_metadata
    from dgserve.routing.app import build_app

    config = _deploy_config(args)
    load_metadata(config.model.path, vision=config.model.vision)  # fail fast on a bad model, before starting Ray
    embedded = args.address is None
    if embedded:
        start_local_ray()
    else:
        connect_ray(args.address)
    serve.start(http_options={"host": config.http.host, "port": config.http.port})
    serve.run(build_app(config), name=config.name, route_prefix=config.route_prefix)
    url = f"http://{config.http.host}:{config.http.port}"
    model_id = config.model.model_id
    print(f"dgserve is serving {model_id} at {url}/v1", flush=True)
    print(f"try: curl {url}/v1/chat/completions -H 'Content-Type: application/json' "
          f"-d '{{\"model\": \"{model_id}\", \"messages\": [{{\"role\": \"user\", \"content\": \"Hello!\"}}], "
          f"\"max_tokens\": 64}}'", flush=True)
    if not embedded:
        print("deployed onto the existing cluster; it keeps serving after this command exits", flush=True)
        return 0
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    print("press Ctrl-C to stop", flush=True)
    stop.wait()
    print("shutting down", flush=True)
    serve.shutdown()
    import ray

    ray.shutdown()
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="serve the OpenAI-compatible API (embedded local Ray unless --address)")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"checkpoint directory or preset (default {DEFAULT_MODEL})")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--replicas", type=int, default=1)
    p.add_argument("--ep-size", type=int, default=1)
    p.add_argument("--address", help="an existing Ray cluster (ray://... or HOST:PORT); default: start one")
    p.add_argument("--config", help="a deploy config YAML (overrides the flags above)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--kv-cache-memory", type=int, default=None,
                   help="KV cache bytes per replica (default: what max_running sequences at the model's full context "
                        "need, at most half of the free memory)")
    p.add_argument("--vision", default="auto", choices=["auto", "off"],
                   help="auto: load the checkpoint's vision tower (if any) and accept images; off: text only")
    p.set_defaults(handler=lambda ns: run(RunArgs(**ns)))
