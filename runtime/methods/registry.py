"""The one registry of adapter methods: name -> (config class, weights class).

A new method lives in its own folder (``config.py`` + ``layer.py``) and is added here with
:func:`register_method`; nothing else in the runtime changes. Every linear-layer method must
answer ``serving_form`` (its per-layer serving form, ``runtime.serving_form``): registration
refuses one that does not.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import AdapterConfigError
from .base import AdapterConfig, AdapterWeights


@dataclass(frozen=True)
class MethodSpec:
    name: str
    config_cls: type[AdapterConfig]
    weights_cls: type[AdapterWeights]
    summary: str

    @property
    def has_serving_form(self) -> bool:
        """True for linear-layer methods (they compile to ``runtime.serving_form``); block-level
        methods (serial/parallel adapters) are served by the native engine only."""
        return self.weights_cls.target_kind == "linear"


_METHODS: dict[str, MethodSpec] = {}


def register_method(
    config_cls: type[AdapterConfig], weights_cls: type[AdapterWeights], summary: str
) -> MethodSpec:
    name = config_cls.method
    if not name or name != weights_cls.method:
        raise ValueError(
            f"config and weights disagree on the method name: {name!r} vs {weights_cls.method!r}"
        )
    if (
        weights_cls.target_kind == "linear"
        and weights_cls.serving_form is AdapterWeights.serving_form
        and not weights_cls.has_table_form()
    ):
        raise ValueError(
            f"linear method {name!r} must implement table_form or serving_form "
            "(runtime.serving_form): "
            "engines serve linear methods through it"
        )
    if name in _METHODS and _METHODS[name].weights_cls is not weights_cls:
        raise ValueError(f"method {name!r} is already registered")
    spec = MethodSpec(name, config_cls, weights_cls, summary)
    _METHODS[name] = spec
    return spec


def get_method(name: str) -> MethodSpec:
    try:
        return _METHODS[name]
    except KeyError:
        raise AdapterConfigError(
            f"unknown adapter method {name!r}; registered methods: {sorted(_METHODS)}"
        ) from None


def available_methods() -> list[str]:
    return sorted(_METHODS)


def linear_methods() -> list[str]:
    """Registered methods that compile to a per-layer serving form."""
    return sorted(name for name, spec in _METHODS.items() if spec.has_serving_form)


def config_from_dict(data: dict[str, Any]) -> AdapterConfig:
    """Rebuild any method's config from ``AdapterConfig.to_dict`` output."""
    if not isinstance(data, dict):
        raise AdapterConfigError(
            f"adapter config must be an object of fields, got {type(data).__name__}"
        )
    if "method" not in data:
        raise AdapterConfigError("adapter config has no 'method' field")
    if not isinstance(data["method"], str):
        raise AdapterConfigError(
            f"adapter config field 'method' must be a string, got {data['method']!r}; "
            f"registered methods: {sorted(_METHODS)}"
        )
    return get_method(data["method"]).config_cls.from_dict(data)
