"""The base of every method's config: :class:`AdapterConfig` and the checks its fields pass.

A method's config is a dataclass of hyperparameters (``config_field`` gives each its help text),
JSON-serialisable (``to_dict`` / ``from_dict``) and validated on construction before anything is
allocated: every field has its annotated type (strictly, JSON-style), ints fit in int64, floats
are finite, and each method's ``validate`` checks ranges (``require_range``). Checks against the
target layers' shapes (``require_dim_bound``, ``check_rank_per_layer``,
``check_rank_any_layer``) run from ``AdapterWeights.check_targets`` once the targets are known.
Every failure is an :class:`AdapterConfigError` naming the field, its value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Union

from ..errors import AdapterConfigError
from ..targets import parse_targets

if TYPE_CHECKING:
    from .base import TargetInfo


def config_field(default: Any, help: str, **kwargs: Any) -> Any:
    """A dataclass field with help text (shown by ``AdapterConfig.describe`` and the CLIs)."""
    return field(default=default, metadata={"help": help}, **kwargs)


@dataclass
class AdapterConfig:
    """Fields common to every method. Subclasses add their own and extend ``validate``."""

    method: ClassVar[str] = ""

    targets: str = config_field(
        "q_proj,v_proj",
        "Layers to adapt: comma-separated name suffixes ('q_proj,v_proj'), 're:<regex>' on the "
        "full layer name, or 'all-linear' (every linear layer except the output head).",
    )

    def __post_init__(self) -> None:
        if isinstance(self.targets, (list, tuple)) and all(
            isinstance(t, str) for t in self.targets
        ):
            self.targets = ",".join(self.targets)
        check_field_types(self)
        self.validate()

    def validate(self) -> None:
        parse_targets(self.targets)

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AdapterConfig:
        if not isinstance(data, dict):
            raise AdapterConfigError(
                f"{cls.method} config must be an object of fields, got {type(data).__name__}"
            )
        data = dict(data)
        method = data.pop("method", cls.method)
        if method != cls.method:
            raise AdapterConfigError(f"config is for method {method!r}, not {cls.method!r}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise AdapterConfigError(
                f"unknown {cls.method} config fields {unknown}; known: {sorted(known)}"
            )
        return cls(**data)

    @classmethod
    def describe(cls) -> dict[str, str]:
        """Field name -> help text."""
        return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}


def require(condition: bool, message: str) -> None:
    """Raise :class:`AdapterConfigError` with ``message`` unless ``condition`` holds."""
    if not condition:
        raise AdapterConfigError(message)


# ----- field checks (run before any allocation) ------------------------------------------------
INT_LIMIT = 2**63  # every int field lies in (-2**63, 2**63): seeds are int64 generator seeds
MAX_DIM = 2**20  # no target layer is wider: ranks, bottlenecks, block sizes stay below it
MAX_BUTTERFLY_FACTORS = 20  # 2^(m-1) blocks of size ≥ 2 fit in MAX_DIM features only for m ≤ 20


def _type_name(hint: Any) -> str:
    if hint is type(None):
        return "null"
    if typing.get_origin(hint) in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(hint))
    if typing.get_origin(hint) is dict:
        key, value = typing.get_args(hint)
        return f"an object of {_type_name(key)} -> {_type_name(value)}"
    names = {bool: "true/false", int: "an integer", float: "a number", str: "a string"}
    return names.get(hint, getattr(hint, "__name__", str(hint)))


def value_has_type(value: Any, hint: Any) -> bool:
    """Strict JSON-style type test: bool is not an int, an int is not a str; a float field
    accepts an int (``16`` for ``16.0``) but not a bool."""
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        return any(value_has_type(value, a) for a in typing.get_args(hint))
    if origin is dict:
        key, item = typing.get_args(hint)
        return isinstance(value, dict) and all(
            value_has_type(k, key) and value_has_type(v, item) for k, v in value.items()
        )
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    return isinstance(value, hint)


def _check_number(method: str, name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    if isinstance(value, int):
        require(
            -INT_LIMIT < value < INT_LIMIT,
            f"{method} {name}={value!r} is out of range: integers must lie in (-2**63, 2**63)",
        )
    else:
        require(math.isfinite(value), f"{method} {name} must be a finite number, got {value!r}")


@functools.cache
def _type_hints(cls: type) -> dict[str, Any]:
    """The resolved annotations of a config class (resolving them evaluates strings: slow)."""
    return typing.get_type_hints(cls)


def check_field_types(config: AdapterConfig) -> None:
    """Every dataclass field of ``config`` has its annotated type (strictly), ints fit in
    int64 and floats are finite; else :class:`AdapterConfigError` naming field and value."""
    hints = _type_hints(type(config))
    method = config.method
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        hint = hints[f.name]
        require(
            value_has_type(value, hint),
            f"{method} config field {f.name!r} must be {_type_name(hint)}, got "
            f"{type(value).__name__} {value!r}; fix the adapter config",
        )
        for item in value.values() if isinstance(value, dict) else (value,):
            _check_number(method, f.name, item)


def require_range(
    config: AdapterConfig,
    name: str,
    low: float,
    high: float,
    *,
    high_open: bool = False,
    low_open: bool = False,
) -> None:
    """``low ≤ config.<name> ≤ high`` (``<`` where open), else an error naming the range."""
    value = getattr(config, name)
    above = value > low if low_open else value >= low
    below = value < high if high_open else value <= high
    interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    require(
        above and below,
        f"{config.method} {name}={value!r} is out of range: allowed {interval}",
    )


def require_dim_bound(
    config: AdapterConfig, name: str, value: int, bound: int, what: str, layer: str
) -> None:
    """A size field against a target's shape: ``value ≤ bound`` (``what`` names the bound)."""
    require(
        value <= bound,
        f"{config.method} {name}={value} is too large for layer {layer}: allowed "
        f"[1, {bound}] ({what}); lower {name} or leave that layer out of targets",
    )


def check_rank_per_layer(
    config: AdapterConfig, name: str, value: int, targets: Sequence[TargetInfo], factor: int = 1
) -> None:
    """``factor · value ≤ min(d_out, d_in)`` on every target (a LoRA-style rank)."""
    for t in targets:
        bound = min(t.d_out, t.d_in) // factor
        what = f"{factor}·{name} ≤ min(d_out, d_in) = {min(t.d_out, t.d_in)}"
        require_dim_bound(config, name, value, bound, what if factor > 1 else what[2:], t.name)


def check_rank_any_layer(
    config: AdapterConfig, name: str, value: int, targets: Sequence[TargetInfo]
) -> None:
    """``value ≤ max over targets of min(d_out, d_in)``: a rank each layer clamps to its own
    size, bounded by the largest useful one (more adds no component anywhere)."""
    widest = max(targets, key=lambda t: min(t.d_out, t.d_in))
    bound = min(widest.d_out, widest.d_in)
    what = "the largest min(d_out, d_in) over the targets; larger adds no rank"
    require_dim_bound(config, name, value, bound, what, widest.name)
