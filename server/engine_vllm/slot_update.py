"""Writing one slot's form into a stacked slice in place (a hot swap without restacking).

When vLLM puts an adapter into a slot, :func:`update_slot` writes the new adapter's per-slot
rows into the slice stacked by :func:`.slices.stack_slice` (a stack has a row per slot: its row
of every per-slot table, its ``r`` rows of each concatenated low-rank factor), if the new form
fits one stacked layout: the same primitives and shapes, the same shared tensors, a low-rank
term of at most the stacked rank, and (shared bases cut to the used components) no component
outside that cut. A slot that changes layout group leaves its old group by pointing at that
group's zero row. Otherwise it answers False and the layer restacks that slice. Shared tensors
are never written. Tested equal to a fresh stack (``tests/server/test_vllm_slices.py``).

A form read from a forms file (:class:`.form_file.LazyForm`) of output/input scales, bias deltas
and shared-basis terms is copied straight from the file's flat tensor: each stack makes a write
plan once per file layout (adapters of one slot bank share it), so the next adapters of that
layout are not decoded at all.
"""

from __future__ import annotations

import math
from dataclasses import fields

import torch
import torch.nn.functional as F

from svda.runtime.serving_form import LayerForm
from svda.runtime.serving_form.compile import SHARED_FIELDS
from svda.runtime.serving_form.primitives import (
    BiasDelta,
    InputScale,
    LowRank,
    OutputScale,
    SharedBasisLowRank,
)

from .form_file import LazyForm
from .slices import SIDES, BasisCut, DenseTerm, StackedSlice


def update_slot(stacked: StackedSlice | None, slot: int, form: LayerForm | LazyForm | None) -> bool:
    """Write ``form`` (one slot; None: the slot holds no svda form now) as slot ``slot`` of
    ``stacked`` in place; False when it does not fit (restack instead): nothing stacked, or a
    layout none of the stacked groups has."""
    if stacked is None:
        return False
    groups = stacked.groups or (stacked,)
    mine = [g for g in groups if slot in g.present]  # the slot's group, if any
    target = None
    if form is not None:
        target = next((g for g in mine + list(groups) if _write(g, slot, form)), None)
        if target is None:
            return False
    for group in mine:
        if group is not target:  # the slot left this layout: its tokens read the zero row
            group.table[slot] = group.zero_row
            group.present.discard(slot)
            group.cache.clear()
    return True


def _write(stacked: StackedSlice, slot: int, form: LayerForm | LazyForm) -> bool:
    """``form`` into row ``slot`` of one layout's stack, if it has that layout."""
    if isinstance(form, LazyForm):
        planned = _planned_write(stacked, slot, form)
        if planned is not None:
            return planned
        form = form.form()
    if not _same_layout(stacked, form):
        return False
    writes = _side_writes(stacked, form, slot)
    terms = _term_writes(stacked, form, slot)
    if writes is None or terms is None:
        return False
    once = _once_per_target(writes + terms)
    if once is None:
        return False
    for target, index, row, _ in once:
        target[index] = row  # copies, casting to the stack's dtype
    _now_holds(stacked, slot)
    return True


def _same_layout(stacked: StackedSlice, form: LayerForm) -> bool:
    """The form has the stack's primitives and shapes (shared tensors are checked apart)."""
    if stacked.form is None or tuple(form.kinds()) != stacked.kinds:
        return False
    return (form.d_in, form.d_out) == (stacked.form.d_in, stacked.form.d_out)


def _once_per_target(writes: list[tuple]) -> list[tuple] | None:
    """``writes`` (stacked tensor first, the form's field last) with one write per stacked
    tensor; None when the stack shares a tensor between two fields and the form does not."""
    once: dict[int, tuple] = {}
    for write in writes:
        if once.setdefault(id(write[0]), write)[-1] is not write[-1]:
            return None
    return list(once.values())


def _now_holds(stacked: StackedSlice, slot: int) -> None:
    if slot not in stacked.present:  # else its table entry is the slot's row already
        stacked.table[slot] = slot
        stacked.present.add(slot)
    stacked.cache.clear()  # gathered rows of the old adapter


def _side_writes(stacked: StackedSlice, form: LayerForm, row: int) -> list | None:
    """The per-slot rows of the input/output primitives; None if a shared tensor differs."""
    writes = []
    for name in SIDES:
        new, old = getattr(form, name), getattr(stacked.form, name)
        if new is None:
            continue
        for f in fields(new):
            value, target = getattr(new, f.name), getattr(old, f.name)
            if not isinstance(value, torch.Tensor):
                continue
            if f.name in SHARED_FIELDS:
                if not torch.equal(value.to(target), target):
                    return None
            else:
                writes.append((target, row, value[0], value))
    return writes


def _term_writes(stacked: StackedSlice, form: LayerForm, row: int) -> list | None:
    writes, basis = [], 0
    for term, (where, k) in zip(form.terms, stacked.places, strict=True):
        if isinstance(term, SharedBasisLowRank):
            one = _shared_basis_writes(stacked.form.terms[k], stacked.bases[basis], term, row)
            basis += 1
        elif where == "dense":
            one = _dense_writes(stacked.dense[k], term, row)
        else:
            one = _low_rank_writes(stacked.form.terms[k], term, row)
        if one is None:
            return None
        writes += one
    return writes


