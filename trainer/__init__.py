"""svda.trainer: the bundled trainer (``svda-train``) that produces adapters into the store.

Python API: :func:`train` with a :class:`TrainConfig` returns a :class:`TrainResult`.
"""

from .config import TrainConfig, TrainConfigError
from .data import DataError
from .hooks import HookContext, TrainerHook, register_method_hooks
from .loop import TrainResult, train
from .method_hooks import AdaLoraHooks, LoraGaInit  # registers the methods' hooks

__all__ = [
    "AdaLoraHooks",
    "DataError",
    "HookContext",
    "LoraGaInit",
    "TrainConfig",
    "TrainConfigError",
    "TrainResult",
    "TrainerHook",
    "register_method_hooks",
    "train",
]
