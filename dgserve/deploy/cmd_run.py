"""``dgserve run``: deploy the OpenAI-compatible endpoint, on an embedded local Ray or an existing cluster."""

from __future__ import annotations

import argparse
import errno
import os
import signal
import socket
import threading
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from dgserve.config import DEFAULT_MODEL
from dgserve.deploy.cli_support import (
    DEVICES,
    EXECUTION_HELP,
    THREADS_HELP,
    UsageError,
    add_quantization_args,
    check_device,
    check_quantization,
    check_quantization_flags,
)
from dgserve.deploy.local_runs import LocalRun, register, unregister

# CPUs Ray reserves for a one-thread replica: a fraction, so that --replicas 4 fits a 2-core laptop's local Ray
ONE_THREAD_CPUS = 0.5


class RunArgs(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    model: str = DEFAULT_MODEL
    revision: str | None = None
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    replicas: int = Field(1, ge=1, le=1024)
    ep_size: int = Field(1, ge=1, le=64)
    address: str | None = None
    config: str | None = None
    dtype: str = "float32"
    device: str = "auto"
    threads: int = Field(1, ge=1, le=1024)
    kv_cache_memory: int | None = Field(None, ge=1 << 20)
    quantization: str = "none"
    fp8_emulation: bool = False
    vision: Literal["auto", "off"] = "auto"
    execution: Literal["auto", "exact", "fast"] = "auto"

    @field_validator("device")
    @classmethod
    def _known_device(cls, v: str) -> str:
        if v not in DEVICES:
            raise ValueError(f"{v!r} is not a device; use one of {', '.join(DEVICES)}")
        return v


def _deploy_config(args: RunArgs):
    from dgserve.config import DeployConfig
    from dgserve.deploy.serve_config import load_deploy_config

    if args.config:
        return load_deploy_config(args.config)  # errors name the file and the field, as `dgserve build` does
    return DeployConfig.from_args({
        "model": {"path": args.model, "revision": args.revision, "dtype": args.dtype, "device": args.device,
                  "vision": args.vision, "quantization": args.quantization, "fp8_emulation": args.fp8_emulation},
        # Ray sets a replica's torch threads (OMP_NUM_THREADS) from the CPUs it reserves: max(1, int(num_cpus))
        "replicas": {"num_replicas": args.replicas, "ep_size": args.ep_size,
                     "num_cpus": ONE_THREAD_CPUS if args.threads == 1 else float(args.threads)},
        "engine": {"kv_cache_memory": args.kv_cache_memory,  # None: the engine's default size
                   "execution": args.execution},
        "http": {"host": args.host, "port": args.port},
    })


def check_port_free(host: str, port: int) -> None:
    """Fail in one line, before Ray starts, when the HTTP port cannot be listened on (as Serve's proxy binds it:
    with SO_REUSEADDR, so only a listener, not a closing connection, makes it busy)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port))
    except socket.gaierror as exc:
        raise UsageError(f"--host {host}: not an address or a known host name ({exc.strerror})") from None
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise UsageError(f"port {port} on {host} is in use; stop what listens there or pick another --port") \
                from None
        if exc.errno == errno.EADDRNOTAVAIL:
            raise UsageError(f"--host {host}: not an address of this machine") from None
        if exc.errno == errno.EACCES:
            raise UsageError(f"port {port} on {host}: permission denied (ports below 1024 need privileges)") \
                from None
        raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror}") from None


def run(args: RunArgs) -> int:
    from dgserve.model.checkpoint import load_metadata

    if not args.config:
        check_quantization_flags(args.quantization, args.fp8_emulation)
    config = _deploy_config(args)
    embedded = args.address is None
    # everything a user can get wrong fails here, in one line, before Ray starts
    if embedded and config.model.device != "auto":  # on a cluster, the GPUs are the workers', not this machine's
        check_device(config.model.device)
    if embedded:  # FP8 matmuls need a CUDA GPU here; the CPU emulation only when asked for
        check_quantization(config.model.quantization, config.model.fp8_emulation, config.model.device,
                           config.model.dtype)
    load_metadata(config.model.path, config.model.revision, vision=config.model.vision)
    if embedded:  # on a cluster, the port is the head's
        check_port_free(config.http.host, config.http.port)

    from ray import serve

    from dgserve.cluster.local_ray import connect_ray, start_local_ray
    from dgserve.routing.app import build_app

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
    import ray

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    # for `dgserve status`; Ray's own default turns token authentication on (RAY_AUTH_MODE=token) at start
    register(LocalRun(os.getpid(), ray.get_runtime_context().gcs_address, url, config.name,
                      os.environ.get("RAY_AUTH_MODE")))
    try:
        print("status: dgserve status (on this machine); press Ctrl-C to stop", flush=True)
        stop.wait()
        print("shutting down", flush=True)
    finally:
        unregister(os.getpid())
    # Deleting the application drains its replicas; the controller and proxy then stop with the embedded Ray.
    # (serve.shutdown() would kill the controller under its own graceful_shutdown call, which Ray logs as a
    # failed task on every exit.)
    serve.delete(config.name)
    ray.shutdown()
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="serve the OpenAI-compatible API (embedded local Ray unless --address)",
                       description="Serve the OpenAI-compatible API: start an embedded local Ray (or join an "
                                   "existing cluster with --address), deploy the model and print the URL and a curl "
                                   "line. Ctrl-C stops the embedded Ray.")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"checkpoint directory, preset or Hugging Face model id "
                                                          f"(default {DEFAULT_MODEL})")
    p.add_argument("--revision", help="with a Hugging Face model id: its branch, tag or commit (default main)")
    p.add_argument("--host", default="127.0.0.1", help="HTTP address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    p.add_argument("--replicas", type=int, default=1, help="model replicas (default 1)")
    p.add_argument("--ep-size", type=int, default=1, help="expert-parallel ranks per replica (default 1)")
    p.add_argument("--address", help="an existing Ray cluster (ray://... or HOST:PORT); default: start one")
    p.add_argument("--config", help="a deploy config YAML (overrides the flags above)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="weight and activation dtype (default float32)")
    p.add_argument("--device", default="auto", help=f"{', '.join(DEVICES)} (default auto: CUDA when there is a GPU)")
    p.add_argument("--threads", type=int, default=1,
                   help=THREADS_HELP.replace("torch CPU threads", "torch CPU threads per replica (Ray reserves as "
                                                                  "many CPUs)"))
    p.add_argument("--kv-cache-memory", type=int, default=None,
                   help="KV cache bytes per replica (default: what max_running sequences at the model's full context "
                        "need, at most half of the free memory)")
    add_quantization_args(p)
    p.add_argument("--vision", default="auto", choices=["auto", "off"],
                   help="auto: load the checkpoint's vision tower (if any) and accept images; off: text only")
    p.add_argument("--execution", default="auto", choices=["auto", "exact", "fast"], help=EXECUTION_HELP)
    p.set_defaults(handler=lambda ns: run(RunArgs(**ns)))
