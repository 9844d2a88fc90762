"""Fixtures for adapter-store tests."""

from __future__ import annotations

import pytest

from svda.adapters_store.store import AdapterStore
from svda.runtime import SvdBasisCache


@pytest.fixture
def svd_cache(tmp_path_factory) -> SvdBasisCache:
    return SvdBasisCache(tmp_path_factory.mktemp("svd"))


@pytest.fixture
def store(tmp_path) -> AdapterStore:
    return AdapterStore(tmp_path / "store")
