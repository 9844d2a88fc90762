"""Serving forms: every linear-layer method compiled, at load time, to a few per-slot primitives.

A method keeps its reference ``get_delta_weight``; for serving it also answers
``serving_form(shared, base_bias)``: one :class:`LayerForm` per layer made of

* :class:`OutputScale` on the base output (SvdA's ``b``, DoRA's ``m/‖W‖ − 1``, IA³, BOFT's ``ds``),
* :class:`InputScale` (IA³ on feed-forward layers),
* :class:`BiasDelta` (BitFit),
* :class:`LowRank` ``A, B`` (LoRA, PiSSA and LoRA-GA as rank 2r, AdaLoRA, DoRA),
* :class:`SharedBasisLowRank`: shared ``A, B`` with per-slot vectors (VeRA; SvdA with V, U),
* :class:`InputRotation` (BOFT's butterfly, the hybrid) and :class:`OutputRotation` (uRNN).

Engines implement these primitives once (per row or token, with a slot index, -1 = the base);
the contract — tensors, shapes, dtypes, slots — is the docstring of :mod:`.primitives`, and the
reference of each primitive is :func:`reference_forward`; :func:`gathered_forward` is a batched
torch implementation (zero slot appended by :func:`with_zero_row`, rows gathered by slot). Serial and parallel adapters change
whole blocks and stay on the native engine. docs/methods.md, "Serving form".
"""

from .compile import can_stack, compile_adapter, compile_layer, stack_forms
from .fast import form_delta, gather_slots, gathered_forward, with_zero_row
from .primitives import (
    BiasDelta,
    InputRotation,
    InputScale,
    LayerForm,
    LowRank,
    OutputRotation,
    OutputScale,
    SharedBasisLowRank,
    Term,
)
from .reference import apply_slot, reference_forward

__all__ = [
    "BiasDelta",
    "InputRotation",
    "InputScale",
    "LayerForm",
    "LowRank",
    "OutputRotation",
    "OutputScale",
    "SharedBasisLowRank",
    "Term",
    "apply_slot",
    "can_stack",
    "compile_adapter",
    "compile_layer",
    "form_delta",
    "gather_slots",
    "gathered_forward",
    "reference_forward",
    "stack_forms",
    "with_zero_row",
]
