"""Frozen adapters attached from packed tensors into slot banks (``runtime.bank``): the part of
:class:`~svda.runtime.model.AdapterModel` that serves adapters loaded from files."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .bank import AdapterBank, BankLayout, frozen_identity_sha256
from .errors import AdapterConfigError, AdapterStateError
from .methods import AdapterConfig, get_method

NORM_BOUND_TIGHTNESS = 0.95  # a cheap lower bound of ‖ΔW‖ this close to its upper bound is used


class PackedAdapters:
    """Mixin of :class:`~svda.runtime.model.AdapterModel` (uses its layers, configs, state)."""

    def add_packed_adapter(
        self,
        name: str,
        config: AdapterConfig,
        tensors: dict[str, torch.Tensor],
        layers: Sequence[tuple[str, dict[str, Sequence[int]]]],
        layer_key: str | None = None,
    ) -> None:
        """Attach a frozen adapter from its packed tensors (one flat tensor per kind, every
        layer's tensor of that kind concatenated in ``layers`` order: the ``.svda`` payload).
        It goes into the slot bank of its layout (made on first use), so attaching costs one
        copy per kind. ``layers``: ``(layer name, {kind: shape})`` in payload order;
        ``layer_key``: a string that determines ``layers`` exactly (see ``BankLayout.of``)."""
        self.check_new_name(name)
        self._require_unmerged("add_packed_adapter")  # bases must come from the original W0
        if not layers:
            raise AdapterConfigError(f"adapter {name!r} has no target layers")
        if layers[0][0] not in self.layer_shapes():
            self._check_packed_targets(config, layers)  # says which layers are unknown
        dtype = self.target_info(layers[0][0]).dtype
        layout = BankLayout.of(config, dtype, layers, layer_key)
        bank = self.banks.get(layout)
        if bank is None:  # a bank of this layout passed these checks (same config and layers)
            self._check_packed_targets(config, layers)  # before anything is allocated
            bank = self._new_bank(layout, config)
        try:
            bank.add(name, tensors)
        except AdapterConfigError:
            if not bank.slots:
                self._dispose_bank(bank)
            raise
        self._banked[name] = bank
        self.configs[name] = config

    def _check_packed_targets(
        self, config: AdapterConfig, layers: Sequence[tuple[str, dict[str, Sequence[int]]]]
    ) -> None:
        """The layers exist and the config fits their shapes (the method's bounds)."""
        shapes = self.layer_shapes()
        unknown = [layer_name for layer_name, _ in layers if layer_name not in shapes]
        if unknown:
            raise AdapterConfigError(
                f"layers {unknown[:5]} are not layers or blocks of this base model; the adapter "
                "was made for another base"
            )
        targets = [self.target_info(layer_name) for layer_name, _ in layers]
        get_method(config.method).weights_cls.check_targets(config, targets)

    def _new_bank(self, layout: BankLayout, config: AdapterConfig) -> AdapterBank:
        spec = get_method(config.method)
        targets = [self.target_info(layer_name) for layer_name, _ in layout.layers]  # once
        key = spec.weights_cls.shared_key(config, targets)
        shared_modules, trainable_kinds = [], set()
        try:  # shapes are checked before the bank allocates its storage from them
            for target, (_, params) in zip(targets, layout.layers, strict=True):
                layer = self.layers.get(target.name)
                if layer is not None and key in layer.shared:
                    shared = layer.shared[key]
                else:
                    shared = spec.weights_cls.build_shared(config, target, targets, self._ctx)
                weights = spec.weights_cls(config, target, shared)
                _check_layer_shapes(weights, target.name, params)
                trainable_kinds |= {k for k, p in weights.named_parameters() if p.requires_grad}
                shared_modules.append(shared)
        finally:
            self._ctx.memo.clear()  # a failed add keeps no regenerated projections
        bank = AdapterBank(layout, config, spec.weights_cls, targets, key, self._device())
        bank.trainable_kinds = trainable_kinds
        bank.shared_modules = shared_modules
        for index, (target, shared) in enumerate(zip(targets, shared_modules, strict=True)):
            self._wrap(target.name).add_bank(bank, index, shared)
        identities = [(t.name, self.layers[t.name].frozen_identity_of_key(key)) for t in targets]
        bank.frozen_sha256 = frozen_identity_sha256(identities)
        self.banks[layout] = bank
        return bank

    def drop_empty_banks(self) -> int:
        """Free the slot banks that hold no adapter (their tables and the frozen tensors only
        they use). Deleting an adapter keeps its bank, so the next adapter of the same layout
        attaches with one copy; returns how many banks were dropped."""
        empty = [bank for bank in self.banks.values() if not bank.slots]
        for bank in empty:
            self._dispose_bank(bank)
        return len(empty)

    def _dispose_bank(self, bank: AdapterBank) -> None:
        del self.banks[bank.layout]
        for layer_name, _ in bank.layers:
            self.layers[layer_name].remove_bank(bank)

    @torch.no_grad()
    def prune_adapter(
        self, name: str, tolerance: float, delta_norms: Sequence[float] | None = None
    ) -> dict[str, int]:
        """Let frozen adapter ``name`` serve with ΔW within ``tolerance · ‖ΔW‖_F`` of the exact
        one per layer, where its method can make that cheaper (SvdA drops components of δ;
        docs/methods.md). ``delta_norms``: exact ‖ΔW‖_F per layer, in the adapter's layer order
        (default: :meth:`pruning_norms`). Changes the adapter's tensors in place; returns the
        method's counts."""
        if not tolerance >= 0:
            raise AdapterConfigError(f"tolerance must be >= 0, got {tolerance}")
        if not self.is_frozen(name):
            raise AdapterStateError(f"adapter {name!r} is trainable; only frozen ones are pruned")
        bank = self._banked[name]
        if delta_norms is None:
            delta_norms = self.pruning_norms(name)
        norms = torch.as_tensor(delta_norms, dtype=torch.float64)
        if norms.shape != (len(bank.layers),):
            raise AdapterConfigError(
                f"need one ‖ΔW‖ per layer ({len(bank.layers)}), got {tuple(norms.shape)}"
            )
        counts = self._on_slot(name, "prune_packed", norms, tolerance)
        bank.version += 1  # layers drop what they prepared from the old values
        return counts

    def packed_serving_forms(self, name: str) -> dict[str, Any] | None:
        """Layer name -> one-slot serving form of frozen adapter ``name``, all layers at once
        where its method can (None: compile layer by layer)."""
        if name not in self._banked:
            return None
        forms = self._on_slot(name, "packed_serving_forms")
        if forms is None:
            return None
        layers = self._banked[name].layers
        return {layer_name: form for (layer_name, _), form in zip(layers, forms, strict=True)}

    def packed_form_rows(self, name: str) -> torch.Tensor | None:
        """The flat tensor :meth:`packed_serving_forms` of frozen adapter ``name`` would view
        (None where its method has none): a writer that knows the layout needs only this."""
        return self._on_slot(name, "packed_form_rows") if name in self._banked else None

    def _on_slot(self, name: str, method: str, *args: Any) -> Any:
        """``weights_cls.<method>(tensors, layers, shared modules, *args, memo=...)`` on frozen
        adapter ``name``'s slot of its bank (views of the bank's flat tables)."""
        bank = self._banked[name]
        tensors = {kind: table[bank.slots[name]] for kind, table in bank.storage.items()}
        call = getattr(bank.weights_cls, method)
        return call(tensors, bank.layers, bank.shared_modules, *args, memo=bank.memo)

    def packed_forms_key(self, name: str) -> Any:
        """A key equal for frozen adapters whose :meth:`packed_serving_forms` have the same
        structure and shared tensors (their slot bank's layout and frozen tensors' identity;
        None without a bank): a writer may reuse the forms' encoded layout across them."""
        bank = self._banked.get(name)
        if bank is None or not bank.weights_cls.has_packed_serving_forms():
            return None
        if not bank.frozen_sha256:  # frozen tensors of unknown identity: no key
            return None
        return ("packed-forms", bank.layout, bank.frozen_sha256)

    def can_prune(self, name: str) -> bool:
        """Whether frozen adapter ``name``'s method prunes (:meth:`prune_adapter` may change it)."""
        return self.is_frozen(name) and self._banked[name].weights_cls.prunable

    def pruning_norms(self, name: str) -> torch.Tensor:
        """(L,) float64 per layer of frozen adapter ``name``: a lower bound of ‖ΔW‖_F for
        pruning budgets. The method's cheap bound where it is within
        :data:`NORM_BOUND_TIGHTNESS` of its upper bound (no pass over the frozen tensors),
        else the exact norm."""
        bank = self._banked[name]
        bounds = self._on_slot(name, "packed_norm_bounds")
        if bounds is None:
            norms, loose = (
                torch.zeros(len(bank.layers), dtype=torch.float64),
                range(len(bank.layers)),
            )
        else:
            norms = bounds[0].cpu()
            loose = (bounds[0] < NORM_BOUND_TIGHTNESS * bounds[1]).nonzero().flatten().tolist()
        for index in loose:
            norms[index] = self.layers[bank.layers[index][0]].delta_norm_of(name)
        return norms

    def is_frozen(self, name: str) -> bool:
        """True for adapters attached with :meth:`add_packed_adapter` (not trainable)."""
        self._require(name)
        return name in self._banked

    def frozen_sha256(self, name: str) -> str:
        """Identity of the frozen tensors adapter ``name`` uses ('' if one is unknown)."""
        self._require(name)
        if name in self._banked:
            return self._banked[name].frozen_sha256
        layers = self.layers_of(name)
        return frozen_identity_sha256([(la.layer_name, la.frozen_identity(name)) for la in layers])


def _check_layer_shapes(weights: nn.Module, layer_name: str, params: tuple) -> None:
    """The packed tensors of a layer must have the shapes the method gives that layer."""
    expected = {kind: tuple(p.shape) for kind, p in weights.named_parameters()}
    if expected != dict(params):
        raise AdapterConfigError(
            f"layer {layer_name}: tensors {dict(params)} do not match the method's {expected}"
        )
