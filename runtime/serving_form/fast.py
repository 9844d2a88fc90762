"""Batched (gathered) implementation of the serving-form primitives: one pass over a mixed batch.

What an engine does with a stacked form (``.compile.stack_forms``): every per-slot table gets a
zero row appended (:func:`with_zero_row`) and slot -1 selects it, so every primitive adds exact
zeros to base rows; each row's tensors are gathered by slot; shared bases (VeRA, SvdA) multiply
the whole batch once. Tested equal to :func:`.reference.reference_forward`. A torch fallback
for engines without their own kernels (vLLM's punica-style kernels would replace ``LowRank``).
"""

from __future__ import annotations

import dataclasses
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
from .compile import SHARED_FIELDS
from .primitives import LayerForm, LowRank, SharedBasisLowRank


def with_zero_row(form: LayerForm) -> LayerForm:
    """The form with one more slot, all zeros, last (so that ``slots = -1`` selects it); the
    rotation's slot gets ``v = v0`` (its identity). Shared tensors are kept as they are."""

    def pad(p: Any) -> Any:
        if p is None:
            return None
        values = {}
        for f in dataclasses.fields(p):
            value = getattr(p, f.name)
            per_slot = isinstance(value, torch.Tensor) and (
                isinstance(p, LowRank) or f.name not in SHARED_FIELDS
            )
            if per_slot:
                zero = p.v0[None] if f.name == "v" else value.new_zeros(1, *value.shape[1:])
                value = torch.cat([value, zero])
            values[f.name] = value
        return type(p)(**values)

    return dataclasses.replace(
        form,
        n_slots=form.n_slots + 1,
        input_scale=pad(form.input_scale),
        input_rotation=pad(form.input_rotation),
        output_rotation=pad(form.output_rotation),
        output_scale=pad(form.output_scale),
        terms=tuple(pad(t) for t in form.terms),
        bias=pad(form.bias),
    )


def _rows(table: torch.Tensor, slots: torch.Tensor, ndim: int) -> torch.Tensor:
    """``table[slots]`` (n, k) -> (N, 1.., k) broadcastable over an activation of ``ndim``."""
    picked = table[slots]
    return picked.view(picked.shape[0], *([1] * (ndim - 2)), *picked.shape[1:])


def _low_rank(t: LowRank, x: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    x3 = x.reshape(x.shape[0], -1, x.shape[-1])  # (N, T, d_in)
    hidden = torch.bmm(x3, t.A[slots].transpose(1, 2))  # (N, T, r)
    out = torch.bmm(hidden, t.B[slots].transpose(1, 2))  # (N, T, d_out)
    return out.reshape(*x.shape[:-1], out.shape[-1])


def _shared_basis(t: SharedBasisLowRank, x: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    hidden = F.linear(x, t.A) * _rows(t.inner, slots, x.dim())  # (N, .., r): A once per batch
    return _rows(t.outer, slots, x.dim()) * F.linear(hidden, t.B)


def _output_rotation(p, h: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    theta = _rows(p.theta, slots, h.dim())  # (N, 1.., 3, n)
    v = p.v[slots].view(len(slots), *([1] * (h.dim() - 2)), *p.v.shape[1:])
    mine = (torch.polar(torch.ones_like(theta), theta), *reflection_vectors(v))
    base = (None, *reflection_vectors(p.v0))
    w = apply_unitary_adjoint(to_complex(h), *base, p.perm.argsort())
    return h + to_real(apply_unitary(w, *mine, p.perm) - apply_unitary(w, *base, p.perm))


def gathered_forward(
    form: LayerForm,
    x: torch.Tensor,
    slots: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    out0: torch.Tensor | None = None,
) -> torch.Tensor:
    """The layer's output for ``x (N, ..., d_in)``, row i with slot ``slots[i]``, where ``form``
    ends with a zero slot (:func:`with_zero_row`) and ``slots`` uses ``-1`` (or
    ``form.n_slots − 1``) for base rows. ``out0``: ``W0 x`` if the engine already has it.
    ``x``, ``out0`` in the form's dtype."""
    ndim = x.dim()
    h = F.linear(x, weight.to(x.dtype)) if out0 is None else out0
    if form.reads_base_input_changed:
        x_in = x
        if form.input_scale is not None:
            x_in = x_in + _rows(form.input_scale.delta, slots, ndim) * x_in
        if form.input_rotation is not None:
            p = form.input_rotation
            moved = rotate_rows(x_in, p.blocks[slots], p.perms, p.perms.argsort(dim=-1)) - x_in
            x_in = x_in + _rows(p.mix[:, None], slots, ndim) * moved
        h = h + F.linear(x_in - x, weight.to(x.dtype))
    if form.output_rotation is not None:
        h = _output_rotation(form.output_rotation, h, slots)
    if form.output_scale is not None:
        h = torch.addcmul(h, _rows(form.output_scale.delta, slots, ndim), h)
    y = h if bias is None else h + bias.to(h.dtype)
    for t in form.terms:
        y = y + (_low_rank(t, x, slots) if isinstance(t, LowRank) else _shared_basis(t, x, slots))
    if form.bias is not None:
        y = y + _rows(form.bias.delta, slots, ndim)
    return y
