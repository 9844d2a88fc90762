"""Serving forms (runtime/serving_form): for every linear method of the registry, the compiled
form equals the method's reference (``W0 + ΔW``, ``b0 + Δb``), stacked forms serve mixed
batches, and rows at -1 are the base bit for bit."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from svda.runtime import AdapterModel
from svda.runtime.errors import AdapterConfigError
from svda.runtime.methods import get_method, linear_methods
from svda.runtime.serving_form import (
    compile_adapter,
    compile_layer,
    gathered_forward,
    reference_forward,
    stack_forms,
    with_zero_row,
)

from .helpers import METHOD_CONFIGS, perturb, tiny_gpt2, tiny_llama

BUILDERS = {"llama": (tiny_llama, "q_proj,v_proj,down_proj"), "gpt2": (tiny_gpt2, "c_attn,c_fc")}
CASES = [(m, a) for m in linear_methods() for a in BUILDERS]


def two_adapters(method: str, arch: str, svd_cache) -> AdapterModel:
    make_model, targets = BUILDERS[arch]
    model = AdapterModel(make_model(), svd_cache=svd_cache)
    for seed, name in enumerate(("a", "b")):
        model.add_adapter(name, METHOD_CONFIGS[method](targets))
        perturb(model, name, seed=seed + 1)
    return model


def reference_output(layer, name: str, x: torch.Tensor) -> torch.Tensor:
    """``(W0 + ΔW) x + b0 + Δb`` from the method's own reference formula."""
    w = layer.weight_out_in() + layer.get_delta_weight(name)
    bias, delta_bias = layer.bias, layer.get_delta_bias(name)
    if delta_bias is not None:
        bias = delta_bias if bias is None else bias + delta_bias
    return F.linear(x, w, bias)


def test_every_linear_method_has_a_form_and_blocks_have_none():
    assert set(linear_methods()) >= {"lora", "vera", "svda", "boft", "urnn", "bitfit"}
    for method in METHOD_CONFIGS:
        spec = get_method(method)
        assert spec.has_serving_form == (method in linear_methods())
        assert spec.has_serving_form == (spec.weights_cls.target_kind == "linear")


@pytest.mark.parametrize(("method", "arch"), CASES)
def test_form_equals_reference_formula(method, arch, svd_cache):
    model = two_adapters(method, arch, svd_cache)
    forms = compile_adapter(model, "a")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in model.layers_of("a"):
            form = forms[layer.layer_name]
            x = torch.randn(3, 5, layer.shape[1], generator=generator)
            got = reference_forward(
                form, x, torch.zeros(3, dtype=torch.long), layer.weight_out_in(), layer.bias
            )
            expected = reference_output(layer, "a", x)
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
            assert (got - F.linear(x, layer.weight_out_in(), layer.bias)).abs().max() > 1e-4


@pytest.mark.parametrize(("method", "arch"), CASES)
def test_stacked_forms_serve_a_mixed_batch_and_base_rows_exactly(method, arch, svd_cache):
    model = two_adapters(method, arch, svd_cache)
    forms = {name: compile_adapter(model, name) for name in ("a", "b")}
    slots = torch.tensor([0, -1, 1, 0, -1])
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in model.layers_of("a"):
            name = layer.layer_name
            form = stack_forms([forms["a"][name], forms["b"][name]])
            assert form.n_slots == 2
            x = torch.randn(5, 4, layer.shape[1], generator=generator)
            w0, b0 = layer.weight_out_in(), layer.bias
            got = reference_forward(form, x, slots, w0, b0)
            base = F.linear(x, w0, b0)
            assert torch.equal(got[slots < 0], base[slots < 0])
            for row, slot in enumerate(slots.tolist()):
                if slot >= 0:
                    expected = reference_output(layer, "ab"[slot], x[row])
                    torch.testing.assert_close(got[row], expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(("method", "arch"), CASES)
def test_form_equals_the_native_mixed_batch(method, arch, svd_cache):
    """The form and the native engine's batched path agree row by row on each layer."""
    model = two_adapters(method, arch, svd_cache)
    forms = {name: compile_adapter(model, name) for name in ("a", "b")}
    model.set_adapter(None)
    layer = next(iter(model.layers_of("a")))
    x = torch.randn(4, 3, layer.shape[1], generator=torch.Generator().manual_seed(2))
    model.state.set(("a", "b"), torch.tensor([1, -1, 0, 1]))
    with torch.no_grad():
        native = layer(x)
        form = stack_forms([forms["a"][layer.layer_name], forms["b"][layer.layer_name]])
        got = reference_forward(
            form, x, torch.tensor([1, -1, 0, 1]), layer.weight_out_in(), layer.bias
        )
    torch.testing.assert_close(got, native, rtol=1e-4, atol=1e-5)


def test_slots_out_of_range_and_block_methods_are_refused(svd_cache):
    model = two_adapters("lora", "llama", svd_cache)
    layer = next(iter(model.layers_of("a")))
    form = compile_adapter(model, "a")[layer.layer_name]
    x = torch.randn(2, layer.shape[1])
    with pytest.raises(ValueError, match=r"slots must lie in \[-1, 1\)"):
        reference_forward(form, x, torch.tensor([0, 1]), layer.weight_out_in())
    with pytest.raises(ValueError, match="slots must be"):
        reference_forward(form, x, torch.tensor([0]), layer.weight_out_in())
    blocks = AdapterModel(tiny_llama(), svd_cache=svd_cache)
    blocks.add_adapter("s", METHOD_CONFIGS["serial_adapter"]("mlp"))
    block = next(iter(blocks.layers_of("s")))
    with pytest.raises(AdapterConfigError, match="no per-layer serving form"):
        compile_layer(block.weights_of("s"), block.shared_of("s"))


def test_stacking_refuses_forms_of_different_shared_bases(svd_cache):
    model = AdapterModel(tiny_llama(), svd_cache=svd_cache)
    model.add_adapter("a", METHOD_CONFIGS["vera"]("q_proj"))
    config = METHOD_CONFIGS["vera"]("q_proj")
    config.projection_seed = 8
    model.add_adapter("b", config)
    name = next(iter(model.layers_of("a"))).layer_name
    forms = [compile_adapter(model, n)[name] for n in ("a", "b")]
    with pytest.raises(AdapterConfigError, match="shared by every slot"):
        stack_forms(forms)


@pytest.mark.parametrize(("method", "arch"), CASES)
def test_gathered_primitives_equal_the_reference(method, arch, svd_cache):
    """The batched torch implementation (zero slot appended, rows gathered) equals the
    per-slot reference, and rows at -1 are the base bit for bit."""
    model = two_adapters(method, arch, svd_cache)
    forms = {name: compile_adapter(model, name) for name in ("a", "b")}
    slots = torch.tensor([1, -1, 0, 1, -1])
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for layer in model.layers_of("a"):
            name = layer.layer_name
            form = stack_forms([forms["a"][name], forms["b"][name]])
            x = torch.randn(5, 3, layer.shape[1], generator=generator)
            w0, b0 = layer.weight_out_in(), layer.bias
            fast = gathered_forward(with_zero_row(form), x, slots, w0, b0)
            torch.testing.assert_close(
                fast, reference_forward(form, x, slots, w0, b0), rtol=1e-4, atol=1e-5
            )
            assert torch.equal(fast[slots < 0], F.linear(x, w0, b0)[slots < 0])
