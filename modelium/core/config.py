"""Settings: built-in defaults < ``modelium.yaml`` < ``MODELIUM_*`` environment < CLI flags.

Every setting works with no config file at all. Memory sizes accept ``512MiB``, ``4GB`` or a
number of bytes. A bad value is a :class:`ConfigError` that names the setting, where it came
from and what is expected.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from modelium.core.limits import TenantLimits
from modelium.core.external import ExternalServer, check_external
from modelium.hardware import parse_bytes

ENV_PREFIX = "MODELIUM_"
DEFAULT_CONFIG_FILE = "modelium.yaml"


class ConfigError(ValueError):
    pass


class ClusterSettings(BaseModel):
    """Models' workers on the nodes of a Ray cluster (``modelium serve --ray ADDRESS``;
    :mod:`modelium.backends.ray`): ``ray`` is the cluster's address (``HOST:PORT`` or ``auto``);
    ``worker_cpus`` the CPUs each worker asks of Ray; ``ready_timeout_s`` how long a worker may
    take to be placed and loaded."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    ray: str | None = Field(None, min_length=1)
    worker_cpus: float = Field(1.0, ge=0)
    ready_timeout_s: float = Field(300.0, gt=0)


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    models_dirs: list[Path] = Field(default_factory=lambda: [Path("models")])
    db: Path = Path("modelium.db")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)

    # devices
    cpu_memory: int | None = None  # bytes Modelium may use on the CPU (default: half the RAM)
    gpu_memory_fraction: float = Field(0.9, gt=0, le=1)
    gpu_memory_reserve: int | None = None  # bytes held back on each GPU (instead of the fraction)
    device_sample_s: float = Field(30.0, gt=0)  # how often each device's memory is sampled
    device_sample_threshold: float = Field(0.05, gt=0, lt=1)  # a sample is logged when it moved this much
    fake_gpus: str | None = None  # e.g. "2x24GiB": fake GPUs for trying placement without one
    # host memory that parked models' weights may hold (0: models are never parked, only evicted);
    # offered only with a GPU: a victim on a GPU whose worker can park keeps its weights there
    park_host_bytes: int = Field(0, ge=0)
    use_gpus: bool = True
    cluster: ClusterSettings = Field(default_factory=ClusterSettings)  # {ray: ADDRESS}: devices of a Ray cluster

    # the brain
    policy: str = "cost-aware"
    policy_settings: dict[str, Any] = Field(default_factory=dict)  # the policy's own (`modelium policies`)
    keep_alive_s: float = Field(300.0, ge=0)
    retry_failed_s: float = Field(30.0, ge=0)
    tick_s: float = Field(5.0, gt=0)

    # the watcher and analysis
    scan_interval_s: float = Field(2.0, gt=0)
    settle_s: float = Field(1.0, ge=0)
    allow_pickle: bool = False
    trust_remote_code: bool = False
    context_tokens: int | None = Field(None, gt=0)
    concurrency: int = Field(1, ge=1)
    runtime_overhead: int = 384 * 2**20
    # once loaded, a model's measured footprint replaces its estimate in the device's ledger
    measured_memory: bool = True
    # a loaded worker on the CPU whose resident memory exceeds its grant (what the device's ledger
    # holds for it) by more than memory_margin (a fraction) is stopped as `oom`; checked every
    # memory_watch_s seconds (0: not watched)
    memory_watch_s: float = Field(1.0, ge=0)
    memory_margin: float = Field(0.25, ge=0)

    # requests and runners
    request_timeout_s: float = Field(300.0, gt=0)
    max_inflight: int = Field(64, ge=1)  # requests one model's worker serves at once (they batch)
    max_queue: int = Field(256, ge=1)  # requests that may wait for one model; more get a 429
    max_body: int = Field(4 * 2**20, ge=1024)  # bytes of a request body; more get a 413
    batch_wait_ms: float = Field(2.0, ge=0)  # embeddings/classification: a lone input waits this long for company
    batch_max_size: int = Field(32, ge=1)  # embeddings/classification: inputs per forward pass
    job_concurrency: int = Field(4, ge=1)  # asynchronous jobs (/v1/jobs) run at once
    job_retention_s: float = Field(86400.0, gt=0)  # a finished job's result is kept this long
    drain_s: float = Field(30.0, ge=0)
    spare_workers: int = Field(1, ge=0)
    # torch threads of a worker running on the CPU. Default: a generating worker takes all cores
    # but one, which is left to the server (it relays every token as it comes, and a decode step
    # is too small to gain from the last core); an encoder's batches take every core
    worker_threads: int | None = Field(None, ge=1)
    # the vLLM backend (modelium.backends.vllm): the program run as `COMMAND serve ...` (split as a
    # shell would), extra arguments for every server (split likewise), how long a server may take to
    # answer /health, and whether servers start with sleep mode (parking)
    vllm_command: str = Field("vllm", min_length=1)
    vllm_args: str = ""
    vllm_ready_timeout_s: float = Field(600.0, gt=0)
    vllm_sleep_mode: bool = False

    # the event log
    synchronous: Literal["NORMAL", "FULL"] = "NORMAL"
    snapshot_every: int = Field(50_000, ge=0)  # events between registry snapshots (0: only at shutdown)
    retention_s: float | None = Field(7 * 86400.0, gt=0)  # request events older than this are rolled up
    compact_every_s: float = Field(3600.0, gt=0)
    # /ws/events: a heartbeat after this many idle seconds; a consumer with more live events than
    # events_buffer not yet sent is closed (code 4008) with where to resume
    events_heartbeat_s: float = Field(15.0, gt=0)
    events_buffer: int = Field(10_000, ge=1)

    # API keys and tenants (modelium.api.auth): without keys a server serves only on loopback,
    # unless insecure; limits per tenant (tenant_limits[tenant], else default_limits)
    insecure: bool = False
    tenant_limits: dict[str, TenantLimits] = Field(default_factory=dict)
    default_limits: TenantLimits = Field(default_factory=TenantLimits)
    # the router's queues: weights of fair queueing over tenants (default 1 each), and a tenant's
    # default priority class (default 0; higher classes are dispatched first)
    tenant_shares: dict[str, float] = Field(default_factory=dict)
    tenant_priorities: dict[str, int] = Field(default_factory=dict)
    # names that route to weighted versions (A/B, canaries) and a shadow model (modelium.core.aliases):
    # {ALIAS: {"versions": {MODEL: weight, ...}, "shadow": MODEL or null}}
    aliases: dict[str, Any] = Field(default_factory=dict)
    # OpenAI-compatible endpoints served next to the local models (modelium.core.external):
    # [{name, url, api_key_env, models: [ids]}], health-checked every external_health_s
    external: list[ExternalServer] = Field(default_factory=list)
    external_health_s: float = Field(10.0, gt=0)

    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["text", "json"] = "text"  # json: one JSON object per log line (modelium.logformat)

    @model_validator(mode="after")
    def _policy(self) -> "Settings":
        from modelium.core.policies import OFFLINE, configured_policy

        if self.policy in OFFLINE:
            raise ValueError(f"policy {self.policy!r} knows the future: it runs in simulations only "
                             f"(`modelium replay simulate --policy {self.policy}`)")
        try:
            configured_policy(self.policy, self.policy_settings, keep_alive_s=self.keep_alive_s,
                              retry_failed_s=self.retry_failed_s)
        except ValueError as e:
            raise ValueError(f"policy: {e}") from None
        return self

    @field_validator("tenant_limits", "default_limits", "policy_settings", "tenant_shares", "tenant_priorities",
                     "aliases", "external", "cluster", mode="before")
    @classmethod
    def _yaml_text(cls, v: Any) -> Any:
        if not isinstance(v, str):
            return v
        try:  # from the environment: YAML or JSON text
            return yaml.safe_load(v)
        except yaml.YAMLError as e:
            raise ValueError(f"not valid YAML or JSON: {e}") from None

    @field_validator("aliases")
    @classmethod
    def _aliases(cls, v: dict[str, Any]) -> dict[str, Any]:
        from modelium.core.aliases import check_aliases

        return {name: a.to_dict() for name, a in check_aliases(v).items()}

    @field_validator("external")
    @classmethod
    def _external(cls, v: list[ExternalServer], info) -> list[ExternalServer]:
        return check_external(v, aliases=(info.data.get("aliases") or {}).keys())

    @field_validator("tenant_shares")
    @classmethod
    def _shares(cls, v: dict[str, float]) -> dict[str, float]:
        from modelium.core.routing import check_shares

        return check_shares(v)

    @field_validator("cpu_memory", "gpu_memory_reserve", "runtime_overhead", "max_body", "park_host_bytes",
                     mode="before")
    @classmethod
    def _bytes(cls, v: Any) -> Any:
        if v is None or isinstance(v, int):
            return v
        try:
            return parse_bytes(v)
        except ValueError as e:
            raise ValueError(str(e)) from None

    @field_validator("models_dirs", mode="before")
    @classmethod
    def _dirs(cls, v: Any) -> Any:
        if isinstance(v, (str, Path)):
            return [p for p in str(v).split(os.pathsep) if p]
        return v

    @field_validator("synchronous", mode="before")
    @classmethod
    def _upper(cls, v: Any) -> Any:
        return v.upper() if isinstance(v, str) else v


