"""Fixtures for adapter-store tests."""

from __future__ import annotations

import pytest

from svda.runtime import SvdBasisCache


@pytest.fixture
def svd_cache(tmp_path_factory) -> SvdBasisCache:
    return SvdBasisCache(tmp_path_factory.mktemp("svd"))
