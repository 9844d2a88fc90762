"""The compact ``.svda`` adapter file: write, read, and load with every check (docs/methods.md, regeneration).

A ``.svda`` file is a safetensors file holding only trainable tensors, one flat tensor per kind
(e.g. ``svda_s``, ``svda_b``: every layer's tensor of that kind concatenated in layer-table
order), plus the metadata of :mod:`.header`. Frozen matrices are never written: the recipe says
how to regenerate them, and a probe of a few sketches ``q_jᵀ ΔW p_j`` per layer (fixed random
``p_j, q_j``) checks at load time that the regenerated ΔW is the exporter's within tolerance.

Loading checks, in this order, each with its own error (:mod:`.errors`): readable safetensors;
metadata valid and of a known format version; tensors well-formed (names, dtype, finite); payload
hash; shapes match the base's layers; base fingerprint; regeneration probe. Nothing is executed
from the file (no pickle); the header is parsed with bounded sizes.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from svda.runtime import AdapterModel, config_from_dict, get_method
from svda.runtime.errors import SvdaError

from .errors import (
    BaseMismatch,
    LayerShapeMismatch,
    PayloadError,
    PayloadHashMismatch,
    UnreadableAdapterFile,
)
from .header import FORMAT_VERSION, AdapterHeader, LayerEntry, ProbeSpec, Recipe, bounded_json
from .probe import layer_sketches

MAX_HEADER_BYTES = 1 << 20  # a 210-layer adapter's header is ~10 KiB; 4096 layers fit
MAX_TENSORS = 64  # entries of the safetensors tensor table (a .svda file has 2 or 3)
PAYLOAD_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PROBE = ProbeSpec(seed=0x5DA, count=3, tolerance=5e-5)


@dataclass
class AdapterFile:
    """A parsed (not yet attached) adapter: header and flat payload tensors."""

    header: AdapterHeader
    tensors: dict[str, torch.Tensor]
    size: int

    @property
    def payload_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    @property
    def parameter_count(self) -> int:
        return sum(t.numel() for t in self.tensors.values())


# ----- writing ----------------------------------------------------------------------------------
def export_adapter(
    model: AdapterModel,
    adapter: str,
    *,
    name: str | None = None,
    dtype: str = "float32",
    tags: list[str] | tuple[str, ...] = (),
    user_metadata: dict[str, str] | None = None,
) -> bytes:
    """The ``.svda`` bytes of adapter ``adapter`` attached to ``model``."""
    if dtype not in PAYLOAD_DTYPES:
        raise ValueError(f"dtype must be one of {sorted(PAYLOAD_DTYPES)}, got {dtype!r}")
    config = model.configs.get(adapter)
    if config is None:
        raise SvdaError(
            f"no adapter named {adapter!r} is attached; attached: {model.adapter_names()}"
        )
    layers = model.layers_of(adapter)
    flat = _flatten_params(adapter, layers, PAYLOAD_DTYPES[dtype])
    entries = _layer_entries(model, adapter, layers, PAYLOAD_DTYPES[dtype])
    header = AdapterHeader(
        format_version=FORMAT_VERSION,
        name=name or adapter,
        method=config.method,
        config=config.to_dict(),
        base_fingerprint=model.fingerprint.whole,
        payload_sha256=payload_sha256(flat),
        payload_dtype=dtype,
        recipe=[Recipe(**r) for r in _recipe(model, adapter)],
        probe=PROBE,
        frozen_sha256=frozen_sha256(model, adapter),
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        tags=list(tags),
        user_metadata=dict(user_metadata or {}),
        layers=entries,
    )
    return save_safetensors(flat, metadata=header.to_safetensors_metadata())


def save_adapter_file(data: bytes, path: str | os.PathLike) -> Path:
    """Write ``data`` atomically (temporary file, fsync, rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path


def _flatten_params(adapter, layers, dtype) -> dict[str, torch.Tensor]:
    kinds: dict[str, list[torch.Tensor]] = {}
    for layer in layers:
        for kind, p in layer.tensors_of(adapter).items():
            kinds.setdefault(kind, []).append(p.detach().to("cpu", torch.float32).flatten())
    return {kind: torch.cat(parts).to(dtype).contiguous() for kind, parts in kinds.items()}


def _layer_entries(model, adapter, layers, dtype) -> list[LayerEntry]:
    """Layer table; probes are computed from the tensors as stored (rounded to ``dtype``)."""
    entries = []
    with _params_as_stored(model, adapter, dtype):
        for index, layer in enumerate(layers):
            d_out, d_in = layer.shape
            sketches, norm = layer_sketches(
                layer, adapter, PROBE.seed, index, PROBE.count, exact_norm=True
            )
            entries.append(
                LayerEntry(
                    name=layer.layer_name,
                    d_out=d_out,
                    d_in=d_in,
                    fingerprint=model.layer_fingerprint(layer.layer_name)[:16],
                    params={k: list(p.shape) for k, p in layer.tensors_of(adapter).items()},
                    probe=sketches,
                    delta_norm=norm,
                )
            )
    return entries


class _params_as_stored:
    """Temporarily round an adapter's tensors to the payload dtype (restored exactly after)."""

    def __init__(self, model: AdapterModel, adapter: str, dtype: torch.dtype):
        self.params = model.adapter_parameters(adapter)
        self.dtype = dtype
        self.saved: dict[str, torch.Tensor] = {}

    def __enter__(self):
        with torch.no_grad():
            for key, p in self.params.items():
                self.saved[key] = p.detach().clone()
                p.copy_(p.to(self.dtype).to(p.dtype))

    def __exit__(self, *exc):
        with torch.no_grad():
            for key, p in self.params.items():
                p.copy_(self.saved[key])


def _recipe(model: AdapterModel, adapter: str) -> list[dict]:
    config = model.configs[adapter]
    spec = get_method(config.method)
    targets = [model.target_info(layer.layer_name) for layer in model.layers_of(adapter)]
    return spec.weights_cls.regeneration_recipe(config, targets)


def frozen_sha256(model: AdapterModel, adapter: str) -> str:
    """Identity of the frozen tensors ``adapter`` uses on ``model`` ('' if one is unknown)."""
    return model.frozen_sha256(adapter)


def payload_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over ``name, dtype, shape, bytes`` of every tensor, in name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(json.dumps([name, str(t.dtype), list(t.shape)]).encode())
        if t.numel():
            h.update(t.view(torch.uint8).numpy())  # the buffer itself, no copy
    return h.hexdigest()


# ----- reading ----------------------------------------------------------------------------------
def read_adapter(
    source: bytes | str | os.PathLike, *, whole_file_verified: bool = False
) -> AdapterFile:
    """Parse a ``.svda`` file or bytes: checks readable, metadata, payload and its hash.

    ``whole_file_verified=True``: the caller has checked the SHA-256 of these exact bytes
    against one recorded when the same bytes passed this function (a store object, see
    :func:`~svda.adapters_store.checkpoint.read_stored_adapter`); the payload hash is then implied
    and not computed again (one hash per load instead of two)."""
    data = _read_bytes(source)
    metadata = _parse_safetensors_header(data)
    header = AdapterHeader.from_safetensors_metadata(metadata)
    _check_implied_size(header, len(data))
    try:
        tensors = load_safetensors(data)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise UnreadableAdapterFile(f"the tensor data is unreadable: {exc}") from exc
    _check_payload(header, tensors)
    if whole_file_verified:
        return AdapterFile(header=header, tensors=tensors, size=len(data))
    actual = payload_sha256(tensors)
    if actual != header.payload_sha256:
        raise PayloadHashMismatch(
            f"payload hash {actual[:16]}… does not match the header's {header.payload_sha256[:16]}…: "
            "the file was modified or damaged"
        )
    return AdapterFile(header=header, tensors=tensors, size=len(data))


def _read_bytes(source: bytes | str | os.PathLike) -> bytes:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source)
    try:
        return Path(source).read_bytes()
    except OSError as exc:
        raise UnreadableAdapterFile(
            f"cannot read adapter file {source}: {exc.strerror or exc}"
        ) from exc


