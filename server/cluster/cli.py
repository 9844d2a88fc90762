"""``svda cluster``: ``svda serve`` on a Ray Serve application of N engine replicas.

    svda cluster --replicas 2 --replica-cpus 1 --store /srv/store --port 50051
    svda cluster --ray-address auto --replicas 8 --tokens-file tokens.txt --tls-cert ... --tls-key ...

Every ``svda serve`` flag is accepted (the ingress is the same gRPC server: tenants, tokens, TLS,
store); the cluster flags are listed under "cluster". Modelled on ``svda.server.cli`` (same
flags from ``ServerSettings``) and on ``serve.run`` of a multiplexed deployment (docs/cluster.md).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import sys
from pathlib import Path

from pydantic import ValidationError

from ..cli import _field_type, _parse_optional, configure_logging
from ..settings import ConfigError, ServerSettings, load_settings
from .settings import ClusterSettings

_CLUSTER_FLAGS = {  # ClusterSettings field: help
    "replicas": "engine replicas (each holds the base model once)",
    "replica_cpus": "Ray CPUs per replica (fractions allowed)",
    "typical_adapter_bytes": "typical adapter size: adapters per replica = budget // this",
    "max_adapters": "adapters per replica (0: adapter_memory_bytes // typical_adapter_bytes)",
    "max_ongoing_requests": "requests one replica runs at once",
    "app_name": "Ray Serve application name",
    "ray_address": "Ray cluster to join (auto: the local node's; unset: start one)",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="svda cluster", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--config", type=Path, help="YAML, TOML or JSON server settings file")
    for name, field in ServerSettings.model_fields.items():
        kind, optional = _field_type(field.annotation)
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, default=argparse.SUPPRESS,
                            type=_parse_optional(kind) if optional else kind,
                            metavar=name.upper(), help=f"{field.description}")  # fmt: skip
    group = parser.add_argument_group("cluster")
    defaults = ClusterSettings()
    for f in dataclasses.fields(ClusterSettings):
        if f.name in _CLUSTER_FLAGS:
            value = getattr(defaults, f.name)
            kind = type(value) if value is not None else str
            group.add_argument(f"--{f.name.replace('_', '-')}", dest=f"cluster_{f.name}",
                               type=kind, default=value, metavar=f.name.upper(),
                               help=f"{_CLUSTER_FLAGS[f.name]} (default: {value})")  # fmt: skip
    return parser


def settings_from_args(args: argparse.Namespace) -> tuple[ServerSettings, ClusterSettings]:
    """The ingress's settings (flags > ``SVDA_*`` > config file) and the cluster's; the engine
    settings among the former go to every replica."""
    overrides = {k: v for k, v in vars(args).items() if k in ServerSettings.model_fields}
    settings = load_settings(args.config, **overrides)
    values = {k[len("cluster_") :]: v for k, v in vars(args).items() if k.startswith("cluster_")}
    values.update(engine=settings.engine, dtype=settings.dtype)  # the server's --engine, --dtype
    cluster = ClusterSettings(**values, engine_kwargs=settings.engine_kwargs())
    cluster.validate()
    return settings, cluster


def build_server(settings: ServerSettings, cluster: ClusterSettings):
    """Deploy the replicas on Ray and return the (not yet started) gRPC ingress around them."""
    from svda.adapters_store import AdapterStore

    from ..app import SvdaServer
    from .engine import ClusterEngine
    from .replica import deploy

    store = AdapterStore(settings.store)
    model = None if settings.model is None else str(Path(settings.model).expanduser().resolve())
    handle = deploy(cluster, model, str(store.root))
    engine = ClusterEngine(handle, store, cluster.app_name)
    return SvdaServer(settings, store=store, engine=engine)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings, cluster = settings_from_args(args)
    except (ValidationError, ConfigError, ValueError) as exc:
        print(f"svda cluster: invalid settings: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level)
    try:
        import ray  # noqa: F401
    except ImportError:
        print("svda cluster: Ray Serve is not installed; run server/cluster/install.sh",
              file=sys.stderr)  # fmt: skip
        return 2
    from ..app import serve_until_signal

    try:
        asyncio.run(serve_until_signal(build_server(settings, cluster)))
    except (OSError, ValueError, RuntimeError) as exc:
        logging.getLogger("svda.server").error("cannot serve the cluster: %s", exc)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
