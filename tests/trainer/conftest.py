"""Fixtures for trainer tests: a tiny local base folder and a toy prompt/completion task."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.tiny_base import tiny_base_folder

WORDS = ["red", "green", "blue", "cyan", "pink", "gold", "gray", "teal", "navy", "lime"]


def toy_records(n: int = 40) -> list[dict]:
    """A learnable mapping: the completion is the prompt's word upper-cased."""
    return [
        {"prompt": f"word: {WORDS[i % len(WORDS)]}\n", "completion": WORDS[i % len(WORDS)].upper()}
        for i in range(n)
    ]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> str:
    return str(tiny_base_folder(tmp_path_factory.mktemp("tiny-base"), seed=0, layers=2))


@pytest.fixture
def toy_data(tmp_path) -> str:
    return str(write_jsonl(tmp_path / "toy.jsonl", toy_records()))


@pytest.fixture
def store_root(tmp_path, monkeypatch) -> str:
    root = tmp_path / "store"
    monkeypatch.setenv("SVDA_STORE", str(root))
    return str(root)
