"""uRNN-unitary: the literal D3 R2 F⁻¹ D2 Π R1 F D1 structure, orthogonality after training, O(d)
parameters, seeded regeneration, exact merge and unmerge (the common method checks run in
test_methods_common and test_bank, with METHOD_CONFIGS["urnn"])."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from svda.runtime import AdapterConfigError, AdapterModel, config_from_dict
from svda.runtime.methods.urnn import UrnnConfig
from svda.runtime.methods.urnn.layer import seeded_structure
from svda.runtime.methods.urnn.unitary import (
    apply_unitary,
    apply_unitary_adjoint,
    reflection_vectors,
    to_complex,
    to_real,
)

from .helpers import perturb, tiny_llama


# ----- the structure -------------------------------------------------------------------------
def dense_unitary(theta, v, perm):
    """D3 R2 F⁻¹ D2 Π R1 F D1 as explicit n × n complex128 matrices."""
    n = theta.shape[1]
    eye = torch.eye(n, dtype=torch.complex128)
    d = [torch.diag(torch.exp(1j * theta[k].double())) for k in range(3)]
    f = torch.fft.fft(eye, dim=0, norm="ortho")  # F e_j as columns
    refl = [
        eye - 2 * torch.outer(u, u.conj()) / (u.abs() ** 2).sum() for u in v.to(torch.complex128)
    ]
    pi = eye[perm]  # (Π z)[j] = z[perm[j]]
    return d[2] @ refl[1] @ torch.linalg.inv(f) @ d[1] @ pi @ refl[0] @ f @ d[0]


def test_fast_application_equals_the_literal_product():
    n, generator = 8, torch.Generator().manual_seed(0)
    theta = torch.randn(3, n, generator=generator, dtype=torch.float64)
    pairs = torch.randn(2, n, 2, generator=generator, dtype=torch.float64)
    perm = torch.randperm(n, generator=generator)
    v, gain = reflection_vectors(pairs)
    phases = torch.polar(torch.ones_like(theta), theta)
    u = dense_unitary(theta, v, perm)
    z = torch.randn(5, n, dtype=torch.complex128, generator=generator)
    torch.testing.assert_close(apply_unitary(z, phases, v, gain, perm), z @ u.T)
    adjoint = apply_unitary_adjoint(z, phases, v, gain, perm.argsort())
    torch.testing.assert_close(adjoint, z @ u.conj())
    torch.testing.assert_close(u.conj().T @ u, torch.eye(n, dtype=torch.complex128))


def test_real_complex_pairing_is_interleaved():
    y = torch.arange(6.0)
    assert torch.equal(to_complex(y), torch.tensor([0 + 1j, 2 + 3j, 4 + 5j]))
    assert torch.equal(to_real(to_complex(y)), y)


def train_a_little(model: AdapterModel, name: str, steps: int = 10) -> None:
    model.set_adapter(name)
    params = list(model.adapter_parameters(name).values())
    optimizer = torch.optim.Adam(params, lr=0.1)
    ids = torch.arange(16).repeat(2, 1) % 96
    for _ in range(steps):
        loss = model(ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def test_rotation_stays_orthogonal_after_training():
    model = AdapterModel(tiny_llama())
    model.add_adapter("a", UrnnConfig("k_proj,gate_proj,down_proj", permutation_seed=1))
    perturb(model, "a", scale=0.5)  # far from the start, then real optimiser steps
    train_a_little(model, "a", steps=5)
    for layer in model.layers.values():
        r = layer.adapters["a"].rotation(layer.shared_of("a"))  # float32
        eye = torch.eye(r.shape[0])
        assert torch.linalg.norm(r.T @ r - eye) < 1e-5 * r.shape[0] ** 0.5
        assert (r - eye).abs().max() > 0.05


def test_parameters_are_linear_in_the_width():
    model = AdapterModel(tiny_llama())
    model.add_adapter("a", UrnnConfig("q_proj,k_proj,gate_proj"))
    layer_counts = {}
    for key, p in model.adapter_parameters("a").items():
        layer = key.rsplit(".", 1)[0]
        layer_counts[layer] = layer_counts.get(layer, 0) + p.numel()
    widths = {name: layer.weight_out_in().shape[0] for name, layer in model.layers.items()}
    assert {layer_counts[n] for n in widths} == {7 * widths[n] // 2 for n in widths}
    assert set(widths.values()) == {32, 16, 48}


# ----- regeneration --------------------------------------------------------------------------
def test_permutation_and_start_vectors_regenerate_from_the_seed():
    perm, v0 = seeded_structure(11, 24)
    generator = torch.Generator(device="cpu").manual_seed(11)
    assert torch.equal(perm, torch.randperm(24, generator=generator))
    assert torch.equal(v0, torch.randn((2, 24, 2), generator=generator))
    first, second = AdapterModel(tiny_llama()), AdapterModel(tiny_llama(seed=1))
    first.add_adapter("a", UrnnConfig("q_proj", permutation_seed=11))
    second.add_adapter("b", UrnnConfig("q_proj", permutation_seed=11))
    first.add_adapter("c", UrnnConfig("q_proj", permutation_seed=12))
    layer_a = first.layers["model.layers.0.self_attn.q_proj"]
    layer_b = second.layers["model.layers.0.self_attn.q_proj"]
    shared_a, shared_b = layer_a.shared_of("a"), layer_b.shared_of("b")
    assert torch.equal(shared_a.perm, shared_b.perm) and torch.equal(shared_a.v0, shared_b.v0)
    assert not torch.equal(shared_a.perm, layer_a.shared_of("c").perm)
    assert first.frozen_sha256("a") == second.frozen_sha256("b") != first.frozen_sha256("c")
    assert shared_a.perm.shape == (16,)


def test_config_validation_and_odd_width():
    config = UrnnConfig("q_proj", permutation_seed=3)
    assert config_from_dict(config.to_dict()) == config
    for bad in (-1, 2**63, 1.5, True):
        with pytest.raises(AdapterConfigError, match="seed"):
            UrnnConfig("q_proj", permutation_seed=bad)
    odd = LlamaConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=45,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    model = AdapterModel(LlamaForCausalLM(odd).eval())
    with pytest.raises(AdapterConfigError, match=r"gate_proj has 45 output features.*even"):
        model.add_adapter("a", UrnnConfig("gate_proj"))
    assert not model.layers  # nothing attached
    model.add_adapter("b", UrnnConfig("down_proj"))  # 32 outputs: fine


# ----- exactness -----------------------------------------------------------------------------
@torch.no_grad()
def test_untouched_rows_are_bit_exact_in_a_mixed_batch():
    model = AdapterModel(tiny_llama())
    model.add_adapter("a", UrnnConfig("all-linear"))
    model.add_adapter("fresh", UrnnConfig("all-linear"))
    perturb(model, "a", scale=0.3)
    ids = torch.randint(0, 96, (4, 6), generator=torch.Generator().manual_seed(4))
    base = model(ids, adapter_rows=[None] * 4).logits
    mixed = model(ids, adapter_rows=["a", None, "fresh", "a"]).logits
    assert torch.equal(mixed[1], base[1]) and torch.equal(mixed[2], base[2])
    assert (mixed[0] - base[0]).abs().max() > 1e-3


@torch.no_grad()
def test_merge_is_the_rotation_and_unmerge_its_transpose():
    model = AdapterModel(tiny_llama())
    model.add_adapter("a", UrnnConfig("q_proj,down_proj", permutation_seed=2))
    perturb(model, "a", scale=0.3)
    layer = model.layers["model.layers.1.mlp.down_proj"]
    w0 = layer.weight.detach().clone()
    r = layer.adapters["a"].rotation(layer.shared_of("a"), torch.float64)
    torch.testing.assert_close(r.T @ r, torch.eye(32, dtype=torch.float64), rtol=0, atol=1e-12)
    model.merge("a")
    torch.testing.assert_close(layer.weight, (r @ w0.double()).float(), rtol=0, atol=1e-6)
    model.unmerge()
    torch.testing.assert_close(layer.weight, w0, rtol=0, atol=1e-6)


def test_adapter_file_round_trip(svd_cache, input_ids):
    from svda.adapters_store import export_adapter, load_adapter, read_adapter

    model = AdapterModel(tiny_llama(), svd_cache=svd_cache)
    model.add_adapter("a", UrnnConfig("q_proj,v_proj,down_proj", permutation_seed=9))
    perturb(model, "a")
    data = export_adapter(model, "a")
    stored = read_adapter(data)
    assert sorted(stored.tensors) == ["urnn_theta", "urnn_v"]
    assert sum(t.numel() for t in stored.tensors.values()) == model.trainable_parameter_count("a")
    assert [r.source for r in stored.header.recipe] == ["seed"]
    assert stored.header.recipe[0].detail["seed"] == 9
    model.set_adapter("a")
    expected = model(input_ids).logits
    fresh = AdapterModel(tiny_llama(), svd_cache=svd_cache)
    load_adapter(data, fresh, "served", probe="always")
    fresh.set_adapter("served")
    torch.testing.assert_close(fresh(input_ids).logits, expected, rtol=0, atol=1e-6)
