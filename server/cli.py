"""``svda``: the server's command line.

    svda serve                         # embedded SmolLM2-135M-Instruct, default store, :50051
    svda serve --model ./my-model --store /srv/store --port 6000 --tokens-file tokens.txt
    svda serve --config svda.yaml --print-settings
    svda cluster --replicas 2          # the same server over replicas on Ray Serve

Every setting of :class:`svda.server.settings.ServerSettings` is a flag; flags override
``SVDA_*`` environment variables, which override the config file. Optional settings take
``none`` to unset them (``--metrics-port none`` turns the metrics endpoint off).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import types
import typing
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from .settings import ConfigError, ServerSettings, load_settings

_TYPES = {int: int, float: float, str: str, Path: Path}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="svda", description="svda adapter serving runtime")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser(
        "serve",
        help="serve a base model and the adapters of a store over gRPC",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    serve.add_argument("--config", type=Path, help="YAML, TOML or JSON settings file")
    serve.add_argument(
        "--print-settings", action="store_true", help="print the effective settings and exit"
    )
    for name, field in ServerSettings.model_fields.items():
        kind, optional = _field_type(field.annotation)
        serve.add_argument(
            f"--{name.replace('_', '-')}",
            dest=name,
            type=_parse_optional(kind) if optional else kind,
            default=argparse.SUPPRESS,  # only flags given on the command line override
            metavar=name.upper(),
            help=f"{field.description} (default: {field.default})",
        )
    return parser


def _field_type(annotation: Any) -> tuple[type, bool]:
    """(the value type, whether None is allowed) of ``int``, ``int | None``, ``Path | None``..."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _TYPES[args[0]], True
    return _TYPES[annotation], False


def _parse_optional(kind: type):
    def parse(text: str) -> Any:
        return None if text.lower() in ("none", "off", "") else kind(text)

    parse.__name__ = kind.__name__  # argparse names the type in its error messages
    return parse


def settings_from_args(args: argparse.Namespace) -> ServerSettings:
    overrides = {k: v for k, v in vars(args).items() if k in ServerSettings.model_fields}
    return load_settings(args.config, **overrides)


def effective_settings(settings: ServerSettings) -> dict[str, Any]:
    """``settings`` as JSON values, with the defaults the server resolves filled in: the base
    model folder (the embedded SmolLM2's converted copy; it is converted on first serve) and the
    store root. Nothing is loaded or converted."""
    values = json.loads(settings.model_dump_json())
    if values.get("model") is None:
        from svda.runtime.base_model import DEFAULT_NAME, default_gguf_path, gguf_key
        from svda.runtime.errors import BaseModelError
        from svda.runtime.paths import svda_home

        try:
            key = gguf_key(default_gguf_path())
            values["model"] = str(svda_home().resolve() / "models" / f"{DEFAULT_NAME}-{key}")
        except BaseModelError as exc:
            print(f"svda serve: no default model: {exc}", file=sys.stderr)
    if values.get("store") is None:
        from svda.adapters_store.store_types import default_store_root

        values["store"] = str(default_store_root().expanduser().resolve())
    return values


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["cluster"]:  # svda cluster: replicas on Ray Serve (docs/cluster.md)
        from .cluster.cli import main as cluster_main

        return cluster_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        settings = settings_from_args(args)
    except (ValidationError, ConfigError) as exc:
        print(f"svda serve: invalid settings: {exc}", file=sys.stderr)
        return 2
    if args.print_settings:
        print(json.dumps(effective_settings(settings), indent=2))
        return 0
    configure_logging(settings.log_level)
    from .app import serve  # grpc, the engine and torch load only when serving

    try:
        serve(settings)
    except (OSError, ValueError) as exc:
        logging.getLogger("svda.server").error("cannot serve: %s", exc)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
