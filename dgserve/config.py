"""The deployment configuration: one pydantic model, ``DeployConfig``, with one default per setting.

It sits below ``replicas/`` and ``routing/`` so that each deployment can be constructed with only its slice
(``DeployConfig.replica_slice()``, ``DeployConfig.ingress_slice()``); ``deploy/`` renders it into Serve and
Helm configs, it does not own it.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from dgserve.engine.engine import EngineConfig
from dgserve.model.image_processing import ImageLimits

DEFAULT_MODEL = "tiny"  # the trained checkpoint shipped in the package (dgserve/model/assets/tiny)

PlacementPolicy = Literal["contiguous", "load_aware"]


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)


class ModelSettings(_Strict):
    path: str = Field(DEFAULT_MODEL, description="checkpoint directory (HF layout), preset name, or Hugging Face "
                      "model id (owner/name: resolved through the local Hub cache, HF_TOKEN, HF_HUB_OFFLINE)")
    revision: str | None = Field(None, description="with a Hugging Face model id: its branch, tag or commit "
                                 "(default main)")
    served_name: str | None = Field(None, description="model id in the API (default: a Hugging Face model id as "
                                    "given, else the path's last component)")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    quantization: Literal["none", "fp8"] = Field(
        "none", description="fp8: e4m3 weights with per-channel scales for the attention projections, dense MLP and "
        "experts, quantized at load time (W8A8 with per-token activation scales on CUDA compute capability >= 8.9, "
        "weight-only FP8 on older GPUs); an FP8 checkpoint is read as it is. On CUDA it needs dtype bfloat16")
    fp8_emulation: bool = Field(False, description="with quantization fp8: emulate the FP8 arithmetic (same rounding, "
                                "fp32 matmuls) instead of needing a GPU; slower than no quantization, for checks")
    vision: Literal["auto", "off"] = Field(
        "auto", description="auto: load the checkpoint's vision tower (if any) and accept image inputs; off: text "
        "only (no vision weights in memory; image parts are a 400)")

    @property
    def model_id(self) -> str:
        from dgserve.model.hub import is_hub_id  # clients name a Hub model by its id, as vLLM serves it

        if self.served_name:
            return self.served_name
        return self.path if is_hub_id(self.path) else self.path.rstrip("/").split("/")[-1]


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
    ep_placement: PlacementPolicy = Field(
        "load_aware", description="expert -> rank map, computed at (re)start from observed per-expert load")
    ep_num_redundant: int = Field(0, ge=0, description="extra expert copies that load_aware placement gives to the "
                                                       "hottest experts; (experts + copies) must divide by ep_size")
    ep_collective_timeout_s: float = Field(60.0, gt=0.0, description="an EP collective that takes longer fails the "
                                                                     "gang (Serve restarts it; requests fail over)")
    num_cpus: float = Field(1.0, ge=0.0)
    num_gpus: float = Field(0.0, ge=0.0, description="GPUs per rank (1 on GPU nodes)")
    max_ongoing_requests: int = Field(256, ge=1)
    health_check_period_s: float = Field(10.0, gt=0.0)
    capacity_prior_tokens_per_s: float = Field(
        200.0, gt=0.0, description="tokens/s a replica is assumed to sustain until it has measured its own")

    @model_validator(mode="after")
    def _check(self) -> ReplicaSettings:
        if self.ep_num_redundant and self.ep_placement != "load_aware":
            raise ValueError("ep_num_redundant copies the hottest experts: it needs ep_placement: load_aware")
        return self


class RouterSettings(_Strict):
    prefix_affinity: bool = Field(True, description="send a request to the replica that recently served its "
                                                    "prompt prefix (prefix-cache hits), load permitting")
    affinity_prefix_tokens: int = Field(256, ge=1, description="prompt tokens hashed for prefix affinity")
    overload_canvases: int = Field(64, ge=1, description="a replica with this many queued+active canvases is "
                                                         "skipped for affinity")
    max_failovers: int = Field(2, ge=0, description="resubmissions of a request after its replica dies or its "
                                                     "expert-parallel group fails")
    failover_backoff_s: float = Field(0.25, ge=0.0, description="wait before the 2nd resubmission, doubling "
                                                                "(at most 2 s) for each further one")


class IngressSettings(_Strict):
    max_body_bytes: int = Field(4 * 2**20, ge=1, description="Larger request bodies are answered 413.")
    request_timeout_s: float | None = Field(
        600.0, gt=0, description="Wall-clock limit per request: 408 before a stream starts, an error event after.")
    default_max_tokens: int | None = Field(
        None, ge=1, description="max_tokens when a request gives none (None: what is left of the context).")
    max_tokens_limit: int | None = Field(
        8192, ge=1, description="Largest max_tokens a request may ask for (more is a 400); also caps the default. "
        "None: only the context window limits it.")
    max_prompt_tokens: int | None = Field(
        None, ge=1, description="Longest prompt, in tokens, a request may send (longer is a 400). None: the context "
        "window less one token.")
    default_draft_every: int = Field(4, ge=1, description="Denoising steps between drafts when a request sets "
                                     "stream_drafts without draft_every.")
    max_concurrent_requests: int | None = Field(
        None, ge=1, description="Generation requests this ingress runs at once; more are answered 429 with "
        "Retry-After before their body is read. None: no limit here (the replicas' queues bound the load).")


class ImageFetchSettings(_Strict):
    """Operator settings for ``http(s)`` image URLs. Off unless ``enabled`` and the host is allow-listed.

    ``allowed_hosts`` entries: ``example.com`` (any port), ``example.com:8443``, or ``*.example.com``
    (its subdomains). The allow-list is the trust boundary: an allowed host is fetched whatever it resolves to.
    """

    enabled: bool = False
    allowed_hosts: tuple[str, ...] = ()
    max_bytes: int = Field(20 * 1024 * 1024, gt=0)
    timeout_s: float = Field(10.0, gt=0)  # the whole fetch, redirects included
    max_redirects: int = Field(3, ge=0, le=10)

    @field_validator("allowed_hosts", mode="before")
    @classmethod
    def _hosts_from_list(cls, v: Any) -> Any:
        return tuple(v) if isinstance(v, list) else v

    @field_validator("allowed_hosts")
    @classmethod
    def _check_hosts(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for entry in v:
            host, port = _split_host_entry(entry)
            if not host or "/" in entry or "*" in host[1:] or (host.startswith("*") and not host.startswith("*.")):
                raise ValueError(f"allowed_hosts entry {entry!r}: expected host, host:port or *.domain")
            if port is not None and not (port.isdigit() and 0 < int(port) < 65536):
                raise ValueError(f"allowed_hosts entry {entry!r}: bad port {port!r}")
        return tuple(e.lower() for e in v)

    def allows(self, host: str, port: int) -> bool:
        host = host.lower()
        for entry in self.allowed_hosts:
            name, entry_port = _split_host_entry(entry)
            if entry_port is not None and entry_port != str(port):
                continue
            if (name.startswith("*.") and host.endswith(name[1:])) or name == host:
                return True
        return False


def _split_host_entry(entry: str) -> tuple[str, str | None]:
    """``host``, ``host:port``, ``[v6]``, ``[v6]:port`` or a bare IPv6 address -> (host, port or None)."""
    if entry.startswith("["):
        host, _, rest = entry[1:].partition("]")
        return host, rest[1:] if rest.startswith(":") else None
    if entry.count(":") == 1:
        host, _, port = entry.partition(":")
        return host, port
    return entry, None


class ImageSettings(_Strict):
    """Image input limits and the http(s) fetch policy of a deployment."""

    limits: ImageLimits = ImageLimits()
    fetch: ImageFetchSettings = ImageFetchSettings()


class AuthSettings(_Strict):
    api_keys_file: str | None = Field(None, description="file with one 'name:key' per line")
    api_keys_env: str | None = Field(None, description="environment variable holding 'name:key,name2:key2'")
    max_concurrent_per_key: int = Field(64, ge=1)


class HttpSettings(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)


class ReplicaSlice(_Strict):
    """What a model replica (or one EP rank) is constructed with. No defaults here: they live in the
    ``DeployConfig`` parts above, and ``DeployConfig.replica_slice()`` copies them."""

    model: ModelSettings
    engine: EngineConfig
    ep_placement: PlacementPolicy
    ep_num_redundant: int
    ep_collective_timeout_s: float
    capacity_prior_tokens_per_s: float
    prefix_affinity: bool
    affinity_prefix_tokens: int
    request_timeout_s: float | None  # with engine.max_waiting unset, the queue is sized from it
    max_ongoing_requests: int


class IngressSlice(_Strict):
    """What the ingress deployment is constructed with (failover lives in ``router``)."""

    model: ModelSettings
    ingress: IngressSettings
    images: ImageSettings
    auth: AuthSettings
    router: RouterSettings


class DeployConfig(_Strict):
    name: str = "dgserve"
    route_prefix: str = "/"
    model: ModelSettings = ModelSettings()
    engine: EngineConfig = EngineConfig()
    replicas: ReplicaSettings = ReplicaSettings()
    router: RouterSettings = RouterSettings()
    ingress: IngressSettings = IngressSettings()
    images: ImageSettings = ImageSettings()
    auth: AuthSettings = AuthSettings()
    http: HttpSettings = HttpSettings()

    @model_validator(mode="after")
    def _check(self) -> DeployConfig:
        if self.model.fp8_emulation and self.model.quantization != "fp8":
            raise ValueError("model.fp8_emulation emulates FP8 weights: it needs model.quantization: fp8")
        if self.model.quantization == "fp8" and self.replicas.ep_size > 1:
            raise ValueError("model.quantization fp8 with replicas.ep_size > 1 is not supported yet (expert-parallel "
                             "ranks load bf16 experts); use ep_size 1 or quantization none")
        return self

    def serve_args(self) -> dict:
        """JSON-compatible ``args`` for the Serve application."""
        return self.model_dump(mode="json")

    @classmethod
    def from_args(cls, args: dict) -> DeployConfig:
        return cls.model_validate(args, strict=False)  # JSON/YAML carry ints for floats etc.

    def replica_slice(self) -> ReplicaSlice:
        r = self.replicas
        return ReplicaSlice(model=self.model, engine=self.engine, ep_placement=r.ep_placement,
                            ep_num_redundant=r.ep_num_redundant, ep_collective_timeout_s=r.ep_collective_timeout_s,
                            capacity_prior_tokens_per_s=r.capacity_prior_tokens_per_s,
                            prefix_affinity=self.router.prefix_affinity,
                            affinity_prefix_tokens=self.router.affinity_prefix_tokens,
                            request_timeout_s=self.ingress.request_timeout_s,
                            max_ongoing_requests=r.max_ongoing_requests)

    def ingress_slice(self) -> IngressSlice:
        return IngressSlice(model=self.model, ingress=self.ingress, images=self.images, auth=self.auth,
                            router=self.router)
