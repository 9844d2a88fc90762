"""A block adapter (serial, on the MLP) and a linear adapter inside that block (LoRA on
mlp.gate_proj) on the same model, added in either order: targets resolve through the block
wrapper, each row's output equals a model holding that adapter alone, and either can be deleted."""

from __future__ import annotations

import pytest
import torch

from svda.runtime import AdapterModel, LoraConfig, base_fingerprint
from svda.runtime.methods import SerialAdapterConfig
from svda.runtime.targets import select_targets

from .helpers import perturb, tiny_llama

CONFIGS = {
    "serial": SerialAdapterConfig(targets="mlp", bottleneck=4),
    "lora": LoraConfig(targets="mlp.gate_proj", r=4, alpha=8.0),
}


def attach(model: AdapterModel, name: str) -> None:
    model.add_adapter(name, CONFIGS[name])
    perturb(model, name, seed=len(name))


def alone(name: str, input_ids: torch.Tensor) -> torch.Tensor:
    model = AdapterModel(tiny_llama())
    attach(model, name)
    return model(input_ids, adapter_rows=[name] * len(input_ids)).logits


@pytest.mark.parametrize("order", [("serial", "lora"), ("lora", "serial")])
def test_block_and_linear_adapters_on_one_block(order, input_ids):
    model = AdapterModel(tiny_llama())
    fingerprint = model.fingerprint
    for name in order:
        attach(model, name)
    gate = "model.layers.0.mlp.gate_proj"
    assert gate in select_targets(model.model, "gate_proj")
    assert base_fingerprint(model.model) == fingerprint  # fingerprinting sees through wrappers
    base = AdapterModel(tiny_llama())(input_ids).logits
    rows = ["serial", "lora", None, "lora"]
    out = model(input_ids, adapter_rows=rows).logits
    references = {"serial": alone("serial", input_ids), "lora": alone("lora", input_ids)}
    for i, row in enumerate(rows):
        expected = base[i] if row is None else references[row][i]
        torch.testing.assert_close(out[i], expected, rtol=1e-5, atol=1e-5)
    for kept, dropped in (order, order[::-1]):
        fresh = AdapterModel(tiny_llama())
        for name in order:
            attach(fresh, name)
        fresh.delete_adapter(dropped)
        logits = fresh(input_ids, adapter_rows=[kept] * len(input_ids)).logits
        torch.testing.assert_close(logits, references[kept], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(fresh(input_ids).logits, base, rtol=1e-5, atol=1e-5)
