"""Fixtures for server tests: a tiny base model folder, adapters made on it, a store holding them.

Generic on purpose (engine and gRPC tests share them):

* ``tiny_folder``: a tiny random Llama + byte tokenizer (``tests/tiny_base.py``), once a session;
* ``tiny_base``: that folder loaded in float64 (a fresh copy per test: the engine wraps layers);
* ``adapter_bytes``: ``{"lora-a": .svda bytes (LoRA r=4 on q,v), "svda-b": (SvdA all-linear)}``,
  both made non-trivial with ``perturb``;
* ``store``: an :class:`AdapterStore` in ``tmp_path`` with both published in the shared namespace.

Every test runs with ``SVDA_HOME`` in a session temporary folder (SVD bases are cached there).
"""

from __future__ import annotations

import pytest
import torch

from svda.adapters_store import AdapterStore, export_adapter, publish_adapter
from svda.runtime import AdapterModel, LoraConfig, SvdaConfig, VeraConfig, load_base_model
from svda.runtime.methods import BoftConfig, HybridConfig, PissaConfig, SerialAdapterConfig
from tests.runtime.helpers import perturb
from tests.tiny_base import tiny_base_folder

METHOD_CONFIGS = {
    "lora": lambda: LoraConfig(targets="q_proj,v_proj", r=4, alpha=8.0),
    "svda": lambda: SvdaConfig(targets="all-linear"),
    "vera": lambda: VeraConfig(targets="q_proj,v_proj", r=16, projection_seed=3),
    "pissa": lambda: PissaConfig(targets="q_proj,v_proj", r=4),
    "boft": lambda: BoftConfig(targets="q_proj,v_proj", block_size=4),
    "hybrid": lambda: HybridConfig(targets="q_proj,v_proj", r=2, block_size=4, lambda_init=0.4),
    "serial_adapter": lambda: SerialAdapterConfig(targets="mlp", bottleneck=4),
}


@pytest.fixture(scope="session", autouse=True)
def _server_svda_home(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SVDA_HOME", str(tmp_path_factory.mktemp("svda-home-server")))
        yield


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory):
    return tiny_base_folder(tmp_path_factory.mktemp("tiny-base"), seed=0, layers=2)


def load_tiny(folder):
    """The tiny base in float64, so batched and single-row greedy decoding agree exactly."""
    return load_base_model(folder, dtype=torch.float64)


@pytest.fixture
def tiny_base(tiny_folder):
    return load_tiny(tiny_folder)


def make_adapter(folder, method: str, seed: int = 0, scale: float = 0.3) -> bytes:
    """``.svda`` bytes of a ``method`` adapter (``METHOD_CONFIGS``) on the tiny base, moved by
    ``perturb`` so that its outputs differ from the base's."""
    model = AdapterModel(load_tiny(folder).model)
    model.add_adapter("a", METHOD_CONFIGS[method]())
    perturb(model, "a", scale=scale, seed=seed)
    return export_adapter(model, "a", name=f"{method}-{seed}")


@pytest.fixture(scope="session")
def adapter_bytes(tiny_folder, _server_svda_home):
    return {
        "lora-a": make_adapter(tiny_folder, "lora", seed=1),
        "svda-b": make_adapter(tiny_folder, "svda", seed=2),
    }


@pytest.fixture
def store(tmp_path, adapter_bytes):
    store = AdapterStore(tmp_path / "store")
    for adapter_id, data in adapter_bytes.items():
        publish_adapter(store, data, adapter_id)
    return store
