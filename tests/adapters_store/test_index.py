"""The store's SQLite index: reused read connections, schema versions."""

from __future__ import annotations

import shutil
import sqlite3

import pytest

from svda.adapters_store.index import SCHEMA_VERSION, StoreIndex
from svda.adapters_store.store import AdapterNotFound, AdapterStore, StoreError

from .store_workers import META


def test_cached_read_connection_sees_later_writes_and_survives_errors(store):
    """Lookups reuse one connection per thread; it must not pin an old snapshot."""
    store.publish(b"one", "p", **META)
    assert store.get("p").version == 1
    other = AdapterStore(store.root)  # another writer (could be another process)
    other.publish(b"two", "p", **META)
    assert store.get("p").version == 2 and len(store.list()) == 2
    with pytest.raises(AdapterNotFound):
        store.get("missing")
    assert store.get("p", version=1).size == 3


def test_cached_read_connection_follows_a_replaced_index(tmp_path):
    """A store folder deleted and made again under a live process: lookups read the new index."""
    root = tmp_path / "s"
    store = AdapterStore(root)
    store.publish(b"old", "p", **META)
    assert store.get("p").size == 3
    shutil.rmtree(root)
    AdapterStore(root).publish(b"newer", "p", **META)
    assert store.get("p").size == 5


def test_a_new_index_is_in_wal_mode_with_the_current_schema(tmp_path):
    index = StoreIndex(tmp_path / "index.sqlite")
    with index.connect() as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    StoreIndex(tmp_path / "index.sqlite")  # opening it again changes nothing


def test_an_index_from_a_newer_svda_is_refused(tmp_path):
    path = tmp_path / "index.sqlite"
    StoreIndex(path)
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(StoreError, match="newer than this svda understands"):
        StoreIndex(path)


def test_a_failed_write_transaction_rolls_back(tmp_path):
    index = StoreIndex(tmp_path / "index.sqlite")
    with pytest.raises(RuntimeError), index.transaction() as conn:
        conn.execute("INSERT INTO ids VALUES ('x', '', 1)")
        raise RuntimeError("abort")
    with index.connect() as conn:
        assert conn.execute("SELECT COUNT(*) FROM ids").fetchone()[0] == 0
