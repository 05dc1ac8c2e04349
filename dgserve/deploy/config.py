"""The deployment configuration: one pydantic model that feeds ``build_app`` (Ray Serve), the Serve
config file written by ``dgserve build``, the Helm chart's ``serveConfigV2``, and ``dgserve run``.

A Serve config names ``dgserve.routing.app:app_builder`` as its import path and carries this model,
dumped to plain JSON types, as the application's ``args``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from dgserve.deploy.cli_support import DEFAULT_MODEL
from dgserve.engine.engine import EngineConfig
from dgserve.routing.image_prompts import ImageSettings
from dgserve.routing.ingress_app import IngressSettings

APP_IMPORT_PATH = "dgserve.routing.app:app_builder"


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)


class ModelSettings(_Strict):
    path: str = Field(DEFAULT_MODEL, description="checkpoint directory (HF layout) or preset name")
    served_name: str | None = Field(None, description="model id in the API (default: the path's last component)")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    vision: Literal["auto", "off"] = Field(
        "auto", description="auto: load the checkpoint's vision tower (if any) and accept image inputs; off: text "
        "only (no vision weights in memory; image parts are a 400)")

    @property
    def model_id(self) -> str:
        return self.served_name or self.path.rstrip("/").split("/")[-1]


class AutoscalingSettings(_Strict):
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(4, ge=1)
    target_utilization: float = Field(0.7, gt=0.0, le=1.0)
    smoothing_window_s: float = Field(30.0, gt=0.0)
    upscale_delay_s: float = Field(30.0, ge=0.0)
    downscale_delay_s: float = Field(300.0, ge=0.0)
    metrics_interval_s: float = Field(2.0, gt=0.0)

    @model_validator(mode="after")
    def _check(self) -> AutoscalingSettings:
        if self.max_replicas < self.min_replicas:
            raise ValueError(f"max_replicas ({self.max_replicas}) < min_replicas ({self.min_replicas})")
        return self


class ReplicaSettings(_Strict):
    num_replicas: int = Field(1, ge=1, description="fixed replica (or EP gang) count when autoscaling is off")
    autoscaling: AutoscalingSettings | None = None
    ep_size: int = Field(1, ge=1, description="expert-parallel ranks per model instance (a gang)")
    ep_placement: Literal["contiguous", "load_aware"] = Field(
        "load_aware", description="expert -> rank map, computed at (re)start from observed per-expert load")
    num_cpus: float = Field(1.0, ge=0.0)
    num_gpus: float = Field(0.0, ge=0.0, description="GPUs per rank (1 on GPU nodes)")
    max_ongoing_requests: int = Field(256, ge=1)
    health_check_period_s: float = Field(10.0, gt=0.0)
    capacity_prior_tokens_per_s: float = Field(
        200.0, gt=0.0, description="tokens/s a replica is assumed to sustain until it has measured its own")


class RouterSettings(_Strict):
    prefix_affinity: bool = True
    affinity_prefix_tokens: int = Field(256, ge=1, description="prompt tokens hashed for prefix affinity")
    overload_canvases: int = Field(64, ge=1, description="a replica with this many queued+active canvases is "
                                                         "skipped for affinity")
    max_failovers: int = Field(2, ge=0, description="resubmissions of a request after its replica dies or its "
                                                     "expert-parallel group fails")
    failover_backoff_s: float = Field(0.25, ge=0.0, description="wait before the 2nd resubmission, doubling "
                                                                "(at most 2 s) for each further one")


class AuthSettings(_Strict):
    api_keys_file: str | None = Field(None, description="file with one 'name:key' per line")
    api_keys_env: str | None = Field(None, description="environment variable holding 'name:key,name2:key2'")
    max_concurrent_per_key: int = Field(64, ge=1)


class HttpSettings(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)


class DeployConfig(_Strict):
    name: str = "dgserve"
    route_prefix: str = "/"
    model: ModelSettings = ModelSettings()
    engine: EngineConfig = EngineConfig(kv_cache_memory=1 << 30)
    replicas: ReplicaSettings = ReplicaSettings()
    router: RouterSettings = RouterSettings()
    ingress: IngressSettings = IngressSettings()
    images: ImageSettings = ImageSettings()
    auth: AuthSettings = AuthSettings()
    http: HttpSettings = HttpSettings()

    def serve_args(self) -> dict:
        """JSON-compatible ``args`` for the Serve application."""
        return self.model_dump(mode="json")

    @classmethod
    def from_args(cls, args: dict) -> DeployConfig:
        return cls.model_validate(args, strict=False)  # JSON/YAML carry ints for floats etc.
