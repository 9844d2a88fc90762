"""The metadata of a ``.svda`` adapter file, validated by pydantic (format reference: FORMAT.md).

The safetensors header carries three string entries:

* ``svda.format``: ``"svda-adapter"``;
* ``svda.header``: readable JSON of :class:`AdapterHeader` without its layer table;
* ``svda.layers``: the layer table (names, shapes, per-layer fingerprint prefixes, tensor
  shapes) as JSON columns, zlib-compressed and base64-encoded;
* ``svda.probes``: per layer the probe sketches and ``‖ΔW‖_F``, little-endian float32, base64;
  so that a 210-layer adapter's header stays under 10 KiB.
"""

from __future__ import annotations

import base64
import functools
import json
import math
import re
import struct
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    SkipValidation,
    ValidationError,
    field_validator,
    model_validator,
)

from .errors import AdapterMetadataError, UnsupportedFormatVersion

FORMAT_NAME = "svda-adapter"
FORMAT_VERSION = 1
KNOWN_VERSIONS = (1,)
MAX_LAYERS_FIELD = 4 << 20  # bytes of the compressed layer table we are willing to inflate
HEX64 = re.compile(r"^[0-9a-f]{64}$")
LAYER_FINGERPRINT = re.compile(r"^[0-9a-f]{16,64}$")  # a prefix of the layer fingerprint
MAX_LAYER_NAME = 512


@dataclass(slots=True)
class LayerEntry:
    """One adapted layer: its base shape, fingerprint prefix, the shapes of its stored tensors
    (kind -> shape), the exporter's probe sketches ``q_jᵀ ΔW p_j`` and ``‖ΔW‖_F``.

    A plain dataclass, not a pydantic model: a 210-layer table is validated column by column
    when a file is read (:func:`_validate_columns`), ~10× faster than one model per layer."""

    name: str
    d_out: int
    d_in: int
    fingerprint: str
    params: dict[str, list[int]]
    probe: list[float]
    delta_norm: float


class Recipe(BaseModel):
    """How a frozen tensor is regenerated (never stored)."""

    model_config = ConfigDict(extra="forbid")

    tensor: str
    source: Literal["seed", "base-svd", "none"]
    detail: dict[str, Any] = Field(default_factory=dict)


class ProbeSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    seed: int = Field(ge=0)
    count: int = Field(ge=1, le=16)
    tolerance: float = Field(gt=0, lt=1, description="|Δsketch| ≤ tolerance · ‖ΔW‖_F")


