"""The per-slot forms of one output slice of a vLLM layer, stacked once per slot composition.

Pure torch (no vLLM), so it is tested without vLLM. :func:`stack_slice` turns the forms in a
layer's LoRA slots (``None``: no svda form there) into what :mod:`.layers` applies per token:

* one stacked form with a zero slot appended and a slot -> row table (``-1`` and slots without
  a form -> the zero slot), when every present form has one layout (the usual case);
* else the per-slot list, applied slot by slot (different methods on one layer).

It is cast to the model's dtype, except forms with a rotation (BOFT, uRNN, the hybrid), which
stay float32 (Cayley/unitary products lose too much in bfloat16). Shared bases are cut to the
components some slot uses: a pruned SvdA adapter keeps few of ``min(d_in, d_out)``, and a
component no slot uses adds exact zeros.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from svda.runtime.errors import AdapterConfigError
from svda.runtime.serving_form import LayerForm, stack_forms, with_zero_row
from svda.runtime.serving_form.primitives import SharedBasisLowRank


@dataclass(frozen=True)
class StackedSlice:
    """``form`` (stacked, zero slot last) with ``table`` (slot -> row, ``table[-1]`` the zero
    slot), or ``per_slot`` (one form or None per slot); ``dtype``: what the delta is computed in;
    ``needs_w0``: some form changes the base product's input (IA³ on inputs, BOFT, hybrid)."""

    dtype: torch.dtype
    needs_w0: bool
    form: LayerForm | None = None
    table: torch.Tensor | None = None
    per_slot: tuple[LayerForm | None, ...] = ()


def compute_dtype(forms: list[LayerForm], model_dtype: torch.dtype) -> torch.dtype:
    """The model's dtype, or float32 when a form rotates (input or output side)."""
    rotates = any(f.input_rotation is not None or f.output_rotation is not None for f in forms)
    return torch.float32 if rotates else model_dtype


def cast_form(form: LayerForm, dtype: torch.dtype, device: torch.device | str = "cpu") -> LayerForm:
    """``form`` on ``device`` with its float tensors in ``dtype`` (permutations stay ``long``)."""
    return form.map_tensors(
        lambda t: t.to(device, dtype if t.is_floating_point() else t.dtype).contiguous()
    )


def used_components(form: LayerForm) -> LayerForm:
    """``form`` with each shared basis cut to the components some slot's ``inner`` uses
    (``inner[:, i] == 0`` for every slot: component ``i`` adds exact zeros)."""

    def cut(term):
        if not isinstance(term, SharedBasisLowRank):
            return term
        used = (term.inner != 0).any(dim=0)
        if bool(used.all()):
            return term
        return replace(term, A=term.A[used], B=term.B[:, used], inner=term.inner[:, used])

    return replace(form, terms=tuple(cut(t) for t in form.terms))


def stack_slice(
    forms: list[LayerForm | None], model_dtype: torch.dtype, device: torch.device | str = "cpu"
) -> StackedSlice | None:
    """What a layer on ``device`` applies for ``forms`` (one per LoRA slot); None when no slot
    has a form."""
    present = [(i, f) for i, f in enumerate(forms) if f is not None]
    if not present:
        return None
    dtype = compute_dtype([f for _, f in present], model_dtype)
    needs_w0 = any(f.reads_base_input_changed for _, f in present)
    try:
        stacked = stack_forms([f for _, f in present])
    except AdapterConfigError:  # different layouts on one layer: slot by slot
        per_slot = tuple(None if f is None else cast_form(f, dtype, device) for f in forms)
        return StackedSlice(dtype, needs_w0, per_slot=per_slot)
    form = cast_form(with_zero_row(used_components(stacked)), dtype, device)
    table = torch.full((len(forms) + 1,), len(present), dtype=torch.long)  # [-1]: zero slot
    for row, (i, _) in enumerate(present):
        table[i] = row
    table = table.to(device)
    return StackedSlice(dtype, needs_w0, form=form, table=table)
