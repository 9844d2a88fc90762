"""The adapter store: versions, dedup, filters, tenants, ids, integrity and gc (crashes and
concurrent writers: test_store_crashes.py; the SQLite index: test_index.py)."""

from __future__ import annotations

import os
import random
import sqlite3
import sys
import time
import types
from datetime import datetime
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from svda.adapters_store.storage import InvalidObjectKey, LocalStorage
from svda.adapters_store.store import (
    AdapterNotFound,
    AdapterStore,
    CorruptObjectError,
    InvalidAdapterId,
    InvalidMetadata,
    StoreError,
    StorePermissionError,
    default_store_root,
    validate_id,
)

from .store_helpers import assert_clean, object_files, sha
from .store_workers import META

# -- publishing, versions, dedup ----------------------------------------------------------------


def test_publish_get_and_read_round_trip(store):
    entry = store.publish(b"adapter-1", "my-adapter", tags=["a", "b", "a"], name="Mine", **META)
    assert (entry.id, entry.version, entry.tenant, entry.name) == ("my-adapter", 1, None, "Mine")
    assert (entry.method, entry.base_fingerprint, entry.tags) == ("svda", "fp-test", ("a", "b"))
    assert (entry.size, entry.sha256) == (9, sha(b"adapter-1"))
    assert Path(entry.path) == store.root / "objects" / f"{sha(b'adapter-1')}.svda"
    assert datetime.fromisoformat(entry.created.replace("Z", "+00:00")).utcoffset().seconds == 0
    assert store.get("my-adapter") == entry
    assert store.read_bytes(entry) == b"adapter-1"
    assert entry.to_dict()["tags"] == ["a", "b"]
    assert AdapterStore(store.root).get("my-adapter", 1) == entry  # reopened


def test_publish_from_a_file_path(store, tmp_path):
    data = random.Random(0).randbytes(3 << 20)  # several copy chunks
    source = tmp_path / "adapter.svda"
    source.write_bytes(data)
    entry = store.publish(source, "from-file", **META)
    assert (entry.size, entry.sha256) == (len(data), sha(data))
    assert store.read_bytes(entry) == data
    with pytest.raises(TypeError, match="Path"):
        store.publish(str(source), "from-str", **META)


def test_republishing_adds_versions_and_keeps_old_ones(store):
    for k in range(1, 4):
        assert store.publish(f"v{k}".encode(), "x", **META).version == k
    assert store.get("x").version == 3
    assert [store.read_bytes(store.get("x", k)) for k in (1, 2, 3)] == [b"v1", b"v2", b"v3"]
    with pytest.raises(AdapterNotFound, match="no version 4; available versions: 1, 2, 3"):
        store.get("x", 4)


def test_version_numbers_are_not_reused_until_the_id_is_gone(store):
    store.publish(b"one", "x", **META)
    store.publish(b"two", "x", **META)
    store.delete("x", 2)
    assert store.publish(b"three", "x", **META).version == 3
    assert [e.version for e in store.list(id="x")] == [1, 3]
    assert [e.ref for e in store.delete("x")] == ["x@1", "x@3"]
    with pytest.raises(AdapterNotFound):
        store.get("x")
    assert store.publish(b"again", "x", **META).version == 1


def test_identical_bytes_share_one_object_until_the_last_reference_goes(store):
    first = store.publish(b"same", "first", **META)
    second = store.publish(b"same", "second", **META)
    assert first.path == second.path and object_files(store) == {first.key}
    store.delete("first")
    assert store.read_bytes(store.get("second")) == b"same"
    store.delete("second")
    assert object_files(store) == set()
    assert_clean(store)


# -- listing and lookup -------------------------------------------------------------------------