class AdapterHeader(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format_version: int
    name: str = Field(min_length=1, max_length=256)
    method: str = Field(min_length=1, max_length=64)
    config: dict[str, Any]
    base_fingerprint: str
    payload_sha256: str
    payload_dtype: Literal["float32", "bfloat16", "float16"]
    recipe: list[Recipe]
    probe: ProbeSpec
    frozen_sha256: str = Field(
        default="",
        pattern=r"^([0-9a-f]{64})?$",
        description="identity of the exporter's frozen tensors ('' if unknown)",
    )
    created: str
    tags: list[str] = Field(default_factory=list)
    user_metadata: dict[str, str] = Field(default_factory=dict)
    layers: SkipValidation[list[LayerEntry]] = Field(default_factory=list)  # checked on read
    _encoded_layers: tuple[list, str] | None = PrivateAttr(default=None)  # (layers, svda.layers)

    @field_validator("base_fingerprint", "payload_sha256")
    @classmethod
    def _hex64(cls, value: str) -> str:
        if not HEX64.match(value):
            raise ValueError("must be 64 lowercase hex digits (a SHA-256)")
        return value

    @model_validator(mode="after")
    def _probes_fit(self) -> AdapterHeader:
        if any(len(entry.probe) != self.probe.count for entry in self.layers):
            raise ValueError(f"every layer needs {self.probe.count} probe values")
        if not self.layers:
            raise ValueError("the adapter adapts no layer")
        return self

    def to_safetensors_metadata(self) -> dict[str, str]:
        head = self.model_dump(exclude={"layers"})
        return {
            "svda.format": FORMAT_NAME,
            "svda.header": json.dumps(head, separators=(",", ":"), ensure_ascii=False),
            **_pack_layers(self.layers, self.probe.count),
        }

    @classmethod
    def from_safetensors_metadata(cls, metadata: dict[str, str] | None) -> AdapterHeader:
        metadata = metadata or {}
        if metadata.get("svda.format") != FORMAT_NAME:
            raise AdapterMetadataError(
                "the file has no svda adapter metadata (svda.format missing)"
            )
        try:
            head = json.loads(metadata["svda.header"])
        except (KeyError, ValueError, TypeError) as exc:
            raise AdapterMetadataError(f"adapter metadata is unreadable: {exc}") from exc
        if not isinstance(head, dict):
            raise AdapterMetadataError("adapter metadata svda.header is not a JSON object")
        version = head.get("format_version")
        if version not in KNOWN_VERSIONS:
            raise UnsupportedFormatVersion(
                f"format version {version!r} is not known to this svda (it reads {KNOWN_VERSIONS}); "
                "upgrade svda to load this file"
            )
        try:
            layers = _unpack_layers(metadata["svda.layers"], metadata["svda.probes"])
        except AdapterMetadataError:
            raise
        except (KeyError, ValueError, TypeError, zlib.error, struct.error) as exc:
            raise AdapterMetadataError(f"adapter metadata is unreadable: {exc}") from exc
        try:
            header = cls.model_validate({**head, "layers": layers})
        except ValidationError as exc:
            raise AdapterMetadataError(f"adapter metadata is invalid: {_first_error(exc)}") from exc
        header._encoded_layers = (header.layers, metadata["svda.layers"])
        return header

    @property
    def encoded_layer_table(self) -> str | None:
        """The file's encoded layer table (``svda.layers``) while ``layers`` is the list read
        from it; None for headers built otherwise (or given another layer list)."""
        if self._encoded_layers is None or self._encoded_layers[0] is not self.layers:
            return None
        return self._encoded_layers[1]

    def kind_totals(self) -> dict[str, int]:
        """Values per tensor kind over all layers: the payload tensors' sizes."""
        packed = self.encoded_layer_table
        if packed is not None:
            return layer_columns(packed).kind_totals  # cached with the table
        return _kind_totals(entry.params for entry in self.layers)


def _pack_layers(layers: list[LayerEntry], count: int) -> dict[str, str]:
    """The layer table as compressed columns, and the probe floats as raw float32."""
    table = {
        "name": [e.name for e in layers],
        "d_out": [e.d_out for e in layers],
        "d_in": [e.d_in for e in layers],
        "fingerprint": [e.fingerprint for e in layers],
        "params": [e.params for e in layers],
    }
    text = json.dumps(table, separators=(",", ":")).encode()
    floats = [x for e in layers for x in (*e.probe, e.delta_norm)]
    if any(len(e.probe) != count for e in layers):
        raise ValueError(f"every layer needs {count} probe values")
    return {
        "svda.layers": base64.b64encode(zlib.compress(text, 9)).decode("ascii"),
        "svda.probes": base64.b64encode(struct.pack(f"<{len(floats)}f", *floats)).decode("ascii"),
    }


class LayerColumns(NamedTuple):
    """A validated layer table, shared by every file with the same encoded table (read-only)."""

    name: tuple[str, ...]
    d_out: tuple[int, ...]
    d_in: tuple[int, ...]
    fingerprint: tuple[str, ...]
    params: tuple[dict[str, list[int]], ...]
    kind_totals: dict[str, int]  # values per tensor kind over all layers (payload sizes)


@functools.lru_cache(maxsize=256)
def layer_columns(packed: str) -> LayerColumns:
    """Decode and validate an encoded layer table (``svda.layers``). Cached by the exact string:
    the adapters of one layout (same base, targets, method shapes) share one table, so a server
    loading many of them decodes and checks it once. Invalid tables raise (and are not cached)."""
    raw = base64.b64decode(packed.encode("ascii"), validate=True)
    if len(raw) > MAX_LAYERS_FIELD:
        raise ValueError("layer table is too large")
    inflater = zlib.decompressobj()
    text = inflater.decompress(raw, 64 * MAX_LAYERS_FIELD)
    if inflater.unconsumed_tail:
        raise ValueError("layer table inflates beyond the limit")
    table = json.loads(text)
    columns = ("name", "d_out", "d_in", "fingerprint", "params")
    if not isinstance(table, dict) or any(not isinstance(table.get(c), list) for c in columns):
        raise ValueError("layer table lacks its columns")
    n = len(table["name"])
    if n == 0 or any(len(table[c]) != n for c in columns):
        raise ValueError("layer table columns are empty or differ in length")
    _validate_columns(table)
    return LayerColumns(*(tuple(table[c]) for c in columns), _kind_totals(table["params"]))


def _kind_totals(layer_params: Iterable[dict[str, list[int]]]) -> dict[str, int]:
    """Values per tensor kind summed over the layers' ``{kind: shape}``."""
    totals: dict[str, int] = {}
    for params in layer_params:
        for kind, shape in params.items():
            totals[kind] = totals.get(kind, 0) + math.prod(shape)
    return totals


def _unpack_layers(packed: str, probes: str) -> list[LayerEntry]:
    columns = layer_columns(packed)
    n = len(columns.name)
    blob = base64.b64decode(probes.encode("ascii"), validate=True)
    floats = struct.unpack(f"<{len(blob) // 4}f", blob[: len(blob) // 4 * 4])
    if len(blob) % 4 or len(floats) % n:
        raise ValueError("probe values do not fit the layer table")
    width = len(floats) // n  # count sketches + delta_norm per layer
    for i, norm in enumerate(floats[width - 1 :: width]):
        if not norm >= 0 or norm == math.inf:  # also NaN
            _invalid(i, "delta_norm", f"must be finite and ≥ 0, got {norm!r}")
    rows = zip(*columns[:5], strict=True)
    return [
        LayerEntry(*row, list(floats[i * width : (i + 1) * width - 1]), floats[(i + 1) * width - 1])
        for i, row in enumerate(rows)
    ]


def _validate_columns(table: dict[str, list]) -> None:
    """Types and ranges of every layer-table entry, a column at a time; the first problem is
    raised as ``AdapterMetadataError("… layers.<i>.<field>: …")``."""
    for i, name in enumerate(table["name"]):
        if not isinstance(name, str) or not 1 <= len(name) <= MAX_LAYER_NAME:
            _invalid(i, "name", f"must be a string of 1 to {MAX_LAYER_NAME} characters")
    for column in ("d_out", "d_in"):
        for i, value in enumerate(table[column]):
            if type(value) is not int or value <= 0:
                _invalid(i, column, f"must be a positive integer, got {value!r}")
    for i, value in enumerate(table["fingerprint"]):
        if not isinstance(value, str) or not LAYER_FINGERPRINT.match(value):
            _invalid(i, "fingerprint", "must be 16 to 64 lowercase hex digits")
    for i, params in enumerate(table["params"]):
        if not isinstance(params, dict) or not all(map(_is_shape, params.keys(), params.values())):
            _invalid(i, "params", "must map tensor kinds to shapes (lists of integers ≥ 0)")


def _is_shape(kind: Any, shape: Any) -> bool:
    return (
        isinstance(kind, str)
        and isinstance(shape, list)
        and all(type(d) is int and d >= 0 for d in shape)
    )


def _invalid(index: int, field: str, message: str) -> None:
    raise AdapterMetadataError(f"adapter metadata is invalid: layers.{index}.{field}: {message}")


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err.get("loc", ()))
    return f"{where}: {err.get('msg')}" + (
        f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    )
