"""Compiling adapters to serving forms (load time), and stacking forms into slot tables.

:func:`compile_layer` asks a method's weights for their form (``AdapterWeights.serving_form``,
one slot); :func:`stack_forms` concatenates the forms of several adapters of one layer into one
form with a slot per adapter, as an engine's slot tables hold them (ranks zero-padded, shared
tensors checked equal); :func:`compile_adapter` compiles every layer of an adapter attached to
an :class:`~svda.runtime.AdapterModel`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import AdapterConfigError
from ..methods.base import AdapterWeights
from .primitives import LayerForm, LowRank

SHARED_FIELDS = {"perms", "v0", "perm", "A", "B"}  # no slot dimension (LowRank is stacked apart)


@torch.no_grad()
def compile_layer(
    weights: AdapterWeights, shared: nn.Module | None, base_bias: torch.Tensor | None = None
) -> LayerForm:
    """One adapter's form on one layer (one slot), detached. ``base_bias``: the layer's ``b0``
    (IA³ scales it); block-level methods (serial/parallel adapters) have no form."""
    if weights.target_kind != "linear":
        raise AdapterConfigError(
            f"{weights.method} adapts whole blocks, not linear layers: it has no per-layer "
            "serving form; serve it on the native engine (block-level)"
        )
    form = weights.serving_form(shared, base_bias)
    if (form.d_out, form.d_in) != (weights.d_out, weights.d_in) or form.n_slots != 1:
        raise AssertionError(f"{weights.method}.serving_form returned a malformed form")
    return form


def compile_adapter(model: Any, name: str) -> dict[str, LayerForm]:
    """Every layer's form of adapter ``name`` on ``model`` (an ``AdapterModel``): layer name ->
    one-slot form. A frozen adapter whose method compiles all layers at once does so."""
    packed = getattr(model, "packed_serving_forms", None)
    forms = packed(name) if packed is not None else None
    if forms is not None:
        return forms
    return {layer.layer_name: layer.serving_form_of(name) for layer in model.layers_of(name)}


def stack_forms(forms: Sequence[LayerForm]) -> LayerForm:
    """One form with the slots of ``forms`` in order (all of one layer and one method layout:
    the same primitives and shared tensors). Low-rank terms of different ranks are zero-padded."""
    first = forms[0]
    if any(
        f.kinds() != first.kinds() or (f.d_in, f.d_out) != (first.d_in, first.d_out) for f in forms
    ):
        raise AdapterConfigError(
            "serving forms to stack must have the same primitives and shapes; stack the "
            "adapters of one method and layer only"
        )
    fields: dict[str, Any] = {}
    memo: dict = {}  # a per-slot tensor two fields share in every form stays one tensor
    for name in ("input_scale", "input_rotation", "output_rotation", "output_scale", "bias"):
        parts = [getattr(f, name) for f in forms]
        fields[name] = None if parts[0] is None else _stack_primitive(parts, memo)
    fields["terms"] = tuple(
        _stack_primitive([f.terms[i] for f in forms], memo) for i in range(len(first.terms))
    )
    n = sum(f.n_slots for f in forms)
    return LayerForm(first.d_in, first.d_out, n, **fields)


def can_stack(a: LayerForm, b: LayerForm) -> bool:
    """Whether :func:`stack_forms` takes ``a`` and ``b`` together: the same primitives and
    shapes, and the same shared tensors (checked by identity first)."""
    if a.kinds() != b.kinds() or (a.d_in, a.d_out) != (b.d_in, b.d_out):
        return False
    for p, q in zip(a.primitives(), b.primitives(), strict=True):
        if isinstance(p, LowRank):
            continue  # ranks are padded
        for f in dataclasses.fields(p):
            x, y = getattr(p, f.name), getattr(q, f.name)
            shared = f.name in SHARED_FIELDS or not isinstance(x, torch.Tensor)
            if shared and not _same(x, y):
                return False
    return True


def _stack_primitive(parts: Sequence[Any], memo: dict) -> Any:
    first = parts[0]
    if isinstance(first, LowRank):
        r = max(p.A.shape[1] for p in parts)
        a = torch.cat([F.pad(p.A, (0, 0, 0, r - p.A.shape[1])) for p in parts])
        b = torch.cat([F.pad(p.B, (0, r - p.B.shape[2])) for p in parts])
        return LowRank(a, b)
    values = {}
    for f in dataclasses.fields(first):
        items = [getattr(p, f.name) for p in parts]
        if f.name in SHARED_FIELDS or not isinstance(items[0], torch.Tensor):
            if any(not _same(items[0], item) for item in items[1:]):
                raise AdapterConfigError(
                    f"{type(first).__name__}.{f.name} is shared by every slot but differs "
                    "between the forms; stack adapters that share their frozen tensors only"
                )
            values[f.name] = items[0]
        else:
            values[f.name] = identity_memo(memo, items, lambda x=items: torch.cat(x))
    return type(first)(**values)


def is_per_slot(p: Any, name: str, value: Any) -> bool:
    """Whether field ``name`` (holding ``value``) of primitive ``p`` has a slot dimension: every
    tensor of a low-rank term does; other primitives' shared fields (:data:`SHARED_FIELDS`)
    and non-tensor fields do not."""
    return isinstance(value, torch.Tensor) and (isinstance(p, LowRank) or name not in SHARED_FIELDS)


def identity_memo(memo: dict, sources: Sequence[Any], make: Callable[[], Any]) -> Any:
    """``make()``, once per tuple of source objects (by identity) within one ``memo``: a tensor
    that several fields share stays one tensor through a transformation of the form."""
    key = tuple(map(id, sources))
    hit = memo.get(key)
    if hit is None or any(a is not b for a, b in zip(hit[0], sources, strict=True)):
        hit = memo[key] = (tuple(sources), make())
    return hit[1]


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return a is b or (a.shape == b.shape and bool(torch.equal(a, b)))
    return a == b
