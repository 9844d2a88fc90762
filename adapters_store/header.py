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
import hashlib
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

from svda.runtime.errors import AdapterConfigError
from svda.runtime.methods.registry import available_methods, config_from_dict

from .errors import AdapterMetadataError, HeaderHashMismatch, UnsupportedFormatVersion

FORMAT_NAME = "svda-adapter"
FORMAT_VERSION = 2  # 2: svda.content_sha256 covers the header's semantic fields (FORMAT.md)
KNOWN_VERSIONS = (1, 2)
HASHED_FIELDS = (
    "format_version",
    "method",
    "config",
    "base_fingerprint",
    "payload_sha256",
    "payload_dtype",
    "recipe",
    "probe",
    "frozen_sha256",
)
HEX64 = re.compile(r"^[0-9a-f]{64}$")
LAYER_FINGERPRINT = re.compile(r"^[0-9a-f]{16,64}$")  # a prefix of the layer fingerprint
MAX_LAYER_NAME = 512
MAX_PROBE_FLOATS = 17  # per layer: at most 16 sketches and ‖ΔW‖_F
MAX_PROBE_TOLERANCE = 1e-3  # a file cannot loosen the probe past this (the exporter writes 5e-5)
# Bounds checked before any JSON is parsed or any table entry is built (FORMAT.md, "Limits").
MAX_HEADER_JSON = 64 << 10  # characters of svda.header
MAX_HEADER_DEPTH = 8  # nesting of svda.header (a real one nests 4 deep)
MAX_HEADER_VALUES = 4096  # JSON values (commas) in svda.header
MAX_LAYERS = 4096
MAX_KINDS = 8  # tensor kinds per layer
MAX_RANK = 4  # dimensions of a per-layer tensor
MAX_DIM = 1 << 20  # any layer size or tensor dimension
MAX_LAYER_TABLE = 1 << 20  # bytes of the inflated layer table (a 210-layer one is ~10 KB)
MAX_CACHED_TABLE = 64 << 10  # encoded characters; 256 cached tables stay under ~100 MB
MAX_LAYER_TABLE_DEPTH = 4  # {column: [{kind: [dims]}]}
MAX_LAYER_TABLE_VALUES = MAX_LAYERS * (4 + MAX_KINDS * (1 + MAX_RANK))
_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*+"', re.S)
_JSON_BRACKET = re.compile(r"[\[\]{}]")
_DEPTH_STEP = {"[": 1, "{": 1, "]": -1, "}": -1}


def bounded_json(
    text: str, what: str, *, max_chars: int, max_depth: int, max_values: int, error: type
) -> Any:
    """``json.loads(text)`` once its size, nesting depth and number of values are checked by a
    linear scan (no recursion, no objects built); a violation raises ``error`` naming ``what``."""
    if len(text) > max_chars:
        raise error(f"{what} is {len(text)} characters, over the {max_chars} limit")
    bare = _JSON_STRING.sub('""', text)  # brackets and commas inside strings do not count
    if bare.count(",") >= max_values:
        raise error(f"{what} holds more than {max_values} JSON values")
    depth = 0
    for bracket in _JSON_BRACKET.findall(bare):
        depth += _DEPTH_STEP[bracket]
        if depth > max_depth:
            raise error(f"{what} nests deeper than {max_depth} levels")
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise error(f"{what} is not valid JSON: {exc}") from exc


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
    tolerance: float = Field(
        gt=0, le=MAX_PROBE_TOLERANCE, description="|Δsketch| ≤ tolerance · ‖ΔW‖_F"
    )


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
    _content_hashed: bool = PrivateAttr(default=False)  # read with a matching content hash

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

    @property
    def content_hashed(self) -> bool:
        """True when read from a file whose ``svda.content_sha256`` matched (format ≥ 2): the
        header's semantic fields, layer table and probes are the exporter's, as written."""
        return self._content_hashed

    def to_safetensors_metadata(self) -> dict[str, str]:
        head = self.model_dump(exclude={"layers"})
        text = json.dumps(head, separators=(",", ":"), ensure_ascii=False)
        meta = {
            "svda.format": FORMAT_NAME,
            "svda.header": text,
            **_pack_layers(self.layers, self.probe.count),
        }
        if self.format_version >= 2:
            meta["svda.content_sha256"] = content_sha256(json.loads(text), meta)
        return meta

    @classmethod
    def from_safetensors_metadata(cls, metadata: dict[str, str] | None) -> AdapterHeader:
        metadata = metadata or {}
        if metadata.get("svda.format") != FORMAT_NAME:
            raise AdapterMetadataError(
                "the file has no svda adapter metadata (svda.format missing)"
            )
        head = _read_head(metadata)
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
        _check_method(header)
        header._encoded_layers = (header.layers, metadata["svda.layers"])
        header._content_hashed = _check_content_hash(head, metadata)
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