def test_list_filters(store):
    store.publish(b"1", "a", tags=["chat"], method="svda", base_fingerprint="base-1")
    store.publish(b"2", "a", tags=["code"], method="svda", base_fingerprint="base-1")
    store.publish(b"3", "b", tags=["chat"], method="lora", base_fingerprint="base-2")
    store.publish(b"4", "c", tenant="acme", method="vera", base_fingerprint="base-1")
    refs = lambda **kw: [e.ref for e in store.list(**kw)]  # noqa: E731
    assert refs() == ["a@1", "a@2", "b@1", "c@1"]
    assert refs(base="base-1") == ["a@1", "a@2", "c@1"]
    assert refs(method="lora") == ["b@1"]
    assert refs(tag="chat") == ["a@1", "b@1"]
    assert refs(base="base-1", tag="code") == ["a@2"]
    assert refs(id="a", latest_only=True) == ["a@2"]
    assert refs(latest_only=True) == ["a@2", "b@1", "c@1"]
    assert refs(tenant="acme", include_shared=False) == ["c@1"]
    assert refs(tenant="other") == ["a@1", "a@2", "b@1"]


def test_missing_ids_raise_adapter_not_found(store):
    with pytest.raises(AdapterNotFound, match="no adapter 'ghost'") as info:
        store.get("ghost")
    assert isinstance(info.value, KeyError) and isinstance(info.value, StoreError)
    with pytest.raises(LookupError):
        store.delete("ghost")
    with pytest.raises(InvalidMetadata, match="version"):
        store.get("ghost", 0)


# -- ids, tenants, paths ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "../etc",
        "a/b",
        "a..b",
        "..",
        ".hidden",
        "-x",
        "_x",
        "a b",
        "a\n",
        "a\\b",
        "é",
        "a" * 129,
    ],
)
def test_invalid_ids_are_refused_everywhere(store, bad):
    for call in (
        lambda: store.publish(b"x", bad, **META),
        lambda: store.get(bad),
        lambda: store.delete(bad),
    ):
        with pytest.raises(InvalidAdapterId, match="invalid adapter id") as info:
            call()
        assert isinstance(info.value, ValueError)
    assert object_files(store) == set()


ID_LIKE = st.text(st.sampled_from("aZ09._-/\\ \n\x00é"), max_size=140)


@given(ID_LIKE | st.text(max_size=140))
@settings(max_examples=150, deadline=None)
def test_accepted_ids_are_plain_names(text):
    try:
        validate_id(text)
    except InvalidAdapterId:
        return
    assert "/" not in text and "\\" not in text and ".." not in text
    assert text[0].isascii() and text[0].isalnum() and len(text) <= 128
    assert Path(text).name == text and not Path(text).is_absolute()


def test_storage_keys_cannot_escape_the_object_area(tmp_path):
    storage = LocalStorage(tmp_path / "s")
    for key in ("../x", "a/b", "..", "", "/abs"):
        with pytest.raises(InvalidObjectKey):
            storage.put_atomic(key, b"data")
        with pytest.raises(InvalidObjectKey):
            storage.exists(key)
    assert list((tmp_path / "s" / "tmp").iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]


def test_tenants_have_their_own_id_namespaces(store):
    mine = store.publish(b"acme", "support", tenant="acme", **META)
    theirs = store.publish(b"globex", "support", tenant="globex", **META)  # same id, no clash
    assert (mine.tenant, mine.version, theirs.tenant, theirs.version) == ("acme", 1, "globex", 1)
    assert store.get("support", tenant="acme") == mine
    assert store.get("support", tenant="globex") == theirs
    assert store.read_bytes(store.get("support", tenant="globex")) == b"globex"
    assert [e.tenant for e in store.list(tenant="globex")] == ["globex"]
    assert store.publish(b"acme 2", "support", tenant="acme", **META).version == 2
    assert store.get("support", tenant="globex").version == 1  # versions are per namespace
    assert len(store.delete("support", tenant="globex")) == 1
    assert [e.version for e in store.list(tenant="acme")] == [1, 2]  # untouched


