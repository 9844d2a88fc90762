"""Batched (gathered) implementation of the serving-form primitives: one pass over a mixed batch.

What an engine does with a stacked form (``.compile.stack_forms``): every per-slot table gets a
zero row appended (:func:`with_zero_row`) and slot -1 selects it, so every primitive adds exact
zeros to base rows; each row's tensors are gathered by slot; shared bases (VeRA, SvdA) multiply
the whole batch once. Tested equal to :func:`.reference.reference_forward`. A torch fallback
for engines without their own kernels (vLLM's punica-style kernels would replace ``LowRank``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from ..methods.boft.ops import rotate_rows
from ..methods.urnn.unitary import (
    apply_unitary,
    apply_unitary_adjoint,
    reflection_vectors,
    to_complex,
    to_real,
)
from .compile import identity_memo, is_per_slot
from .primitives import LayerForm, LowRank, OutputRotation, SharedBasisLowRank


def _map_per_slot(
    p: Any, fn: Callable[[str, torch.Tensor], torch.Tensor], memo: dict | None = None
) -> Any:
    """``p`` with ``fn(name, tensor)`` applied to its per-slot tensors (a low-rank term's are all
    per slot; other primitives keep their shared fields, :data:`SHARED_FIELDS`, as they are).
    ``memo`` (one per form): a tensor two fields share is mapped once and stays shared."""
    values = {}
    for f in dataclasses.fields(p):
        value = getattr(p, f.name)
        if not is_per_slot(p, f.name, value):
            values[f.name] = value
        elif memo is None:
            values[f.name] = fn(f.name, value)
        else:
            values[f.name] = identity_memo(memo, (value,), lambda n=f.name, v=value: fn(n, v))
    return type(p)(**values)


def with_zero_row(form: LayerForm) -> LayerForm:
    """The form with one more slot, all zeros, last (so that ``slots = -1`` selects it); the
    rotation's slot gets ``v = v0`` (its identity). Shared tensors are kept as they are."""
    memo: dict = {}  # a tensor two fields share is padded once

    def pad(p: Any) -> Any:
        def append_zero(name: str, value: torch.Tensor) -> torch.Tensor:
            zero = p.v0[None] if name == "v" else value.new_zeros(1, *value.shape[1:])
            return torch.cat([value, zero])

        return _map_per_slot(p, append_zero, memo)

    return form.map_primitives(pad, n_slots=form.n_slots + 1)


def gather_slots(form: LayerForm, slots: torch.Tensor, in_range: bool = False) -> LayerForm:
    """The form whose slot ``i`` is slot ``slots[i]`` of ``form`` (``-1``: its last slot, the zero
    slot of :func:`with_zero_row` or of a table): per-row tensors, gathered once per batch
    composition; shared tensors are kept. ``in_range``: no ``-1`` in ``slots`` (a cheaper
    gather)."""

    def gather(_: str, value: torch.Tensor) -> torch.Tensor:
        return value.index_select(0, slots) if in_range else value[slots]

    memo: dict = {}
    return form.map_primitives(lambda p: _map_per_slot(p, gather, memo), n_slots=len(slots))


def _rows(table: torch.Tensor, ndim: int, lead: int = 1) -> torch.Tensor:
    """A per-row table ``(N or 1, *k)`` shaped ``(N or 1, 1.., *k)`` to broadcast over an
    activation of ``ndim`` dimensions; ``lead``: how many trailing dimensions ``k`` has."""
    return table.view(table.shape[0], *([1] * (ndim - 2)), *table.shape[table.dim() - lead :])


def _low_rank(t: LowRank, x: torch.Tensor) -> torch.Tensor:
    if t.A.shape[0] == 1:  # one adapter for every row: plain products
        return F.linear(F.linear(x, t.A[0]), t.B[0])
    x3 = x.reshape(x.shape[0], -1, x.shape[-1])  # (N, T, d_in)
    hidden = torch.bmm(x3, t.A.transpose(1, 2))  # (N, T, r)
    out = torch.bmm(hidden, t.B.transpose(1, 2))  # (N, T, d_out)
    return out.reshape(*x.shape[:-1], out.shape[-1])


