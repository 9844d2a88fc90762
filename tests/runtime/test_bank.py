"""Slot banks: frozen adapters attached from packed tensors behave exactly like attached modules."""

from __future__ import annotations

import pytest
import torch

from svda.runtime import AdapterConfigError, AdapterModel
from svda.runtime.methods import get_method

from .helpers import METHOD_CONFIGS, packed, perturb, tiny_llama


def with_modules(svd_cache, method: str, count: int) -> AdapterModel:
    model = AdapterModel(tiny_llama(), svd_cache=svd_cache)
    for i in range(count):
        model.add_adapter(f"m{i}", METHOD_CONFIGS[method]("all-linear"))
        perturb(model, f"m{i}", seed=i)
    return model


def add_packed_copies(model: AdapterModel, method: str, count: int) -> None:
    for i in range(count):
        model.add_packed_adapter(f"p{i}", model.configs[f"m{i}"], *packed(model, f"m{i}"))


@pytest.mark.parametrize("method", sorted(METHOD_CONFIGS))
@torch.no_grad()
def test_packed_adapters_equal_their_modules_alone_and_mixed(method, svd_cache, input_ids):
    count = 6  # more than the bank's first capacity: it grows and keeps earlier slots
    model = with_modules(svd_cache, method, count)
    add_packed_copies(model, method, count)
    assert all(model.is_frozen(f"p{i}") and not model.is_frozen(f"m{i}") for i in range(count))
    ids = input_ids[:3]
    for i in range(count):
        model.set_adapter(f"m{i}")
        expected = model(ids).logits
        model.set_adapter(f"p{i}")
        torch.testing.assert_close(model(ids).logits, expected, rtol=0, atol=1e-6)
    rows = ["p1", None, "m3", "p5", "p1", "m0"]
    batch = torch.randint(0, 96, (len(rows), 7), generator=torch.Generator().manual_seed(2))
    mixed = model(batch, adapter_rows=rows).logits
    for i, name in enumerate(rows):
        alone = model(batch[i : i + 1], adapter_rows=[name]).logits
        torch.testing.assert_close(mixed[i : i + 1], alone, rtol=1e-5, atol=1e-5)


LINEAR_METHODS = [m for m in sorted(METHOD_CONFIGS) if get_method(m).weights_cls.mergeable]


@pytest.mark.parametrize("method", LINEAR_METHODS)
@torch.no_grad()
def test_packed_adapter_delta_merge_and_tensors(method, svd_cache, input_ids):
    model = with_modules(svd_cache, method, 1)
    add_packed_copies(model, method, 1)
    for layer_name, delta in model.get_delta_weights("m0").items():
        torch.testing.assert_close(model.get_delta_weights("p0")[layer_name], delta)
    assert model.trainable_parameter_count("p0") == model.trainable_parameter_count("m0")
    state = model.adapter_state_dict("p0")
    assert state.keys() == model.adapter_state_dict("m0").keys()
    model.set_adapter("p0")
    unmerged = model(input_ids).logits
    model.merge("p0")
    torch.testing.assert_close(model(input_ids).logits, unmerged, rtol=1e-5, atol=1e-5)
    model.unmerge()
    model.set_adapter(None)
    base = AdapterModel(tiny_llama(), svd_cache=svd_cache)(input_ids).logits
    torch.testing.assert_close(model(input_ids).logits, base, rtol=0, atol=1e-6)


@torch.no_grad()
def test_deleting_frees_slots_and_empty_banks_can_be_dropped(svd_cache, input_ids):
    model = with_modules(svd_cache, "svda", 2)
    add_packed_copies(model, "svda", 2)
    bank = model._banked["p0"]
    model.delete_adapter("p0")
    model.add_packed_adapter("again", model.configs["m1"], *packed(model, "m1"))
    assert bank.slots == {"p1": 1, "again": 0}  # the freed slot is reused
    model.set_adapter("again")
    again = model(input_ids).logits
    model.set_adapter("m1")
    torch.testing.assert_close(again, model(input_ids).logits, rtol=0, atol=1e-6)
    model.delete_adapter("again")
    model.delete_adapter("p1")
    assert list(model.banks.values()) == [bank] and not bank.slots  # kept for the next one
    assert model.drop_empty_banks() == 1
    assert not model.banks
    assert all(not layer.banks for layer in model.layers.values())
    model.delete_adapter("m0")
    model.delete_adapter("m1")
    assert all(len(layer.shared) == 0 for layer in model.layers.values())


def test_packed_tensors_that_do_not_fit_are_refused(svd_cache):
    model = with_modules(svd_cache, "svda", 1)
    flat, layers = packed(model, "m0")
    short = {**flat, "svda_b": flat["svda_b"][:-1]}
    with pytest.raises(AdapterConfigError, match="do not fit"):
        model.add_packed_adapter("p", model.configs["m0"], short, layers)
    wrong_k = [(name, {**params, "svda_s": [params["svda_s"][0] - 1]}) for name, params in layers]
    smaller = {**flat, "svda_s": flat["svda_s"][: -len(layers)]}
    with pytest.raises(AdapterConfigError, match="do not match the method"):
        model.add_packed_adapter("p", model.configs["m0"], smaller, wrong_k)
    assert "p" not in model.configs and not model.banks
