"""Attaching adapters to a Hugging Face causal LM and running them, alone, mixed or merged.

    >>> am = AdapterModel(base.model)
    >>> am.add_adapter("acme", SvdaConfig(targets="all-linear"))
    >>> am.set_adapter("acme"); logits = am(input_ids).logits            # one adapter
    >>> am(input_ids, adapter_rows=["acme", None, "other"]).logits        # one per row
    >>> am.merge("acme"); ...; am.unmerge()                              # merged path

Target layers are replaced by :class:`~svda.runtime.layer.AdapterLinear` wrappers the first time
an adapter targets them; the base weights stay frozen. The base fingerprint is taken before any
change, so it names the original weights even while an adapter is merged.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .bank import AdapterBank, BankLayout
from .block import AdapterBlock
from .errors import AdapterConfigError, AdapterStateError
from .fingerprint import BaseFingerprint, base_fingerprint, block_fingerprint
from .layer import HALF_DTYPES, AdapterLinear, AdapterState
from .methods import AdapterConfig, TargetInfo, get_method
from .names import check_adapter_name
from .packed import PackedAdapters
from .regeneration.svd_basis import SvdBasisCache
from .targets import iter_candidate_blocks, resolve_module, select_targets, weight_out_in


@dataclass
class RegenerationContext:
    """What ``build_shared`` may use: the SVD cache and a memo for seed-generated tensors."""

    svd_cache: SvdBasisCache
    memo: dict[str, Any] = field(default_factory=dict)


class AdapterModel(PackedAdapters, nn.Module):
    """A frozen base causal LM with any number of named adapters of any registered method."""

    def __init__(self, model: nn.Module, svd_cache: SvdBasisCache | None = None):
        super().__init__()
        self.model = model
        for p in model.parameters():
            p.requires_grad_(False)
        self.fingerprint: BaseFingerprint = base_fingerprint(model)
        self.svd_cache = svd_cache if svd_cache is not None else SvdBasisCache()
        self.state = AdapterState()
        self.configs: dict[str, AdapterConfig] = {}
        self.layers: dict[str, AdapterLinear] = {}  # target layer name -> wrapper
        self.banks: dict[BankLayout, AdapterBank] = {}  # slot banks of frozen adapters
        self._banked: dict[str, AdapterBank] = {}  # frozen adapter name -> its bank
        self._ctx = RegenerationContext(self.svd_cache)
        self._layer_shapes: dict[str, tuple[int, int]] | None = None
        self._blocks: dict[str, tuple[int, int]] | None = None

    # ----- adding and removing adapters ------------------------------------------------------
    def add_adapter(self, name: str, config: AdapterConfig) -> None:
        """Attach a new adapter with freshly initialised trainable tensors."""
        self.check_new_name(name)
        self._require_unmerged("add_adapter")  # frozen bases must come from the original W0
        spec = get_method(config.method)
        names = select_targets(self.model, config.targets, spec.weights_cls.target_kind)
        targets = [self.target_info(n) for n in names]
        spec.weights_cls.check_targets(config, targets)  # before anything is allocated
        key = spec.weights_cls.shared_key(config, targets)
        added: list[AdapterLinear] = []
        try:
            for target in targets:
                layer = self._wrap(target.name)
                if key in layer.shared:
                    shared = layer.shared[key]
                else:
                    shared = spec.weights_cls.build_shared(config, target, targets, self._ctx)
                weights = spec.weights_cls(config, target, shared)
                layer.add(name, weights, key, shared)
                added.append(layer)
        except BaseException:
            for layer in added:  # a failed add leaves no weights or shared tensors behind
                layer.remove(name)
            raise
        finally:
            self._ctx.memo.clear()
        self.configs[name] = config

    def delete_adapter(self, name: str) -> None:
        self._require(name)
        if self.state.merged == name:
            raise AdapterStateError(
                f"adapter {name!r} is merged; call unmerge() before deleting it"
            )
        bank = self._banked.pop(name, None)
        if bank is not None:
            bank.remove(name)  # an empty bank stays, ready for the next adapter of its layout
        else:
            for layer in self.layers_of(name):
                layer.remove(name)
        del self.configs[name]
        if name in self.state.names:
            self.state.set((), None)

    def check_new_name(self, name: str) -> None:
        check_adapter_name(name)  # the rule of store ids too (runtime.names)
        if name in self.configs:
            raise AdapterConfigError(
                f"an adapter named {name!r} is already attached; delete it first"
            )

    def target_info(self, layer_name: str) -> TargetInfo:
        """What a method needs to know about target ``layer_name`` (wrapped or not): a linear
        layer, or an attention/MLP block (then ``weight`` is one of its parameters, for the
        device and dtype, and both dims are the hidden size)."""
        module = self._base_module(layer_name)
        bias = None
        if layer_name in self.blocks():
            weight, (d_out, d_in) = next(module.parameters()), self.blocks()[layer_name]
        else:
            weight, bias = weight_out_in(module), module.bias
            d_out, d_in = weight.shape
        return TargetInfo(
            name=layer_name,
            d_out=d_out,
            d_in=d_in,
            weight=weight.detach(),
            fingerprint=self.layer_fingerprint(layer_name),
            dtype=torch.float32 if weight.dtype in HALF_DTYPES else weight.dtype,
            bias=None if bias is None else bias.detach(),
        )

    def layer_fingerprint(self, layer_name: str) -> str:
        """Fingerprint of a target layer or block (KeyError for other names)."""
        if layer_name in self.fingerprint.layers:
            return self.fingerprint.layers[layer_name]
        if layer_name in self.blocks():
            return block_fingerprint(self.fingerprint.layers, layer_name)
        raise KeyError(layer_name)

    def blocks(self) -> dict[str, tuple[int, int]]:
        """Attention/MLP blocks that block-level adapters may target -> (hidden, hidden)."""
        if self._blocks is None:
            hidden = getattr(self.model.config, "hidden_size", 0)
            self._blocks = {name: (hidden, hidden) for name, _ in iter_candidate_blocks(self.model)}
        return self._blocks

    def layer_shapes(self) -> dict[str, tuple[int, int]]:
        """``(d_out, d_in)`` of every layer or block an adapter may target (computed once)."""
        if self._layer_shapes is None:
            self._layer_shapes = {
                name: tuple(weight_out_in(self._base_module(name)).shape)
                for name in self.fingerprint.layers
            }
            self._layer_shapes.update(self.blocks())
        return self._layer_shapes

    def _base_module(self, layer_name: str) -> nn.Module:
        if layer_name in self.layers:
            return self.layers[layer_name].base_layer
        return resolve_module(self.model, layer_name)

    def _wrap(self, layer_name: str) -> AdapterLinear:
        if layer_name not in self.layers:
            parent_name, _, child = layer_name.rpartition(".")
            parent = resolve_module(self.model, parent_name) if parent_name else self.model
            if isinstance(parent, AdapterLinear):  # a linear inside a wrapped block
                parent = parent.base_layer
            module = getattr(parent, child)
            if layer_name in self.blocks():
                hidden = self.blocks()[layer_name][0]
                wrapper = AdapterBlock(module, layer_name, self.state, hidden)
            else:
                wrapper = AdapterLinear(module, layer_name, self.state)
            setattr(parent, child, wrapper)
            self.layers[layer_name] = wrapper
        return self.layers[layer_name]

    # ----- choosing adapters --------------------------------------------------------------------
    def set_adapter(self, name: str | None) -> None:
        """Every row uses ``name`` (None: the base model) until changed."""
        self._require_unmerged("set_adapter")
        if name is None:
            self.state.set((), None)
            return
        self._require(name)
        self.state.set((name,), None)

    def set_adapter_rows(self, rows: Sequence[str | None]) -> None:
        """Row ``i`` of the next batches uses adapter ``rows[i]`` (None: the base model)."""
        self._require_unmerged("set_adapter_rows")
        names = tuple(dict.fromkeys(r for r in rows if r is not None))
        for name in names:
            self._require(name)
        position = {name: i for i, name in enumerate(names)}
        index = torch.tensor([position[r] if r is not None else -1 for r in rows], dtype=torch.long)
        self.state.set(names, index.to(self._device()))

    @contextmanager
    def adapter_rows(self, rows: Sequence[str | None] | None) -> Iterator[None]:
        """Use per-row adapters inside the block, then restore what was active before."""
        saved = (self.state.names, self.state.row_index)
        if rows is not None:
            self.set_adapter_rows(rows)
        try:
            yield
        finally:
            if self.state.merged is None:
                self.state.set(*saved)

    def forward(
        self, *args: Any, adapter_rows: Sequence[str | None] | None = None, **kwargs: Any
    ) -> Any:
        if adapter_rows is None:
            return self.model(*args, **kwargs)
        with self.adapter_rows(adapter_rows):
            return self.model(*args, **kwargs)

    def generate(
        self, *args: Any, adapter_rows: Sequence[str | None] | None = None, **kwargs: Any
    ) -> Any:
        with self.adapter_rows(adapter_rows):
            return self.model.generate(*args, **kwargs)

    # ----- merge / unmerge ----------------------------------------------------------------------
    @torch.no_grad()
    def merge(self, name: str) -> None:
        """Add ``name``'s ΔW into the base weights (float64 arithmetic); forwards then cost the
        base model's alone. Only one adapter can be merged at a time."""
        self._require(name)
        self._require_unmerged("merge")
        if not get_method(self.configs[name].method).weights_cls.mergeable:
            raise AdapterStateError(
                f"adapter {name!r} ({self.configs[name].method}) is non-linear and cannot be "
                "merged; serve it unmerged"
            )
        for layer in self.layers_of(name):
            layer.merge(name)
        self.state.set((name,), None)
        self.state.merged = name

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract the merged adapter's ΔW again; the base weights are restored to float
        rounding (the adapter stays attached and active)."""
        name = self.state.merged
        if name is None:
            return
        for layer in self.layers_of(name):
            layer.unmerge(name)
        self.state.merged = None
        self.state.set((name,), None)

    # ----- inspection and tensors ---------------------------------------------------------------
    def adapter_names(self) -> list[str]:
        return list(self.configs)

    def adapter_parameters(self, name: str) -> dict[str, nn.Parameter]:
        """``"<layer>.<param>" -> parameter`` for every trainable tensor of ``name`` (for a frozen
        adapter: views of its bank slot)."""
        self._require(name)
        params = {}
        for layer in self.layers_of(name):
            for pname, p in layer.tensors_of(name).items():
                params[f"{layer.layer_name}.{pname}"] = p
        return params

    def adapter_state_dict(self, name: str) -> dict[str, torch.Tensor]:
        """Detached CPU copies of ``name``'s trainable tensors (what an adapter file stores)."""
        return {
            k: p.detach().cpu().clone().contiguous()
            for k, p in self.adapter_parameters(name).items()
        }

    @torch.no_grad()
    def load_adapter_state_dict(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        """Copy ``tensors`` into ``name``'s parameters; names and shapes must match exactly."""
        params = self.adapter_parameters(name)
        missing, extra = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
        if missing or extra:
            raise AdapterConfigError(
                f"adapter {name!r}: missing tensors {missing[:5]}, unexpected {extra[:5]}"
            )
        for key, p in params.items():
            if tuple(tensors[key].shape) != tuple(p.shape):
                raise AdapterConfigError(
                    f"adapter {name!r}: tensor {key} has shape {tuple(tensors[key].shape)}, layer expects {tuple(p.shape)}"
                )
        for key, p in params.items():
            p.copy_(tensors[key].to(dtype=p.dtype, device=p.device))
        if name in self._banked:
            self._banked[name].version += 1  # layers drop what they prepared from old values

    def trainable_parameter_count(self, name: str) -> int:
        """Values training updates (LoRA-GA's A0, B0 and the hybrid's λ are stored, not
        trained); for a frozen adapter, the values its method trains."""
        if name in self._banked:
            return self._banked[name].trainable_numel()
        return sum(p.numel() for p in self.adapter_parameters(name).values() if p.requires_grad)

    def stored_parameter_count(self, name: str) -> int:
        """Values the adapter's file stores: the trainable ones and data-dependent frozen ones."""
        return sum(p.numel() for p in self.adapter_parameters(name).values())

    def adapter_nbytes(self, name: str) -> int:
        """Bytes of the adapter's own tensors (what adapter memory budgets count; the frozen
        tensors adapters share are not included)."""
        if name in self._banked:
            return self._banked[name].nbytes_per_adapter()
        return sum(p.numel() * p.element_size() for p in self.adapter_parameters(name).values())

    def get_delta_weights(self, name: str) -> dict[str, torch.Tensor]:
        """``layer -> ΔW`` (d1, d2) by the reference formula."""
        self._require(name)
        return {layer.layer_name: layer.get_delta_weight(name) for layer in self.layers_of(name)}

    def shared_frozen_bytes(self) -> int:
        """Bytes held by frozen shared tensors (SVD bases, VeRA projections) on all layers."""
        storages = {}
        for layer in self.layers.values():
            for buf in layer.shared.buffers():
                storage = buf.untyped_storage()
                storages[storage.data_ptr()] = storage.nbytes()
        return sum(storages.values())

    # ----- helpers ----------------------------------------------------------------------------
    def layers_of(self, name: str) -> list[AdapterLinear]:
        """The wrapped layers adapter ``name`` is attached to, in model order (for a frozen
        adapter: its file's layer order)."""
        if name in self._banked:
            return [self.layers[layer_name] for layer_name, _ in self._banked[name].layers]
        return [layer for layer in self.layers.values() if name in layer.adapters]

    def _require(self, name: str) -> None:
        if name not in self.configs:
            raise AdapterConfigError(
                f"no adapter named {name!r} is attached; attached: {sorted(self.configs)}"
            )

    def _require_unmerged(self, what: str) -> None:
        if self.state.merged is not None:
            raise AdapterStateError(
                f"{what}() while adapter {self.state.merged!r} is merged into the weights; call unmerge() first"
            )

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device
