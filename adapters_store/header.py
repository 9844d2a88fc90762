"""The metadata of a ``.svda`` adapter file, validated by pydantic (format reference: FORMAT.md).

The safetensors header carries three string entries:

* ``svda.format``: ``"svda-adapter"``;
* ``svda.header``: readable JSON of :class:`AdapterHeader` without its layer table;
* ``svda.layers``: the layer table (names, shapes, per-layer fingerprints, probes), JSON
  compressed with zlib and base64-encoded, so that a 210-layer adapter's header stays a few KiB.
"""

from __future__ import annotations

import base64
import json
import re
import zlib
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

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

    def to_safetensors_metadata(self) -> dict[str, str]:
        head = self.model_dump(exclude={"layers"})
        layers = [entry.model_dump() for entry in self.layers]
        packed = base64.b64encode(
            zlib.compress(json.dumps(layers, separators=(",", ":")).encode(), 9)
        )
        return {
            "svda.format": FORMAT_NAME,
            "svda.header": json.dumps(head, separators=(",", ":"), ensure_ascii=False),
            "svda.layers": packed.decode("ascii"),
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
            layers = _unpack_layers(metadata["svda.layers"])
        except (KeyError, ValueError, zlib.error) as exc:
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


def _unpack_layers(packed: str) -> Any:
    raw = base64.b64decode(packed.encode("ascii"), validate=True)
    if len(raw) > MAX_LAYERS_FIELD:
        raise ValueError("layer table is too large")
    inflater = zlib.decompressobj()
    text = inflater.decompress(raw, 64 * MAX_LAYERS_FIELD)
    if inflater.unconsumed_tail:
        raise ValueError("layer table inflates beyond the limit")
    return json.loads(text)


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err.get("loc", ()))
    return f"{where}: {err.get('msg')}" + (
        f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    )
