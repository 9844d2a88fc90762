"""Serving forms in one safetensors file: the tensors, and the forms' structure as JSON metadata.

No pickle: a reader builds only the primitive classes of :mod:`svda.runtime.serving_form`
from the layout, and fails on anything else. Tensor ``{layer}|{place}|{field}``; metadata
``svda_forms``: layer -> {d_in, d_out, n_slots, sides: {side: primitive}, terms: [primitive]},
a primitive being {type, tensors: [field], refs: {field: name}, values: {field: str}}. A
``ref`` stands for a tensor stored elsewhere (a shared basis), resolved by the reader's
``resolve(name)``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from svda.runtime.serving_form import LayerForm
from svda.runtime.serving_form.primitives import (
    BiasDelta,
    InputRotation,
    InputScale,
    LowRank,
    OutputRotation,
    OutputScale,
    SharedBasisLowRank,
)

PRIMITIVE_CLASSES = (
    InputScale, InputRotation, OutputRotation, OutputScale, BiasDelta, LowRank, SharedBasisLowRank,
)  # fmt: skip
PRIMITIVES = {c.__name__: c for c in PRIMITIVE_CLASSES}
SIDES = ("input_scale", "input_rotation", "output_rotation", "output_scale", "bias")
META_KEY = "svda_forms"


def save_forms(forms: dict[str, LayerForm], path: Path, ref_of: Callable[[Any], str | None]):
    """Write ``forms`` to ``path``; a field value for which ``ref_of`` gives a name is stored
    as that reference, not as a tensor."""
    tensors: dict[str, torch.Tensor] = {}
    layout = {}
    for layer, form in forms.items():
        layout[layer] = {
            "d_in": form.d_in, "d_out": form.d_out, "n_slots": form.n_slots,
            "sides": {
                side: _encode(getattr(form, side), f"{layer}|{side}", tensors, ref_of)
                for side in SIDES
                if getattr(form, side) is not None
            },
            "terms": [
                _encode(t, f"{layer}|term{i}", tensors, ref_of) for i, t in enumerate(form.terms)
            ],
        }  # fmt: skip
    save_file(tensors, str(path), metadata={META_KEY: json.dumps(layout)})


def load_forms(path: Path, resolve: Callable[[str], torch.Tensor]) -> dict[str, LayerForm]:
    """The forms of a file written by :func:`save_forms` (CPU tensors)."""
    with safe_open(str(path), framework="pt", device="cpu") as f:
        layout = json.loads((f.metadata() or {}).get(META_KEY, "null"))
        if not isinstance(layout, dict):
            raise ValueError(f"{path} holds no svda serving forms")
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no iter)
    forms = {}
    for layer, entry in layout.items():
        sides = {
            side: _decode(p, f"{layer}|{side}", tensors, resolve)
            for side, p in entry["sides"].items()
            if side in SIDES
        }
        terms = tuple(
            _decode(p, f"{layer}|term{i}", tensors, resolve) for i, p in enumerate(entry["terms"])
        )
        forms[layer] = LayerForm(
            int(entry["d_in"]), int(entry["d_out"]), int(entry["n_slots"]), terms=terms, **sides
        )
    return forms


def _encode(p: Any, prefix: str, tensors: dict, ref_of: Callable) -> dict:
    out: dict[str, Any] = {"type": type(p).__name__, "tensors": [], "refs": {}, "values": {}}
    for f in fields(p):
        value = getattr(p, f.name)
        ref = ref_of(value)
        if ref is not None:
            out["refs"][f.name] = ref
        elif isinstance(value, torch.Tensor):  # a copy: safetensors refuses shared storage
            tensors[f"{prefix}|{f.name}"] = value.detach().cpu().contiguous().clone()
            out["tensors"].append(f.name)
        elif isinstance(value, str):
            out["values"][f.name] = value
        else:
            raise TypeError(f"{type(p).__name__}.{f.name}: cannot store a {type(value).__name__}")
    return out


def _decode(p: dict, prefix: str, tensors: dict, resolve: Callable) -> Any:
    cls = PRIMITIVES.get(p.get("type"))
    if cls is None:
        raise ValueError(f"unknown serving-form primitive {p.get('type')!r}")
    values = {name: tensors[f"{prefix}|{name}"] for name in p["tensors"]}
    values.update({name: resolve(ref) for name, ref in p["refs"].items()})
    values.update(p["values"])
    return cls(**values)