def test_another_tenants_id_is_indistinguishable_from_an_absent_one(store):
    store.publish(b"acme", "acme-adapter", tenant="acme", **META)
    messages = []
    for adapter_id in ("acme-adapter", "nobody-has-this"):
        for call in (store.get, store.delete):
            with pytest.raises(AdapterNotFound) as info:
                call(adapter_id, tenant="globex")
            messages.append(str(info.value).replace(adapter_id, "ID"))
    assert messages[:2] == messages[2:] and "acme" not in "".join(messages)
    assert store.list(tenant="globex") == []


def test_shared_namespace_is_readable_by_all_writable_by_admin_only(store):
    shared = store.publish(b"public", "public-adapter", **META)
    assert shared.tenant is None
    assert store.get("public-adapter", tenant="acme") == shared
    assert [e.ref for e in store.list(tenant="acme")] == ["public-adapter@1"]
    with pytest.raises(StorePermissionError, match="shared namespace"):
        store.delete("public-adapter", tenant="acme")
    assert store.publish(b"public 2", "public-adapter", **META).version == 2
    own = store.publish(b"mine", "public-adapter", tenant="acme", **META)  # shadows the shared
    assert store.get("public-adapter", tenant="acme") == own
    assert store.get("public-adapter", tenant="globex").tenant is None
    assert store.get("public-adapter").version == 2  # admin: the shared one first
    store.delete("public-adapter", tenant="acme")
    assert store.get("public-adapter", tenant="acme").tenant is None


def test_admin_calls_resolve_a_tenant_id_only_when_unambiguous(store):
    store.publish(b"acme", "support", tenant="acme", **META)
    assert store.get("support").tenant == "acme"  # the only one of that id
    store.publish(b"globex", "support", tenant="globex", **META)
    with pytest.raises(InvalidMetadata, match=r"several tenants.*name the tenant"):
        store.get("support")
    assert [e.tenant for e in store.list()] == ["acme", "globex"]
    assert store.delete("support", tenant="acme")[0].tenant == "acme"
    assert store.get("support").tenant == "globex"


def test_schema_1_index_is_migrated_in_place(tmp_path):
    root = tmp_path / "old"
    root.mkdir()
    conn = sqlite3.connect(root / "index.sqlite")
    conn.executescript(
        """
        CREATE TABLE ids (id TEXT PRIMARY KEY, tenant TEXT NOT NULL, last_version INTEGER NOT NULL);
        CREATE TABLE adapters (
            id TEXT NOT NULL, version INTEGER NOT NULL, tenant TEXT NOT NULL, name TEXT,
            method TEXT NOT NULL, base_fingerprint TEXT NOT NULL, size INTEGER NOT NULL,
            sha256 TEXT NOT NULL, created TEXT NOT NULL, tags TEXT NOT NULL,
            PRIMARY KEY (id, version));
        INSERT INTO ids VALUES ('a', 'acme', 2), ('s', '', 1);
        INSERT INTO adapters VALUES ('a', 2, 'acme', NULL, 'svda', 'f', 1, 'x', 't', '[]'),
                                    ('s', 1, '', 'n', 'lora', 'f', 1, 'y', 't', '["k"]');
        PRAGMA user_version = 1;
        """
    )
    conn.close()
    store = AdapterStore(root)
    assert [(e.id, e.version, e.tenant, e.tags) for e in store.list()] == [
        ("a", 2, "acme", ()),
        ("s", 1, None, ("k",)),
    ]
    assert store.publish(b"next", "a", tenant="acme", **META).version == 3
    assert store.publish(b"b", "a", tenant="globex", **META).version == 1
    with sqlite3.connect(root / "index.sqlite") as check:
        assert check.execute("PRAGMA user_version").fetchone()[0] == 2


def test_invalid_ids_are_not_echoed_whole(store):
    with pytest.raises(InvalidMetadata) as info:
        store.publish(b"x", "x" * 10_000, **META)
    assert len(str(info.value)) < 300


