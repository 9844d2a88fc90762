"""Hook points for methods that need the trainer's cooperation.

The methods that exist now (SvdA, VeRA, LoRA) need none. Later ones plug in here without
touching the loop, by registering a factory for their method name:

* LoRA-GA initialises ``A0, B0`` from gradients of a few batches -> ``before_training`` (it can
  draw batches with ``ctx.sample_batches`` and compute losses with ``ctx.loss``);
* AdaLoRA prunes its rank budget, the hybrid method sets ``λ`` from gradient norms ->
  ``after_backward`` (gradients are present; returned numbers go into the step log and plot).

    >>> register_method_hooks("adalora", lambda config: [AdaLoraBudget(config)])
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from svda.runtime import AdapterModel

from .config import TrainConfig
from .distributed import DistInfo


@dataclass
class HookContext:
    """What a hook may use: the model, the adapter's parameters and ways to get data and loss."""

    config: TrainConfig
    model: AdapterModel
    adapter: str
    params: dict[str, torch.nn.Parameter]
    device: torch.device
    dist: DistInfo
    sample_batches: Callable[[int], Iterator[dict[str, torch.Tensor]]]  # n -> training batches
    loss: Callable[[dict[str, torch.Tensor]], torch.Tensor]  # batch -> mean token loss
    total_steps: int = 0  # optimizer steps of the whole run


class TrainerHook:
    """Override the methods you need; the defaults do nothing."""

    def before_training(self, ctx: HookContext) -> None:
        """Once, after the adapter is attached and before step 0 (not again on resume)."""

    def after_backward(self, ctx: HookContext, step: int) -> dict[str, float] | None:
        """Every step, after gradients are complete and before clipping and the update."""
        return None

    def on_step_end(self, ctx: HookContext, step: int, row: dict[str, Any]) -> None:
        """Every step, after the update, with the step's log row (``step`` is 1-based)."""

    def before_export(self, ctx: HookContext) -> None:
        """Once, after the last step and before the adapter is exported (every rank)."""


HookFactory = Callable[[TrainConfig], list[TrainerHook]]
_METHOD_HOOKS: dict[str, HookFactory] = {}


def register_method_hooks(method: str, factory: HookFactory) -> None:
    """Hooks that every training run of ``method`` gets."""
    _METHOD_HOOKS[method] = factory


def hooks_for(config: TrainConfig, extra: list[TrainerHook] | None = None) -> list[TrainerHook]:
    factory = _METHOD_HOOKS.get(config.method)
    return (factory(config) if factory else []) + list(extra or [])
