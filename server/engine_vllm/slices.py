"""The per-slot forms of one output slice of a vLLM layer, stacked once per slot composition.

Pure torch (no vLLM), so it is tested without vLLM. :func:`stack_slice` turns the forms in a
layer's LoRA slots (``None``: no svda form there) into what :mod:`.layers` applies per token:

* one stacked form with a row per slot and a zero row appended, and a slot -> row table
  (``-1`` and slots without a form -> the zero row), when every present form has one layout
  (the usual case): an adapter entering any slot is then written into its row in place;
* else one such stack per layout (different methods, or bases, on one layer: each maps the
  other layouts' slots to its zero slot, and :func:`stacked_delta` adds their deltas).

It is cast to the model's dtype, except forms with a rotation (BOFT, uRNN, the hybrid), which
stay float32 (Cayley/unitary products lose too much in bfloat16). Shared bases are cut to the
components some slot uses: a pruned SvdA adapter keeps few of ``min(d_in, d_out)``, and a
component no slot uses adds exact zeros.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from svda.runtime.serving_form import (
    LayerForm,
    can_stack,
    form_delta,
    gather_slots,
    stack_forms,
    with_zero_row,
)
from svda.runtime.serving_form.compile import identity_memo, is_per_slot
from svda.runtime.serving_form.primitives import LowRank, SharedBasisLowRank

from .form_file import LazyForm

DENSE_LOW_RANK_MAX = 1024  # slots x rank up to which low-rank terms are kept concatenated
GATHER_MAX_TOKENS = 64  # up to this many tokens, each token's factors are gathered per layout
SHARED_BASIS = ("A", "B")  # a SharedBasisLowRank's shared fields
SIDES = ("input_scale", "input_rotation", "output_rotation", "output_scale", "bias")
_MEMO: dict = {}  # (id, dtype, device, cut, dim) -> (shared tensor, cut and cast copy)
_MEMO_MAX = 4096
_MEMO_LOCK = threading.Lock()


class BasisCut(NamedTuple):
    """A shared basis of a stack: the uncut ``A, B`` (as in the forms) and the components kept
    (``used`` mask; their indices and the dropped ones', None when every component is kept)."""

    A: torch.Tensor
    B: torch.Tensor
    used: torch.Tensor
    kept: torch.Tensor | None = None
    dropped: torch.Tensor | None = None


class DenseTerm(NamedTuple):
    """A stacked low-rank term kept apart from the form: ``A (n, r, d_in)`` and ``Bt (n, r,
    d_out)`` (each row's ``Bᵀ``), both contiguous: ``index_select(0, rows)`` gathers whole rows
    (decode), and ``A.view(n·r, d_in)``, ``Bt.view(n·r, d_out)`` are the concatenations of the
    masked dense products (prefill)."""

    A: torch.Tensor
    Bt: torch.Tensor

    @property
    def r(self) -> int:
        return self.A.shape[1]


@dataclass(frozen=True)
class StackedSlice:
    """``form`` (stacked, zero slot last) with ``table`` (slot -> row, ``table[-1]`` the zero
    slot), or ``groups`` (slots of several layouts: one such stack per layout, each mapping the
    other layouts' slots to its zero slot); ``dtype``: what the delta is computed in;
    ``needs_w0``: some form changes the base product's input (IA³ on inputs, BOFT, hybrid)."""

    dtype: torch.dtype
    needs_w0: bool
    form: LayerForm | None = None
    table: torch.Tensor | None = None
    groups: tuple[StackedSlice, ...] = ()
    dense: tuple[DenseTerm, ...] = ()  # low-rank terms run apart from the form
    cache: dict = field(default_factory=dict, compare=False)  # per batch layout: gathered rows
    present: set[int] = field(default_factory=set, compare=False)  # slots with a row here
    plans: dict = field(default_factory=dict, compare=False)  # slot writes per file layout
    gather: FormGather | None = field(default=None, compare=False)  # rows -> per-row form
    kinds: tuple[str, ...] = ()  # the stacked forms' primitives, in order
    places: tuple[tuple[str, int], ...] = ()  # per term: ("dense", j) or ("form", k)
    bases: tuple[BasisCut, ...] = ()  # per shared basis

    @property
    def zero_row(self) -> int:
        """The row that adds exact zeros (last): slot -1 and slots without a form read it."""
        return self.form.n_slots - 1


class FormGather:
    """:func:`gather_slots` of one stacked form, planned once: its per-slot tensors (each
    once, though two fields share it) and how to rebuild the form around their gathered rows,
    so that a new batch layout costs the gathers and a few constructors, no introspection."""

    def __init__(self, form: LayerForm) -> None:
        self.form, self.tensors = form, []
        places: dict[int, int] = {}

        def plan(p: Any) -> tuple:
            fixed, per_slot = {}, []
            for f in fields(p):
                value = getattr(p, f.name)
                if is_per_slot(p, f.name, value):
                    if id(value) not in places:
                        places[id(value)] = len(self.tensors)
                        self.tensors.append(value)
                    per_slot.append((f.name, places[id(value)]))
                else:
                    fixed[f.name] = value
            return type(p), fixed, per_slot

        self.sides = [(n, plan(getattr(form, n))) for n in SIDES if getattr(form, n) is not None]
        self.terms = [plan(t) for t in form.terms]

    def __call__(self, rows: torch.Tensor) -> LayerForm:
        """The form whose row ``i`` is row ``rows[i]`` (no ``-1``) of the stacked form."""
        return self._build([t.index_select(0, rows) for t in self.tensors], len(rows))

    def one(self, row: int) -> LayerForm:
        """Row ``row`` alone (views, no copy): one slot for every token of a batch."""
        return self._build([t.narrow(0, row, 1) for t in self.tensors], 1)

    def _build(self, gathered: list[torch.Tensor], n_rows: int) -> LayerForm:
        def build(spec: tuple) -> Any:
            cls, fixed, per_slot = spec
            return cls(**fixed, **{name: gathered[i] for name, i in per_slot})

        sides = {name: build(spec) for name, spec in self.sides}
        terms = tuple(build(spec) for spec in self.terms)
        return LayerForm(self.form.d_in, self.form.d_out, n_rows, terms=terms, **sides)


def compute_dtype(forms: list[LayerForm], model_dtype: torch.dtype) -> torch.dtype:
    """The model's dtype, or float32 when a form rotates (input or output side)."""
    rotates = any(f.input_rotation is not None or f.output_rotation is not None for f in forms)
    return torch.float32 if rotates else model_dtype


def cast_form(form: LayerForm, dtype: torch.dtype, device: torch.device | str = "cpu") -> LayerForm:
    """``form`` on ``device`` with its float tensors in ``dtype`` (permutations stay ``long``);
    shared bases through :func:`shared_tensor` (once per basis, not once per composition)."""

    memo: dict = {}  # a tensor two fields share stays one

    def one(t: torch.Tensor) -> torch.Tensor:
        cast = lambda: t.to(device, dtype if t.is_floating_point() else t.dtype).contiguous()  # noqa: E731
        return identity_memo(memo, (t,), cast)

    def primitive(p):
        shared = SHARED_BASIS if isinstance(p, SharedBasisLowRank) else ()
        values = {f.name: getattr(p, f.name) for f in fields(p)}
        for name, v in values.items():
            if isinstance(v, torch.Tensor):
                values[name] = shared_tensor(v, dtype, device) if name in shared else one(v)
        return type(p)(**values)

    return form.map_primitives(primitive)


def shared_tensor(
    t: torch.Tensor, dtype: torch.dtype, device, rows: torch.Tensor | None = None, dim: int = 0
) -> torch.Tensor:
    """``t`` (a shared basis, the same object in every slot's form) cut to the ``rows`` mask
    along ``dim`` and cast, memoised per process: a new slot composition reuses it (SvdA's
    ``Vᵀ, U`` are as large as the base weights)."""
    cut = None if rows is None else rows.cpu().numpy().tobytes()
    key = (id(t), dtype, str(device), cut, dim)
    with _MEMO_LOCK:
        hit = _MEMO.get(key)
        if hit is not None and hit[0] is t:
            return hit[1]
    out = t if rows is None else t.index_select(dim, rows.nonzero().flatten().to(t.device))
    out = out.to(device, dtype).contiguous()
    with _MEMO_LOCK:
        if len(_MEMO) >= _MEMO_MAX:
            _MEMO.pop(next(iter(_MEMO)))
        _MEMO[key] = (t, out)  # t kept alive: its id stays its own
    return out


def used_components(form: LayerForm, keep: dict | None = None) -> tuple[LayerForm, tuple]:
    """``form`` with each shared basis cut to the components some slot's ``inner`` uses
    (``inner[:, i] == 0`` for every slot: component ``i`` adds exact zeros) or ``keep`` names
    (:func:`kept_cuts`: a former cut, so adapters that left keep their components and can come
    back in place); and per basis :class:`BasisCut`."""
    keep = keep or {}
    bases = []

    def cut(term):
        if not isinstance(term, SharedBasisLowRank):
            return term
        used = (term.inner != 0).any(dim=0)
        kept = keep.get(_basis_key(term.A))
        if kept is not None and kept.shape == used.shape:
            used = used | kept
        whole = bool(used.all())
        indices = None if whole else (used.nonzero().flatten(), (~used).nonzero().flatten())
        bases.append(BasisCut(term.A, term.B, used, *(indices or (None, None))))
        if whole:
            return term
        a = shared_tensor(term.A, term.A.dtype, term.A.device, used, dim=0)
        b = shared_tensor(term.B, term.B.dtype, term.B.device, used, dim=1)
        return replace(term, A=a, B=b, inner=term.inner[:, used])

    return replace(form, terms=tuple(cut(t) for t in form.terms)), tuple(bases)


def kept_cuts(stacked: StackedSlice | None) -> dict:
    """The cuts of ``stacked``'s shared bases, for :func:`stack_slice`'s ``keep``."""
    if stacked is None:
        return {}
    layouts = stacked.groups or (stacked,)
    return {_basis_key(cut.A): cut.used for part in layouts for cut in part.bases}


def _basis_key(t: torch.Tensor) -> tuple:
    """One shared basis: the same memory seen the same way (views made apart compare equal)."""
    return (t.data_ptr(), tuple(t.shape), t.stride(), t.dtype, str(t.device))


def stack_slice(
    forms: list[LayerForm | LazyForm | None],
    model_dtype: torch.dtype,
    device: torch.device | str = "cpu",
    dense_limit: int = DENSE_LOW_RANK_MAX,
    keep: dict | None = None,
) -> StackedSlice | None:
    """What a layer on ``device`` applies for ``forms`` (one per LoRA slot); None when no slot
    has a form. Low-rank terms of at most ``dense_limit`` slots × rank run dense. ``keep``:
    components to keep in the shared bases' cuts (:func:`kept_cuts` of the former stack)."""
    forms = [f.form() if isinstance(f, LazyForm) else f for f in forms]
    present = [(i, f) for i, f in enumerate(forms) if f is not None]
    if not present:
        return None
    groups = _layout_groups(present)
    if len(groups) > 1:  # several methods (or bases) on one layer: one stack per layout
        parts = tuple(
            _stack_layout([f if i in g else None for i, f in enumerate(forms)], model_dtype,
                          device, dense_limit, keep)
            for g in groups
        )  # fmt: skip
        needs_w0 = any(p.needs_w0 for p in parts)
        return StackedSlice(parts[0].dtype, needs_w0, groups=parts)
    return _stack_layout(forms, model_dtype, device, dense_limit, keep)


def _layout_groups(present: list[tuple[int, LayerForm]]) -> list[set[int]]:
    """Slots whose forms stack together (:func:`can_stack`), in order of first appearance."""
    firsts: list[LayerForm] = []
    groups: list[set[int]] = []
    for i, form in present:
        for first, group in zip(firsts, groups, strict=True):
            if can_stack(first, form):
                group.add(i)
                break
        else:
            firsts.append(form)
            groups.append({i})
    return groups


def _stack_layout(forms, model_dtype, device, dense_limit, keep) -> StackedSlice:
    """:func:`stack_slice` for slots of one layout (the others ``None``)."""
    present = [(i, f) for i, f in enumerate(forms) if f is not None]
    dtype = compute_dtype([f for _, f in present], model_dtype)
    needs_w0 = any(f.reads_base_input_changed for _, f in present)
    stacked = stack_forms([f for _, f in present])
    cut, bases = used_components(stacked, keep)
    # one row per slot (row i: slot i; a slot without a form of this layout holds the zero
    # row's values), the zero row last: any slot can later take an adapter in place
    n = len(forms)
    position = torch.full((n + 1,), len(present), dtype=torch.long)
    for row, (i, _) in enumerate(present):
        position[i] = row
    form = cast_form(gather_slots(with_zero_row(cut), position), dtype, device)
    form, dense, places = split_dense_low_rank(form, dense_limit)
    table = torch.full((n + 1,), n, dtype=torch.long)  # slot -> row; absent and -1: zero row
    for i, _ in present:
        table[i] = i
    return StackedSlice(
        dtype, needs_w0, form=form, table=table.to(device), dense=dense,
        present={i for i, _ in present}, gather=FormGather(form), kinds=tuple(stacked.kinds()),
        places=places, bases=bases,
    )  # fmt: skip


def split_dense_low_rank(form: LayerForm, limit: int = DENSE_LOW_RANK_MAX):
    """``form`` without its low-rank terms of at most ``limit`` slots × rank, those terms as
    :class:`DenseTerm` (a batch runs them per token from gathered rows, or as two dense
    products with a one-hot slot mask in between; the zero slot has zero rows, so base rows get
    exact zeros), and where each term went."""
    dense, kept, places = [], [], []
    for term in form.terms:
        n, r = term.A.shape[:2] if isinstance(term, LowRank) else (0, 0)
        if isinstance(term, LowRank) and n * r <= limit:
            places.append(("dense", len(dense)))
            dense.append(DenseTerm(term.A.contiguous(), term.B.transpose(1, 2).contiguous()))
        else:
            places.append(("form", len(kept)))
            kept.append(term)
    return replace(form, terms=tuple(kept)), tuple(dense), tuple(places)


def slice_delta(
    stacked: StackedSlice,
    x: torch.Tensor,
    out0: torch.Tensor,
    slots: torch.Tensor,
    weight: torch.Tensor | None = None,
    layout: object = None,
    linear=None,
) -> torch.Tensor:
    """``y − W0x − b0`` of one stacked slice for tokens ``x (N, d_in)`` at ``slots (N,)`` (-1:
    the base), ``out0 = W0x``, all in ``stacked.dtype``. ``layout``: a value that changes
    whenever the batch's slots may change (the plugin's mapping version): the gathered rows
    and masks are kept until then (None: gathered every call). ``linear``: products with the
    shared bases (:func:`svda.runtime.serving_form.form_delta`)."""
    cache = layout_cache(stacked, slots, layout)
    if cache["idle"]:
        return torch.zeros_like(out0)
    form, scale = cache["form"], cache["scale"]
    if scale is not None:  # only an output scale besides the dense terms (DoRA): no dispatch
        delta = scale * out0
    else:
        delta = None if form is None else form_delta(form, x, out0, weight, linear=linear)
    for term in _low_rank_terms(stacked, cache, x):
        delta = term if delta is None else delta + term
    return torch.zeros_like(out0) if delta is None else delta


@dataclass(frozen=True, eq=False)
class BatchLayout:
    """One batch composition in the vLLM worker (the plugin makes one per LoRA mapping; equal
    only to itself): ``used``, the slots some token is at; ``slots``, each token's slot with the
    base as ``n_slots`` (a table's last entry: the zero row), so no token is ``-1``; ``content``:
    a hashable value equal for two layouts with the same tokens' slots (None: this layout
    alone), so that what was made for one is reused for the next such mapping."""

    used: frozenset[int]
    slots: torch.Tensor
    uniform: int | None = None  # the slot of every token, when they all have one slot
    content: object = None

    @property
    def key(self) -> object:
        """What layouts with the same tokens' slots share (the layout itself without content)."""
        return self if self.content is None else self.content


def layout_cache(stacked: StackedSlice, slots: torch.Tensor, layout: object) -> dict:
    """What :func:`slice_delta` keeps per batch layout: ``idle`` when no token's slot has a row
    in this stack (such a stack is skipped), else the gathered rows (:func:`_gather_layout`).
    With a :class:`BatchLayout` (``slots`` its tokens' slots) the idle check is host-side."""
    cache = stacked.cache
    if layout is None or cache.get("layout") != (layout, len(slots)):
        cache.clear()
        cache.update(_gather(stacked, slots, layout))
        cache["layout"] = (layout, len(slots))
    return cache


def _gather(stacked: StackedSlice, slots: torch.Tensor, layout: object) -> dict:
    if isinstance(layout, BatchLayout):
        if stacked.present.isdisjoint(layout.used):
            return {"idle": True}
        if layout.uniform is not None:  # its row is the slot's (the slot is present)
            return _gather_one(stacked, layout.uniform)
        return _gather_layout(stacked, stacked.table.index_select(0, slots))
    rows = stacked.table[slots]  # -1 -> the zero row
    if bool((rows == stacked.zero_row).all()):
        return {"idle": True}
    return _gather_layout(stacked, rows)


def _gather_layout(stacked: StackedSlice, rows: torch.Tensor) -> dict:
    """What one batch layout needs: the per-row form, and for the dense low-rank terms either
    each token's factors (few tokens: decode) or one-hot slot masks (many: prefill)."""
    out = _form_entries(stacked.gather(rows) if stacked.form.primitives() else None)
    if len(rows) <= GATHER_MAX_TOKENS:
        per_token = []
        for term in stacked.dense:  # (N, r, d_in) and (N, r, d_out)
            per_token.append(
                (term.A.index_select(0, rows).float(), term.Bt.index_select(0, rows).float())
            )
        return out | {"per_token": per_token}
    onehot = F.one_hot(rows, stacked.form.n_slots).to(stacked.dtype)  # (N, n + 1)
    return out | {"masks": {t.r: onehot.repeat_interleave(t.r, 1) for t in stacked.dense}}


def _gather_one(stacked: StackedSlice, row: int) -> dict:
    """:func:`_gather_layout` for a batch whose every token has row ``row``: that row's form
    (views) and its dense low-rank factors, applied to the whole batch by plain products."""
    out = _form_entries(stacked.gather.one(row) if stacked.form.primitives() else None)
    factors = [(term.A[row], term.Bt[row]) for term in stacked.dense]  # (r, d_in), (r, d_out)
    return out | {"one": factors}


def _form_entries(form: LayerForm | None) -> dict:
    """The gathered form, and its output scale when that is its only primitive (DoRA, IA³ on
    ``k, v``: one product with the base output, no dispatch)."""
    only_scale = form is not None and form.output_scale is not None and len(form.primitives()) == 1
    return {"idle": False, "form": form, "scale": form.output_scale.delta if only_scale else None}


def _low_rank_terms(stacked: StackedSlice, cache: dict, x: torch.Tensor):
    """Each dense low-rank term's ``B_k A_k x`` per token: batched products of the gathered
    factors in float32 (CPU bf16 batched products are slow), or two dense products masked, or
    (every token one slot) that slot's two products."""
    if "one" in cache:
        for a, bt in cache["one"]:
            yield F.linear(x, a) @ bt
        return
    if "per_token" in cache:
        x32 = x.float()[:, None]  # (N, 1, d_in)
        for a, bt in cache["per_token"]:
            yield torch.bmm(torch.bmm(x32, a.transpose(1, 2)), bt)[:, 0].to(x.dtype)
        return
    for term in stacked.dense:  # every token against every slot's rows, masked to its own
        a_cat, bt_cat = term.A.view(-1, term.A.shape[2]), term.Bt.view(-1, term.Bt.shape[2])
        yield (F.linear(x, a_cat) * cache["masks"][term.r]) @ bt_cat


def stacked_delta(
    stacked: StackedSlice,
    x: torch.Tensor,
    out0: torch.Tensor,
    slots: torch.Tensor,
    weight_for: Callable[[torch.dtype], torch.Tensor] | None = None,
    layout: object = None,
    linear=None,
) -> torch.Tensor | None:
    """``y − W0x − b0`` of a stacked slice in ``out0``'s dtype, each layout group computed in
    its own dtype (:func:`slice_delta`). ``weight_for(dtype)``: W0 in that dtype, for groups
    whose forms change the base product's input. None when no token of the batch has a slot
    in any of its stacks (nothing to add)."""
    total = None
    for part in stacked.groups or (stacked,):
        if layout_cache(part, slots, layout)["idle"]:
            continue  # e.g. a group whose slots all moved to another layout
        dtype = part.dtype
        weight = weight_for(dtype) if part.needs_w0 else None
        delta = slice_delta(part, x.to(dtype), out0.to(dtype), slots, weight, layout, linear)
        delta = delta.to(out0.dtype)
        total = delta if total is None else total + delta
    return total
