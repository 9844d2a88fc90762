"""Mixed-adapter batches: LoRA, VeRA and SvdA adapters (and the base, index -1) in one batch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from svda.runtime import AdapterModel, AdapterStateError, LoraConfig, SvdaConfig, VeraConfig
from svda.runtime.methods.svda import layer as svda_layer
from svda.runtime.serving_form import fast as form_primitives

from .helpers import perturb, tiny_llama

ADAPTERS = {
    "svda-1": SvdaConfig(targets="all-linear"),
    "svda-2": SvdaConfig(targets="q_proj,v_proj", s_init="constant", s_constant=0.5),
    "vera-1": VeraConfig(targets="q_proj,v_proj", r=16, projection_seed=3),
    "vera-2": VeraConfig(targets="q_proj,v_proj", r=16, projection_seed=3),
    "lora-1": LoraConfig(targets="q_proj,k_proj,v_proj,o_proj", r=2),
    "lora-2": LoraConfig(targets="q_proj,v_proj", r=6),
}
ROWS = ["svda-1", "vera-1", None, "lora-1", "svda-2", "vera-2", "lora-2", "svda-1"]


@pytest.fixture
def model(svd_cache) -> AdapterModel:
    model = AdapterModel(tiny_llama(), svd_cache=svd_cache)
    for seed, (name, config) in enumerate(ADAPTERS.items()):
        model.add_adapter(name, config)
        perturb(model, name, seed=seed)
    return model


def batch_ids() -> torch.Tensor:
    return torch.randint(0, 96, (len(ROWS), 11), generator=torch.Generator().manual_seed(4))


@torch.no_grad()
def test_each_row_equals_its_adapter_alone(model):
    ids = batch_ids()
    mixed = model(ids, adapter_rows=ROWS).logits
    for i, name in enumerate(ROWS):
        model.set_adapter(name)
        alone = model(ids[i : i + 1]).logits
        torch.testing.assert_close(mixed[i : i + 1], alone, rtol=0, atol=1e-5)


@torch.no_grad()
def test_rows_with_padding_mask_and_generation(model):
    ids = batch_ids()[:3]
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding on row 1
    rows = ["lora-1", "svda-1", "vera-1"]
    out = model.generate(
        ids,
        attention_mask=mask,
        adapter_rows=rows,
        max_new_tokens=5,
        min_new_tokens=5,
        do_sample=False,
        pad_token_id=0,
    )
    for i, name in enumerate(rows):
        model.set_adapter(name)
        alone = model.model.generate(
            ids[i : i + 1, 4:] if i == 1 else ids[i : i + 1],
            max_new_tokens=5,
            min_new_tokens=5,
            do_sample=False,
            pad_token_id=0,
        )
        assert out[i, -5:].tolist() == alone[0, -5:].tolist()


@torch.no_grad()
def test_shared_matrices_are_applied_once_per_batch(model, monkeypatch):
    """VeRA's A and SvdA's Vᵀ each multiply the whole batch in one call per layer."""
    calls = {"vera": 0, "svda": 0}

    def counting(module, kind):
        def linear(x, weight, bias=None):
            calls[kind] += 1
            return F.linear(x, weight, bias)

        monkeypatch.setattr(
            module, "F", type("F", (), {"linear": staticmethod(linear), "pad": F.pad})
        )

    counting(form_primitives, "vera")  # VeRA runs through its serving form's primitives
    counting(svda_layer, "svda")
    model(batch_ids(), adapter_rows=ROWS)
    n_layers = len(model.model.model.layers)
    # VeRA (both adapters share seed and r, so one group): A and B once each, on q and v.
    assert calls["vera"] == 2 * 2 * n_layers
    # SvdA: Vᵀ and U once each per targeted layer (7 layers per block are targeted by svda-1).
    assert calls["svda"] == 2 * 7 * n_layers


@torch.no_grad()
def test_switching_merging_and_unmerging_restore_the_base(model):
    ids = batch_ids()
    base = model(ids).logits
    for name in ADAPTERS:
        model.set_adapter(name)
        model(ids)
        model.merge(name)
        model(ids)
        model.unmerge()
    model.set_adapter(None)
    torch.testing.assert_close(model(ids).logits, base, rtol=0, atol=1e-6)
    torch.testing.assert_close(
        model(ids, adapter_rows=[None] * len(ROWS)).logits, base, rtol=0, atol=1e-6
    )


def test_mixing_rows_while_merged_is_refused(model):
    model.merge("svda-1")
    with pytest.raises(AdapterStateError, match="unmerge"):
        model(batch_ids(), adapter_rows=ROWS)
    with pytest.raises(AdapterStateError, match="unmerge"):
        model.merge("lora-1")
    model.unmerge()


def test_unknown_adapter_in_rows_is_refused(model):
    with pytest.raises(ValueError, match="no adapter named 'nope'"):
        model(batch_ids(), adapter_rows=["nope", *ROWS[1:]])


@torch.no_grad()
def test_half_precision_base_mixes_and_unmerges_bit_exactly(svd_cache):
    model = AdapterModel(tiny_llama().to(torch.bfloat16), svd_cache=svd_cache)
    model.add_adapter("s", SvdaConfig(targets="all-linear"))
    model.add_adapter("l", LoraConfig(targets="q_proj,v_proj", r=2))
    perturb(model, "s")
    perturb(model, "l", seed=1)
    assert all(p.dtype == torch.float32 for p in model.adapter_parameters("s").values())
    weights = {n: layer.weight.detach().clone() for n, layer in model.layers.items()}
    ids = batch_ids()[:2]
    mixed = model(ids, adapter_rows=["s", "l"]).logits
    model.set_adapter("s")
    torch.testing.assert_close(mixed[:1], model(ids[:1]).logits, rtol=0, atol=1e-2)
    model.merge("s")
    model.unmerge()
    assert all(torch.equal(layer.weight, weights[n]) for n, layer in model.layers.items())


def test_adding_adapters_while_one_is_merged_is_refused(model):
    model.merge("lora-1")
    with pytest.raises(AdapterStateError, match="unmerge"):
        model.add_adapter("late", SvdaConfig(targets="q_proj"))
    model.unmerge()
    model.add_adapter("late", SvdaConfig(targets="q_proj"))
