"""The adapter store: versioned, content-addressed adapter files with a SQLite index.

Layout of a store root (default ``$SVDA_STORE``, else ``svda_home() / "store"``)::

    index.sqlite (+ -wal, -shm)    the index; always local to the root, even if objects are not
    objects/<sha256>.svda          adapter bytes, named by the sha256 of their content
    tmp/                           staged writes; leftovers of crashed writers (see gc)

**Ids and versions.** An adapter is addressed by an *id* chosen by the publisher
(``^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$``, no ``..``), unique within its namespace (below).
Publishing an existing id adds version ``last + 1``; older versions stay readable until deleted.
Version numbers are never reused while the id has any version left; deleting every version
frees the id (a later publish starts again at 1). Identical bytes share one object file, across
namespaces too. The store does not parse adapter files: the caller passes ``method``,
``base_fingerprint``, ``name`` and ``tags`` and the store keeps them with the size and sha256 of
the bytes.

**Tenants and namespaces.** Every tenant has its own namespace of ids, and there is one shared
namespace (stored as tenant ``''``, reported as ``None``). Two tenants may both publish an id
``"support"``: they get two independent adapters, and neither can learn that the other exists.

* ``tenant="acme"`` (a name like an id) publishes into and deletes from acme's namespace. It
  reads an id from its own namespace first, then from the shared one (its own adapter shadows a
  shared one of the same id). Another tenant's ids are invisible: reading or deleting one
  answers :class:`AdapterNotFound` with the same message as for an id nobody has.
* ``tenant=None`` is an *admin* call: it publishes into the shared namespace and reads or
  deletes the shared id, else the one tenant's id of that name (if several tenants have it, the
  call must name the tenant). ``list()`` shows every namespace. ``tenant=""`` is refused as
  ambiguous.

``list(tenant=t)`` shows what ``t`` may read: its own entries and the shared ones.

**Atomicity.** ``publish`` stages the bytes (temp file in ``tmp/``, fsync) outside any lock,
then in one ``BEGIN IMMEDIATE`` transaction computes the version, renames the object into
``objects/`` (fsyncing the directory) unless an identical one is there, and inserts the row.
A crash at any point leaves either no trace, a stale temp file, or an unreferenced object;
``gc`` removes both. Every committed row's object exists, because objects are only removed
under the same lock after checking that no row references them. ``delete`` removes rows and
then, in a second transaction, the objects no row references any more (a crash in between
leaves an orphan for ``gc``). Connections are opened per call, so a store object may be used
from several threads and processes share the store through SQLite's locking (WAL mode, a busy
timeout). Keep the root on a local filesystem: SQLite locking is unreliable on network mounts.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import sqlite3
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .index import StoreIndex
from .storage import LocalStorage, ObjectStorage, StagedObject
from .store_types import (
    OBJECT_SUFFIX,
    AdapterNotFound,
    CorruptObjectError,
    GcReport,
    InvalidAdapterId,
    InvalidMetadata,
    StoreEntry,
    StoreError,
    StorePermissionError,
    check_write,
    default_store_root,
    utc_now,
    validate_id,
    validate_tags,
    validate_tenant,
    validate_text,
    validate_version,
)

__all__ = [
    "DEFAULT_TEMP_MAX_AGE_S",
    "AdapterNotFound",
    "AdapterStore",
    "CorruptObjectError",
    "GcReport",
    "InvalidAdapterId",
    "InvalidMetadata",
    "StoreEntry",
    "StoreError",
    "StorePermissionError",
    "default_store_root",
    "validate_id",
]

DEFAULT_TEMP_MAX_AGE_S = 15 * 60.0
_SHA_RE = re.compile(r"[0-9a-f]{64}")
_COLUMN_NAMES = (
    "id", "version", "tenant", "name", "method", "base_fingerprint", "size", "sha256", "created",
    "tags",
)  # fmt: skip
_IN_NAMESPACE = "WHERE tenant = ? AND id = ?"
_COLUMNS = ", ".join(_COLUMN_NAMES)


def check_object(entry: StoreEntry, data: bytes, where: str) -> bytes:
    """``data`` if it has ``entry``'s recorded size and sha256, else :class:`CorruptObjectError`
    (``where``: the object's location, for the message)."""
    digest = hashlib.sha256(data).hexdigest()
    if len(data) != entry.size or digest != entry.sha256:
        raise CorruptObjectError(
            f"the object of {entry.ref} at {where} is corrupt (sha256 {digest}, {len(data)} "
            f"bytes; expected {entry.sha256}, {entry.size} bytes); delete this version and "
            "publish it again"
        )
    return data


class AdapterStore:
    """A directory of versioned adapters; see the module docstring for the rules."""

    def __init__(
        self,
        root: str | Path | None = None,
        *,
        storage: ObjectStorage | None = None,
        timeout_s: float = 60.0,
    ) -> None:
        self.root = Path(root).expanduser().resolve() if root else default_store_root().resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.storage = storage if storage is not None else LocalStorage(self.root)
        self.index = StoreIndex(self.root / "index.sqlite", timeout_s)

    def __repr__(self) -> str:
        return f"AdapterStore({str(self.root)!r})"

    # -- public API ---------------------------------------------------------------------------

    def publish(
        self,
        data: bytes | Path,
        id: str,
        *,
        tenant: str | None = None,
        tags: Sequence[str] = (),
        method: str,
        base_fingerprint: str,
        name: str | None = None,
    ) -> StoreEntry:
        """Store ``data`` (bytes or a file path) as the next version of ``id``. Adapter files
        are published through :func:`~svda.adapters_store.publish_adapter` (or after
        ``read_adapter`` as the server's upload does): readers trust an object whose SHA-256
        matches to have passed those checks."""
        row = {
            "id": validate_id(id),
            "tenant": validate_tenant(tenant) or "",
            "name": None if name is None else validate_text("name", name, 256),
            "method": validate_text("method", method, 64),
            "base_fingerprint": validate_text("base_fingerprint", base_fingerprint, 256),
            "tags": json.dumps(list(validate_tags(tags))),
            "created": utc_now(),
        }
        staged = self.storage.stage(data)
        try:
            row.update(sha256=staged.sha256, size=staged.size)
            with self.index.transaction() as conn:
                row["version"] = self._next_version(conn, row["id"], row["tenant"])
                self._commit_object(staged)
                names = ", ".join(f":{c}" for c in _COLUMN_NAMES)
                conn.execute(f"INSERT INTO adapters ({_COLUMNS}) VALUES ({names})", row)
        finally:
            self.storage.discard(staged)  # no-op once committed
        return self._entry(tuple(row[c] for c in _COLUMN_NAMES))

    def staging_file(self, prefix: str = "upload-") -> Path:
        """A new empty file in the store's staging folder (``tmp/``, which ``gc`` cleans of
        leftovers) for a caller to write a file to publish from; the caller removes it."""
        folder = getattr(self.storage, "temp_dir", self.root / "tmp")
        folder.mkdir(parents=True, exist_ok=True)
        fd, path = tempfile.mkstemp(prefix=prefix, suffix=".part", dir=folder)
        os.close(fd)
        return Path(path)

    def get(self, id: str, version: int | None = None, tenant: str | None = None) -> StoreEntry:
        """The latest (or the given) version of ``id``, if ``tenant`` may read it."""
        id, caller, version = validate_id(id), validate_tenant(tenant), validate_version(version)
        with self.index.connect(reuse=True) as conn:
            conn.execute("BEGIN")  # one snapshot for both queries
            namespace = self._namespace(conn, id, caller)
            rows = self._rows(conn, _IN_NAMESPACE + " ORDER BY version", (namespace, id))
            conn.execute("COMMIT")
        wanted = [r for r in rows if version is None or r[1] == version]
        if not wanted:
            available = ", ".join(str(r[1]) for r in rows)
            raise AdapterNotFound(
                f"adapter {id!r} has no version {version}; available versions: {available}"
            )
        return self._entry(wanted[-1])

    def read_bytes(self, entry: StoreEntry) -> bytes:
        """The bytes of ``entry``, checked against its recorded size and sha256."""
        if not _SHA_RE.fullmatch(entry.sha256):
            raise InvalidMetadata(f"entry {entry.ref} has a malformed sha256 {entry.sha256!r}")
        try:
            data = self.storage.read(entry.key)
        except FileNotFoundError:
            raise AdapterNotFound(
                f"the object of {entry.ref} ({self.storage.path_or_url(entry.key)}) is missing: "
                "it was deleted meanwhile or the store is damaged; look it up again or re-publish"
            ) from None
        return check_object(entry, data, self.storage.path_or_url(entry.key))

    def list(
        self,
        base: str | None = None,
        method: str | None = None,
        tenant: str | None = None,
        tag: str | None = None,
        *,
        id: str | None = None,
        latest_only: bool = False,
        include_shared: bool = True,
    ) -> list[StoreEntry]:
        """Entries ``tenant`` may read (all for ``None``), filtered; sorted by id, version."""
        caller = validate_tenant(tenant)
        clauses, params = [], []
        for column, value in (("base_fingerprint", base), ("method", method), ("id", id)):
            if value is not None:
                clauses.append(f"{column} = ?")
                params.append(value)
        if caller is not None:
            clauses.append("tenant IN (?, '')" if include_shared else "tenant = ?")
            params.append(caller)
        if latest_only:
            clauses.append(
                "version = (SELECT last_version FROM ids "
                "WHERE ids.namespace = adapters.tenant AND ids.id = adapters.id)"
            )
        where = f"WHERE {' AND '.join(clauses)} " if clauses else ""
        with self.index.connect(reuse=True) as conn:
            rows = self._rows(conn, f"{where}ORDER BY id, version", params)
        entries = [self._entry(r) for r in rows]
        return [e for e in entries if tag is None or tag in e.tags]

    def delete(
        self, id: str, version: int | None = None, tenant: str | None = None
    ) -> list[StoreEntry]:
        """Delete one version (or all versions) of ``id``; return the deleted entries.

        Objects that no row references any more are removed right away.
        """
        id, caller, version = validate_id(id), validate_tenant(tenant), validate_version(version)
        with self.index.transaction() as conn:
            namespace = self._namespace(conn, id, caller)
            check_write(id, namespace, caller)
            where = _IN_NAMESPACE + ("" if version is None else " AND version = ?")
            params = (namespace, id) if version is None else (namespace, id, version)
            deleted = [self._entry(r) for r in self._rows(conn, where, params)]
            if not deleted:
                raise AdapterNotFound(f"adapter {id!r} has no version {version}")
            conn.execute(f"DELETE FROM adapters {where}", params)
            if not conn.execute(
                f"SELECT 1 FROM adapters {_IN_NAMESPACE}", (namespace, id)
            ).fetchone():
                conn.execute("DELETE FROM ids WHERE namespace = ? AND id = ?", (namespace, id))
        with contextlib.suppress(StoreError, OSError):  # if this fails, gc removes them
            self._remove_unreferenced({e.sha256 for e in deleted})
        return deleted

    def gc(
        self, *, temp_max_age_s: float = DEFAULT_TEMP_MAX_AGE_S, dry_run: bool = False
    ) -> GcReport:
        """Remove objects no row references and staged files older than ``temp_max_age_s``.

        Use a ``temp_max_age_s`` well above the longest publish, or a publish in flight may
        lose its staged file (it then fails and can simply be retried).
        """
        temp = self.storage.remove_stale_temp(temp_max_age_s, dry_run=dry_run)
        with self.index.transaction() as conn:
            referenced = {r[0] for r in conn.execute("SELECT DISTINCT sha256 FROM adapters")}
            orphans = [
                k for k in self.storage.list() if k.removesuffix(OBJECT_SUFFIX) not in referenced
            ]
            freed = sum(self._size_or_zero(k) for k in orphans)
            if not dry_run:
                for key in orphans:
                    self.storage.delete(key)
        kept = len(referenced)
        return GcReport(sorted(orphans), sorted(temp), freed, kept, dry_run)

    def verify(self) -> list[str]:
        """Read every object the index references; return one line per problem (none: [])."""
        problems: list[str] = []
        for entry in {e.sha256: e for e in self.list()}.values():  # each object once
            try:
                self.read_bytes(entry)
            except (AdapterNotFound, CorruptObjectError) as exc:
                problems.append(str(exc))
        return problems

    # -- index helpers ------------------------------------------------------------------------

    def _rows(self, conn: sqlite3.Connection, tail: str, params: Sequence[Any]) -> list[tuple]:
        return conn.execute(f"SELECT {_COLUMNS} FROM adapters {tail}", params).fetchall()

    def _entry(self, row: tuple) -> StoreEntry:
        id, version, tenant, name, method, base, size, sha, created, tags = row
        key = f"{sha}{OBJECT_SUFFIX}"
        path = self.storage.path_or_url(key)
        tags = tuple(json.loads(tags))
        return StoreEntry(
            id, version, tenant or None, name, method, base, size, sha, created, tags, path
        )

    def _namespace(self, conn: sqlite3.Connection, id: str, caller: str | None) -> str:
        """The namespace ('' = shared) whose ``id`` the caller addresses (module docstring)."""
        found = [r[0] for r in conn.execute("SELECT namespace FROM ids WHERE id = ?", (id,))]
        if caller is not None:
            for namespace in (caller, ""):
                if namespace in found:
                    return namespace
        elif "" in found or len(found) == 1:
            return "" if "" in found else found[0]
        elif found:
            raise InvalidMetadata(
                f"adapter id {id!r} exists for several tenants ({', '.join(sorted(found))}) "
                "and not in the shared namespace: name the tenant (tenant=...)"
            )
        who = "" if caller is None else f" for tenant {caller!r}"
        raise AdapterNotFound(
            f"no adapter {id!r} in the store at {self.root}{who}; list the store to see its ids"
        )

    def _next_version(self, conn: sqlite3.Connection, id: str, namespace: str) -> int:
        key = (namespace, id)
        row = conn.execute(
            "SELECT last_version FROM ids WHERE namespace = ? AND id = ?", key
        ).fetchone()
        if row is None:
            conn.execute("INSERT INTO ids VALUES (?, ?, 1)", key)
            return 1
        conn.execute(
            "UPDATE ids SET last_version = ? WHERE namespace = ? AND id = ?", (row[0] + 1, *key)
        )
        return row[0] + 1

    # -- object helpers -----------------------------------------------------------------------

    def _commit_object(self, staged: StagedObject) -> None:
        """Make ``staged`` visible as ``<sha256>.svda`` unless an intact copy is there already."""
        key = f"{staged.sha256}{OBJECT_SUFFIX}"
        if not (self.storage.exists(key) and self.storage.size(key) == staged.size):
            self.storage.commit(staged, key)

    def _remove_unreferenced(self, shas: set[str]) -> None:
        """Remove the objects of ``shas`` that no row references (under the write lock)."""
        with self.index.transaction() as conn:
            for sha in shas:
                if not conn.execute("SELECT 1 FROM adapters WHERE sha256 = ?", (sha,)).fetchone():
                    self.storage.delete(f"{sha}{OBJECT_SUFFIX}")

    def _size_or_zero(self, key: str) -> int:
        try:
            return self.storage.size(key)
        except FileNotFoundError:
            return 0
