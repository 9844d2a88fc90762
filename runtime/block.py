"""The wrapper for block-level adapters: around a whole attention or MLP module (docs/methods.md,
serial / parallel bottleneck adapters).

It shares :class:`~svda.runtime.layer.AdapterLinear`'s bookkeeping (attached modules, slot banks,
per-row groups) but its base is a module, not a weight:

    out0   = block(x, ...)            (its first output, if it returns a tuple)
    result = out0 + Σ_groups add_prepared(x, out0, ...)

so a method sees the block's input ``x`` and output ``out0``: a serial adapter transforms
``out0``, a parallel one ``x``. There is no ΔW, so these adapters neither merge nor reduce to a
weight; ``shape`` is (hidden, hidden).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .errors import AdapterStateError
from .layer import AdapterLinear, AdapterState


class AdapterBlock(AdapterLinear):
    def __init__(self, base_layer: nn.Module, layer_name: str, state: AdapterState, hidden: int):
        super().__init__(base_layer, layer_name, state)
        self.hidden = hidden

    @property
    def weight(self) -> torch.Tensor:
        raise AdapterStateError(f"{self.layer_name} is a block, not a linear layer: no weight")

    @property
    def bias(self) -> torch.Tensor | None:
        return None

    def weight_out_in(self) -> torch.Tensor:
        raise AdapterStateError(f"{self.layer_name} is a block, not a linear layer: no weight")

    @property
    def shape(self) -> tuple[int, int]:
        return self.hidden, self.hidden

    def merge(self, name: str) -> None:
        raise AdapterStateError(
            f"adapter {name!r} acts on block {self.layer_name} non-linearly and cannot be merged; "
            "serve it unmerged"
        )

    def unmerge(self, name: str) -> None:
        self.merge(name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        output = self.base_layer(*args, **kwargs)
        state = self._state
        if not state.names or state.merged is not None:
            return output
        groups = self._groups(state)
        if not groups:
            return output
        x = args[0] if args else kwargs["hidden_states"]
        out0 = output[0] if isinstance(output, tuple) else output
        result = out0
        for group in groups:
            result = self._add_group_delta(result, group, x, out0)
        return (result, *output[1:]) if isinstance(output, tuple) else result
