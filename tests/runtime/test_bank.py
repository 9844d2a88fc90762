"""Slot banks: frozen adapters attached from packed tensors behave exactly like attached modules."""

from __future__ import annotations

import dataclasses
import itertools

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


@pytest.mark.parametrize("method", sorted(METHOD_CONFIGS))
@torch.no_grad()
def test_bank_wide_prepare_equals_layer_by_layer(method, svd_cache):
    """``prepare_bank`` (one pass over the bank's flat storage for every layer) gives each
    layer what ``prepare`` gives it: dense, partly pruned and untouched adapters, base rows."""
    model = with_modules(svd_cache, method, 2)
    add_packed_copies(model, method, 2)
    model.add_packed_adapter(
        "zero", model.configs["m0"], *packed(with_modules(svd_cache, method, 1), "m0")
    )
    if method == "svda":
        deltas = model.get_delta_weights("p1")
        norms = [float(deltas[name].norm()) for name, _ in model._banked["p1"].layers]
        model.prune_adapter("p1", 0.3, norms)  # some columns of p1 only
        with torch.no_grad():  # "zero": δ = 0 everywhere (s = σ)
            for layer in model.layers_of("zero"):
                tensors = layer.tensors_of("zero")
                tensors["svda_s"].copy_(layer.shared_of("zero").sigma[: tensors["svda_s"].numel()])
    bank = model._banked["p0"]
    slot = bank.slots
    compositions = [[slot["p1"], -1, slot["p0"], slot["zero"]], [slot["p1"], -1], [slot["zero"]]]
    cls, widths = bank.weights_cls, set()
    for rows, ndim in itertools.product(compositions, (2, 3)):
        row_index = torch.tensor(rows)
        fast = cls.prepare_bank(bank, row_index, ndim)
        for index, (tables, shared) in enumerate(
            zip(bank.layer_tables, bank.shared_modules, strict=True)
        ):
            plain = cls.prepare(tables, row_index, shared, ndim)
            assert_same(fast[index], plain)
            if method == "svda":
                k = tables["svda_s"].shape[1]
                widths.add("none" if plain["delta"] is None else plain["U"].shape[1] == k)
    if method == "svda":  # every case of SvdA's column selection was compared
        assert widths == {"none", True, False}


def assert_same(a, b) -> None:
    """Equal nested structures of tensors (bit for bit), numbers, None and dataclasses (serving
    forms)."""
    if dataclasses.is_dataclass(b):
        assert type(a) is type(b)
        assert_same(vars(a), vars(b))
    elif isinstance(b, dict):
        assert a.keys() == b.keys()
        for key in b:
            assert_same(a[key], b[key])
    elif isinstance(b, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_same(x, y)
    elif isinstance(b, torch.Tensor):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    else:
        assert a == b


@pytest.mark.parametrize(("method", "frozen_stored"), [("lora_ga", 2), ("hybrid", 2), ("lora", 1)])
def test_trainable_counts_leave_out_stored_frozen_tensors(method, frozen_stored, svd_cache):
    """LoRA-GA's A0, B0 and the hybrid's λ are stored but never trained."""
    model = with_modules(svd_cache, method, 1)
    add_packed_copies(model, method, 1)
    trainable, stored = model.trainable_parameter_count("m0"), model.stored_parameter_count("m0")
    assert trainable == model.trainable_parameter_count("p0")  # frozen copy: same count
    assert stored == model.stored_parameter_count("p0")
    assert model.adapter_nbytes("m0") == model.adapter_nbytes("p0") == 4 * stored  # float32
    low_rank = sum(
        p.numel() for k, p in model.adapter_parameters("m0").items() if k.endswith(("A", "B"))
    )
    if method == "lora":
        assert trainable == stored == low_rank
    else:  # A0, B0 match A, B in size; the hybrid adds one λ per layer and its Q triangles
        lam = len(model.layers_of("m0")) if method == "hybrid" else 0
        assert stored - trainable == low_rank + lam
