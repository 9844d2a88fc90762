"""Slot banks: preallocated, flat storage for adapters loaded for serving (vLLM's LoRA slots).

Adapters attached with :meth:`AdapterModel.add_adapter` are ``nn.Module`` trees, one per target
layer: right for training, slow to create (~40 µs a layer). Adapters loaded from a file for
serving are frozen, and every adapter of one *layout* (method, config, target layers and their
tensor shapes, dtype) has the same tensors, so they live in one bank per layout:

    bank[kind]   : (capacity + 1, Σ_layers numel)   one row per slot; the last row is all zeros
    layer tables : bank[kind][:, offset : offset + numel].unflatten(1, shape)   (views, made once)

The flat row order is the adapter file's (each kind concatenated in layer-table order), so
loading an adapter is one copy per kind into a free slot, whatever the number of layers. The
forward gathers each batch row's slot from the layer's table views (-1: the zero row, the base).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .errors import AdapterConfigError
from .methods import AdapterConfig, AdapterWeights, TargetInfo


@dataclass(frozen=True)
class BankLayout:
    """What adapters sharing a bank have in common (equal layouts share one bank)."""

    method: str
    config: str  # canonical JSON of the config: every field equal
    dtype: torch.dtype
    layer_key: str  # identifies the layer table: its JSON, or a lossless encoding the caller has
    source: Sequence = field(compare=False, hash=False, repr=False)  # (name, {kind: shape}) …

    @classmethod
    def of(
        cls,
        config: AdapterConfig,
        dtype: torch.dtype,
        layers: Sequence[tuple[str, dict]],
        layer_key: str | None = None,
    ) -> BankLayout:
        """``layers``: ``(layer name, {kind: shape})`` in file order. ``layer_key``: a string
        that determines them exactly (an adapter file's encoded layer table: equal strings mean
        equal tables), which saves encoding 200+ layers on every load; default their JSON."""
        key = layer_key if layer_key is not None else json.dumps([[n, p] for n, p in layers])
        config_json = json.dumps(config.to_dict(), sort_keys=True)
        return cls(config.method, config_json, dtype, key, layers)

    @property
    def layers(self) -> list[tuple[str, list[tuple[str, tuple[int, ...]]]]]:
        """``[(layer name, [(kind, shape), ...]), ...]`` in file order."""
        return [
            (name, [(kind, tuple(shape)) for kind, shape in params.items()])
            for name, params in self.source
        ]

    def kind_sizes(self) -> dict[str, int]:
        sizes: dict[str, int] = {}
        for _, params in self.layers:
            for kind, shape in params:
                sizes[kind] = sizes.get(kind, 0) + _numel(shape)
        return sizes


class AdapterBank:
    """Slots for frozen adapters of one :class:`BankLayout` on one model."""

    def __init__(
        self,
        layout: BankLayout,
        config: AdapterConfig,
        weights_cls: type[AdapterWeights],
        targets: Sequence[TargetInfo],
        shared_key: str,
        device: torch.device,
        capacity: int = 4,
    ):
        self.layout, self.config, self.weights_cls = layout, config, weights_cls
        self.layers = layout.layers  # parsed once
        self.targets = list(targets)  # in layout order
        self.shared_key = shared_key
        self.device = device
        self.slots: dict[str, int] = {}  # adapter name -> slot
        self.shared_modules: list[nn.Module | None] = []  # per layer, set by the model
        self.memo: dict[str, Any] = {}  # a method's per-bank constants (prepare_bank, pruning)
        self.trainable_kinds: set[str] = set()  # kinds training updates (set by the model)
        self._rows: tuple = ((), None)  # (stamp, table row of each batch row)
        self._prepared: dict[int, list[dict]] = {}  # ndim -> per-layer prepared, for _rows
        self.frozen_sha256 = ""  # identity of the frozen tensors, set by the model
        self.version = 0  # bumped when slots or storage change (layers rebuild their groups)
        self._constants = weights_cls.row_constants(config)
        self._sizes = layout.kind_sizes()
        self._allocate(capacity)

    # ----- storage --------------------------------------------------------------------------
    def _allocate(self, capacity: int) -> None:
        old = getattr(self, "storage", None)
        self.capacity = capacity
        kinds = {**self._sizes, **dict.fromkeys(self._constants, 1)}
        self.storage = {
            kind: torch.zeros(capacity + 1, size, dtype=self.layout.dtype, device=self.device)
            for kind, size in kinds.items()
        }
        if old is not None:  # keep the used slots (the zero row stays last)
            for kind, table in old.items():
                self.storage[kind][: table.shape[0] - 1] = table[:-1]
        self.layer_tables = [self._views(i) for i in range(len(self.layers))]
        self.version += 1

    def _views(self, index: int) -> dict[str, torch.Tensor]:
        offsets = self._offsets()[index]
        views = {
            kind: self.storage[kind][:, start : start + _numel(shape)].unflatten(1, shape)
            for kind, (start, shape) in offsets.items()
        }
        for kind in self._constants:
            views[kind] = self.storage[kind][:, 0]  # (capacity + 1,)
        return views

    def _offsets(self) -> list[dict[str, tuple[int, tuple[int, ...]]]]:
        if not hasattr(self, "_offset_cache"):
            running: dict[str, int] = {}
            self._offset_cache = []
            for _, params in self.layers:
                entry = {}
                for kind, shape in params:
                    entry[kind] = (running.get(kind, 0), shape)
                    running[kind] = running.get(kind, 0) + _numel(shape)
                self._offset_cache.append(entry)
        return self._offset_cache

    # ----- slots ----------------------------------------------------------------------------
    @torch.no_grad()
    def add(self, name: str, flat: dict[str, torch.Tensor]) -> int:
        """Copy an adapter's flat tensors (one per kind, file order) into a free slot."""
        wrong = {k: tuple(t.shape) for k, t in flat.items() if t.numel() != self._sizes.get(k)}
        if set(flat) != set(self._sizes) or wrong:
            raise AdapterConfigError(
                f"adapter {name!r}: tensors {sorted(flat)} do not fit the layer table "
                f"(expected {self._sizes}, got shapes {wrong})"
            )
        slot = self._free_slot()
        for kind, tensor in flat.items():
            self.storage[kind][slot].copy_(tensor.reshape(-1))
        for kind, value in self._constants.items():
            self.storage[kind][slot, 0] = value
        self.slots[name] = slot
        self.version += 1
        return slot

    def _free_slot(self) -> int:
        used = set(self.slots.values())
        for slot in range(self.capacity):
            if slot not in used:
                return slot
        self._allocate(self.capacity * 2)
        return len(used)

    def remove(self, name: str) -> None:
        """Free ``name``'s slot (its row is overwritten by the next adapter; no batch row can
        select a free slot)."""
        del self.slots[name]
        self.version += 1

    def layer_tensors(self, name: str, index: int) -> dict[str, torch.Tensor]:
        """Adapter ``name``'s tensors on layer ``index`` (views of its slot, not constants)."""
        slot = self.slots[name]
        return {k: t[slot] for k, t in self.layer_tables[index].items() if k in self._sizes}

    # ----- one batch composition, shared by every layer of the bank -----------------------------
    def rows_for(self, state) -> torch.Tensor | None:
        """Each batch row's table row under ``state`` (an ``AdapterState`` with a row index;
        -1: the zero row), or None if no row uses this bank. Computed once per composition for
        all the bank's layers."""
        stamp = (id(state), state.version, self.version)
        if self._rows[0] != stamp:
            slots = {pos: self.slots[n] for pos, n in enumerate(state.names) if n in self.slots}
            rows = local_rows(len(state.names), state.row_index, slots) if slots else None
            self._rows, self._prepared = (stamp, rows), {}
        return self._rows[1]

    def prepared_layer(self, index: int, row_index: torch.Tensor, ndim: int) -> dict:
        """Layer ``index``'s ``prepare`` output for ``row_index`` (from :meth:`rows_for`); the
        method prepares all layers at once (``prepare_bank``) on the first request."""
        if row_index is not self._rows[1]:  # not the current composition: no caching
            return self.weights_cls.prepare(
                self.layer_tables[index], row_index, self.shared_modules[index], ndim
            )
        if ndim not in self._prepared:
            self._prepared[ndim] = self.weights_cls.prepare_bank(self, row_index, ndim)
        return self._prepared[ndim][index]

    def kind_offsets(self, kind: str) -> list[tuple[int, tuple[int, ...]]]:
        """``(start, shape)`` of every layer's ``kind`` tensor in a flat storage row."""
        return [offsets[kind] for offsets in self._offsets()]

    def trainable_numel(self) -> int:
        """Values per adapter of the kinds training updates (not stored frozen ones)."""
        return sum(n for kind, n in self._sizes.items() if kind in self.trainable_kinds)

    def nbytes_per_adapter(self) -> int:
        return sum(self._sizes.values()) * self.layout.dtype.itemsize

    def materialize(self, name: str, index: int, shared: nn.Module | None) -> AdapterWeights:
        """A module holding a copy of ``name``'s tensors on layer ``index`` (for the reference
        formula, merge and export; not for the hot path)."""
        weights = self.weights_cls(self.config, self.targets[index], shared)
        with torch.no_grad():
            for kind, tensor in self.layer_tensors(name, index).items():
                getattr(weights, kind).copy_(tensor)
        return weights.requires_grad_(False)


def frozen_identity_sha256(identities: Sequence[tuple[str, str]]) -> str:
    """Identity of an adapter's frozen tensors from ``(layer, identity)`` pairs ('' if one is
    unknown)."""
    lines = [f"{layer}={identity}" for layer, identity in identities]
    if any(line.endswith("=") for line in lines):
        return ""
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def local_rows(n_names: int, row_index: torch.Tensor, local: dict[int, int]) -> torch.Tensor | None:
    """Batch rows mapped to table rows: ``local`` maps positions in the state's names to table
    rows; rows of other adapters or the base get -1. None if no row of the batch uses any."""
    # lookup table: global position -> table row; the extra last slot maps the base's -1
    lut = [-1] * (n_names + 1)
    for position, row in local.items():
        lut[position] = row
    rows = torch.tensor(lut, dtype=torch.long, device=row_index.device)[row_index]
    return rows if bool((rows >= 0).any()) else None


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n
