"""Server settings: defaults < config file < ``SVDA_*`` environment variables < CLI flags.

Every field is also a ``svda serve`` flag (``max_batch_size`` -> ``--max-batch-size``) and an
environment variable (``SVDA_MAX_BATCH_SIZE``). A config file (``--config FILE`` or
``SVDA_CONFIG``) is YAML, TOML or JSON (by suffix) with the same keys::

    # svda.yaml
    port: 50051
    store: /srv/svda/store
    tls_cert: /etc/svda/server.crt
    tls_key: /etc/svda/server.key
    tokens_file: /etc/svda/tokens.txt
    adapter_memory_bytes: 536870912
"""

from __future__ import annotations

import contextvars
import json
import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

DEFAULT_PORT = 50051
DEFAULT_METRICS_PORT = 9464
_config_file: contextvars.ContextVar[Path | None] = contextvars.ContextVar(
    "svda_config_file", default=None
)

ENGINE_FIELDS = (
    "max_batch_size", "max_waiting", "max_context_tokens", "max_new_tokens_limit",
    "adapter_memory_bytes", "svda_prune_tolerance", "merge_policy", "device",
)  # fmt: skip


ENGINES = ("native", "vllm")
DTYPES = ("float32", "bfloat16", "float16")


class ConfigError(ValueError):
    """The config file is unreadable or has unknown keys."""