def _shared_basis_writes(old: SharedBasisLowRank, basis: BasisCut, new: SharedBasisLowRank, row):
    if not (_same(new.A, basis.A) and _same(new.B, basis.B)):
        return None  # another basis (e.g. another seed): not the stacked one
    inner, outer = new.inner[0], (old.outer, row, new.outer[0], new.outer)
    if basis.kept is None:  # no cut
        return [(old.inner, row, inner, new.inner), outer]
    if bool(inner.index_select(0, basis.dropped).any()):
        return None  # a component the stacked cut dropped
    return [(old.inner, row, inner.index_select(0, basis.kept), new.inner), outer]


def _dense_writes(dense: DenseTerm, new: LowRank, row: int) -> list | None:
    r, r_new = dense.r, new.A.shape[1]
    if r_new > r:
        return None
    a = F.pad(new.A[0], (0, 0, 0, r - r_new))  # (r, d_in), zero rows past r_new
    bt = F.pad(new.B[0], (0, r - r_new)).t()  # (r, d_out)
    return [(dense.A, row, a, new.A), (dense.Bt, row, bt, new.B)]


def _low_rank_writes(old: LowRank, new: LowRank, row: int) -> list | None:
    r, r_new = old.A.shape[1], new.A.shape[1]
    if r_new > r:
        return None
    return [
        (old.A, row, F.pad(new.A[0], (0, 0, 0, r - r_new)), new.A),
        (old.B, row, F.pad(new.B[0], (0, r - r_new)), new.B),
    ]


def _same(x: torch.Tensor, y: torch.Tensor) -> bool:
    """One shared tensor (the same object in the worker: read once per process) or equal."""
    return x is y or (x.shape == y.shape and x.dtype == y.dtype and bool(torch.equal(x, y)))


# ----- write plans: a form read from a file, copied from the file's flat tensor ------------------
PLANNED = (InputScale, OutputScale, BiasDelta, SharedBasisLowRank)  # no shared field in the file
NO_PLAN, NO_FIT = "no plan", "no fit"


def _planned_write(stacked: StackedSlice, slot: int, lazy: LazyForm) -> bool | None:
    """Copy the layer's rows straight from ``lazy.file.flat`` with the plan this stack made for
    the file's layout (adapters of one slot bank share it: only the first is decoded); None
    when no plan applies (write the decoded form), False when the form does not fit."""
    key = (id(lazy.file.layout), lazy.layer)
    known = stacked.plans.get(key)
    if known is None or known[0] is not lazy.file.layout:
        known = stacked.plans[key] = (lazy.file.layout, _make_plan(stacked, lazy))
    plan = known[1]
    if plan == NO_PLAN:
        return None
    if plan == NO_FIT:
        return False
    checks, writes = plan
    flat = lazy.file.flat
    for name, dropped in checks:
        buffer = flat[name]
        values = buffer[dropped] if isinstance(dropped, slice) else buffer.index_select(0, dropped)
        if bool(values.any()):
            return False  # a component the stacked cut dropped
    for target, name, source in writes:
        buffer = flat[name]
        target[slot] = (
            buffer[source] if isinstance(source, slice) else buffer.index_select(0, source)
        )
    _now_holds(stacked, slot)
    return True


def _make_plan(stacked: StackedSlice, lazy: LazyForm):
    """``(checks, writes)`` for forms of this layout: ``checks`` (flat name, indices that must
    be zero), ``writes`` (stacked tensor, flat name, slice or indices of its row); or NO_FIT /
    NO_PLAN. The layer is decoded once to check its structure (the values are checked per
    adapter: a cut component must be zero)."""
    form = lazy.form()
    if not _same_layout(stacked, form):
        return NO_FIT
    if not all(isinstance(p, PLANNED) for p in form.primitives()):
        return NO_PLAN
    pairs, cuts = [], {}  # (stacked tensor, the form's field); inner vectors of cut bases
    for name in SIDES:
        new, old = getattr(form, name), getattr(stacked.form, name)
        if new is not None:
            pairs += [(getattr(old, f.name), getattr(new, f.name)) for f in fields(new)]
    bases = iter(stacked.bases)
    for term, (_, k) in zip(form.terms, stacked.places, strict=True):
        cut, old = next(bases), stacked.form.terms[k]
        if not (_same(term.A, cut.A) and _same(term.B, cut.B)):
            return NO_FIT  # another basis (e.g. another seed): not the stacked one
        pairs += [(old.inner, term.inner), (old.outer, term.outer)]
        cuts[id(term.inner)] = cut
    once = _once_per_target(pairs)  # a tensor the stack shares between two fields: once
    if once is None:
        return NO_FIT
    writes, checks = [], []
    for target, field in once:
        place = lazy.file.place_of(field)
        if place is None or place[2][0] != 1:
            return NO_PLAN
        name, offset, shape = place
        source = slice(offset, offset + math.prod(shape))
        cut = cuts.get(id(field))
        if cut is not None and cut.kept is not None:  # inner vector of a cut shared basis
            if not len(cut.kept):  # cut to nothing: the whole vector must be zero
                checks.append((name, source))
                continue
            checks.append((name, cut.dropped + offset))
            source = cut.kept + offset
        writes.append((target, name, source))
    return checks, writes
