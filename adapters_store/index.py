"""The SQLite index of an adapter store: connections, write transactions, schema.

One file (``index.sqlite`` in the store root, WAL mode, a busy timeout) shared by threads and
processes through SQLite's locking. Writes go through :meth:`StoreIndex.transaction`
(``BEGIN IMMEDIATE``: the write lock up front); reads on the serving path reuse one connection
per thread (:meth:`StoreIndex.connect` with ``reuse=True``).
"""

from __future__ import annotations

import os
import random
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .store_types import StoreError

SCHEMA_VERSION = 2
# schema 2: ids are per namespace (tenant, '' for shared); schema 1 had one global id space
_SCHEMA = """
CREATE TABLE IF NOT EXISTS ids (
    namespace TEXT NOT NULL, id TEXT NOT NULL, last_version INTEGER NOT NULL,
    PRIMARY KEY (namespace, id)
);
CREATE TABLE IF NOT EXISTS adapters (
    id TEXT NOT NULL, version INTEGER NOT NULL, tenant TEXT NOT NULL, name TEXT,
    method TEXT NOT NULL, base_fingerprint TEXT NOT NULL, size INTEGER NOT NULL,
    sha256 TEXT NOT NULL, created TEXT NOT NULL, tags TEXT NOT NULL,
    PRIMARY KEY (tenant, id, version)
);
CREATE INDEX IF NOT EXISTS ids_id ON ids (id);
CREATE INDEX IF NOT EXISTS adapters_sha256 ON adapters (sha256);
CREATE INDEX IF NOT EXISTS adapters_base ON adapters (base_fingerprint);
CREATE INDEX IF NOT EXISTS adapters_tenant ON adapters (tenant);
"""
# schema 1 -> 2: the old tables are renamed, the new ones created, the rows copied (every
# schema-1 id had one owner, so (namespace, id) keys stay unique), the old tables dropped
_MIGRATE_1_TO_2 = """
DROP INDEX IF EXISTS adapters_sha256;
DROP INDEX IF EXISTS adapters_base;
DROP INDEX IF EXISTS adapters_tenant;
ALTER TABLE ids RENAME TO ids_v1;
ALTER TABLE adapters RENAME TO adapters_v1;
{schema};
INSERT INTO ids (namespace, id, last_version) SELECT tenant, id, last_version FROM ids_v1;
INSERT INTO adapters SELECT * FROM adapters_v1;
DROP TABLE ids_v1;
DROP TABLE adapters_v1
"""


class StoreIndex:
    """The index file at ``path``; created (schema, WAL) on first use."""

    def __init__(self, path: Path, timeout_s: float = 60.0) -> None:
        self.path = path
        self.timeout_s = timeout_s
        self._local = threading.local()  # this thread's cached read connection
        self._init_index()

    @contextmanager
    def connect(self, reuse: bool = False) -> Iterator[sqlite3.Connection]:
        """A connection in autocommit mode. ``reuse=True`` (reads on the serving path): this
        thread's cached connection, opened once (~0.3 ms saved per lookup); it is dropped after
        any error and never shared across threads or a fork."""
        conn = self._cached_connection() if reuse else None
        fresh = conn is None
        if fresh:
            try:
                conn = sqlite3.connect(self.path, timeout=self.timeout_s, isolation_level=None)
                conn.execute("PRAGMA synchronous = FULL")
            except sqlite3.Error as exc:
                raise StoreError(f"cannot open the store index {self.path}: {exc}") from exc
        ok = False
        try:
            yield conn
            ok = True
        except sqlite3.OperationalError as exc:
            raise StoreError(
                f"store index {self.path}: {exc}; if it is locked, another process holds "
                f"it for over {self.timeout_s:.0f} s: retry, or raise timeout_s"
            ) from exc
        except sqlite3.DatabaseError as exc:
            raise StoreError(
                f"store index {self.path} is unusable ({exc}); restore it from a backup "
                "(objects/ can be re-published)"
            ) from exc
        finally:
            if reuse and ok and not conn.in_transaction:
                self._local.conn = (self._index_identity(), conn)
            else:
                if not fresh:
                    self._local.conn = None
                conn.close()

    def _cached_connection(self) -> sqlite3.Connection | None:
        """This thread's connection, unless the process forked or the index file was replaced
        (a connection keeps reading the file it opened)."""
        cached = getattr(self._local, "conn", None)
        self._local.conn = None  # taken; given back by connect when it was used cleanly
        if cached is None:
            return None
        if cached[0] != self._index_identity():
            cached[1].close()
            return None
        return cached[1]

    def _index_identity(self) -> tuple[int, int, int] | None:
        """(process, device, inode) of the index file as this process sees it now."""
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return os.getpid(), st.st_dev, st.st_ino

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """A write transaction: ``BEGIN IMMEDIATE`` takes the write lock up front."""
        with self.connect() as conn:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise

    def _init_index(self) -> None:
        self._enable_wal()
        with self.connect() as conn:
            if conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION:
                return
        with self.transaction() as conn:
            found = conn.execute("PRAGMA user_version").fetchone()[0]
            if found > SCHEMA_VERSION:
                raise StoreError(
                    f"store index {self.path} has schema {found}, newer than this svda "
                    f"understands ({SCHEMA_VERSION}); upgrade svda"
                )
            script = (
                _MIGRATE_1_TO_2.format(schema=_SCHEMA.strip().rstrip(";"))
                if found == 1
                else _SCHEMA
            )
            for statement in filter(str.strip, script.split(";")):
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def _enable_wal(self) -> None:
        """Switch the index to WAL mode, retrying while other processes race to do the same.

        SQLite answers "database is locked" at once, without waiting for the busy timeout,
        when several connections switch a new index to WAL together.
        """
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                with self.connect() as conn:
                    mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
                    if mode != "wal":
                        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
                break
            except StoreError as exc:
                locked = "locked" in str(exc.__cause__) or "busy" in str(exc.__cause__)
                if not locked or time.monotonic() > deadline:
                    raise
                time.sleep(random.uniform(0.005, 0.05))
        if mode != "wal":
            raise StoreError(
                f"store index {self.path} cannot use WAL mode (it stays {mode!r}); "
                "keep the store on a local filesystem"
            )
