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

import functools
import json
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass, fields
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
_LAYOUTS: dict[Any, tuple[str, int, torch.dtype]] = {}  # layout key -> (text, numel, dtype)
_LAYOUTS_MAX = 256
_LAYOUTS_LOCK = threading.Lock()


def save_forms(
    forms: dict[str, LayerForm],
    path: Path,
    ref_of: Callable[[Any, str], str | None],
    layout_key: Any = None,
) -> None:
    """Write ``forms`` to ``path``; a field for which ``ref_of(primitive, field name)`` gives a
    name is stored as that reference, not as a tensor. ``layout_key``: equal for forms of one
    structure whose tensors are views of one new flat tensor at the same places (a slot bank's
    packed forms): the encoded layout is kept, and :func:`save_packed_rows` writes the next
    files of that key from their flat tensor alone."""
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
    text, tensors = json.dumps(layout), packer.tensors()
    save_file(tensors, str(path), metadata={META_KEY: text})
    if layout_key is not None and packer.whole_base is not None:
        with _LAYOUTS_LOCK:
            _LAYOUTS[layout_key] = (text, packer.whole_base.numel(), packer.whole_base.dtype)
            while len(_LAYOUTS) > _LAYOUTS_MAX:
                _LAYOUTS.pop(next(iter(_LAYOUTS)))


def save_packed_rows(path: Path, layout_key: Any, rows: torch.Tensor) -> bool:
    """Write a forms file from the flat tensor alone when forms of ``layout_key`` were saved
    before as views of such a tensor (the same places): True; False when the layout is not
    known here (save the forms instead)."""
    known = _LAYOUTS.get(layout_key)
    if known is None or (rows.numel(), rows.dtype) != known[1:]:
        return False
    kind = str(rows.dtype).removeprefix("torch.")
    save_file({f"flat.{kind}": rows.reshape(-1)}, str(path), metadata={META_KEY: known[0]})
    return True


def load_forms(path: Path, resolve: Callable[[str], torch.Tensor]) -> dict[str, LayerForm]:
    """The forms of a file written by :func:`save_forms` (CPU tensors, views of the flat ones)."""
    forms = FormsFile(path, resolve)
    return {layer: forms.form(layer) for layer in forms.layout}


class FormsFile:
    """A forms file read whole, each layer's form decoded when first asked for (:meth:`form`).
    ``layout`` is one object per distinct layout text in this process, so adapters of one
    slot bank share it; :meth:`place_of` tells where a decoded tensor lies in ``flat``."""

    def __init__(self, path: Path, resolve: Callable[[str], torch.Tensor]) -> None:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            self.layout, extents = _parsed_layout((f.metadata() or {}).get(META_KEY, "null"))
            if not isinstance(self.layout, dict):
                raise ValueError(f"{path} holds no svda serving forms")
            self.flat = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (no iter)
        for kind, end in extents.items():
            buffer = self.flat.get(f"flat.{kind}")
            if buffer is None or buffer.numel() < end:
                raise ValueError(f"a serving-form tensor lies outside the file's {kind} data")
        self.resolve = resolve
        self._views: dict[tuple, torch.Tensor] = {}  # (key, offset, *shape) -> one view
        self._places: dict[int, tuple] = {}  # id(view) -> its key in _views
        self._forms: dict[str, LayerForm] = {}

    def form(self, layer: str) -> LayerForm:
        if layer not in self._forms:
            entry = self.layout[layer]
            sides = {s: self._decode(p) for s, p in entry["sides"].items() if s in SIDES}
            terms = tuple(self._decode(p) for p in entry["terms"])
            self._forms[layer] = LayerForm(
                int(entry["d_in"]), int(entry["d_out"]), int(entry["n_slots"]), terms=terms,
                **sides,
            )  # fmt: skip
        return self._forms[layer]

    def lazy(self) -> dict[str, LazyForm]:
        """Layer name -> its form, not decoded yet."""
        return {layer: LazyForm(self, layer) for layer in self.layout}

    def place_of(self, tensor: torch.Tensor) -> tuple[str, int, tuple[int, ...]] | None:
        """``(flat key, offset, shape)`` of a tensor of a form decoded from this file."""
        key = self._places.get(id(tensor))
        if key is None or self._views.get(key) is not tensor:
            return None
        return key[0], key[1], key[2:]

    def _decode(self, p: dict) -> Any:
        cls = PRIMITIVES.get(p.get("type"))
        if cls is None:
            raise ValueError(f"unknown serving-form primitive {p.get('type')!r}")
        values = {name: self._view(place) for name, place in p["tensors"].items()}
        values.update({name: self.resolve(ref) for name, ref in p["refs"].items()})
        values.update(p["values"])
        return cls(**values)

    def _view(self, place: Any) -> torch.Tensor:
        """``flat.<dtype>[offset : offset + numel]`` shaped (inside it: :func:`_parsed_layout`);
        one view per place (a tensor the writer stored once for two fields is one again)."""
        kind, offset, shape = place
        key = (f"flat.{kind}", offset, *shape)
        if key not in self._views:
            buffer = self.flat[key[0]]
            strides = _contiguous_strides(tuple(shape))
            view = buffer.as_strided(shape, strides, buffer.storage_offset() + offset)
            self._views[key] = view
            self._places[id(view)] = key
        return self._views[key]


