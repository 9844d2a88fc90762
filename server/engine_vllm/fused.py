"""A whole vLLM layer's svda delta for a decode batch in a few products (every output slice at once).

A packed layer such as ``qkv_proj`` holds one stacked slice per output (q, k, v); the generic
path (:func:`.slices.stacked_delta`) runs each slice on its own, a dozen small torch calls per
slice. Decode batches are small (a few tokens per step, :data:`.slices.GATHER_MAX_TOKENS` at
most), so these calls, not their arithmetic, are the cost. When every slice of the layer holds
only the simple primitives — an output scale, low-rank terms kept dense, at most one shared-basis
term, a bias delta — a :class:`LayerPlan`, made once per batch layout, lays the tokens' rows of
all slices side by side over the layer's whole output ``y (N, D)`` (zeros where a slice has
nothing)::

    y += s ⊙ y                      output scales (SvdA's b, DoRA's magnitude, IA³ on k, v)
    y += c                          bias deltas − s ⊙ b0 (so the scale acts on W0x only)
    h = x A_tokᵀ                    every dense low-rank term: A_tok (N, R, d_in) in float32,
    y[:, slice] += h[:, rows] Bt    one batched product per layer, then one per slice with its
                                    terms' Bᵀ rows (N, r, size): no zero blocks between slices
    y += o ⊙ (B_sh (i ⊙ (A_sh x)))  the shared bases (SvdA's Vᵀ, U; VeRA's A, B) of all slices:
                                    A_sh (K, d_in) stacked, B_sh (D, K) block-placed

A slice stacked in several layout groups (slots of several methods) is planned from the groups
the batch uses: each group's rows for the tokens of the other groups are its zero row (exact
zeros: no scale, no bias, zero inner and outer vectors, zero factors), so the groups' rows add
— their scales, biases and outer vectors summed into one row per token, their low-rank terms
and shared bases side by side. Anything else (rotations, input scales, a compute dtype other
than the model's, prefill batches of several slots) returns None and takes the per-slice path.
Pure torch; tested equal to the per-slice path (``tests/server/test_vllm_fused.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from svda.runtime.serving_form.primitives import SharedBasisLowRank

from .slices import GATHER_MAX_TOKENS, BatchLayout, StackedSlice

Linear = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class SharedBases:
    """The shared-basis terms of a layer's slices as one pair of products: ``A (K, d_in)`` the
    slices' ``A`` stacked, ``B (D, K)`` each slice's ``B`` at its output rows and its components'
    columns; ``parts`` the per-slice tensors they were made from (a later layout with the same
    parts reuses them, so prepacked GEMM handlers stay valid)."""

    A: torch.Tensor
    B: torch.Tensor
    parts: tuple


@dataclass(frozen=True)
class LowRankBlock:
    """One slice's dense low-rank terms in a :class:`LayerPlan`: the tokens' ``Bᵀ`` rows
    ``bt (M, r, size)`` (float32), fed by rows ``rows`` of ``h = x A_tokᵀ``, added to the
    slice's output columns ``start : start + size``."""

    start: int
    rows: slice
    bt: torch.Tensor

    def out(self, y: torch.Tensor) -> torch.Tensor:
        return y[:, self.start : self.start + self.bt.shape[2]]  # a view: added in place


@dataclass(frozen=True)
class LayerPlan:
    """One batch layout's gathered rows for a whole layer (see the module docstring); every
    field None when no token of the layout has a row in it. ``uniform``: every token has one
    slot, whose row alone was gathered (``M = 1``, broadcast over the tokens); else ``M = N``."""

    scale: torch.Tensor | None = None  # (M, D), model dtype
    const: torch.Tensor | None = None  # (M, D), model dtype
    a_tok: torch.Tensor | None = None  # (M, R, d_in), float32
    b_blocks: tuple[LowRankBlock, ...] = ()  # one per slice with dense terms
    shared: SharedBases | None = None
    inner: torch.Tensor | None = None  # (M, K), model dtype
    outer: torch.Tensor | None = None  # (M, D), model dtype
    uniform: bool = False

    def apply(self, x: torch.Tensor, y: torch.Tensor, linear: Linear | None = None) -> None:
        """Add the layer's delta to ``y = W0 x + b0 (N, D)`` in place; ``x (N, d_in)``."""
        if self.scale is not None:
            y.addcmul_(y, self.scale)  # before the terms: the scale acts on the base output only
        if self.const is not None:
            y.add_(self.const)
        if self.a_tok is not None and self.uniform:  # one slot's factors: plain products
            h = x.float() @ self.a_tok[0].t()  # (N, R)
            for block in self.b_blocks:
                block.out(y).add_(h[:, block.rows] @ block.bt[0])
        elif self.a_tok is not None:
            h = torch.bmm(x.float().unsqueeze(1), self.a_tok.transpose(1, 2))  # (N, 1, R)
            for block in self.b_blocks:
                block.out(y).add_(torch.bmm(h[:, :, block.rows], block.bt).squeeze(1))
        if self.shared is not None:
            linear = linear or F.linear
            h = linear(x, self.shared.A).mul_(self.inner)
            y.addcmul_(linear(h, self.shared.B), self.outer)


