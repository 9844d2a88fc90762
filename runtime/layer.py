"""The wrapper that replaces a target ``nn.Linear`` (or GPT-2 ``Conv1D``) in the base model.

It keeps the original layer as ``base_layer`` and holds every adapter attached to this layer,
of any method, plus the frozen tensors they share. Which adapter each batch row uses is read from
an :class:`AdapterState` shared by all wrappers of one model (vLLM's per-row adapter index; -1
means the base model):

    out0   = W0 x                      (once, no bias)
    result = out0 + bias + Σ_groups batched_delta(x, out0, members, row_index, shared)

where a group is the adapters present in the batch that share one frozen ``shared`` module.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .methods.base import AdapterWeights
from .targets import weight_out_in

HALF_DTYPES = (torch.float16, torch.bfloat16)


@dataclass
class AdapterState:
    """Which adapters a forward uses; one per :class:`~svda.runtime.model.AdapterModel`.

    ``names`` are the adapters addressed by ``row_index``; ``row_index`` is a (B,) long tensor of
    positions in ``names`` (-1: base model for that row) or None, meaning every row uses
    ``names[0]`` (or the base model when ``names`` is empty). ``merged`` names the adapter whose
    ΔW is currently added into the base weights."""

    names: tuple[str, ...] = ()
    row_index: torch.Tensor | None = None
    merged: str | None = None
    version: int = 0

    def set(self, names: Sequence[str], row_index: torch.Tensor | None) -> None:
        self.names, self.row_index = tuple(names), row_index
        self.version += 1


@dataclass
class _Group:
    key: str
    members: list[AdapterWeights]
    row_index: torch.Tensor | None  # positions in members, or -1


@dataclass
class _GroupCache:
    stamp: tuple = ()
    groups: list[_Group] = field(default_factory=list)


class AdapterLinear(nn.Module):
    def __init__(self, base_layer: nn.Module, layer_name: str, state: AdapterState):
        super().__init__()
        self.base_layer = base_layer
        self.layer_name = layer_name
        self.adapters = nn.ModuleDict()  # adapter name -> AdapterWeights
        self.shared = nn.ModuleDict()  # shared key -> frozen module (or empty nn.Module)
        self.adapter_keys: dict[str, str] = {}  # adapter name -> shared key
        self._state = state
        self._cache = _GroupCache()
        self._original_weight: torch.Tensor | None = None  # half-precision weight while merged
        self._layout_version = 0

    @property
    def weight(self) -> torch.Tensor:  # code that inspects ``layer.weight`` keeps working
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def weight_out_in(self) -> torch.Tensor:
        return weight_out_in(self.base_layer)

    def add(self, name: str, weights: AdapterWeights, key: str, shared: nn.Module | None) -> None:
        if key not in self.shared:
            self.shared[key] = shared if shared is not None else nn.Module()
        self.adapters[name] = weights
        self.adapter_keys[name] = key
        self._layout_version += 1

    def remove(self, name: str) -> None:
        del self.adapters[name]
        key = self.adapter_keys.pop(name)
        if key not in self.adapter_keys.values():
            del self.shared[key]
        self._layout_version += 1

    def frozen_identity(self, name: str) -> str:
        """Bit-level identity of the frozen tensors adapter ``name`` uses here ("none" if it
        uses none, "" if unknown)."""
        shared = self.shared[self.adapter_keys[name]]
        has_frozen = any(True for _ in shared.buffers())
        return getattr(shared, "identity", "") if has_frozen else "none"

    def get_delta_weight(self, name: str) -> torch.Tensor:
        """ΔW of adapter ``name`` on this layer as ``(d1, d2)`` (the reference formula)."""
        return self.adapters[name].get_delta_weight(self.shared[self.adapter_keys[name]])

    @torch.no_grad()
    def merge(self, name: str) -> None:
        """Fold adapter ``name`` into the base weight (float64 arithmetic). A half-precision
        weight is copied first: subtracting ΔW again would not restore it within its rounding."""
        weight = self.weight_out_in()
        if weight.dtype in HALF_DTYPES:
            self._original_weight = weight.detach().clone()
        self.adapters[name].merge_into(weight, self.shared[self.adapter_keys[name]])

    @torch.no_grad()
    def unmerge(self, name: str) -> None:
        """Take adapter ``name`` out of the base weight again (bit-exact for half precision)."""
        weight = self.weight_out_in()
        if self._original_weight is not None:
            weight.copy_(self._original_weight)
            self._original_weight = None
            return
        self.adapters[name].unmerge_from(weight, self.shared[self.adapter_keys[name]])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        state = self._state
        if not state.names or state.merged is not None:
            return self.base_layer(x)
        groups = self._groups(state)
        if not groups:
            return self.base_layer(x)
        out0 = F.linear(x, self.weight_out_in())
        result = out0 if self.bias is None else out0 + self.bias
        for group in groups:
            result = self._add_group_delta(result, group, x, out0)
        return result

    def _add_group_delta(
        self, result: torch.Tensor, group: _Group, x: torch.Tensor, out0: torch.Tensor
    ) -> torch.Tensor:
        cls = type(group.members[0])
        dtype = next(group.members[0].parameters()).dtype  # adapters may be float32 on a half base
        shared = self.shared[group.key]
        return cls.add_delta(
            result, x.to(dtype), out0.to(dtype), group.members, group.row_index, shared
        )

    def _groups(self, state: AdapterState) -> list[_Group]:
        stamp = (id(state), state.version, self._layout_version)
        if self._cache.stamp != stamp:
            self._cache = _GroupCache(stamp, self._build_groups(state))
        return self._cache.groups

    def _build_groups(self, state: AdapterState) -> list[_Group]:
        if state.row_index is None:
            name = state.names[0]
            if name not in self.adapters:
                return []
            return [_Group(self.adapter_keys[name], [self.adapters[name]], None)]
        by_key: dict[str, list[tuple[int, str]]] = {}
        for position, name in enumerate(state.names):
            if name in self.adapters:
                by_key.setdefault(self.adapter_keys[name], []).append((position, name))
        groups = []
        for key, entries in by_key.items():
            # lookup table: global position -> local member index; the extra last slot maps -1
            lut = torch.full(
                (len(state.names) + 1,), -1, dtype=torch.long, device=state.row_index.device
            )
            for local, (position, _) in enumerate(entries):
                lut[position] = local
            local_index = lut[state.row_index]
            if bool((local_index >= 0).any()):  # skip groups no row of this batch uses
                members = [self.adapters[name] for _, name in entries]
                groups.append(_Group(key, members, local_index))
        return groups
