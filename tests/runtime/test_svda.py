"""SvdA specifics: the fast identity vs the plain formula, δ sparsity, s init, top-k."""

from __future__ import annotations

import pytest
import torch

from svda.runtime import AdapterConfigError, AdapterModel, SvdaConfig
from svda.runtime.methods.svda.layer import _active_columns

from .helpers import packed, perturb, tiny_llama


def svda_model(svd_cache, **config) -> AdapterModel:
    model = AdapterModel(tiny_llama(), svd_cache=svd_cache)
    model.add_adapter("a", SvdaConfig(targets="all-linear", **config))
    return model


@torch.no_grad()
def test_identity_equals_plain_formula_per_layer(svd_cache):
    model = svda_model(svd_cache)
    perturb(model, "a")
    model.set_adapter("a")
    for layer in model.layers.values():
        weights, shared = layer.adapters["a"], layer.shared["svd"]
        x = torch.randn(3, layer.weight_out_in().shape[1])
        w0 = layer.weight_out_in()
        plain = x @ (w0 + weights.get_delta_weight(shared)).T
        torch.testing.assert_close(
            layer(x) - (layer.bias if layer.bias is not None else 0), plain, rtol=1e-4, atol=1e-5
        )
        assert weights.svda_s.numel() == min(w0.shape)
        assert weights.svda_b.numel() == w0.shape[0]


def test_trainable_parameter_count_is_m_plus_d1(svd_cache):
    model = svda_model(svd_cache)
    expected = sum(
        min(w.shape) + w.shape[0]
        for w in (layer.weight_out_in() for layer in model.layers.values())
    )
    assert model.trainable_parameter_count("a") == expected


@torch.no_grad()
def test_only_b_trained_skips_the_singular_vectors(svd_cache):
    model = svda_model(svd_cache)
    layer = next(iter(model.layers.values()))
    weights = layer.adapters["a"]
    weights.svda_b.normal_()
    delta = weights.delta(layer.shared["svd"])[None]  # one row: (1, k)
    assert _active_columns(delta, None, weights.k, needs_grad=False) is None
    weights.svda_s[3] += 0.5
    delta = weights.delta(layer.shared["svd"])[None]
    assert _active_columns(delta, None, weights.k, needs_grad=False).tolist() == [3]
    # rows of the base (-1) do not count, whatever their table row holds
    rows = torch.tensor([-1, -1])
    assert _active_columns(delta.expand(2, -1), rows, weights.k, needs_grad=False) is None
    # while training s, every component is touched so every s gets a gradient
    with torch.enable_grad():
        assert _active_columns(delta, None, weights.k, needs_grad=True) == slice(0, weights.k)


@torch.no_grad()
def test_constant_s_init_changes_nothing_until_b_moves(svd_cache, input_ids):
    model = svda_model(svd_cache, s_init="constant", s_constant=0.25)
    base = model(input_ids).logits
    model.set_adapter("a")
    torch.testing.assert_close(model(input_ids).logits, base, rtol=0, atol=1e-6)
    layer = next(iter(model.layers.values()))
    assert torch.all(layer.adapters["a"].svda_s == 0.25)


def test_top_k_trains_only_k_components(svd_cache, input_ids):
    model = svda_model(svd_cache, top_k=3)
    layer = next(iter(model.layers.values()))
    assert layer.adapters["a"].svda_s.shape == (3,)
    perturb(model, "a")
    model.set_adapter("a")
    with torch.no_grad():
        unmerged = model(input_ids).logits
        model.merge("a")
        torch.testing.assert_close(model(input_ids).logits, unmerged, rtol=0, atol=1e-5)
        model.unmerge()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"s_init": "random"}, "s_init"),
        ({"top_k": 0}, "top_k"),
        ({"targets": ""}, "targets is empty"),
    ],
)
def test_bad_config_is_refused_with_a_clear_message(kwargs, message):
    with pytest.raises(AdapterConfigError, match=message):
        SvdaConfig(**kwargs)


@pytest.mark.parametrize("tolerance", [0.0, 0.05, 0.3])
@torch.no_grad()
def test_pruned_serving_stays_within_the_declared_bound(tolerance, svd_cache):
    model = svda_model(svd_cache)
    perturb(model, "a", scale=0.05)
    exact = model.get_delta_weights("a")
    norms = [float(torch.linalg.norm(exact[layer.layer_name])) for layer in model.layers_of("a")]
    model.add_packed_adapter("p", model.configs["a"], *packed(model, "a"))
    counts = model.prune_adapter("p", tolerance, norms)
    pruned = model.get_delta_weights("p")
    for layer_name, norm in zip(exact, norms, strict=True):
        error = float(torch.linalg.norm(pruned[layer_name] - exact[layer_name]))
        assert error <= tolerance * norm + 1e-6
    kept, total = counts["components_kept"], counts["components_total"]
    assert kept == total if tolerance == 0 else kept < total