@pytest.mark.parametrize("bad", ["", "../acme", "a/b", "x" * 200])
def test_invalid_tenants_are_refused(store, bad):
    with pytest.raises(InvalidMetadata, match="tenant"):
        store.publish(b"x", "x", tenant=bad, **META)
    with pytest.raises(InvalidMetadata, match="tenant"):
        store.list(tenant=bad)


def test_invalid_metadata_is_refused_before_anything_is_written(store):
    bad_calls = [
        {"method": ""},
        {"base_fingerprint": "x" * 300},
        {"tags": "chat"},
        {"tags": ["ok", ""]},
        {"name": "line\nbreak"},
    ]
    for bad in bad_calls:
        with pytest.raises(InvalidMetadata):
            store.publish(b"x", "x", **{**META, **bad})
    assert store.list() == [] and object_files(store) == set()


# -- integrity, gc, default root ----------------------------------------------------------------


def test_read_bytes_detects_corrupt_and_missing_objects(store):
    entry = store.publish(b"precious", "p", **META)
    Path(entry.path).write_bytes(b"tampered")
    with pytest.raises(CorruptObjectError, match=r"corrupt.*publish it again"):
        store.read_bytes(entry)
    assert len(store.verify()) == 1
    Path(entry.path).unlink()
    with pytest.raises(AdapterNotFound, match="missing"):
        store.read_bytes(entry)


def test_republishing_repairs_a_truncated_object(store):
    entry = store.publish(b"precious bytes", "p", **META)
    Path(entry.path).write_bytes(b"prec")
    store.publish(b"precious bytes", "p", **META)
    assert store.read_bytes(entry) == b"precious bytes"


def test_gc_removes_orphans_and_stale_temp_files_only(store):
    kept = store.publish(b"kept", "kept", **META)
    orphan = store.root / "objects" / f"{sha(b'orphan')}.svda"
    orphan.write_bytes(b"orphan")
    stale, fresh = store.root / "tmp" / "1-stale.part", store.root / "tmp" / "2-fresh.part"
    stale.write_bytes(b"half")
    fresh.write_bytes(b"in flight")
    old = time.time() - 3600
    os.utime(stale, (old, old))

    report = store.gc(dry_run=True)
    assert (report.removed_objects, report.removed_temp) == ([orphan.name], [stale.name])
    assert orphan.exists() and stale.exists()

    report = store.gc()
    assert (report.removed_objects, report.removed_temp) == ([orphan.name], [stale.name])
    assert (report.freed_bytes, report.kept_objects) == (6, 1)
    assert not orphan.exists() and not stale.exists() and fresh.exists()
    assert store.read_bytes(kept) == b"kept"
    assert store.gc(temp_max_age_s=0).removed_temp == [fresh.name]
    assert_clean(store)


def test_default_root_comes_from_svda_store_then_svda_home(tmp_path, monkeypatch):
    monkeypatch.setenv("SVDA_STORE", str(tmp_path / "env-store"))
    assert default_store_root() == tmp_path / "env-store"
    assert AdapterStore().root == (tmp_path / "env-store").resolve()
    monkeypatch.delenv("SVDA_STORE")
    # Stand-ins for svda.runtime(.paths): the real package imports torch, which is slow.
    paths = types.SimpleNamespace(svda_home=lambda: tmp_path / "home")
    monkeypatch.setitem(sys.modules, "svda.runtime", types.ModuleType("svda.runtime"))
    monkeypatch.setitem(sys.modules, "svda.runtime.paths", paths)
    assert default_store_root() == tmp_path / "home" / "store"


def test_a_file_that_is_not_an_index_gives_a_store_error(tmp_path):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "index.sqlite").write_bytes(b"not a database" * 100)
    with pytest.raises(StoreError, match="index"):
        AdapterStore(tmp_path / "bad")