@dataclass(frozen=True, eq=False)
class LazyForm:
    """Layer ``layer``'s form in ``file``, decoded by :meth:`form` (a slot update that has a
    write plan for the file's layout copies from ``file.flat`` without it)."""

    file: FormsFile
    layer: str

    def form(self) -> LayerForm:
        return self.file.form(self.layer)


class _Packer:
    """Collects tensors into one flat buffer per dtype; the same tensor object is kept once,
    and a contiguous view of a 1-D tensor is a place in that tensor, kept whole once."""

    def __init__(self) -> None:
        self.parts: dict[str, list[torch.Tensor]] = {}
        self.sizes: dict[str, int] = {}
        self.seen: dict[int, tuple[torch.Tensor, list]] = {}  # id -> (tensor, its place)
        self.views_only = True  # every tensor added so far was a view of a 1-D tensor

    @property
    def whole_base(self) -> torch.Tensor | None:
        """The one tensor packed, when every tensor added was it or a view of it."""
        only = [t for parts in self.parts.values() for t in parts]
        return only[0] if len(only) == 1 and self.views_only else None

    def add(self, tensor: torch.Tensor) -> list:
        base = tensor._base  # a 1-D base only: never a whole table (a slot bank's is 2-D)
        if (
            base is not None
            and base.dim() == 1
            and base.dtype == tensor.dtype
            and base.is_contiguous()
            and tensor.is_contiguous()
        ):
            kind, offset, _ = self._add_whole(base)
            start = offset + tensor.storage_offset() - base.storage_offset()
            return [kind, start, list(tensor.shape)]
        self.views_only = False
        return self._add_whole(tensor)

    def _add_whole(self, tensor: torch.Tensor) -> list:
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
        ref = ref_of(p, f.name)
        if ref is not None:
            out["refs"][f.name] = ref
        elif isinstance(value, torch.Tensor):
            out["tensors"][f.name] = packer.add(value)
        elif isinstance(value, str):
            out["values"][f.name] = value
        else:
            raise TypeError(f"{type(p).__name__}.{f.name}: cannot store a {type(value).__name__}")
    return out


@functools.lru_cache(maxsize=1024)
def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))


@functools.lru_cache(maxsize=64)
def _parsed_layout(text: str) -> tuple[Any, dict[str, int]]:
    """The layout of a forms file (adapters of one bank layout write the same text: parsed once)
    and per flat dtype the end of its furthest tensor; places must be well formed."""
    layout, extents = json.loads(text), {}
    if not isinstance(layout, dict):
        return layout, extents
    try:
        primitives = [p for e in layout.values() for p in [*e["sides"].values(), *e["terms"]]]
        for p in primitives:
            if p.get("type") not in PRIMITIVES:
                raise ValueError(f"unknown serving-form primitive {p.get('type')!r}")
            for place in p["tensors"].values():
                kind, offset, shape = place
                if not (isinstance(offset, int) and offset >= 0 and all(d >= 0 for d in shape)):
                    raise ValueError(f"a serving-form tensor has a bad place {place!r}")
                extents[kind] = max(extents.get(kind, 0), offset + math.prod(shape))
    except (AttributeError, KeyError, TypeError) as exc:
        raise ValueError(f"malformed svda serving-forms layout: {exc!r}") from exc
    return layout, extents