class ServerSettings(BaseSettings):
    """Everything ``svda serve`` can be told; see the module docstring for the sources."""

    model_config = SettingsConfigDict(env_prefix="SVDA_", extra="forbid", validate_default=True)

    # what to serve
    model: str | None = Field(None, description="base model folder (default: embedded SmolLM2)")
    store: Path | None = Field(None, description="adapter store root (default: $SVDA_HOME/store)")
    # where
    host: str = Field("127.0.0.1", description="address to listen on (0.0.0.0: every interface)")
    port: int = Field(DEFAULT_PORT, ge=0, le=65535, description="gRPC port (0: a free port)")
    metrics_host: str = Field("127.0.0.1", description="address of the /metrics endpoint")
    metrics_port: int | None = Field(
        DEFAULT_METRICS_PORT, ge=0, le=65535, description="Prometheus port (0: free; unset: off)"
    )
    # security
    tls_cert: Path | None = Field(None, description="server certificate chain (PEM)")
    tls_key: Path | None = Field(None, description="server private key (PEM)")
    tls_client_ca: Path | None = Field(
        None, description="CA of client certificates (PEM): requires mutual TLS"
    )
    tokens_file: Path | None = Field(
        None, description="bearer tokens, one `TOKEN TENANT` per line (or YAML/JSON)"
    )
    admin_tenant: str = Field("admin", description="tenant whose tokens make admin calls")
    # limits
    max_upload_bytes: int = Field(64 << 20, gt=0, description="largest adapter upload")
    upload_stall_timeout_s: float = Field(
        30.0, gt=0, description="an upload that sends nothing for this long is cancelled"
    )
    max_concurrent_uploads: int = Field(
        4, gt=0, description="uploads at once; more are refused with RESOURCE_EXHAUSTED"
    )
    max_message_bytes: int = Field(8 << 20, gt=0, description="largest gRPC message")
    grace_s: float = Field(10.0, ge=0, description="seconds running RPCs get at shutdown")
    log_level: str = Field("INFO", description="DEBUG, INFO, WARNING or ERROR")
    # engine
    max_batch_size: int = Field(16, gt=0, description="rows in the running batch")
    max_waiting: int = Field(256, ge=0, description="queued requests before RESOURCE_EXHAUSTED")
    max_context_tokens: int = Field(0, ge=0, description="prompt + new tokens (0: the model's)")
    max_new_tokens_limit: int = Field(1024, gt=0, description="largest max_new_tokens")
    adapter_memory_bytes: int = Field(256 << 20, gt=0, description="adapter memory budget")
    svda_prune_tolerance: float = Field(
        0.05, ge=0, lt=1, description="SvdA δ pruning bound ε per layer (0: exact)"
    )
    merge_policy: str = Field("auto", description="auto, never or always-single (see the README)")
    device: str = Field("cpu", description="torch device of the base model")
    # engine backend (docs/engine.md; the vLLM one needs `make install-vllm`)
    engine: str = Field(
        "native", description="native (embedded default, block adapters) or vllm (vLLM AsyncLLM)"
    )
    dtype: str = Field("float32", description="base model dtype: float32, bfloat16 or float16")
    vllm_max_loras: int = Field(8, gt=0, description="vllm engine: adapters in one batch")
    vllm_max_compiled: int = Field(
        64, ge=0, description="vllm engine: compiled adapters kept on disk after they leave memory"
    )

    @field_validator(
        "model", "store", "metrics_port", "tls_cert", "tls_key", "tls_client_ca", "tokens_file",
        mode="before",
    )  # fmt: skip
    @classmethod
    def _none_words(cls, value: Any) -> Any:
        """``none``/``off`` (e.g. ``SVDA_METRICS_PORT=none``) unsets an optional setting."""
        if isinstance(value, str) and value.strip().lower() in ("none", "off", ""):
            return None
        return value

    @model_validator(mode="after")
    def _check_tls(self) -> ServerSettings:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("give both tls_cert and tls_key (or neither)")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("tls_client_ca (mutual TLS) needs tls_cert and tls_key")
        if self.engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, not {self.engine!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, not {self.dtype!r}")
        if self.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ValueError(
                f"log_level must be DEBUG, INFO, WARNING or ERROR, not {self.log_level}"
            )
        return self

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None

    def engine_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``svda.server.engine.EngineSettings``."""
        return {name: getattr(self, name) for name in ENGINE_FIELDS}

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, ConfigFileSource(settings_cls))


class ConfigFileSource(PydanticBaseSettingsSource):
    """Values of the config file named by :func:`load_settings` or ``$SVDA_CONFIG``."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        raise NotImplementedError  # __call__ is overridden

    def __call__(self) -> dict[str, Any]:
        path = _config_file.get() or os.environ.get("SVDA_CONFIG")
        return read_config_file(Path(path)) if path else {}


def read_config_file(path: Path) -> dict[str, Any]:
    """A config file as a dict (keys may use ``-`` or ``_``); unknown keys are an error."""
    path = path.expanduser()
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from exc
    suffix = path.suffix.lower()
    try:
        if suffix == ".toml":
            doc = _toml_loads(path, text)
        elif suffix == ".json":
            doc = json.loads(text)
        elif suffix in (".yaml", ".yml"):
            doc = yaml.safe_load(text) or {}
        else:
            raise ConfigError(f"config file {path}: use a yaml, yml, toml or json file (by suffix)")
    except (ValueError, yaml.YAMLError) as exc:  # TOMLDecodeError, JSONDecodeError: ValueError
        raise ConfigError(f"config file {path} is not valid {suffix[1:]}: {exc}") from exc
    if not isinstance(doc, dict):
        raise ConfigError(f"config file {path} must hold a mapping of setting -> value")
    values = {str(k).replace("-", "_"): v for k, v in doc.items()}
    unknown = sorted(set(values) - set(ServerSettings.model_fields))
    if unknown:
        raise ConfigError(
            f"config file {path}: unknown settings {unknown}; see `svda serve --help`"
        )
    return values


def _toml_loads(path: Path, text: str) -> dict[str, Any]:
    try:
        import tomllib  # Python 3.11+
    except ImportError:
        raise ConfigError(
            f"config file {path}: TOML needs Python 3.11+; use YAML or JSON"
        ) from None
    return tomllib.loads(text)


def load_settings(config_file: str | Path | None = None, **overrides: Any) -> ServerSettings:
    """Settings from the sources in order; ``overrides`` (e.g. CLI flags) win over everything."""
    token = _config_file.set(Path(config_file) if config_file else None)
    try:
        return ServerSettings(**overrides)
    finally:
        _config_file.reset(token)