FIELDS = set(Settings.model_fields)


def _from_env(env: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in env.items():
        if not key.startswith(ENV_PREFIX):
            continue
        name = key[len(ENV_PREFIX):].lower()
        if name in FIELDS:
            out[name] = value
    return out


def _from_file(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e}") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of settings, not {type(data).__name__}")
    unknown = sorted(set(data) - FIELDS)
    if unknown:
        raise ConfigError(f"config file {path}: unknown setting(s) {', '.join(unknown)}")
    return data


def load_settings(
    *,
    config_file: str | Path | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Merge the sources (later wins) and validate. ``config_file`` None: ./modelium.yaml if present."""
    env = os.environ if env is None else env
    merged: dict[str, Any] = {}
    sources: dict[str, str] = {}
    path = Path(config_file) if config_file is not None else Path(DEFAULT_CONFIG_FILE)
    if config_file is not None or path.exists():
        if not path.exists():
            raise ConfigError(f"config file {path} does not exist")
        for k, v in _from_file(path).items():
            merged[k], sources[k] = v, str(path)
    for k, v in _from_env(env).items():
        merged[k], sources[k] = v, f"${ENV_PREFIX}{k.upper()}"
    for k, v in (overrides or {}).items():
        if v is not None:
            merged[k], sources[k] = v, "the command line"
    try:
        return Settings(**merged)
    except ValidationError as e:
        problems = []
        for err in e.errors():
            msg = str(err["msg"]).removeprefix("Value error, ")
            if not err["loc"]:  # a rule across settings (the policy and its settings)
                where = ", ".join(f"{k} from {sources[k]}" for k in ("policy", "policy_settings") if k in sources)
                problems.append(f"{msg} ({where or 'defaults'})")
                continue
            field = ".".join(str(x) for x in err["loc"])
            top = str(err["loc"][0])
            problems.append(f"{field} (from {sources.get(top, 'defaults')}): {msg}")
        raise ConfigError("invalid settings: " + "; ".join(problems)) from None