def _read_head(metadata: dict[str, str]) -> dict[str, Any]:
    """``svda.header`` parsed with bounded size and depth, of a known format version."""
    text = metadata.get("svda.header")
    if not isinstance(text, str):
        raise AdapterMetadataError("adapter metadata svda.header is missing")
    head = bounded_json(
        text,
        "adapter metadata svda.header",
        max_chars=MAX_HEADER_JSON,
        max_depth=MAX_HEADER_DEPTH,
        max_values=MAX_HEADER_VALUES,
        error=AdapterMetadataError,
    )
    if not isinstance(head, dict):
        raise AdapterMetadataError("adapter metadata svda.header is not a JSON object")
    version = head.get("format_version")
    if type(version) is not int or version not in KNOWN_VERSIONS:
        raise UnsupportedFormatVersion(
            f"format version {version!r} is not known to this svda (it reads {KNOWN_VERSIONS}); "
            "upgrade svda to load this file"
        )
    return head


def _check_method(header: AdapterHeader) -> None:
    """The method must be registered here, and the config one of its valid configs."""
    if header.method not in available_methods():
        raise AdapterMetadataError(
            f"adapter method {header.method!r} is not registered in this svda "
            f"(known: {available_methods()}); the file is damaged or needs a newer svda"
        )
    if header.config.get("method") != header.method:
        raise AdapterMetadataError(
            f"adapter config is for method {header.config.get('method')!r}, "
            f"the header says {header.method!r}"
        )
    try:
        config_from_dict(dict(header.config))
    except (AdapterConfigError, TypeError, ValueError) as exc:
        raise AdapterMetadataError(f"adapter config is invalid: {exc}") from exc


def content_sha256(head: dict[str, Any], metadata: dict[str, str]) -> str:
    """SHA-256 over the header's semantic fields (canonical JSON of :data:`HASHED_FIELDS`),
    the encoded layer table and the encoded probes; ``payload_sha256`` among the fields ties it
    to the payload. Cosmetic fields (name, created, tags, user_metadata) are not covered."""
    fields = {key: head.get(key) for key in HASHED_FIELDS}
    h = hashlib.sha256(json.dumps(fields, sort_keys=True, separators=(",", ":")).encode())
    for key in ("svda.layers", "svda.probes"):
        h.update(b"\n" + metadata[key].encode("ascii"))
    return h.hexdigest()


def _check_content_hash(head: dict[str, Any], metadata: dict[str, str]) -> bool:
    """Whether a content hash was present and matched; raises when it does not match, or when
    a format-2 file lacks it. Format-1 files have none (their probe then always runs)."""
    stored = metadata.get("svda.content_sha256")
    if stored is None:
        if head["format_version"] >= 2:
            raise AdapterMetadataError(
                "adapter metadata svda.content_sha256 is missing (required from format version 2)"
            )
        return False
    if stored != content_sha256(head, metadata):
        raise HeaderHashMismatch(
            "the header's content hash (svda.content_sha256) does not match its method, config, "
            "recipe, probe or layer table: the file was modified or damaged; re-export it"
        )
    return True


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


def layer_columns(packed: str) -> LayerColumns:
    """Decode and validate an encoded layer table (``svda.layers``). Cached by the exact string:
    the adapters of one layout (same base, targets, method shapes) share one table, so a server
    loading many of them decodes and checks it once. Invalid tables raise (and are not cached);
    tables over :data:`MAX_CACHED_TABLE` encoded characters are not cached either, so that the
    cache's memory stays bounded whatever files arrive."""
    if isinstance(packed, str) and len(packed) <= MAX_CACHED_TABLE:
        return _cached_layer_columns(packed)
    return _decode_layer_columns(packed)


