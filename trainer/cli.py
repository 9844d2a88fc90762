"""``svda-train``: fine-tune an adapter and publish it into the store (or write a ``.svda`` file).

    svda-train --method svda --data train.jsonl --out acme
    svda-train --config run.yaml --lr 5e-4 --rank 16        # flags override the file
    torchrun --nproc-per-node 2 -m svda.trainer.cli --method lora --data train.jsonl --out-file a.svda

Training flags come from :class:`~svda.trainer.config.TrainConfig`. Method hyperparameters come
from every registered method's config dataclass, so a new method gets flags with no change here:
``--<method>-<field>`` always (``--svda-s-init``, ``--lora-alpha``) and a plain ``--<field>``
(``--targets``, ``--top-k``; ``--rank`` for ``r``) applied to whichever method is trained.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import types
import typing
from typing import Any

from svda.runtime import available_methods, get_method
from svda.runtime.errors import SvdaError

from .checkpointing import ResumeError
from .config import TrainConfig, TrainConfigError
from .data import DataError

ALIASES = {"r": "rank"}  # method field -> plain flag name
LIST_FIELDS = {"betas": float, "tags": str}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    try:
        config = config_from_args(args)
        from .loop import train  # imported late: --help stays fast

        train(config)
    except (TrainConfigError, DataError, ResumeError, SvdaError, OSError) as exc:
        print(f"svda-train: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "svda-train: interrupted; continue with the same flags plus --resume", file=sys.stderr
        )
        return 130
    return 0


# ----- parser -----------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="svda-train",
        description="Fine-tune an adapter (any registered method) on JSONL/CSV data.",
        argument_default=argparse.SUPPRESS,
    )
    parser.add_argument("--config", help="YAML/JSON file of settings; flags override it")
    _add_train_flags(parser.add_argument_group("training"))
    _add_method_flags(parser)
    return parser


def _add_train_flags(group: argparse._ArgumentGroup) -> None:
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        if f.name == "adapter":
            continue
        flag = "--" + f.name.replace("_", "-")
        kind, help_text = hints[f.name], f.metadata.get("help", "")
        if f.name == "method":
            help_text += f" Registered: {', '.join(available_methods())}."
        if kind is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, help=help_text)
        elif f.name in LIST_FIELDS:
            group.add_argument(flag, type=_list_of(LIST_FIELDS[f.name]), help=help_text + " (a,b)")
        else:
            group.add_argument(flag, type=_converter(kind), help=help_text)


def _add_method_flags(parser: argparse.ArgumentParser) -> None:
    """``--<method>-<field>`` for every method, and one plain ``--<field>`` per field name."""
    taken = {f.name for f in dataclasses.fields(TrainConfig)} | {"config"}
    plain: dict[str, list[str]] = {}
    for method in available_methods():
        group = parser.add_argument_group(f"{method} hyperparameters")
        for name, help_text in get_method(method).config_cls.describe().items():
            flag = f"--{method}-{name}".replace("_", "-")
            group.add_argument(
                flag, dest=f"method:{method}:{name}", metavar=name.upper(), help=help_text
            )
            plain.setdefault(name, []).append(f"{method}: {help_text}")
    group = parser.add_argument_group("hyperparameters of the trained method")
    for name, helps in plain.items():
        flag = ALIASES.get(name, name)
        if flag in taken:
            continue
        group.add_argument(
            "--" + flag.replace("_", "-"),
            dest=f"plain:{name}",
            metavar=name.upper(),
            help=" | ".join(helps),
        )


# ----- flags -> TrainConfig -----------------------------------------------------------------------
def config_from_args(args: dict[str, Any]) -> TrainConfig:
    """Settings from ``--config`` (if any), overridden by the flags given."""
    config_file = args.pop("config", None)
    train = {k: v for k, v in args.items() if ":" not in k}
    method = train.get("method")
    if method is None and config_file:
        from .config import read_config_file

        method = read_config_file(config_file).get("method")
    adapter = method_overrides(method or TrainConfig.method, args)
    overrides = {**train, "adapter": adapter}
    if config_file:
        return TrainConfig.from_file(config_file, overrides)
    return TrainConfig.from_dict(overrides)


def method_overrides(method: str, args: dict[str, Any]) -> dict[str, Any]:
    """Method hyperparameters from the flags, typed by the method's config dataclass."""
    try:
        config_cls = get_method(method).config_cls
    except SvdaError as exc:
        raise TrainConfigError(str(exc)) from None
    hints = typing.get_type_hints(config_cls)
    out: dict[str, Any] = {}
    for key, raw in args.items():
        kind, colon, rest = key.partition(":")
        if not colon:
            continue
        if kind == "plain":
            field = rest
        elif kind == "method":
            owner, _, field = rest.partition(":")
            if owner != method:
                raise TrainConfigError(
                    f"--{owner}-{field.replace('_', '-')} is a {owner} setting, "
                    f"but this run trains {method!r}"
                )
        else:
            continue
        if field not in hints:
            flag = ALIASES.get(field, field).replace("_", "-")
            raise TrainConfigError(
                f"--{flag} is not a hyperparameter of {method}; its hyperparameters are {sorted(hints)}"
            )
        out[field] = _parse(raw, hints[field], f"--{field}")
    return out


def _parse(raw: str, kind: Any, flag: str) -> Any:
    args = typing.get_args(kind)
    if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union:
        if type(None) in args and raw.strip().lower() in ("none", "null", ""):
            return None
        kind = next(a for a in args if a is not type(None))
    try:
        return _converter(kind)(raw)
    except (ValueError, TypeError) as exc:  # json.JSONDecodeError is a ValueError
        raise TrainConfigError(f"{flag}: cannot read {raw!r} as {kind.__name__}: {exc}") from None


def _converter(kind: Any):
    if kind is bool:
        return _bool
    if kind in (int, float, str):
        return kind
    if kind in (dict, list) or typing.get_origin(kind) in (dict, list):
        return json.loads  # e.g. --layer-ranks '{"model.layers.0.self_attn.q_proj": 4}'
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    if len(args) == 1:  # Optional[X]: "none" -> None
        inner = _converter(args[0])
        return lambda raw: None if raw.strip().lower() in ("none", "null") else inner(raw)
    return str


def _bool(raw: str) -> bool:
    low = raw.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true/false, got {raw!r}")


def _list_of(kind: type):
    return lambda raw: [kind(x) for x in raw.split(",") if x.strip()]


if __name__ == "__main__":
    sys.exit(main())