def plan_key(layout: object, n_tokens: int) -> tuple | None:
    """What a layer keeps the plan of this batch under, or None when the batch is not planned
    (no host-side layout, or several slots over more than :data:`GATHER_MAX_TOKENS` tokens):
    one plan per slot for a batch whose every token has that slot, whatever the tokens (a
    request's prefill and decode), else one per layout content and batch size."""
    if not isinstance(layout, BatchLayout):
        return None
    if layout.uniform is not None:
        return ("one", layout.uniform)
    return (layout.key, n_tokens) if n_tokens <= GATHER_MAX_TOKENS else None


def plan_layer(
    slices: list[tuple[StackedSlice | None, int, int]],
    layout: BatchLayout,
    n_tokens: int,
    model_dtype: torch.dtype,
    bias: torch.Tensor | None = None,
    memo: dict | None = None,
) -> LayerPlan | None:
    """The :class:`LayerPlan` of a layer whose output slices are ``(stacked, start, size)`` for
    the first ``n_tokens`` tokens of ``layout``; None when some slice needs the per-slice path.
    ``bias``: the base layer's bias ``b0 (D,)``; ``memo``: the layer's dict for its shared bases.
    A layout whose every token has one slot gathers that slot's row once, for any batch size."""
    if plan_key(layout, n_tokens) is None:
        return None
    uniform = layout.uniform is not None
    active = []
    for stacked, start, size in slices:
        parts = () if stacked is None else stacked.groups or (stacked,)
        used = [p for p in parts if not p.present.isdisjoint(layout.used)]  # none: no row here
        if not all(_fits(p, model_dtype) for p in used):
            return None  # forms the plan lacks
        active += [(p, start, size) for p in used]  # several groups: their rows add
    if not active:
        return LayerPlan()
    width = slices[-1][1] + slices[-1][2]
    rows_n = 1 if uniform else n_tokens
    gathered = [(s, start, size, _picker(s, layout, rows_n)) for s, start, size in active]
    placed: dict = {}  # a per-slot table two fields share (SvdA's b) is placed once
    scale = _side(gathered, "output_scale", rows_n, width, placed)
    const = _side(gathered, "bias", rows_n, width, placed)
    if scale is not None and bias is not None:
        const = -scale * bias if const is None else const - scale * bias
    a_tok, b_blocks = _per_token_low_rank(gathered)
    shared, inner, outer = _shared(gathered, rows_n, width, {} if memo is None else memo, placed)
    return LayerPlan(scale, const, a_tok, b_blocks, shared, inner, outer, uniform)


def _picker(stacked: StackedSlice, layout: BatchLayout, n: int):
    """The tokens' rows of a per-slot table of ``stacked``: one slot's row as a view (every
    token at that slot), else a gather by the first ``n`` tokens' slots."""
    if layout.uniform is not None:  # a slot holds its own row, or reads the zero row
        row = layout.uniform if layout.uniform in stacked.present else stacked.zero_row
        return lambda t: t.narrow(0, row, 1)
    rows = stacked.table.index_select(0, layout.slots[:n])
    return lambda t: t.index_select(0, rows)


def _place(pieces: list[tuple[int, torch.Tensor]], n: int, width: int) -> torch.Tensor:
    """``(start, rows (n, size))`` pieces side by side over ``width`` columns, zeros between
    (one concatenation; a piece covering every column is returned as it is); pieces of one
    slice's layout groups (the same start) add."""
    if len({start for start, _ in pieces}) < len(pieces):
        out = pieces[0][1].new_zeros(n, width)
        for start, rows in pieces:
            out[:, start : start + rows.shape[1]] += rows
        return out
    parts, at = [], 0
    for start, rows in sorted(pieces, key=lambda p: p[0]):
        if start > at:
            parts.append(_zeros(rows, n, start - at))
        parts.append(rows)
        at = start + rows.shape[1]
    if at < width:
        parts.append(_zeros(parts[-1], n, width - at))
    return _cat(parts)


_ZEROS: dict = {}  # (rows, columns, dtype, device) -> zeros (read only: concatenated, copied)


def _zeros(like: torch.Tensor, n: int, width: int) -> torch.Tensor:
    key = (n, width, like.dtype, like.device)
    if key not in _ZEROS:
        if len(_ZEROS) >= 256:
            _ZEROS.clear()
        _ZEROS[key] = like.new_zeros(n, width)
    return _ZEROS[key]


def _placed(placed: dict, tables: list[tuple[int, torch.Tensor, object]], n: int, width: int):
    """:func:`_place` of ``(start, per-slot table, picker)``, once per set of tables."""
    key = tuple((start, id(t)) for start, t, _ in tables)
    if key not in placed:
        placed[key] = (tables, _place([(start, pick(t)) for start, t, pick in tables], n, width))
    return placed[key][1]


