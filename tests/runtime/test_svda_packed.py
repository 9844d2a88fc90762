"""SvdA on packed (slot-bank) tensors: cheap bounds on ‖ΔW‖_F for pruning budgets (no pass over
U) and where they are used; every layer's serving form at once."""

from __future__ import annotations

import pytest
import torch

from svda.runtime import AdapterModel, SvdaConfig
from svda.runtime.packed import NORM_BOUND_TIGHTNESS

from .helpers import packed, perturb, tiny_llama


def packed_svda(svd_cache, scale: float, dtype=torch.float32, **config) -> AdapterModel:
    """Adapter "a" as modules, "p" the same tensors attached packed (frozen) into a bank."""
    model = AdapterModel(tiny_llama().to(dtype), svd_cache=svd_cache)
    model.add_adapter("a", SvdaConfig(targets="all-linear", **config))
    with torch.no_grad():
        perturb(model, "a", scale=scale)
    model.add_packed_adapter("p", model.configs["a"], *packed(model, "a"))
    return model


def bounds_of(model: AdapterModel, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    bank = model._banked[name]
    tensors = {kind: table[bank.slots[name]] for kind, table in bank.storage.items()}
    return bank.weights_cls.packed_norm_bounds(tensors, bank.layers, bank.shared_modules, bank.memo)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("top_k", [None, 3])
@pytest.mark.parametrize("scale", [1e-4, 0.01, 1.0])
def test_bounds_hold_the_exact_norm_between_them(scale, top_k, dtype, svd_cache):
    """Square and tall U (up/down projections), top-k adapters, small to huge δ, float32 and
    bfloat16 bases: lower ≤ ‖ΔW‖_F ≤ upper on every layer."""
    model = packed_svda(svd_cache, scale, dtype, top_k=top_k)
    lower, upper = bounds_of(model, "p")
    exact = torch.tensor([layer.delta_norm_of("p") for layer in model.layers_of("p")]).double()
    assert (lower <= exact * (1 + 1e-5)).all()
    assert (upper >= exact * (1 - 1e-5)).all()
    assert (lower >= 0).all()


def test_small_deltas_give_tight_bounds_and_large_ones_loose(svd_cache):
    lower, upper = bounds_of(packed_svda(svd_cache, 1e-4), "p")
    assert (lower >= 0.99 * upper).all()
    lower, upper = bounds_of(packed_svda(svd_cache, 1.0), "p")
    assert (lower < NORM_BOUND_TIGHTNESS * upper).any()


@pytest.mark.parametrize("scale", [1e-4, 1.0])
def test_pruning_norms_take_the_bound_where_tight_and_the_exact_norm_elsewhere(
    scale, svd_cache, monkeypatch
):
    model = packed_svda(svd_cache, scale)
    lower, upper = bounds_of(model, "p")
    exact = [layer.delta_norm_of("p") for layer in model.layers_of("p")]
    passes = []
    for layer in model.layers_of("p"):
        original = layer.delta_norm_of
        monkeypatch.setattr(layer, "delta_norm_of", lambda n, f=original: passes.append(n) or f(n))
    norms = model.pruning_norms("p")
    tight = lower >= NORM_BOUND_TIGHTNESS * upper
    assert len(passes) == int((~tight).sum())  # a pass over U only where the bound is loose
    for i, norm in enumerate(norms.tolist()):
        expected = float(lower[i]) if tight[i] else exact[i]
        assert norm == pytest.approx(expected, rel=1e-12, abs=1e-12)
        assert norm <= exact[i] * (1 + 1e-5)


@pytest.mark.parametrize("scale", [0.003, 0.05, 0.5])
@torch.no_grad()
def test_default_pruning_stays_within_the_declared_bound(scale, svd_cache):
    """``prune_adapter`` without norms (what the loader does) keeps ΔW within ε·‖ΔW‖_F."""
    tolerance = 0.2
    model = packed_svda(svd_cache, scale)
    exact = model.get_delta_weights("a")
    counts = model.prune_adapter("p", tolerance)
    pruned = model.get_delta_weights("p")
    for layer_name, delta in exact.items():
        error = torch.linalg.norm((pruned[layer_name] - delta).double())
        assert error <= tolerance * torch.linalg.norm(delta.double()) + 1e-6
    assert counts["components_kept"] < counts["components_total"]


def test_methods_without_pruning_are_not_pruned_or_measured(svd_cache):
    from svda.runtime import LoraConfig

    model = AdapterModel(tiny_llama(), svd_cache=svd_cache)
    model.add_adapter("a", LoraConfig(targets="all-linear", r=2))
    model.add_packed_adapter("p", model.configs["a"], *packed(model, "a"))
    assert not model.can_prune("p")
    assert packed_svda(svd_cache, 0.01).can_prune("p")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("top_k", [None, 3])
def test_all_layers_forms_at_once_equal_the_per_layer_forms(top_k, dtype, svd_cache):
    """``compile_adapter`` on a banked SvdA adapter takes the packed path; its forms equal each
    layer's own ``serving_form_of`` (δ zero beyond k), share one copy of b per layer, and do not
    change when the slot is reused."""
    from svda.runtime.serving_form import compile_adapter

    model = packed_svda(svd_cache, 0.05, dtype, top_k=top_k)
    with torch.no_grad():
        model.prune_adapter("p", 0.1)
    forms = compile_adapter(model, "p")
    storages = {f.terms[0].inner.untyped_storage().data_ptr() for f in forms.values()}
    assert len(storages) == 1  # the packed path ran: every layer's δ is a view of one tensor
    for layer in model.layers_of("p"):
        expected, got = layer.serving_form_of("p"), forms[layer.layer_name]
        assert (got.d_in, got.d_out, got.kinds()) == (
            expected.d_in,
            expected.d_out,
            expected.kinds(),
        )
        (term,), (want,) = got.terms, expected.terms
        for field in ("A", "B", "inner", "outer"):
            torch.testing.assert_close(getattr(term, field), getattr(want, field), rtol=0, atol=0)
        assert term.key == want.key
        torch.testing.assert_close(
            got.output_scale.delta, expected.output_scale.delta, rtol=0, atol=0
        )
        assert got.output_scale.delta is term.outer
    before = {k: f.terms[0].inner.clone() for k, f in forms.items()}
    bank = model._banked["p"]
    for table in bank.storage.values():
        table[bank.slots["p"]].add_(1.0)
    for k, f in forms.items():
        torch.testing.assert_close(f.terms[0].inner, before[k], rtol=0, atol=0)


def test_methods_without_the_shortcut_compile_layer_by_layer(svd_cache):
    from svda.runtime import LoraConfig

    model = AdapterModel(tiny_llama(), svd_cache=svd_cache)
    model.add_adapter("a", LoraConfig(targets="all-linear", r=2))
    model.add_packed_adapter("p", model.configs["a"], *packed(model, "a"))
    assert model.packed_serving_forms("p") is None
    assert model.packed_serving_forms("a") is None  # modules, not a bank
