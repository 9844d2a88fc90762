"""Training checkpoints of attached adapters, and publishing ``.svda`` bytes into a store.

A checkpoint folder (what the trainer writes, and what ``svda-pack export`` reads) holds
``svda_checkpoint.json`` (adapter name, method config, base fingerprint) and
``adapter.safetensors`` (the adapter's trainable tensors by ``"<layer>.<param>"``, float32).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from svda.runtime import AdapterModel, config_from_dict
from svda.runtime.errors import AdapterConfigError

from .errors import AdapterFormatError, BaseMismatch
from .format import AdapterFile, read_adapter
from .store import AdapterStore
from .store_types import StoreEntry

MANIFEST = "svda_checkpoint.json"
TENSORS = "adapter.safetensors"


class CheckpointError(AdapterFormatError):
    check = "checkpoint"


def save_checkpoint(model: AdapterModel, name: str, folder: str | os.PathLike) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(model.adapter_state_dict(name), str(folder / TENSORS))
    manifest = {
        "name": name,
        "config": model.configs[name].to_dict(),
        "base_fingerprint": model.fingerprint.whole,
    }
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return folder


def read_checkpoint(folder: str | os.PathLike) -> tuple[dict, dict]:
    """The checkpoint's manifest (with a parsed ``config``) and tensors; no model needed."""
    folder = Path(folder)
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        tensors = load_file(str(folder / TENSORS))
        manifest["config"] = config_from_dict(manifest["config"])
    except (OSError, ValueError, KeyError, TypeError, SafetensorError, AdapterConfigError) as exc:
        raise CheckpointError(
            f"{folder} is not a readable svda checkpoint ({MANIFEST} + {TENSORS}): {exc}"
        ) from exc
    return manifest, tensors


def load_checkpoint(folder: str | os.PathLike, model: AdapterModel, name: str | None = None) -> str:
    """Attach the checkpoint's adapter to ``model``; returns the adapter name used."""
    manifest, tensors = read_checkpoint(folder)
    if manifest.get("base_fingerprint") not in (None, model.fingerprint.whole):
        raise BaseMismatch(
            f"checkpoint {folder} was trained on base {manifest['base_fingerprint'][:16]}…, "
            f"this base is {model.fingerprint.whole[:16]}…"
        )
    name = name or manifest["name"]
    model.add_adapter(name, manifest["config"])
    try:
        model.load_adapter_state_dict(name, tensors)
    except AdapterConfigError as exc:
        model.delete_adapter(name)
        raise CheckpointError(f"checkpoint {folder} does not fit this base: {exc}") from exc
    return name


def publish_adapter(
    store: AdapterStore, data: bytes, id: str, tenant: str | None = None
) -> StoreEntry:
    """Validate ``.svda`` bytes (every check that needs no base) and publish them as ``id``."""
    header = read_adapter(data).header
    return store.publish(
        data,
        id,
        tenant=tenant,
        tags=header.tags,
        method=header.method,
        base_fingerprint=header.base_fingerprint,
        name=header.name,
    )


def read_stored_adapter(store: AdapterStore, entry: StoreEntry) -> AdapterFile:
    """Read and check a published adapter: the store verifies the object's SHA-256 (the file's
    content address, recorded when :func:`publish_adapter` validated these bytes), which covers
    the payload, so the payload hash is not computed a second time."""
    return read_adapter(store.read_bytes(entry), whole_file_verified=True)
