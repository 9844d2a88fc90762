"""The common suite: every registered method through the same checks, on Llama- and GPT-2-shaped
models (nn.Linear and Conv1D targets)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from svda.runtime import AdapterModel, AdapterStateError, available_methods, config_from_dict
from svda.runtime.methods import get_method

from .helpers import METHOD_CONFIGS, perturb, tiny_gpt2, tiny_llama

BUILDERS = {"llama": (tiny_llama, "q_proj,v_proj,down_proj"), "gpt2": (tiny_gpt2, "c_attn,c_fc")}
CASES = [(method, arch) for method in METHOD_CONFIGS for arch in BUILDERS]
LINEAR = [(m, a) for m, a in CASES if get_method(m).weights_cls.mergeable]
NON_LINEAR = [(m, a) for m, a in CASES if not get_method(m).weights_cls.mergeable]


def build(method: str, arch: str, svd_cache, trained: bool = True, name: str = "a") -> AdapterModel:
    make_model, targets = BUILDERS[arch]
    model = AdapterModel(make_model(), svd_cache=svd_cache)
    model.add_adapter(name, METHOD_CONFIGS[method](targets))
    if trained:
        perturb(model, name)
    return model


def logits(model: AdapterModel, ids: torch.Tensor, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, **kwargs).logits


def test_every_registered_method_is_in_the_common_suite():
    assert set(available_methods()) <= set(METHOD_CONFIGS)


@pytest.mark.parametrize(("method", "arch"), CASES)
def test_untouched_adapter_changes_nothing(method, arch, svd_cache, input_ids):
    model = build(method, arch, svd_cache, trained=False)
    base = logits(model, input_ids)
    model.set_adapter("a")
    torch.testing.assert_close(logits(model, input_ids), base, rtol=0, atol=1e-6)


@pytest.mark.parametrize(("method", "arch"), CASES)
def test_trained_adapter_changes_outputs(method, arch, svd_cache, input_ids):
    model = build(method, arch, svd_cache)
    base = logits(model, input_ids)
    model.set_adapter("a")
    assert (logits(model, input_ids) - base).abs().max() > 1e-3


@pytest.mark.parametrize(("method", "arch"), LINEAR)
def test_merged_equals_unmerged_and_unmerge_restores(method, arch, svd_cache, input_ids):
    model = build(method, arch, svd_cache)
    base = logits(model, input_ids)
    weights_before = {n: layer.weight.detach().clone() for n, layer in model.layers.items()}
    model.set_adapter("a")
    unmerged = logits(model, input_ids)
    model.merge("a")
    torch.testing.assert_close(logits(model, input_ids), unmerged, rtol=0, atol=1e-5)
    model.unmerge()
    model.set_adapter(None)
    torch.testing.assert_close(logits(model, input_ids), base, rtol=0, atol=1e-6)
    for name, layer in model.layers.items():
        torch.testing.assert_close(layer.weight, weights_before[name], rtol=0, atol=1e-6)


@pytest.mark.parametrize(("method", "arch"), NON_LINEAR)
def test_non_linear_methods_refuse_to_merge_and_change_nothing(method, arch, svd_cache, input_ids):
    model = build(method, arch, svd_cache)
    model.set_adapter("a")
    before = logits(model, input_ids)
    with pytest.raises(AdapterStateError, match="cannot be merged"):
        model.merge("a")
    torch.testing.assert_close(logits(model, input_ids), before, rtol=0, atol=0)


@pytest.mark.parametrize(("method", "arch"), LINEAR)
def test_reference_formula_equals_fast_path(method, arch, svd_cache, input_ids):
    model = build(method, arch, svd_cache)
    model.set_adapter("a")
    fast = logits(model, input_ids)
    with torch.no_grad():
        for layer in model.layers.values():
            layer.base_layer.weight += _as_stored(
                layer, model.get_delta_weights("a")[layer.layer_name]
            )
            delta_bias = layer.get_delta_bias("a")
            if delta_bias is not None and layer.base_layer.bias is None:
                layer.base_layer.bias = torch.nn.Parameter(delta_bias.clone())
            elif delta_bias is not None:
                layer.base_layer.bias += delta_bias
    model.set_adapter(None)
    torch.testing.assert_close(logits(model, input_ids), fast, rtol=0, atol=1e-5)


def _as_stored(layer, delta_oi: torch.Tensor) -> torch.Tensor:
    """ΔW (d1, d2) in the layout of the base weight (transposed for Conv1D)."""
    return delta_oi if layer.base_layer.weight.shape == delta_oi.shape else delta_oi.T


@pytest.mark.parametrize(("method", "arch"), CASES)
def test_save_load_round_trip(method, arch, svd_cache, input_ids, tmp_path):
    model = build(method, arch, svd_cache)
    path = tmp_path / "adapter.safetensors"
    save_file(model.adapter_state_dict("a"), str(path))
    model.set_adapter("a")
    expected = logits(model, input_ids)

    fresh = build(method, arch, svd_cache, trained=False)
    config = config_from_dict(model.configs["a"].to_dict())
    fresh.delete_adapter("a")
    fresh.add_adapter("a", config)
    fresh.load_adapter_state_dict("a", load_file(str(path)))
    fresh.set_adapter("a")
    torch.testing.assert_close(logits(fresh, input_ids), expected, rtol=0, atol=0)


@pytest.mark.parametrize(("method", "arch"), CASES)
def test_mixed_batch_equals_each_alone(method, arch, svd_cache, input_ids):
    model = build(method, arch, svd_cache, name="a")
    make_config = METHOD_CONFIGS[method]
    model.add_adapter("b", make_config(BUILDERS[arch][1]))
    perturb(model, "b", seed=5)
    rows = ["a", None, "b", "a"]
    mixed = logits(model, input_ids, adapter_rows=rows)
    for i, name in enumerate(rows):
        model.set_adapter(name)
        alone = logits(model, input_ids[i : i + 1])
        torch.testing.assert_close(mixed[i : i + 1], alone, rtol=0, atol=1e-5)


@pytest.mark.parametrize(("method", "arch"), CASES)
def test_batched_delta_equals_reference_delta(method, arch, svd_cache):
    model = build(method, arch, svd_cache, name="a")
    model.add_adapter("b", METHOD_CONFIGS[method](BUILDERS[arch][1]))
    perturb(model, "b", seed=3)
    layer = next(iter(model.layers.values()))
    members = [layer.adapters["a"], layer.adapters["b"]]
    shared = layer.shared[layer.adapter_keys["a"]]
    generator = torch.Generator().manual_seed(2)
    d_out, d_in = layer.shape
    x = torch.randn(5, 3, d_in, generator=generator)
    out0 = torch.randn(5, 3, d_out, generator=generator)  # W0 x for linear layers, else any
    if type(members[0]).mergeable:
        out0 = torch.nn.functional.linear(x, layer.weight_out_in())
    cls = type(members[0])
    with torch.no_grad():
        for rows in (torch.tensor([0, 1, -1, 1, 0]), None):
            fast = cls.batched_delta(x, out0, members, rows, shared)
            reference = cls.reference_delta(x, out0, members, rows, shared)
            torch.testing.assert_close(fast, reference, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", list(METHOD_CONFIGS))
def test_a_few_training_steps_lower_the_loss(method, svd_cache):
    model = AdapterModel(tiny_llama(), svd_cache=svd_cache)
    model.add_adapter("a", METHOD_CONFIGS[method]("all-linear"))
    model.set_adapter("a")
    params = [p for p in model.adapter_parameters("a").values() if p.requires_grad]
    assert params  # frozen tensors an adapter stores (LoRA-GA's A0, B0) have no gradient
    assert not any(
        p.requires_grad for p in model.model.parameters() if all(p is not q for q in params)
    )
    optimizer = torch.optim.Adam(params, lr=3e-2)
    ids = torch.arange(16).repeat(2, 1) % 96  # a fixed sequence to memorise
    losses = []
    for _ in range(20):
        loss = model(ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05


@pytest.mark.parametrize("method", list(METHOD_CONFIGS))
def test_config_round_trips_through_dict(method):
    config = METHOD_CONFIGS[method]("q_proj,v_proj")
    assert config_from_dict(config.to_dict()) == config