def _fits(stacked: StackedSlice, model_dtype: torch.dtype) -> bool:
    """Whether a slice's stack holds only what :class:`LayerPlan` applies."""
    form = stacked.form
    if stacked.groups or stacked.needs_w0 or stacked.dtype != model_dtype or form is None:
        return False
    if any(p is not None for p in (form.input_scale, form.input_rotation, form.output_rotation)):
        return False
    return all(isinstance(t, SharedBasisLowRank) for t in form.terms) and len(form.terms) <= 1


def _side(gathered: list, name: str, n: int, width: int, placed: dict) -> torch.Tensor | None:
    """The slices' per-row ``output_scale`` or ``bias`` deltas over the whole output (zeros
    where a slice has none); None when no slice has one."""
    tables = [
        (start, getattr(s.form, name).delta, pick)
        for s, start, _, pick in gathered
        if getattr(s.form, name) is not None
    ]
    return _placed(placed, tables, n, width) if tables else None


def _per_token_low_rank(gathered: list) -> tuple[torch.Tensor | None, tuple[LowRankBlock, ...]]:
    """Every dense low-rank term of every slice as the tokens' ``A (n, R, d_in)`` (each slice's
    rows, one slice after another) and one :class:`LowRankBlock` per slice (the same rows'
    ``Bᵀ``), float32: whole rows of :class:`.slices.DenseTerm` gathered (one slot: views when
    the model computes in float32), no transposing copy, no zeros between slices. A slice's
    layout groups share rows: a token's rows are zero in every group but its own, so the
    groups' factors, zero-padded to the largest rank, add (rank max, not sum, per token)."""
    per_slice: dict[int, list] = {}
    for s, start, _, pick in gathered:
        if s.dense:
            a = _cat([pick(t.A).float() for t in s.dense])  # (n, r_group, d_in)
            per_slice.setdefault(start, []).append((a, _cat([pick(t.Bt).float() for t in s.dense])))
    a_parts, blocks, offset = [], [], 0
    for start, parts in per_slice.items():
        a, bt = parts[0] if len(parts) == 1 else _add_padded(parts)
        a_parts.append(a)
        blocks.append(LowRankBlock(start, slice(offset, offset + a.shape[1]), bt))
        offset += a.shape[1]
    if not a_parts:
        return None, ()
    return _cat(a_parts), tuple(blocks)


def _cat(parts: list[torch.Tensor]) -> torch.Tensor:
    """``parts`` side by side along dim 1 (one part: itself, a view stays a view)."""
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def _add_padded(parts: list[tuple[torch.Tensor, torch.Tensor]]):
    """Layout groups' ``(A (n, r_g, d_in), Bᵀ (n, r_g, size))`` as one pair of the largest rank
    (rows past a group's rank are zero): each token has nonzero rows in one group only."""
    r = max(a.shape[1] for a, _ in parts)
    a_sum = sum(F.pad(a, (0, 0, 0, r - a.shape[1])) for a, _ in parts)
    bt_sum = sum(F.pad(bt, (0, 0, 0, r - bt.shape[1])) for _, bt in parts)
    return a_sum, bt_sum


def _shared(gathered: list, n: int, width: int, memo: dict, placed: dict):
    """The slices' shared-basis terms (one per layout group of a slice at most) as
    :class:`SharedBases` and the tokens' ``inner (n, K)`` and ``outer (n, width)``; Nones when
    there is none. Terms of one slice's groups share its columns: a token's inner and outer
    rows are zero in every group but its own, so ``(o₁ + o₂) ⊙ (B₁h₁ + B₂h₂)`` is its own
    group's term."""
    terms = [
        (start, pick, t)
        for s, start, _, pick in gathered
        for t in s.form.terms
        if t.A.shape[0]  # a basis cut to no component adds exact zeros
    ]
    if not terms:
        return None, None, None
    bases = _stacked_bases([(start, t.A, t.B) for start, _, t in terms], width, memo)
    inner = _cat([pick(t.inner) for _, pick, t in terms])
    outer = _placed(placed, [(start, t.outer, pick) for start, pick, t in terms], n, width)
    return bases, inner, outer


def _stacked_bases(parts: list[tuple[int, torch.Tensor, torch.Tensor]], width: int, memo: dict):
    """:class:`SharedBases` of ``(start, A, B)`` per slice, the last one made kept in ``memo``."""
    held = memo.get("bases")
    if (
        held is not None
        and len(held.parts) == len(parts)
        and all(
            p[0] == q[0] and p[1] is q[1] and p[2] is q[2]
            for p, q in zip(held.parts, parts, strict=True)
        )
    ):
        return held
    a = torch.cat([A for _, A, _ in parts]).contiguous()
    b = a.new_zeros(width, a.shape[0])
    offset = 0
    for start, A, B in parts:
        b[start : start + B.shape[0], offset : offset + A.shape[0]] = B
        offset += A.shape[0]
    memo["bases"] = SharedBases(a, b, tuple(parts))
    return memo["bases"]
