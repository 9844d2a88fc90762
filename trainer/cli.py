"""``svda-train``: fine-tune an adapter and publish it into the store (or write a ``.svda`` file).

    svda-train --method svda --data train.jsonl --out acme
    svda-train --config run.yaml --lr 5e-4 --rank 16        # flags override the file
    torchrun --nproc-per-node 2 -m svda.trainer.cli --method lora --data train.jsonl --out-file a.svda

Training flags come from :class:`~svda.trainer.config.TrainConfig`. Method hyperparameters come
from every registered method's config dataclass, so a new method gets flags with no change here:
``--<method>-<field>`` always (``--svda-s-init``, ``--lora-alpha``) and a plain ``--<field>``
(``--targets``, ``--top-k``; ``--rank`` for ``r``) applied to whichever method is trained.

It says what it is doing on stderr from the start (importing torch, loading and converting the
base, tokenizing, the SVD of the targeted weights), prints the summary on stdout at the end (with
or without ``--no-progress``), and on SIGINT/SIGTERM says whether a checkpoint is there to
``--resume`` from and exits 130/143. Only standard-library modules are imported before the first
status line.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import signal
import sys
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .config import TrainConfig

ALIASES = {"r": "rank"}  # method field -> plain flag name
LIST_FIELDS = {"betas": float, "tags": str}
PROG = "svda-train"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not {"-h", "--help"} & set(argv):
        _status("starting: importing torch and the adapter methods ...")
    args = vars(build_parser().parse_args(argv))
    from svda.runtime.errors import SvdaError

    from .checkpointing import ResumeError
    from .config import TrainConfigError
    from .data import DataError

    config = None
    try:
        config = config_from_args(args)
        from .loop import train  # imported late: the first status line comes before torch

        with _status_lines(), _signals_interrupt():
            result = train(config)
    except (TrainConfigError, DataError, ResumeError, SvdaError, OSError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        return _interrupted(exc, config)
    if result.is_main:
        from .report import format_summary

        print(format_summary(result.summary), flush=True)
    return 0


# ----- status lines, signals ------------------------------------------------------------------
def _status(message: str) -> None:
    if os.environ.get("RANK", "0") == "0":
        print(f"{PROG}: {message}", file=sys.stderr, flush=True)


class _StderrLines(logging.Handler):
    """The trainer's status lines on stderr (the stream of the moment: tests capture it)."""

    def emit(self, record: logging.LogRecord) -> None:
        _status(record.getMessage())


@contextlib.contextmanager
def _status_lines() -> Iterator[None]:
    logger, handler = logging.getLogger("svda.trainer"), _StderrLines()
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


class Interrupted(KeyboardInterrupt):
    """SIGTERM (or another stop signal) during training: unwinds like Ctrl-C."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextlib.contextmanager
def _signals_interrupt() -> Iterator[None]:
    """SIGTERM raises :class:`Interrupted` while training (SIGINT already raises
    KeyboardInterrupt); outside the main thread signals cannot be caught and stay as they are."""

    def handler(signum: int, frame: Any) -> None:
        raise Interrupted(signum)

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _interrupted(exc: KeyboardInterrupt, config: Any) -> int:
    """Say what was interrupted and what is left to resume from; 143 (SIGTERM) or 130."""
    signum = exc.signum if isinstance(exc, Interrupted) else signal.SIGINT
    what = f"{PROG}: interrupted by {signal.Signals(signum).name}"
    if config is None:
        _status_line(f"{what} before training started")
    else:
        from .checkpointing import list_checkpoints

        found = list_checkpoints(Path(config.output_dir) / "checkpoints")
        if found:
            _status_line(
                f"{what}; the last checkpoint is {found[-1]}: continue with the same flags "
                "plus --resume"
            )
        else:
            _status_line(
                f"{what}; no checkpoint was saved, so nothing can be resumed (--checkpoint-every "
                "N saves one every N steps)"
            )
    return 128 + int(signum)


def _status_line(message: str) -> None:
    if os.environ.get("RANK", "0") == "0":
        print(message, file=sys.stderr, flush=True)


# ----- parser -----------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    """Every TrainConfig field and every registered method's hyperparameters, with defaults."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Fine-tune an adapter (any registered method) on JSONL/CSV data. Each flag "
        "shows its default; method hyperparameters default to the method's own.",
        argument_default=argparse.SUPPRESS,
    )
    parser.add_argument("--config", help="YAML/JSON file of settings; flags override it")
    _add_train_flags(parser.add_argument_group("training"))
    _add_method_flags(parser)
    return parser


def _add_train_flags(group: argparse._ArgumentGroup) -> None:
    from svda.runtime import available_methods

    from .config import TrainConfig

    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        if f.name == "adapter":
            continue
        flag = "--" + f.name.replace("_", "-")
        kind, help_text = hints[f.name], f.metadata.get("help", "")
        if f.name == "method":
            help_text += f" Registered: {', '.join(available_methods())}."
        if f.name in LIST_FIELDS:
            help_text += " Comma-separated (a,b)."
        help_text += _default_text(f)
        if kind is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, help=help_text)
        elif f.name in LIST_FIELDS:
            group.add_argument(flag, type=_list_of(LIST_FIELDS[f.name]), help=help_text)
        else:
            group.add_argument(flag, type=_converter(kind), help=help_text)


def _add_method_flags(parser: argparse.ArgumentParser) -> None:
    """``--<method>-<field>`` for every method, and one plain ``--<field>`` per field name."""
    from svda.runtime import available_methods, get_method

    from .config import TrainConfig

    taken = {f.name for f in dataclasses.fields(TrainConfig)} | {"config"}
    plain: dict[str, list[str]] = {}
    for method in available_methods():
        group = parser.add_argument_group(f"{method} hyperparameters")
        for f in dataclasses.fields(get_method(method).config_cls):
            help_text = f.metadata.get("help", "") + _default_text(f)
            flag = f"--{method}-{f.name}".replace("_", "-")
            group.add_argument(
                flag, dest=f"method:{method}:{f.name}", metavar=f.name.upper(), help=help_text
            )
            plain.setdefault(f.name, []).append(f"{method}: {help_text}")
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


def _default_text(f: dataclasses.Field) -> str:
    """`` (default: X)`` for a dataclass field, unless its help already says its default."""
    help_text = f.metadata.get("help", "")
    if "default" in help_text.lower():
        return ""
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return ""
    if isinstance(value, bool):
        shown = "on" if value else "off"
    elif isinstance(value, list):
        shown = ",".join(map(str, value)) or "none"
    elif value is None or value == {}:
        shown = "none"
    else:
        shown = str(value)
    return f" (default: {shown.replace('%', '%%')})"


# ----- flags -> TrainConfig -----------------------------------------------------------------------
def config_from_args(args: dict[str, Any]) -> TrainConfig:
    """Settings from ``--config`` (if any), overridden by the flags given."""
    from .config import TrainConfig

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
    from svda.runtime import get_method
    from svda.runtime.errors import SvdaError

    from .config import TrainConfigError

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
        from .config import TrainConfigError

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
