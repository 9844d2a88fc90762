"""The wrapper that replaces a target ``nn.Linear`` (or GPT-2 ``Conv1D``) in the base model.

It keeps the original layer as ``base_layer`` and holds every adapter attached to this layer,
of any method, plus the frozen tensors they share. Which adapter each batch row uses is read from
an :class:`AdapterState` shared by all wrappers of one model (vLLM's per-row adapter index; -1
means the base model):

    out0   = W0 x                      (once, no bias)
    result = out0 + bias + Σ_groups add_table_delta(x, out0, tables, row_index, shared)

where a group is the adapters present in the batch that share one frozen ``shared`` module and
one storage: attached modules (tables stacked per forward) or a slot bank (``runtime.bank``,
tables are views made once).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .bank import AdapterBank, local_rows
from .methods.base import AdapterWeights
from .names import AdapterDict
from .serving_form.compile import compile_layer
from .serving_form.primitives import LayerForm
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
        """Choose the adapters; unchanged choices keep the layers' cached groups (decode)."""
        names = tuple(names)
        same_rows = (
            row_index is None
            if self.row_index is None
            else row_index is not None and torch.equal(row_index, self.row_index)
        )
        if names == self.names and same_rows:
            return
        self.names, self.row_index = names, row_index
        self.version += 1


@dataclass
class _Group:
    key: str  # shared key
    cls: type[AdapterWeights]
    row_index: torch.Tensor | None  # rows of the tables, -1 for the zero row; None: row 0
    members: list[AdapterWeights] = field(default_factory=list)  # module groups
    tables: dict[str, torch.Tensor] | None = None  # bank groups: views of the bank
    bank: tuple[AdapterBank, int] | None = None  # bank groups in a mixed batch: (bank, layer)
    prepared: dict | None = None  # bank groups: ``cls.prepare`` output, kept for a decode loop
    prepared_ndim: int = 0


@dataclass
class _GroupCache:
    stamp: tuple = ()
    groups: list[_Group] = field(default_factory=list)