@torch.no_grad()
def test_closed_form_delta_norm_equals_the_plain_one(svd_cache):
    model = svda_model(svd_cache)
    perturb(model, "a", scale=0.1)
    for layer in model.layers_of("a"):
        weights, shared = layer.adapters["a"], layer.shared_of("a")
        plain = float(torch.linalg.norm(weights.get_delta_weight(shared).double()))
        assert abs(weights.delta_norm(shared) - plain) <= 1e-5 * plain


@torch.no_grad()
def test_a_packed_adapters_norm_and_form_come_from_its_slot(svd_cache):
    """Loading and exporting read a banked SvdA adapter's ‖ΔW‖ and serving form straight from
    its slot's tensors (no module per layer): both match the plain ΔW of the reference formula."""
    from svda.runtime.serving_form import form_delta

    model = svda_model(svd_cache)
    perturb(model, "a", scale=0.1)
    model.add_packed_adapter("p", model.configs["a"], *packed(model, "a"))
    for layer in model.layers_of("p"):
        plain = layer.get_delta_weight("p").double()  # (d1, d2), from a materialized module
        assert layer.delta_norm_of("p") == pytest.approx(float(torch.linalg.norm(plain)), rel=1e-5)
        form = layer.serving_form_of("p")
        eye = torch.eye(form.d_in, dtype=plain.dtype).to(layer.weight_out_in().dtype)
        out0 = eye @ layer.weight_out_in().T
        got = form_delta(form, eye, out0).double().T  # column i: ΔW e_i
        torch.testing.assert_close(got, plain, rtol=1e-4, atol=1e-5)


def reference_prune(model: AdapterModel, name: str, norms, tolerance: float) -> dict:
    """docs/methods.md pruning layer by layer, the plain way: sort the bounds |δ_i|·max|b|, drop the
    smallest while their squares sum to at most (ε‖ΔW‖)²."""
    pruned = {}
    for layer, norm in zip(model.layers_of(name), norms, strict=True):
        weights, shared = layer.adapters[name], layer.shared_of(name)
        sigma = shared.sigma[: weights.k]
        delta = (weights.svda_s - sigma).double()
        bounds = (delta * weights.svda_b.abs().max().double()) ** 2
        s, total = weights.svda_s.clone(), 0.0
        for i in sorted(range(len(bounds)), key=lambda i: float(bounds[i])):
            total += float(bounds[i])
            if total > (tolerance * norm) ** 2:
                break
            s[i] = sigma[i]
        pruned[layer.layer_name] = s
    return pruned


@pytest.mark.parametrize("tolerance", [0.02, 0.2, 2.0])
@torch.no_grad()
def test_bank_pruning_equals_the_layer_by_layer_reference(tolerance, svd_cache):
    """All layers at once (whole layers without a sort, partial ones sorted together) equals
    the plain per-layer loop; the layers' scales differ so that some lose every component,
    some a part, some none."""
    model = svda_model(svd_cache)
    perturb(model, "a", scale=0.05)
    for i, layer in enumerate(model.layers_of("a")):
        weights, sigma = layer.adapters["a"], layer.shared_of("a").sigma
        delta = (weights.svda_s - sigma[: weights.k]) * 10.0 ** (2 * (i % 3) - 2)  # 0.01×…100×
        weights.svda_s.copy_(sigma[: weights.k] + delta)
    norms = [float(torch.linalg.norm(d)) for d in model.get_delta_weights("a").values()]
    expected = reference_prune(model, "a", norms, tolerance)
    model.add_packed_adapter("p", model.configs["a"], *packed(model, "a"))
    model.prune_adapter("p", tolerance, norms)
    for layer in model.layers_of("p"):
        torch.testing.assert_close(
            layer.tensors_of("p")["svda_s"], expected[layer.layer_name], rtol=0, atol=0
        )


@torch.no_grad()
def test_pruning_a_second_adapter_of_a_bank_reuses_the_plan_and_matches(svd_cache):
    """The bank keeps the layer-table constants of pruning; the next adapter gets the same
    result as the first one did without them."""
    model = svda_model(svd_cache)
    perturb(model, "a", scale=0.05)
    norms = [float(torch.linalg.norm(d)) for d in model.get_delta_weights("a").values()]
    model.add_packed_adapter("p", model.configs["a"], *packed(model, "a"))
    bank = model._banked["p"]
    first = model.prune_adapter("p", 0.1, norms)
    assert any(key.startswith("svda_prune_plan") for key in bank.memo)
    model.add_packed_adapter("q", model.configs["a"], *packed(model, "a"))
    assert model._banked["q"] is bank
    assert model.prune_adapter("q", 0.1, norms) == first
    p_params, q_params = model.adapter_parameters("p"), model.adapter_parameters("q")
    for key, value in p_params.items():
        torch.testing.assert_close(q_params[key], value, rtol=0, atol=0)