def _decode_layer_columns(packed: str) -> LayerColumns:
    table = bounded_json(
        _inflate(packed),
        "the layer table (svda.layers)",
        max_chars=MAX_LAYER_TABLE,
        max_depth=MAX_LAYER_TABLE_DEPTH,
        max_values=MAX_LAYER_TABLE_VALUES,
        error=AdapterMetadataError,
    )
    columns = ("name", "d_out", "d_in", "fingerprint", "params")
    if not isinstance(table, dict) or any(not isinstance(table.get(c), list) for c in columns):
        raise ValueError("layer table lacks its columns")
    n = len(table["name"])
    if n == 0 or any(len(table[c]) != n for c in columns):
        raise ValueError("layer table columns are empty or differ in length")
    if n > MAX_LAYERS:
        raise AdapterMetadataError(f"the layer table has {n} layers, over the {MAX_LAYERS} limit")
    _validate_columns(table)
    return LayerColumns(*(tuple(table[c]) for c in columns), _kind_totals(table["params"]))


_cached_layer_columns = functools.lru_cache(maxsize=256)(_decode_layer_columns)
layer_columns.cache_clear = _cached_layer_columns.cache_clear  # type: ignore[attr-defined]


def _inflate(packed: str) -> str:
    """The layer table's JSON text; inflating stops at :data:`MAX_LAYER_TABLE` bytes."""
    if not isinstance(packed, str) or len(packed) > 2 * MAX_LAYER_TABLE:
        raise AdapterMetadataError("the layer table (svda.layers) is missing or too large")
    raw = base64.b64decode(packed.encode("ascii"), validate=True)
    inflater = zlib.decompressobj()
    text = inflater.decompress(raw, MAX_LAYER_TABLE + 1)
    if len(text) > MAX_LAYER_TABLE or inflater.unconsumed_tail:
        raise AdapterMetadataError(
            f"the layer table (svda.layers) inflates past the {MAX_LAYER_TABLE}-byte limit"
        )
    if not inflater.eof:
        raise ValueError("the layer table (svda.layers) is truncated")
    return text.decode("utf-8")


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
    if not isinstance(probes, str) or len(probes) > 4 * MAX_PROBE_FLOATS * n:
        raise AdapterMetadataError("the probe values (svda.probes) do not fit the layer table")
    blob = base64.b64decode(probes.encode("ascii"), validate=True)
    floats = struct.unpack(f"<{len(blob) // 4}f", blob[: len(blob) // 4 * 4])
    if len(blob) % 4 or len(floats) % n or not floats:
        raise ValueError("probe values do not fit the layer table")
    width = len(floats) // n  # count sketches + delta_norm per layer
    if not math.isfinite(sum(map(abs, floats))):  # one pass; the loops below say where
        for i, norm in enumerate(floats[width - 1 :: width]):
            if not math.isfinite(norm):
                _invalid(i, "delta_norm", f"must be finite and ≥ 0, got {norm!r}")
        bad = next(i for i, x in enumerate(floats) if not math.isfinite(x))
        _invalid(bad // width, "probe", "sketches must be finite numbers")
    for i, norm in enumerate(floats[width - 1 :: width]):
        if norm < 0:
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
            if type(value) is not int or not 0 < value <= MAX_DIM:
                _invalid(i, column, f"must be a positive integer ≤ {MAX_DIM}, got {value!r}")
    for i, value in enumerate(table["fingerprint"]):
        if not isinstance(value, str) or not LAYER_FINGERPRINT.match(value):
            _invalid(i, "fingerprint", "must be 16 to 64 lowercase hex digits")
    for i, params in enumerate(table["params"]):
        if (
            not isinstance(params, dict)
            or len(params) > MAX_KINDS
            or not all(map(_is_shape, params.keys(), params.values()))
        ):
            _invalid(
                i,
                "params",
                f"must map tensor kinds to shapes (lists of integers ≥ 0): at most {MAX_KINDS} "
                f"kinds of at most {MAX_RANK} dimensions ≤ {MAX_DIM}",
            )


def _is_shape(kind: Any, shape: Any) -> bool:
    return (
        isinstance(kind, str)
        and 0 < len(kind) <= 64
        and isinstance(shape, list)
        and len(shape) <= MAX_RANK
        and all(type(d) is int and 0 <= d <= MAX_DIM for d in shape)
    )


def _invalid(index: int, field: str, message: str) -> None:
    raise AdapterMetadataError(f"adapter metadata is invalid: layers.{index}.{field}: {message}")


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err.get("loc", ()))
    return f"{where}: {err.get('msg')}" + (
        f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    )
