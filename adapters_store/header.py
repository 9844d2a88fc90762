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
import json
import re
import struct
import zlib
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
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


class LayerEntry(BaseModel):
    """One adapted layer: its base shape, fingerprint, and the shapes of its stored tensors."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=512)
    d_out: int = Field(gt=0)
    d_in: int = Field(gt=0)
    fingerprint: str = Field(
        pattern=r"^[0-9a-f]{16,64}$", description="prefix of the layer fingerprint"
    )
    params: dict[str, list[int]] = Field(description="tensor kind -> shape on this layer")
    probe: list[float] = Field(description="sketches q_jᵀ ΔW p_j of the exporting machine")
    delta_norm: float = Field(ge=0, description="‖ΔW‖_F on the exporting machine")


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
    layers: list[LayerEntry] = Field(default_factory=list)

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
            layers = _unpack_layers(metadata["svda.layers"], metadata["svda.probes"])
        except (KeyError, ValueError, TypeError, zlib.error, struct.error) as exc:
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
            return cls.model_validate({**head, "layers": layers})
        except ValidationError as exc:
            raise AdapterMetadataError(f"adapter metadata is invalid: {_first_error(exc)}") from exc


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


def _unpack_layers(packed: str, probes: str) -> list[dict[str, Any]]:
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
    if any(len(table[c]) != n for c in columns):
        raise ValueError("layer table columns differ in length")
    blob = base64.b64decode(probes.encode("ascii"), validate=True)
    floats = struct.unpack(f"<{len(blob) // 4}f", blob[: len(blob) // 4 * 4])
    if n == 0 or len(blob) % 4 or len(floats) % n:
        raise ValueError("probe values do not fit the layer table")
    width = len(floats) // n  # count sketches + delta_norm per layer
    return [
        {
            **{c: table[c][i] for c in columns},
            "probe": list(floats[i * width : (i + 1) * width - 1]),
            "delta_norm": floats[(i + 1) * width - 1],
        }
        for i in range(n)
    ]


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err.get("loc", ()))
    return f"{where}: {err.get('msg')}" + (
        f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    )
