"""svda.trainer: the bundled trainer (``svda-train``) that produces adapters into the store.

Python API: :func:`train` with a :class:`TrainConfig` returns a :class:`TrainResult`.

The names below are imported on first use, so ``svda-train`` can say what it is doing before
torch loads; :mod:`svda.trainer.loop` registers the methods' trainer hooks
(:mod:`svda.trainer.method_hooks`).
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "AdaLoraHooks": "method_hooks",
    "DataError": "data",
    "HookContext": "hooks",
    "LoraGaInit": "method_hooks",
    "TrainConfig": "config",
    "TrainConfigError": "config",
    "TrainResult": "loop",
    "TrainerHook": "hooks",
    "register_method_hooks": "hooks",
    "train": "loop",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'svda.trainer' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_WHERE])
