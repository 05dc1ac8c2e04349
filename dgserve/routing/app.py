"""``build_app(config) -> serve.Application``: the Ingress (OpenAI API) in front of ModelReplica
deployments routed by the canvas-sharding router. ``app_builder(args)`` is the import path that Serve
config files (``dgserve build``, the Helm chart) name.
"""

from __future__ import annotations

import logging

from ray import serve
from ray.serve.config import RequestRouterConfig

from dgserve.deploy.config import DeployConfig
from dgserve.model.checkpoint import load_metadata
from dgserve.replicas.metrics import ReplicaMetrics
from dgserve.replicas.model_replica import ModelReplica
from dgserve.routing.auth import APIKeyMiddleware, APIKeyStore, serve_key_counter
from dgserve.routing.ingress_app import build_fastapi_app
from dgserve.routing.replica_backend import ReplicaBackend

log = logging.getLogger(__name__)

ROUTING_STATS_PERIOD_S = 1.0


@serve.ingress()
class Ingress:
    """HTTP entry point: validation, chat template, tokenization, streaming, failover."""

    def __init__(self, replica_handle, args: dict) -> None:
        self.config = DeployConfig.from_args(args)
        self.metadata = load_metadata(self.config.model.path, vision=self.config.model.vision)
        self.metrics = ReplicaMetrics(self.config.model.model_id)
        self.backend = ReplicaBackend(replica_handle, self.metadata, self.config, on_failover=self.metrics.on_failover)
        self.keys = APIKeyStore.from_settings(self.config.auth)  # APIKeyError: a bad key file fails the deploy
        if self.keys is not None:
            log.info("API keys required on /v1: %s", ", ".join(self.keys.names))

    def __serve_build_asgi_app__(self):
        keys = self.keys
        app = build_fastapi_app(self.backend, self.config.ingress, authorize=keys.authorize if keys else None)
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


def replica_options(config: DeployConfig) -> dict:
    r = config.replicas
    opts: dict = {
        "ray_actor_options": {"num_cpus": r.num_cpus, "num_gpus": r.num_gpus},
        "max_ongoing_requests": r.max_ongoing_requests,
        "health_check_period_s": r.health_check_period_s,
        "request_router_config": RequestRouterConfig(
            request_router_class="dgserve.routing.replica_router:CanvasRouter",
            request_router_kwargs={
                "overload_canvases": config.router.overload_canvases,
                "affinity_prefix_tokens": config.router.affinity_prefix_tokens,
                "block_size": config.engine.block_size,
            },
            request_routing_stats_period_s=ROUTING_STATS_PERIOD_S,
        ),
    }
    if r.autoscaling is not None:
        from dgserve.routing.autoscaling import autoscaling_config

        opts["autoscaling_config"] = autoscaling_config(r.autoscaling, gang_size=r.ep_size)
    else:
        opts["num_replicas"] = r.num_replicas * r.ep_size
    return opts


def build_app(config: DeployConfig) -> serve.Application:
    if config.replicas.ep_size > 1:
        from dgserve.cluster.gang import gang_scheduling_config
        from dgserve.replicas.model_replica import EPModelReplica

        opts = replica_options(config)
        opts["gang_scheduling_config"] = gang_scheduling_config(config.replicas.ep_size)
        replica = serve.deployment(EPModelReplica, name="ModelReplica", **opts)
    else:
        replica = serve.deployment(ModelReplica, name="ModelReplica", **replica_options(config))
    ingress = serve.deployment(Ingress, name="Ingress", num_replicas=1, max_ongoing_requests=4096,
                               ray_actor_options={"num_cpus": 0.1})
    return ingress.bind(replica.bind(config.serve_args()), config.serve_args())


def app_builder(args: dict) -> serve.Application:
    """Serve config entry point: ``import_path: dgserve.routing.app:app_builder`` with DeployConfig args."""
    return build_app(DeployConfig.from_args(args))
