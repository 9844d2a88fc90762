"""Checks shared by the store tests."""

from __future__ import annotations

import hashlib

from svda.adapters_store.store import AdapterStore


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def object_files(store: AdapterStore) -> set[str]:
    return {p.name for p in (store.root / "objects").iterdir()}


def assert_clean(store: AdapterStore) -> None:
    """Every row's object is intact, and objects/ holds exactly the referenced objects."""
    assert store.verify() == []
    assert object_files(store) == {e.key for e in store.list()}
    assert list((store.root / "tmp").iterdir()) == []