def _shared_basis(t: SharedBasisLowRank, x: torch.Tensor, linear=None) -> torch.Tensor:
    linear = F.linear if linear is None else linear
    hidden = linear(x, t.A) * _rows(t.inner, x.dim())  # (N, .., r): A once for the batch
    return _rows(t.outer, x.dim()) * linear(hidden, t.B)


def _rotation_moved(p: OutputRotation, h: torch.Tensor) -> torch.Tensor:
    """``(U(θ, v) − U(0, v0)) U(0, v0)ᴴ h`` per row."""
    theta, v = _rows(p.theta, h.dim(), 2), _rows(p.v, h.dim(), 3)
    mine = (torch.polar(torch.ones_like(theta), theta), *reflection_vectors(v))
    base = (None, *reflection_vectors(p.v0))
    w = apply_unitary_adjoint(to_complex(h), *base, p.perm.argsort())
    return to_real(apply_unitary(w, *mine, p.perm) - apply_unitary(w, *base, p.perm))


def _input_change(form: LayerForm, x: torch.Tensor) -> torch.Tensor:
    """``x̃ − x`` of the input-side primitives (exact zeros for zero slots)."""
    x_in = x
    if form.input_scale is not None:
        x_in = x_in + _rows(form.input_scale.delta, x.dim()) * x_in
    if form.input_rotation is not None:
        p = form.input_rotation
        blocks = p.blocks[0] if p.blocks.shape[0] == 1 else p.blocks
        moved = rotate_rows(x_in, blocks, p.perms, p.perms.argsort(dim=-1)) - x_in
        x_in = x_in + _rows(p.mix[:, None], x.dim()) * moved
    return x_in - x


def form_delta(
    form: LayerForm,
    x: torch.Tensor,
    out0: torch.Tensor,
    weight: torch.Tensor | None = None,
    term_input: torch.Tensor | None = None,
    linear: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """``y − W0 x − b0`` for a form with one slot per row of ``x (N, ..., d_in)`` (or one slot
    for every row), ``out0 = W0 x``; zero slots give exact zeros. ``weight``: W0, needed only by
    input-side primitives; ``term_input``: what the additive terms read (e.g. ``x`` after
    training dropout; default ``x``); ``linear``: ``x Wᵀ`` for the shared bases' fixed ``W``
    (an engine may pass a GEMM with prepacked weights; default ``F.linear``)."""
    parts, h = [], out0
    if form.reads_base_input_changed:
        moved_in = F.linear(_input_change(form, x), weight.to(x.dtype))  # W0 (x̃ − x)
        parts.append(moved_in)
        h = out0 + moved_in
    if form.output_rotation is not None:
        moved = _rotation_moved(form.output_rotation, h)
        parts.append(moved)
        h = h + moved
    if form.output_scale is not None:
        parts.append(_rows(form.output_scale.delta, x.dim()) * h)
    term_x = x if term_input is None else term_input
    for t in form.terms:
        if isinstance(t, LowRank):
            parts.append(_low_rank(t, term_x))
        elif t.A.shape[0]:  # a shared basis cut to no component adds exact zeros
            parts.append(_shared_basis(t, term_x, linear))
    if form.bias is not None:
        parts.append(_rows(form.bias.delta, x.dim()).expand_as(out0))
    if not parts:
        return torch.zeros_like(out0)
    delta = parts[0]
    for part in parts[1:]:
        delta = delta + part
    return delta


def gathered_forward(
    form: LayerForm,
    x: torch.Tensor,
    slots: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    out0: torch.Tensor | None = None,
) -> torch.Tensor:
    """The layer's output for ``x (N, ..., d_in)``, row i with slot ``slots[i]``, where ``form``
    ends with a zero slot (:func:`with_zero_row`) and ``slots`` uses ``-1`` for base rows.
    ``out0``: ``W0 x`` if the engine already has it. ``x``, ``out0`` in the form's dtype."""
    out0 = F.linear(x, weight.to(x.dtype)) if out0 is None else out0
    y = out0 if bias is None else out0 + bias.to(out0.dtype)  # the base rows, as the base
    return y + form_delta(gather_slots(form, slots), x, out0, weight)
