"""Method-specific checks of PiSSA, LoRA-GA, BitFit and AdaLoRA (the common suite covers the rest)."""

from __future__ import annotations

import pytest
import torch

from svda.adapters_store import export_adapter, load_adapter, read_adapter
from svda.runtime import AdapterModel
from svda.runtime.methods import AdaLoraConfig, BitFitConfig, LoraGaConfig, PissaConfig
from svda.trainer.adalora_budget import (
    AdaLoraBudget,
    compact_adalora,
    orthogonal_regularization,
)

from .helpers import perturb, tiny_llama

LAYER = "model.layers.0.self_attn.q_proj"


@torch.no_grad()
def test_pissa_starts_from_the_principal_part_and_stores_only_a_and_b(svd_cache):
    model = AdapterModel(tiny_llama(), svd_cache=svd_cache)
    model.add_adapter("p", PissaConfig(targets="q_proj", r=4))
    layer = model.layers[LAYER]
    weights = layer.adapters["p"]
    u, s, vh = torch.linalg.svd(layer.weight_out_in().double())
    principal = (u[:, :4] * s[:4]) @ vh[:4]
    torch.testing.assert_close(
        (weights.lora_B @ weights.lora_A).double(), principal, atol=1e-5, rtol=0
    )
    assert float(model.get_delta_weights("p")[LAYER].abs().max()) < 1e-5
    adapter_file = read_adapter(export_adapter(model, "p"))
    assert set(adapter_file.tensors) == {"lora_A", "lora_B"}
    assert adapter_file.header.recipe[0].source == "base-svd"


@torch.no_grad()
def test_lora_ga_initialises_from_the_gradient_without_changing_the_model(svd_cache):
    model = AdapterModel(tiny_llama(), svd_cache=svd_cache)
    model.add_adapter("g", LoraGaConfig(targets="q_proj", r=2))
    weights = model.layers[LAYER].adapters["g"]
    grad = torch.randn(32, 32, generator=torch.Generator().manual_seed(0))
    weights.initialise_from_gradient(grad)
    assert float(weights.get_delta_weight(None).abs().max()) == 0.0
    _, _, vh = torch.linalg.svd(grad.double())
    rows = weights.lora_A0.double() / weights.lora_A0.double().norm(dim=1, keepdim=True)
    torch.testing.assert_close(rows.abs(), vh[:2].abs(), atol=1e-5, rtol=0)
    assert not weights.lora_A0.requires_grad and weights.lora_A.requires_grad
    adapter_file = read_adapter(export_adapter(model, "g"))
    assert set(adapter_file.tensors) == {"lora_A", "lora_B", "lora_A0", "lora_B0"}
    with pytest.raises(ValueError, match="2r"):
        weights.initialise_from_gradient(torch.randn(32, 3))


@torch.no_grad()
def test_bitfit_merge_adds_a_bias_where_there_was_none_and_unmerge_removes_it(svd_cache, input_ids):
    model = AdapterModel(tiny_llama(), svd_cache=svd_cache)
    model.add_adapter("b", BitFitConfig(targets="q_proj,down_proj"))
    perturb(model, "b")
    assert model.trainable_parameter_count("b") == 2 * (32 + 32)
    model.set_adapter("b")
    unmerged = model(input_ids).logits
    model.merge("b")
    assert model.layers[LAYER].base_layer.bias is not None
    torch.testing.assert_close(model(input_ids).logits, unmerged, rtol=0, atol=1e-5)
    model.unmerge()
    assert model.layers[LAYER].base_layer.bias is None


def test_adalora_prunes_to_its_budget_and_stores_only_the_kept_ranks(svd_cache, input_ids):
    model = AdapterModel(tiny_llama(), svd_cache=svd_cache)
    config = AdaLoraConfig(targets="q_proj,v_proj", r=6, target_r=2, tinit=2, tfinal=3, delta_t=1)
    model.add_adapter("a", config)
    model.set_adapter("a")
    params = [p for p in model.adapter_parameters("a").values() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=1e-2)
    budget = AdaLoraBudget(model, "a", total_steps=12)
    for step in range(1, 13):
        loss = model(input_ids, labels=input_ids).loss + orthogonal_regularization(model, "a")
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        kept = budget.step(step)
    layers = len(model.layers_of("a"))
    assert kept == 2 * layers  # the final budget: target_r per layer on average
    model.set_adapter("a")
    with torch.no_grad():
        before = model(input_ids).logits
    ranks = compact_adalora(model, "a")
    assert sum(ranks.values()) == 2 * layers and model.configs["a"].layer_ranks == ranks
    data = export_adapter(model, "a")
    shapes = model.layer_shapes()
    expected = sum(r * (shapes[n][0] + 1 + shapes[n][1]) for n, r in ranks.items())
    assert read_adapter(data).parameter_count == expected
    target = AdapterModel(tiny_llama(), svd_cache=svd_cache)
    load_adapter(data, target, "a")
    target.set_adapter("a")
    with torch.no_grad():
        torch.testing.assert_close(target(input_ids).logits, before, rtol=0, atol=1e-5)