NOT_SAFETENSORS = (
    "this is not a .svda adapter file: a .svda file is a safetensors file (an 8-byte header "
    "length, then a JSON header starting with '{{'), these {size} bytes are not one (no valid "
    "header length); upload the .svda file that svda-pack export wrote"
)


def _parse_safetensors_header(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file, with bounded, validated sizes."""
    if len(data) < 9 or data[8:9] != b"{":
        raise UnreadableAdapterFile(NOT_SAFETENSORS.format(size=len(data)))
    (length,) = struct.unpack("<Q", data[:8])
    if length > MAX_HEADER_BYTES:
        raise UnreadableAdapterFile(
            f"header length {length} exceeds the {MAX_HEADER_BYTES}-byte limit: "
            "this is not a .svda adapter file, or it is damaged"
        )
    if length > len(data) - 8:
        raise UnreadableAdapterFile(
            f"header length {length} runs past the end of the {len(data)}-byte file: "
            "the file is truncated or is not a .svda adapter file"
        )
    try:
        text = data[8 : 8 + length].decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UnreadableAdapterFile(f"the safetensors header is not UTF-8 text: {exc}") from exc
    header = bounded_json(
        text,
        "the safetensors header",
        max_chars=MAX_HEADER_BYTES,
        max_depth=4,  # {tensor: {shape: [..]}}, {__metadata__: {key: string}}
        max_values=16 * MAX_TENSORS,
        error=UnreadableAdapterFile,
    )
    if not isinstance(header, dict):
        raise UnreadableAdapterFile("the safetensors header is not a JSON object")
    if len(header) > MAX_TENSORS + 1:
        raise UnreadableAdapterFile(
            f"the file holds {len(header) - 1} tensors; a .svda file has at most {MAX_TENSORS}"
        )
    metadata = header.get("__metadata__") or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise UnreadableAdapterFile("the safetensors __metadata__ is not a string map")
    return metadata


def _check_implied_size(header: AdapterHeader, file_bytes: int) -> None:
    """The layer table's tensor shapes must fit in the file before any tensor is built."""
    itemsize = PAYLOAD_DTYPES[header.payload_dtype].itemsize
    implied = sum(header.kind_totals().values()) * itemsize
    if implied > file_bytes:
        raise UnreadableAdapterFile(
            f"the layer table implies {implied} payload bytes, but the file has only "
            f"{file_bytes} bytes: the file is truncated or damaged"
        )


def _check_payload(header: AdapterHeader, tensors: dict[str, torch.Tensor]) -> None:
    expected = header.kind_totals()
    missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or extra:
        raise PayloadError(
            f"payload tensors do not match the layer table: missing {missing}, unexpected {extra}"
        )
    dtype = PAYLOAD_DTYPES[header.payload_dtype]
    for kind, t in tensors.items():
        if t.dtype != dtype or t.dim() != 1:
            raise PayloadError(
                f"tensor {kind} is {t.dtype} with shape {tuple(t.shape)}; expected 1-D {dtype}"
            )
        if t.numel() != expected[kind]:
            raise PayloadError(
                f"tensor {kind} has {t.numel()} values; the layer table needs {expected[kind]}"
            )
        if not _all_finite(t):
            raise PayloadError(f"tensor {kind} holds NaN or Inf values")


def _all_finite(t: torch.Tensor) -> bool:
    """One reduction instead of a mask: a sum is finite when every value is (unless finite
    values overflow it, which the exact check then settles)."""
    total = float(t.float().sum()) if t.numel() else 0.0
    return math.isfinite(total) or bool(torch.isfinite(t).all())


def split_payload(adapter_file: AdapterFile) -> dict[str, torch.Tensor]:
    """Flat tensors back to ``"<layer>.<kind>" -> tensor`` in each layer's shape."""
    offsets = dict.fromkeys(adapter_file.tensors, 0)
    out = {}
    for entry in adapter_file.header.layers:
        for kind, shape in entry.params.items():
            n = int(torch.Size(shape).numel())
            start = offsets[kind]
            out[f"{entry.name}.{kind}"] = adapter_file.tensors[kind][start : start + n].view(shape)
            offsets[kind] = start + n
    return out


# ----- base checks ------------------------------------------------------------------------------
def check_shapes(adapter_file: AdapterFile, model: AdapterModel) -> None:
    shapes = model.layer_shapes()
    for entry in adapter_file.header.layers:
        if entry.name not in shapes:
            raise LayerShapeMismatch(
                f"layer {entry.name} of the adapter does not exist in this base model"
            )
        d_out, d_in = shapes[entry.name]
        if (d_out, d_in) != (entry.d_out, entry.d_in):
            raise LayerShapeMismatch(
                f"layer {entry.name} is {d_out}×{d_in} in this base, {entry.d_out}×{entry.d_in} in the adapter"
            )


def check_base(adapter_file: AdapterFile, model: AdapterModel) -> None:
    header = adapter_file.header
    if header.base_fingerprint != model.fingerprint.whole:
        raise BaseMismatch(
            f"adapter {header.name!r} was trained on base {header.base_fingerprint[:16]}…, "
            f"but this base is {model.fingerprint.whole[:16]}…; load it onto the base it was made for"
        )
    for entry in header.layers:
        if not model.layer_fingerprint(entry.name).startswith(entry.fingerprint):
            raise BaseMismatch(f"layer {entry.name} of this base differs from the adapter's base")


def adapter_config(adapter_file: AdapterFile):
    return config_from_dict(adapter_file.header.config)
