"""The engine seam: :class:`Engine` has exactly the signatures of the ServingEngine Protocol."""

from __future__ import annotations

import inspect

from svda.server.engine import Engine, ServingEngine

METHODS = [
    name
    for name, value in vars(ServingEngine).items()
    if not name.startswith("_") and callable(value)
]


def test_engine_matches_every_method_of_the_protocol():
    assert set(METHODS) >= {"submit", "info", "verify_adapter", "load_adapter", "pin_adapter"}
    for name in METHODS:
        wanted = inspect.signature(getattr(ServingEngine, name))
        got = inspect.signature(getattr(Engine, name))
        assert list(got.parameters) == list(wanted.parameters), name
        for param, spec in wanted.parameters.items():
            assert got.parameters[param].default == spec.default, (name, param)
            assert got.parameters[param].annotation == spec.annotation, (name, param)
        assert got.return_annotation == wanted.return_annotation, name


def test_a_double_without_every_method_is_not_an_engine():
    class Partial:
        def info(self):
            return None

    assert not isinstance(Partial(), ServingEngine)
    full = type("Full", (Partial,), {n: lambda self, *a, **k: None for n in METHODS})
    assert isinstance(full(), ServingEngine)
