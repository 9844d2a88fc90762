"""What every adapter method provides: a config, per-layer weights, and a batched forward.

Modelled on HF PEFT's tuners (one folder per method, ``config.py`` + ``layer.py``) and vLLM's
multi-LoRA path (a per-row adapter index, -1 for the base model). A method is three things:

* an :class:`AdapterConfig` subclass: hyperparameters, validated, JSON-serialisable;
* an :class:`AdapterWeights` subclass: one adapter's trainable tensors on one target layer, with
  the reference ``get_delta_weight`` (ΔW as ``(d1, d2)``), merge and unmerge;
* an ``add_table_delta`` classmethod, the fast path: the contribution of several adapters of the
  method to a batch whose row ``i`` uses table row ``row_index[i]`` (the zero row for -1), given
  the layer input ``x`` and the base output without bias ``out0 = W0 x``. Tables stack the
  adapters' tensors: built per forward from attached modules (``member_tables``, differentiable),
  or views of a preallocated slot bank (``runtime.bank``) for adapters loaded for serving.
  Adapters that share frozen tensors (the same ``shared_key``) go through one call, so shared
  matrices are applied once per batch.

Frozen tensors that several adapters share (VeRA's random projections, SvdA's singular vectors)
live in a per-layer *shared* module built by ``build_shared``; they are never trainable and never
stored in adapter files (docs/methods.md, regeneration).

This module holds the layer side (:class:`TargetInfo`, :class:`AdapterWeights`); the config base
and its field checks are in ``base_config``, the table helpers in ``tables``. Methods import all
of them from here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from .base_config import (
    INT_LIMIT,
    MAX_BUTTERFLY_FACTORS,
    MAX_DIM,
    AdapterConfig,
    check_field_types,
    check_rank_any_layer,
    check_rank_per_layer,
    config_field,
    require,
    require_dim_bound,
    require_range,
    value_has_type,
)
from .tables import (
    constant_table,
    gather_rows,
    stack_padded_ranks,
    stack_with_zero_row,
    table_rows,
)

__all__ = [
    "INT_LIMIT",
    "MAX_BUTTERFLY_FACTORS",
    "MAX_DIM",
    "AdapterConfig",
    "AdapterWeights",
    "TargetInfo",
    "check_field_types",
    "check_rank_any_layer",
    "check_rank_per_layer",
    "config_field",
    "constant_table",
    "gather_rows",
    "require",
    "require_dim_bound",
    "require_range",
    "stack_padded_ranks",
    "stack_with_zero_row",
    "table_rows",
    "value_has_type",
]


@dataclass(frozen=True)
class TargetInfo:
    """What a method needs to know about one target layer when it builds an adapter."""

    name: str  # full module name in the base model, e.g. "model.layers.0.self_attn.q_proj"
    d_out: int  # d1
    d_in: int  # d2
    weight: torch.Tensor  # W0 as (d1, d2): a view of the base weight, never modified here
    fingerprint: str  # layer fingerprint (runtime.fingerprint)
    dtype: torch.dtype  # dtype of adapter tensors: the weight's, float32 for half-precision bases
    bias: torch.Tensor | None = None  # b0 (d1,): a view of the base bias (None: none, or a block)


# a slot bank's layer table: (layer name, [(tensor kind, shape), ...]) in payload order
LayerTable = Sequence[tuple[str, Sequence[tuple[str, tuple[int, ...]]]]]


class AdapterWeights(nn.Module):
    """One adapter's trainable tensors on one target layer (subclass per method)."""

    method: ClassVar[str] = ""
    target_kind: ClassVar[str] = "linear"  # "block": whole attention / MLP modules
    mergeable: ClassVar[bool] = True  # False: non-linear (served unmerged only)
    # scalars named alike on the config and the weights, kept per row (LoRA's "scaling")
    row_constant_fields: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: AdapterConfig, target: TargetInfo, shared: nn.Module | None):
        super().__init__()
        self.d_out, self.d_in = target.d_out, target.d_in

    # ----- checks ---------------------------------------------------------------------------
    @classmethod
    def check_targets(cls, config: AdapterConfig, targets: Sequence[TargetInfo]) -> None:
        """Check ``config`` against the target layers' shapes before anything is allocated
        (ranks, block sizes, ...); raise :class:`AdapterConfigError` naming the field, its value
        and the allowed range. Default: nothing depends on the shapes."""

    # ----- identity -----------------------------------------------------------------------
    @classmethod
    def shared_key(cls, config: AdapterConfig, targets: Sequence[TargetInfo]) -> str:
        """Adapters with equal keys share one frozen ``shared`` module per layer."""
        return cls.method

    @classmethod
    def regeneration_recipe(
        cls, config: AdapterConfig, targets: Sequence[TargetInfo]
    ) -> list[dict[str, Any]]:
        """How each frozen tensor is regenerated (for the adapter file); [] if there are none.
        Entries: ``{"tensor": ..., "source": "seed" | "base-svd", "detail": {...}}``."""
        return []

    @classmethod
    def build_shared(
        cls, config: AdapterConfig, target: TargetInfo, targets: Sequence[TargetInfo], ctx: Any
    ) -> nn.Module | None:
        """Frozen tensors shared by all adapters with this key on this layer (None if none)."""
        return None

    # ----- reference math -------------------------------------------------------------------
    def get_delta_weight(self, shared: nn.Module | None) -> torch.Tensor:
        """ΔW as ``(d1, d2)`` in the parameters' dtype: the plain formula of docs/methods.md."""
        raise NotImplementedError

    def delta_norm(self, shared: nn.Module | None) -> float:
        """‖ΔW‖_F in float64 (methods with a cheaper closed form override it)."""
        return float(torch.linalg.norm(self.get_delta_weight(shared).double()))

    # tensor-level shortcuts for a slot bank's adapters (load, export: no module is built)
    slot_delta_norm: ClassVar[Any] = None  # classmethod (tensors, shared) -> float
    slot_serving_form: ClassVar[Any] = None  # classmethod (tensors, shared, base_bias) -> form

    def get_delta_bias(self, shared: nn.Module | None) -> torch.Tensor | None:
        """Change of the layer's bias (d1,), or None: most methods leave the bias alone."""
        return None

    # ----- serving form (runtime.serving_form) ------------------------------------------------
    @classmethod
    def table_form(
        cls, tables: dict[str, torch.Tensor], shared: nn.Module | None, zero_row: bool
    ) -> Any:
        """The ``serving_form.LayerForm`` of every row of ``tables`` (``(n, *shape)`` per kind,
        constants ``(n,)``, as :meth:`member_tables` or a slot bank's views give them), one slot
        per row; with ``zero_row`` the last row is a table's zero row and its slot must be the
        identity. A method that implements it gets :meth:`serving_form`, :meth:`prepare` and
        :meth:`add_prepared` from it: the native engine then runs it through the form's
        primitives (``serving_form.fast``). Others override those three instead."""
        raise NotImplementedError

    @classmethod
    def has_table_form(cls) -> bool:
        return cls.table_form.__func__ is not AdapterWeights.table_form.__func__

    def single_tables(self) -> dict[str, torch.Tensor]:
        """This adapter's tensors and constants as one-row tables (for :meth:`table_form`)."""
        tables = {kind: p[None] for kind, p in self.named_parameters()}
        like = next(iter(tables.values()))
        for kind, value in self.constants().items():
            tables[kind] = torch.tensor([float(value)], dtype=like.dtype, device=like.device)
        return tables

    def serving_form(self, shared: nn.Module | None, base_bias: torch.Tensor | None = None) -> Any:
        """This adapter on this layer as a one-slot ``serving_form.LayerForm`` (detached): what
        engines serve. ``base_bias``: the layer's ``b0`` (d1,) or None. Every linear method
        implements it (or :meth:`table_form`); the common suite checks it against
        ``get_delta_weight``."""
        if not self.has_table_form():
            raise NotImplementedError(
                f"{self.method} has no serving form: block-level methods are served by the "
                "native engine only"
            )
        form = type(self).table_form(self.single_tables(), shared, zero_row=False)
        return dataclasses.replace(form, d_in=self.d_in, d_out=self.d_out)

    def merge_into(self, weight_oi: torch.Tensor, shared: nn.Module | None) -> None:
        """``W0 ← W0 + ΔW`` in place (computed in float64, cast back)."""
        delta = self.get_delta_weight(shared).to(torch.float64)
        weight_oi.copy_((weight_oi.to(torch.float64) + delta).to(weight_oi.dtype))

    def unmerge_from(self, weight_oi: torch.Tensor, shared: nn.Module | None) -> None:
        """Undo :meth:`merge_into` (``W ← W − ΔW``, float64)."""
        delta = self.get_delta_weight(shared).to(torch.float64)
        weight_oi.copy_((weight_oi.to(torch.float64) - delta).to(weight_oi.dtype))

    # ----- batched forward -----------------------------------------------------------------
    @classmethod
    def row_constants(cls, config: AdapterConfig) -> dict[str, float]:
        """Per-adapter scalars the forward reads from tables beside the tensors (e.g. LoRA's
        α/r); a slot bank fills them from the config. Default: the attributes named in
        ``row_constant_fields``, read from the config."""
        return {name: getattr(config, name) for name in cls.row_constant_fields}

    def constants(self) -> dict[str, float]:
        """This adapter's values of :meth:`row_constants` (default: the same attributes, read
        from the weights)."""
        return {name: getattr(self, name) for name in self.row_constant_fields}

    @classmethod
    def packed_serving_forms(
        cls,
        tensors: dict[str, torch.Tensor],
        layers: LayerTable,
        shared: Sequence[nn.Module | None],
        memo: dict[str, Any] | None = None,
    ) -> list[Any] | None:
        """Every layer's one-slot serving form at once from packed tensors (as in
        :meth:`prune_packed`; the forms' per-slot tensors may be views of a few new flat
        tensors), or None where the method has no such shortcut (then per layer)."""
        return None

    @classmethod
    def packed_form_rows(
        cls,
        tensors: dict[str, torch.Tensor],
        layers: LayerTable,
        shared: Sequence[nn.Module | None],
        memo: dict[str, Any] | None = None,
    ) -> torch.Tensor | None:
        """The one new flat tensor whose views are every per-slot tensor of
        :meth:`packed_serving_forms` (at places fixed by the layer table), or None where the
        method has no such shortcut."""
        return None

    @classmethod
    def has_packed_serving_forms(cls) -> bool:
        """Whether the method overrides :meth:`packed_serving_forms`."""
        return cls.packed_serving_forms.__func__ is not AdapterWeights.packed_serving_forms.__func__

    prunable: ClassVar[bool] = False  # True: prune_packed can make the adapter cheaper

    @classmethod
    def packed_norm_bounds(
        cls,
        tensors: dict[str, torch.Tensor],
        layers: LayerTable,
        shared: Sequence[nn.Module | None],
        memo: dict[str, Any] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Lower and upper bounds (L,) float64 on ‖ΔW‖_F per layer, from packed tensors (as in
        :meth:`prune_packed`) without a pass over large frozen tensors, or None where the method
        has none. Pruning budgets from a lower bound stay within the declared tolerance."""
        return None

    @classmethod
    def prune_packed(
        cls,
        tensors: dict[str, torch.Tensor],
        layers: LayerTable,
        shared: Sequence[nn.Module | None],
        delta_norms: torch.Tensor,
        tolerance: float,
        memo: dict[str, Any] | None = None,
    ) -> dict[str, int]:
        """Serve a cheaper adapter whose ΔW is within ``tolerance · ‖ΔW‖_F`` of the exact one on
        every layer, by editing its packed tensors in place (one flat tensor per kind, as in a
        slot bank). ``delta_norms``: (L,) ‖ΔW‖_F per layer, or lower bounds of it (never the
        file's own values).
        ``memo``: a dict kept for one layer table and its shared modules (a slot bank's), for
        constants the method computes once. Returns counts for reports, e.g. components kept /
        total. Default: nothing to prune."""
        return {}

    @classmethod
    def member_tables(
        cls, members: Sequence[AdapterWeights], shared: nn.Module | None
    ) -> dict[str, torch.Tensor]:
        """Members' trainable tensors (and constants) stacked into tables ``(n + 1, *shape)``
        whose last row is zeros (selected by row index -1). Differentiable. Methods whose members
        may differ in shape (LoRA ranks, SvdA top-k) override it to pad."""
        tables = {
            kind: stack_with_zero_row([getattr(m, kind) for m in members])
            for kind, _ in members[0].named_parameters()
        }
        for kind in members[0].constants():
            values = [m.constants()[kind] for m in members] + [0.0]
            tables[kind] = torch.tensor(values, dtype=next(members[0].parameters()).dtype)
        return tables

    @classmethod
    def prepare(
        cls,
        tables: dict[str, torch.Tensor],
        row_index: torch.Tensor | None,
        shared: nn.Module | None,
        ndim: int,
    ) -> dict[str, Any]:
        """What the forward needs for one batch composition: each row's tensors gathered from
        ``tables`` (rows of the tables, -1: the zero row; None: every batch row uses row 0),
        shaped to broadcast over an activation of ``ndim`` dimensions. A layer caches it while
        the composition and the tables stay the same (a decode loop), unless it is training."""
        if not cls.has_table_form():
            raise NotImplementedError(f"{cls.method} implements neither prepare nor table_form")
        from ..serving_form.fast import gather_slots  # (serving_form imports this module)

        form = cls.table_form(tables, shared, zero_row=row_index is not None)
        if row_index is None:
            row_index = torch.zeros(1, dtype=torch.long, device=next(iter(tables.values())).device)
        return {"form": gather_slots(form, row_index)}  # each batch row's slot, gathered once

    @classmethod
    def prepare_bank(cls, bank: Any, row_index: torch.Tensor, ndim: int) -> list[dict[str, Any]]:
        """:meth:`prepare` for every layer of a slot bank (``runtime.bank.AdapterBank``) and one
        batch composition (the same on all its layers). Methods override it to do the work for
        all layers in a few tensor operations; the default prepares layer by layer."""
        return [
            cls.prepare(tables, row_index, shared, ndim)
            for tables, shared in zip(bank.layer_tables, bank.shared_modules, strict=True)
        ]

    @classmethod
    def add_prepared(
        cls,
        result: torch.Tensor,
        x: torch.Tensor,
        out0: torch.Tensor,
        prepared: dict[str, Any],
        shared: nn.Module | None,
        dropout: nn.Module | None = None,
    ) -> torch.Tensor:
        """The fast path: ``result + ΔW_{row} x`` for every batch row. ``x``: (B, ..., d2);
        ``out0 = W0 x``: (B, ..., d1), both in the adapter dtype. ``dropout`` applies to the
        adapter's input (training). Frozen tensors in ``shared`` are applied once per batch."""
        if not cls.has_table_form():
            raise NotImplementedError(
                f"{cls.method} implements neither add_prepared nor table_form"
            )
        from ..serving_form.fast import form_delta  # (serving_form imports this module)

        form = prepared["form"]
        weight = shared.weight_for(x) if form.reads_base_input_changed else None
        term_x = x if dropout is None else dropout(x)
        return result + form_delta(form, x, out0, weight, term_x).to(result.dtype)

    @classmethod
    def add_table_delta(
        cls,
        result: torch.Tensor,
        x: torch.Tensor,
        out0: torch.Tensor,
        tables: dict[str, torch.Tensor],
        row_index: torch.Tensor | None,
        shared: nn.Module | None,
        dropout: nn.Module | None = None,
    ) -> torch.Tensor:
        """:meth:`prepare` then :meth:`add_prepared`, for tables as :meth:`member_tables`
        builds them (or a slot bank's views)."""
        prepared = cls.prepare(tables, row_index, shared, x.dim())
        return cls.add_prepared(result, x, out0, prepared, shared, dropout)

    @classmethod
    def batched_delta(
        cls,
        x: torch.Tensor,
        out0: torch.Tensor,
        members: Sequence[AdapterWeights],
        row_index: torch.Tensor | None,
        shared: nn.Module | None,
    ) -> torch.Tensor:
        """The fast path on attached modules: ``ΔW_{members[row_index[i]]} x_i`` (zeros for -1)."""
        tables = cls.member_tables(members, shared)
        return cls.add_table_delta(torch.zeros_like(out0), x, out0, tables, row_index, shared)

    @classmethod
    def reference_delta(
        cls,
        x: torch.Tensor,
        out0: torch.Tensor,
        members: Sequence[AdapterWeights],
        row_index: torch.Tensor | None,
        shared: nn.Module | None,
    ) -> torch.Tensor:
        """Plain implementation the fast path is tested against: ``ΔW_a x`` row by row."""

        def delta_of(member: AdapterWeights, x_rows: torch.Tensor) -> torch.Tensor:
            bias = member.get_delta_bias(shared)
            bias = None if bias is None else bias.to(x.dtype)
            return nn.functional.linear(x_rows, member.get_delta_weight(shared).to(x.dtype), bias)

        if row_index is None:
            return delta_of(members[0], x)
        out = torch.zeros_like(out0)
        for position, member in enumerate(members):
            rows = row_index == position
            out[rows] = delta_of(member, x[rows])
        return out

    # ----- bookkeeping ----------------------------------------------------------------------
    def trainable_parameter_count(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)
