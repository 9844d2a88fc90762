"""Serving forms in one safetensors file: the tensors, and the forms' structure as JSON metadata.

No pickle: a reader builds only the primitive classes of :mod:`svda.runtime.serving_form`
from the layout, and fails on anything else. The tensors are packed into one flat tensor per
dtype (``flat.<dtype>``; a tensor used twice, like SvdA's ``b``, is stored once), so writing
and reading cost a few calls, not one per tensor (an adapter has hundreds). Metadata
``svda_forms``: layer -> {d_in, d_out, n_slots, sides: {side: primitive}, terms: [primitive]},
a primitive being {type, tensors: {field: [dtype, offset, shape]}, refs: {field: name},
values: {field: str}}. A ``ref`` stands for a tensor stored elsewhere (a shared basis),
resolved by the reader's ``resolve(name)``.
"""

from __future__ import annotations

import json
import math
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
    packer = _Packer()
    layout = {}
    for layer, form in forms.items():
        layout[layer] = {
            "d_in": form.d_in, "d_out": form.d_out, "n_slots": form.n_slots,
            "sides": {
                side: _encode(getattr(form, side), packer, ref_of)
                for side in SIDES
                if getattr(form, side) is not None
            },
            "terms": [_encode(t, packer, ref_of) for t in form.terms],
        }  # fmt: skip
    save_file(packer.tensors(), str(path), metadata={META_KEY: json.dumps(layout)})


def load_forms(path: Path, resolve: Callable[[str], torch.Tensor]) -> dict[str, LayerForm]:
    """The forms of a file written by :func:`save_forms` (CPU tensors, views of the flat ones)."""
    with safe_open(str(path), framework="pt", device="cpu") as f:
        layout = json.loads((f.metadata() or {}).get(META_KEY, "null"))
        if not isinstance(layout, dict):
            raise ValueError(f"{path} holds no svda serving forms")
        flat = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no iter)
    forms = {}
    for layer, entry in layout.items():
        sides = {
            side: _decode(p, flat, resolve) for side, p in entry["sides"].items() if side in SIDES
        }
        terms = tuple(_decode(p, flat, resolve) for p in entry["terms"])
        forms[layer] = LayerForm(
            int(entry["d_in"]), int(entry["d_out"]), int(entry["n_slots"]), terms=terms, **sides
        )
    return forms


class _Packer:
    """Collects tensors into one flat buffer per dtype; the same tensor object is kept once."""

    def __init__(self) -> None:
        self.parts: dict[str, list[torch.Tensor]] = {}
        self.sizes: dict[str, int] = {}
        self.seen: dict[int, tuple[torch.Tensor, list]] = {}  # id -> (tensor, its place)

    def add(self, tensor: torch.Tensor) -> list:
        known = self.seen.get(id(tensor))
        if known is not None and known[0] is tensor:
            return known[1]
        kind = str(tensor.dtype).removeprefix("torch.")
        offset = self.sizes.get(kind, 0)
        self.parts.setdefault(kind, []).append(tensor.detach().reshape(-1))
        self.sizes[kind] = offset + tensor.numel()
        place = [kind, offset, list(tensor.shape)]
        self.seen[id(tensor)] = (tensor, place)
        return place

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f"flat.{k}": torch.cat(v).cpu() for k, v in self.parts.items()}


def _encode(p: Any, packer: _Packer, ref_of: Callable) -> dict:
    out: dict[str, Any] = {"type": type(p).__name__, "tensors": {}, "refs": {}, "values": {}}
    for f in fields(p):
        value = getattr(p, f.name)
        ref = ref_of(value)
        if ref is not None:
            out["refs"][f.name] = ref
        elif isinstance(value, torch.Tensor):
            out["tensors"][f.name] = packer.add(value)
        elif isinstance(value, str):
            out["values"][f.name] = value
        else:
            raise TypeError(f"{type(p).__name__}.{f.name}: cannot store a {type(value).__name__}")
    return out


def _decode(p: dict, flat: dict[str, torch.Tensor], resolve: Callable) -> Any:
    cls = PRIMITIVES.get(p.get("type"))
    if cls is None:
        raise ValueError(f"unknown serving-form primitive {p.get('type')!r}")
    values = {name: _view(flat, place) for name, place in p["tensors"].items()}
    values.update({name: resolve(ref) for name, ref in p["refs"].items()})
    values.update(p["values"])
    return cls(**values)


def _view(flat: dict[str, torch.Tensor], place: Any) -> torch.Tensor:
    """``flat.<dtype>[offset : offset + numel]`` shaped; a place outside the buffer is refused."""
    kind, offset, shape = place
    buffer = flat.get(f"flat.{kind}")
    numel = math.prod(shape)
    if buffer is None or not (offset >= 0 and offset + numel <= buffer.numel()):
        raise ValueError(f"a serving-form tensor lies outside the file's {kind} data")
    return buffer[offset : offset + numel].view(shape)
