"""Pure-torch reference of every serving-form primitive (``.primitives``), per slot.

Plain and slow on purpose: rows are grouped by slot and each group is run through the layer's
formula with that slot's tensors; rows at -1 are never touched (``W0 x + b0`` as the base layer
computes it). Engines test their fast kernels against :func:`reference_forward`.
"""

from __future__ import annotations

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
from .primitives import (
    InputRotation,
    LayerForm,
    LowRank,
    OutputRotation,
    SharedBasisLowRank,
    Term,
)


def input_rotation(p: InputRotation, k: int, x: torch.Tensor) -> torch.Tensor:
    """``x + mix[k]·(x R_k − x)`` for rows ``x (..., d_in)``."""
    inverse = p.perms.argsort(dim=-1)
    moved = rotate_rows(x, p.blocks[k], p.perms, inverse) - x
    return x + p.mix[k] * moved


def output_rotation(p: OutputRotation, k: int, h: torch.Tensor) -> torch.Tensor:
    """``h + (U(θ_k, v_k) − U(0, v0)) U(0, v0)ᴴ h`` for rows ``h (..., d_out)``."""
    inverse = p.perm.argsort()
    phases = torch.polar(torch.ones_like(p.theta[k]), p.theta[k])  # (3, n)
    mine = (phases, *reflection_vectors(p.v[k]))
    base = (None, *reflection_vectors(p.v0))
    w = apply_unitary_adjoint(to_complex(h), *base, inverse)
    moved = apply_unitary(w, *mine, p.perm) - apply_unitary(w, *base, p.perm)
    return h + to_real(moved)


def term(t: Term, k: int, x: torch.Tensor) -> torch.Tensor:
    """One additive term of slot ``k`` on rows ``x (..., d_in)``: ``(..., d_out)``."""
    if isinstance(t, LowRank):
        return F.linear(F.linear(x, t.A[k]), t.B[k])
    if isinstance(t, SharedBasisLowRank):
        return t.outer[k] * F.linear(t.inner[k] * F.linear(x, t.A), t.B)
    raise TypeError(f"unknown serving-form term {type(t).__name__}")


def apply_slot(
    form: LayerForm,
    k: int,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """The layer's output for rows ``x (..., d_in)`` that all use slot ``k`` (``0 ≤ k < n``);
    ``weight``: ``W0 (d_out, d_in)``, ``bias``: ``b0 (d_out,)`` or None. In the form's dtype."""
    w0 = weight.to(x.dtype)
    x_in = x
    if form.input_scale is not None:
        x_in = x_in + form.input_scale.delta[k] * x_in
    if form.input_rotation is not None:
        x_in = input_rotation(form.input_rotation, k, x_in)
    h = F.linear(x, w0) + F.linear(x_in - x, w0)
    if form.output_rotation is not None:
        h = output_rotation(form.output_rotation, k, h)
    if form.output_scale is not None:
        h = h + form.output_scale.delta[k] * h
    y = h if bias is None else h + bias.to(x.dtype)
    for t in form.terms:
        y = y + term(t, k, x)
    if form.bias is not None:
        y = y + form.bias.delta[k]
    return y


def reference_forward(
    form: LayerForm,
    x: torch.Tensor,
    slots: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """The layer's output for a mixed batch: row ``i`` of ``x (N, ..., d_in)`` uses slot
    ``slots[i]`` (``-1``: the base, ``F.linear(x, W0, b0)`` exactly). Returns ``(N, ..., d_out)``
    in ``x``'s dtype; the adapter rows are computed in the form's dtype."""
    _check_slots(form, x, slots)
    out = F.linear(x, weight, bias)
    dtype = _form_dtype(form, x.dtype)
    for k in torch.unique(slots).tolist():
        if k < 0:
            continue
        rows = slots == k
        out[rows] = apply_slot(form, k, x[rows].to(dtype), weight, bias).to(out.dtype)
    return out


def _check_slots(form: LayerForm, x: torch.Tensor, slots: torch.Tensor) -> None:
    if slots.dim() != 1 or slots.shape[0] != x.shape[0]:
        raise ValueError(
            f"slots must be (N,) with N = x.shape[0] = {x.shape[0]}, got {tuple(slots.shape)}"
        )
    if slots.numel() and not (int(slots.min()) >= -1 and int(slots.max()) < form.n_slots):
        raise ValueError(f"slots must lie in [-1, {form.n_slots}), got {slots.tolist()}")
    if x.shape[-1] != form.d_in:
        raise ValueError(f"x has {x.shape[-1]} features, the form expects d_in = {form.d_in}")


def _form_dtype(form: LayerForm, default: torch.dtype) -> torch.dtype:
    for p in form.primitives():
        for value in vars(p).values():
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                return value.dtype
    return default
