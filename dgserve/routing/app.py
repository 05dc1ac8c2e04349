"""``build_app(config) -> serve.Application``: the Ingress (OpenAI API) in front of ModelReplica
deployments routed by the canvas-sharding router. ``app_builder(args)`` is the import path that Serve
config files (``dgserve build``, the Helm chart) name.
"""

from __future__ import annotations

import logging
from typing import Any

from ray import serve
from ray.exceptions import TaskCancelledError
from ray.serve.exceptions import RequestCancelledError

from dgserve.cluster.gang import gang_scheduling_config
from dgserve.config import DeployConfig, IngressSlice
from dgserve.model.checkpoint import load_metadata
from dgserve.replicas.ep_rank import EPModelReplica
from dgserve.replicas.metrics import ReplicaMetrics
from dgserve.replicas.model_replica import ModelReplica
from dgserve.routing.auth import APIKeyMiddleware, APIKeyStore, serve_key_counter
from dgserve.routing.autoscaling import autoscaling_config
from dgserve.routing.chat_backend import EngineChatBackend
from dgserve.routing.ingress_app import build_fastapi_app

log = logging.getLogger(__name__)

APP_IMPORT_PATH = "dgserve.routing.app:app_builder"
ROUTER_IMPORT_PATH = "dgserve.routing.replica_router:CanvasRouter"
INGRESS_DEPLOYMENT = "Ingress"
MODEL_DEPLOYMENT = "ModelReplica"
ROUTING_STATS_PERIOD_S = 1.0
INGRESS_MAX_ONGOING = 4096  # the ingress only relays; the replicas' queues and max_ongoing_requests bound load
INGRESS_CPUS = 0.1


@serve.ingress()
class Ingress:
    """HTTP entry point: validation, chat template, tokenization, streaming, failover."""

    def __init__(self, replica_handle, config: IngressSlice) -> None:
        self.config = config
        self.metadata = load_metadata(self.config.model.path, self.config.model.revision,
                                      vision=self.config.model.vision)
        self.metrics = ReplicaMetrics(self.config.model.model_id)
        self.backend = EngineChatBackend.over_serve(replica_handle, self.metadata, config,
                                                    on_failover=self.metrics.on_failover)
        self.keys = APIKeyStore.from_settings(self.config.auth)  # APIKeyError: a bad key file fails the deploy
        if self.keys is not None:
            log.info("API keys required on /v1: %s", ", ".join(self.keys.names))

    def __serve_build_asgi_app__(self):
        keys = self.keys
        app = build_fastapi_app(self.backend, self.config.ingress, authorize=keys.authorize if keys else None,
                                disconnect_errors=(TaskCancelledError, RequestCancelledError))
        metrics = self.metrics

        @app.middleware("http")
        async def count_rejections(request, call_next):
            response = await call_next(request)
            if response.status_code in (413, 429):
                metrics.on_rejected(response.status_code)
            return response

        if keys is not None:  # outermost: keys and per-key limits are checked before anything reads the body
            app.add_middleware(APIKeyMiddleware, keys=keys, max_concurrent=self.config.auth.max_concurrent_per_key,
                               on_response=serve_key_counter(self.config.model.model_id),
                               on_reject=metrics.on_rejected)
        return app


def deployment_options(config: DeployConfig) -> dict[str, dict[str, Any]]:
    """Every Serve option of the application's deployments, in plain JSON types, keyed by deployment name.

    The one place they are written: ``build_app`` applies them; ``dgserve build`` writes the same values as the
    Serve config's ``deployments`` (where operators see them); the Helm chart's ``serveConfigV2`` carries only
    the config, so Serve gets them from ``build_app`` when it builds the application in the cluster. Serve
    counts replicas: an expert-parallel gang of ``ep_size`` ranks is ``ep_size`` replicas.
    """
    r = config.replicas
    router = config.router
    model: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": r.num_cpus, "num_gpus": r.num_gpus},
        "max_ongoing_requests": r.max_ongoing_requests,
        "health_check_period_s": r.health_check_period_s,
        "request_router_config": {
            "request_router_class": ROUTER_IMPORT_PATH,
            "request_router_kwargs": {
                "prefix_affinity": router.prefix_affinity,
                "overload_canvases": router.overload_canvases,
                "affinity_prefix_tokens": router.affinity_prefix_tokens,
                "block_size": config.engine.block_size,
            },
            "request_routing_stats_period_s": ROUTING_STATS_PERIOD_S,
        },
    }
    if r.autoscaling is not None:
        model["autoscaling_config"] = autoscaling_config(r.autoscaling, gang_size=r.ep_size)
    else:
        model["num_replicas"] = r.num_replicas * r.ep_size
    if r.ep_size > 1:
        model["gang_scheduling_config"] = gang_scheduling_config(r.ep_size)
    ingress: dict[str, Any] = {"num_replicas": 1, "max_ongoing_requests": INGRESS_MAX_ONGOING,
                               "ray_actor_options": {"num_cpus": INGRESS_CPUS}}
    return {INGRESS_DEPLOYMENT: ingress, MODEL_DEPLOYMENT: model}


def replica_deployment(config: DeployConfig, replica_class: type[ModelReplica] | None = None) -> serve.Deployment:
    """The model deployment (EP ranks when ``ep_size > 1``), with its options; bind it with
    ``config.replica_slice()``. ``build_app`` puts the ingress in front of it; tests deploy it alone (and may
    give a subclass of the replica class, to observe it)."""
    replica_class = replica_class or (EPModelReplica if config.replicas.ep_size > 1 else ModelReplica)
    return serve.deployment(replica_class, name=MODEL_DEPLOYMENT, **deployment_options(config)[MODEL_DEPLOYMENT])


def build_app(config: DeployConfig) -> serve.Application:
    ingress = serve.deployment(Ingress, name=INGRESS_DEPLOYMENT, **deployment_options(config)[INGRESS_DEPLOYMENT])
    return ingress.bind(replica_deployment(config).bind(config.replica_slice()), config.ingress_slice())


def app_builder(args: dict) -> serve.Application:
    """Serve config entry point: ``import_path: dgserve.routing.app:app_builder`` with DeployConfig args."""
    return build_app(DeployConfig.from_args(args))