class AdapterLinear(nn.Module):
    def __init__(self, base_layer: nn.Module, layer_name: str, state: AdapterState):
        super().__init__()
        self.base_layer = base_layer
        self.layer_name = layer_name
        self.adapters = AdapterDict()  # attached (trainable) adapters: name -> AdapterWeights
        self.shared = nn.ModuleDict()  # shared key -> frozen module (or empty nn.Module)
        self.adapter_keys: dict[str, str] = {}  # attached adapter name -> shared key
        self.banks: list[tuple[AdapterBank, int]] = []  # slot banks on this layer, our index
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

    @property
    def shape(self) -> tuple[int, int]:
        """(d1, d2) of the adapted map."""
        return tuple(self.weight_out_in().shape)

    # ----- membership -----------------------------------------------------------------------
    def add(self, name: str, weights: AdapterWeights, key: str, shared: nn.Module | None) -> None:
        self._add_shared(key, shared)
        self.adapters[name] = weights
        self.adapter_keys[name] = key
        self._layout_version += 1

    def remove(self, name: str) -> None:
        del self.adapters[name]
        self._drop_shared(self.adapter_keys.pop(name))
        self._layout_version += 1

    def add_bank(self, bank: AdapterBank, index: int, shared: nn.Module | None) -> None:
        self._add_shared(bank.shared_key, shared)
        self.banks.append((bank, index))
        self._layout_version += 1

    def remove_bank(self, bank: AdapterBank) -> None:
        self.banks = [(b, i) for b, i in self.banks if b is not bank]
        self._drop_shared(bank.shared_key)
        self._layout_version += 1

    def _add_shared(self, key: str, shared: nn.Module | None) -> None:
        if key not in self.shared:
            self.shared[key] = shared if shared is not None else nn.Module()

    def _drop_shared(self, key: str) -> None:
        if key not in self.adapter_keys.values() and all(
            b.shared_key != key for b, _ in self.banks
        ):
            del self.shared[key]

    def __contains__(self, name: str) -> bool:
        return name in self.adapters or self._bank_of(name) is not None

    def _bank_of(self, name: str) -> tuple[AdapterBank, int] | None:
        for bank, index in self.banks:
            if name in bank.slots:
                return bank, index
        return None

    def shared_of(self, name: str) -> nn.Module:
        if name in self.adapters:
            return self.shared[self.adapter_keys[name]]
        bank, _ = self._require_bank(name)
        return self.shared[bank.shared_key]

    def weights_of(self, name: str) -> AdapterWeights:
        """Adapter ``name``'s weights on this layer: the attached module, or for a banked
        adapter a module holding a copy of its slot (reference formula, merge, export)."""
        if name in self.adapters:
            return self.adapters[name]
        bank, index = self._require_bank(name)
        return bank.materialize(name, index, self.shared[bank.shared_key])

    def delta_norm_of(self, name: str) -> float:
        """‖ΔW‖_F of adapter ``name`` here, from its slot's tensors where the method can."""
        shared, fast = self.shared_of(name), self._slot_shortcut(name, "slot_delta_norm")
        if fast is not None:
            return fast(self.tensors_of(name), shared)
        return self.weights_of(name).delta_norm(shared)

    def serving_form_of(self, name: str) -> LayerForm:
        """Adapter ``name``'s one-slot serving form here (:func:`compile_layer`'s checks)."""
        shared, fast = self.shared_of(name), self._slot_shortcut(name, "slot_serving_form")
        if fast is not None:
            return fast(self.tensors_of(name), shared, self.bias)
        return compile_layer(self.weights_of(name), shared, self.bias)

    def _slot_shortcut(self, name: str, what: str) -> Callable | None:
        """A banked adapter's tensor-level classmethod ``what`` (None: attached modules, or a
        method without one; the caller builds the module then)."""
        found = None if name in self.adapters else self._bank_of(name)
        return None if found is None else getattr(found[0].weights_cls, what)

    def tensors_of(self, name: str) -> dict[str, torch.Tensor]:
        """Adapter ``name``'s trainable tensors here (parameters, or views of its bank slot)."""
        if name in self.adapters:
            return dict(self.adapters[name].named_parameters())
        bank, index = self._require_bank(name)
        return bank.layer_tensors(name, index)

    def _require_bank(self, name: str) -> tuple[AdapterBank, int]:
        found = self._bank_of(name)
        if found is None:
            raise KeyError(f"adapter {name!r} is not on layer {self.layer_name}")
        return found

    def frozen_identity(self, name: str) -> str:
        """Bit-level identity of the frozen tensors adapter ``name`` uses here ("none" if it
        uses none, "" if unknown)."""
        return self._identity(self.shared_of(name))

    def frozen_identity_of_key(self, key: str) -> str:
        return self._identity(self.shared[key])

    @staticmethod
    def _identity(shared: nn.Module) -> str:
        has_frozen = any(True for _ in shared.buffers())
        return getattr(shared, "identity", "") if has_frozen else "none"

    # ----- reference, merge ---------------------------------------------------------------
    def get_delta_weight(self, name: str) -> torch.Tensor:
        """ΔW of adapter ``name`` on this layer as ``(d1, d2)`` (the reference formula)."""
        return self.weights_of(name).get_delta_weight(self.shared_of(name))

    def get_delta_bias(self, name: str) -> torch.Tensor | None:
        """Change of this layer's bias by adapter ``name`` (None for most methods)."""
        return self.weights_of(name).get_delta_bias(self.shared_of(name))

    @torch.no_grad()
    def merge(self, name: str) -> None:
        """Fold adapter ``name`` into the base weight (float64 arithmetic). A half-precision
        weight is copied first: subtracting ΔW again would not restore it within its rounding."""
        weight = self.weight_out_in()
        if weight.dtype in HALF_DTYPES:
            self._original_weight = weight.detach().clone()
        weights, shared = self.weights_of(name), self.shared_of(name)
        weights.merge_into(weight, shared)
        self._merge_bias(weights.get_delta_bias(shared))

    @torch.no_grad()
    def unmerge(self, name: str) -> None:
        """Take adapter ``name`` out of the base weight again (bit-exact for half precision)."""
        weights, shared = self.weights_of(name), self.shared_of(name)
        self._unmerge_bias(weights.get_delta_bias(shared))
        weight = self.weight_out_in()
        if self._original_weight is not None:
            weight.copy_(self._original_weight)
            self._original_weight = None
            return
        weights.unmerge_from(weight, shared)

    def _merge_bias(self, delta: torch.Tensor | None) -> None:
        """``bias += Δb``; a layer without bias gets one (removed again on unmerge)."""
        self._created_bias = False
        self._original_bias = None
        if delta is None:
            return
        bias = self.base_layer.bias
        if bias is None:
            weight = self.base_layer.weight
            new = delta.detach().to(device=weight.device, dtype=weight.dtype).clone()
            self.base_layer.bias = nn.Parameter(new, requires_grad=False)
            self._created_bias = True
            return
        if bias.dtype in HALF_DTYPES:
            self._original_bias = bias.detach().clone()
        bias.copy_((bias.double() + delta.double()).to(bias.dtype))

    def _unmerge_bias(self, delta: torch.Tensor | None) -> None:
        if delta is None:
            return
        if getattr(self, "_created_bias", False):
            self.base_layer.bias = None
        elif getattr(self, "_original_bias", None) is not None:
            self.base_layer.bias.copy_(self._original_bias)
        else:
            bias = self.base_layer.bias
            bias.copy_((bias.double() - delta.double()).to(bias.dtype))
        self._created_bias, self._original_bias = False, None

    # ----- forward ----------------------------------------------------------------------------
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
        shared, cls = self.shared[group.key], group.cls
        if group.tables is None:  # attached modules: fresh tables (they may be training)
            tables = cls.member_tables(group.members, shared)
            dtype = next(iter(tables.values())).dtype  # float32 adapters on a half base
            dropout = (
                getattr(group.members[0], "dropout", None) if group.row_index is None else None
            )
            return cls.add_table_delta(
                result, x.to(dtype), out0.to(dtype), tables, group.row_index, shared, dropout
            )
        if group.prepared is None or group.prepared_ndim != x.dim():
            if group.bank is not None:  # prepared for all the bank's layers at once
                bank, index = group.bank
                group.prepared = bank.prepared_layer(index, group.row_index, x.dim())
            else:
                group.prepared = cls.prepare(group.tables, group.row_index, shared, x.dim())
            group.prepared_ndim = x.dim()
        dtype = next(iter(group.tables.values())).dtype
        return cls.add_prepared(result, x.to(dtype), out0.to(dtype), group.prepared, shared)

    def _groups(self, state: AdapterState) -> list[_Group]:
        stamp = (
            id(state),
            state.version,
            self._layout_version,
            *(b.version for b, _ in self.banks),
        )
        if self._cache.stamp != stamp:
            self._cache = _GroupCache(stamp, self._build_groups(state))
        return self._cache.groups

    def _build_groups(self, state: AdapterState) -> list[_Group]:
        if state.row_index is None:
            return self._single_group(state.names[0])
        # one group per (shared key, method): methods may share frozen tensors (SVD bases)
        by_key: dict[tuple[str, type], list[tuple[int, str]]] = {}
        for position, name in enumerate(state.names):
            if name in self.adapters:
                key = (self.adapter_keys[name], type(self.adapters[name]))
                by_key.setdefault(key, []).append((position, name))
        groups = []
        for (key, cls), entries in by_key.items():
            local = {pos: i for i, (pos, _) in enumerate(entries)}
            local_index = local_rows(len(state.names), state.row_index, local)
            if local_index is not None:
                members = [self.adapters[name] for _, name in entries]
                groups.append(_Group(key, cls, local_index, members=members))
        for bank, index in self.banks:
            local_index = bank.rows_for(state)  # once per composition for all its layers
            if local_index is not None:
                tables = bank.layer_tables[index]
                group = _Group(bank.shared_key, bank.weights_cls, local_index, tables=tables)
                group.bank = (bank, index)
                groups.append(group)
        return groups

    def _single_group(self, name: str) -> list[_Group]:
        if name in self.adapters:
            weights = self.adapters[name]
            return [_Group(self.adapter_keys[name], type(weights), None, members=[weights])]
        found = self._bank_of(name)
        if found is None:
            return []
        bank, index = found
        slot = bank.slots[name]
        tables = {k: t[slot : slot + 1] for k, t in bank.layer_tables[index].items()}
        return [_Group(bank.shared_key, bank.weights_cls, None, tables=tables)]
