"""Fixtures for runtime tests; model builders live in ``tests.runtime.helpers``."""

from __future__ import annotations

import pytest
import torch

from svda.runtime import SvdBasisCache

from .helpers import VOCAB


@pytest.fixture
def svd_cache(tmp_path) -> SvdBasisCache:
    return SvdBasisCache(tmp_path / "svd")


@pytest.fixture
def input_ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (4, 9), generator=torch.Generator().manual_seed(1))
