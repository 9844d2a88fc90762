"""Types and argument checks of the adapter store: errors, entries, gc reports, validators.

Split from :mod:`svda.adapters_store.store` (which re-exports the public names) to keep each
file small. Imports nothing heavy: the store must open without importing torch.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

__all__ = [
    "OBJECT_SUFFIX",
    "AdapterNotFound",
    "CorruptObjectError",
    "GcReport",
    "InvalidAdapterId",
    "InvalidMetadata",
    "StoreEntry",
    "StoreError",
    "StorePermissionError",
    "default_store_root",
    "validate_id",
    "validate_tenant",
]

OBJECT_SUFFIX = ".svda"
# The naming rule of ids, tenants and adapter names is svda.runtime.names' (NAME_PATTERN,
# NAME_RULE): restated here because importing svda.runtime loads torch, and the store opens
# without it; tests/adapters_store/test_store.py checks that the two agree.
_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
NAME_RULE = "1-128 characters from [A-Za-z0-9._-], starting with a letter or digit, without '..'"


class StoreError(Exception):
    """Base class of every error the adapter store raises on purpose."""


class AdapterNotFound(StoreError, KeyError):
    """No adapter (or no such version, or no object file) for the requested id."""

    def __str__(self) -> str:  # KeyError would print the repr of the message
        return str(self.args[0]) if self.args else ""


class StorePermissionError(StoreError, PermissionError):
    """The calling tenant may not read or write this id."""


class InvalidMetadata(StoreError, ValueError):
    """A tenant, tag, method, fingerprint, name or version argument is not acceptable."""


class InvalidAdapterId(InvalidMetadata):
    """An adapter id does not match ``^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$`` or contains '..'."""


class CorruptObjectError(StoreError):
    """An object file's bytes do not match the size/sha256 recorded in the index."""


@dataclass(frozen=True)
class StoreEntry:
    """One published version of an adapter: the index row plus where its bytes live."""

    id: str
    version: int
    tenant: str | None  # None: the shared namespace
    name: str | None
    method: str
    base_fingerprint: str
    size: int
    sha256: str
    created: str  # ISO 8601, UTC
    tags: tuple[str, ...] = field(default_factory=tuple)
    path: str = ""  # file path (LocalStorage) or URL of the object

    @property
    def key(self) -> str:
        """The object key: ``<sha256>.svda``."""
        return f"{self.sha256}{OBJECT_SUFFIX}"

    @property
    def ref(self) -> str:
        """``id@version``, e.g. for messages and CLI output."""
        return f"{self.id}@{self.version}"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of every field (tags as a list)."""
        return {**asdict(self), "tags": list(self.tags)}


@dataclass(frozen=True)
class GcReport:
    """What :meth:`AdapterStore.gc` removed (or would remove, with ``dry_run``)."""

    removed_objects: list[str]
    removed_temp: list[str]
    freed_bytes: int
    kept_objects: int
    dry_run: bool = False


def default_store_root() -> Path:
    """``$SVDA_STORE`` if set, else ``svda_home() / "store"``."""
    env = os.environ.get("SVDA_STORE")
    if env:
        return Path(env).expanduser()
    from svda.runtime.paths import svda_home  # lazy: importing svda.runtime loads torch

    return svda_home() / "store"


def _short(value: object, limit: int = 40) -> str:
    """``value`` quoted for an error message, cut to ``limit`` characters (ids can be huge)."""
    if not isinstance(value, str):
        return f"of type {type(value).__name__}"
    if len(value) <= limit:
        return repr(value)
    return f"{value[:limit]!r}… ({len(value)} characters)"


def validate_id(id: str) -> str:
    """Return ``id`` if it is a valid adapter id, else raise :class:`InvalidAdapterId`."""
    if not isinstance(id, str) or not _ID_RE.fullmatch(id) or ".." in id:
        raise InvalidAdapterId(
            f"invalid adapter id {_short(id)}: use {NAME_RULE} (adapter names follow the same rule)"
        )
    return id


def validate_tenant(tenant: str | None) -> str | None:
    if tenant is None:
        return None
    if tenant == "":
        raise InvalidMetadata(
            "tenant '' is ambiguous: pass tenant=None for an admin call (it writes the shared "
            "namespace) or a tenant name"
        )
    if not isinstance(tenant, str) or not _ID_RE.fullmatch(tenant) or ".." in tenant:
        raise InvalidMetadata(f"invalid tenant {_short(tenant)}: use {NAME_RULE}")
    return tenant


def validate_text(what: str, value: object, max_len: int) -> str:
    if not isinstance(value, str) or not value or len(value) > max_len or not value.isprintable():
        raise InvalidMetadata(
            f"invalid {what} {value!r}: give a non-empty printable string of at most "
            f"{max_len} characters"
        )
    return value


def validate_tags(tags: Sequence[str]) -> tuple[str, ...]:
    if isinstance(tags, str):
        raise InvalidMetadata(f"tags must be a list of strings, not the string {tags!r}")
    checked = [validate_text("tag", t, 64) for t in tags or ()]
    return tuple(dict.fromkeys(checked))  # de-duplicated, order kept


def validate_version(version: int | None) -> int | None:
    if version is not None and (type(version) is not int or version < 1):
        raise InvalidMetadata(f"invalid version {version!r}: give an integer >= 1 (or None)")
    return version


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


def check_write(id: str, owner: str, caller: str | None) -> None:
    """Raise :class:`StorePermissionError` unless ``caller`` may delete from ``owner``'s id."""
    if caller is None or owner == caller:
        return
    if owner == "":
        raise StorePermissionError(
            f"adapter {id!r} is in the shared namespace, which only an admin call "
            "(tenant=None) may change"
        )
    raise StorePermissionError(  # unreachable from the store: other namespaces are invisible
        f"adapter {id!r} is not tenant {caller!r}'s; a tenant may change only its own adapters"
    )
