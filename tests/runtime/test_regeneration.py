"""Regeneration contract (docs/methods.md, regeneration): seeded matrices bit-identical; SVD bases canonical, cached,
validated, and reproducing ΔW within relative Frobenius error 1e-5."""

from __future__ import annotations

import os

import pytest
import torch
from peft.tuners.vera.model import _kaiming_init

from svda.runtime import SvdBasisCache, compute_svd_basis, layer_fingerprint
from svda.runtime.regeneration.seeded import vera_projections
from svda.runtime.regeneration.svd_basis import canonicalize_signs


def with_threads(n: int, fn):
    saved = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        return fn()
    finally:
        torch.set_num_threads(saved)


# ----- seeded random matrices ---------------------------------------------------------------------
def test_vera_projections_are_bit_identical_across_runs_threads_and_dtypes():
    one = with_threads(1, lambda: vera_projections(1234, 64, 300, 200))
    two = with_threads(2, lambda: vera_projections(1234, 64, 300, 200))
    again = vera_projections(1234, 64, 300, 200)
    for a, b, c in zip(one, two, again, strict=True):
        assert a.dtype == torch.float32
        assert torch.equal(a, b) and torch.equal(a, c)
    # requesting another dtype afterwards is a cast of the same float32 numbers
    half = vera_projections(1234, 64, 300, 200)[0].to(torch.bfloat16)
    assert torch.equal(half, one[0].to(torch.bfloat16))
    assert not torch.equal(vera_projections(1235, 64, 300, 200)[0], one[0])


def test_vera_projections_equal_peft_generation_for_the_same_key():
    generator = torch.Generator(device="cpu").manual_seed(99)
    peft_a = _kaiming_init((16, 40), generator=generator)
    peft_b = _kaiming_init((50, 16), generator=generator)
    a, b = vera_projections(99, 16, 50, 40)
    assert torch.equal(a, peft_a) and torch.equal(b, peft_b)


# ----- SVD bases ----------------------------------------------------------------------------------
def random_weight(d1: int, d2: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(d1, d2, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("shape", [(24, 16), (16, 24), (20, 20)])
def test_svd_basis_reconstructs_and_has_canonical_sign(shape):
    w = random_weight(*shape)
    basis = compute_svd_basis(w)
    assert basis.U.dtype == torch.float64
    torch.testing.assert_close(basis.reconstruct(), w.double(), rtol=0, atol=1e-10)
    rows = basis.U.abs().argmax(dim=0)
    assert (basis.U[rows, torch.arange(basis.U.shape[1])] > 0).all()
    assert (basis.sigma[:-1] >= basis.sigma[1:]).all()
    u2, v2 = canonicalize_signs(-basis.U, -basis.V)  # a flipped basis is put back
    assert torch.equal(u2, basis.U) and torch.equal(v2, basis.V)


def trained_delta(basis, b: torch.Tensor, s: torch.Tensor, dtype=torch.float64) -> torch.Tensor:
    u, v = basis.U.to(dtype), basis.V.to(dtype)
    return b.to(dtype)[:, None] * ((u * s.to(dtype)) @ v.T)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return (torch.linalg.norm(a.double() - b.double()) / torch.linalg.norm(b.double())).item()


def test_trained_looking_delta_agrees_across_threads_and_precisions():
    w = random_weight(96, 64, seed=3)
    generator = torch.Generator().manual_seed(8)
    reference_basis = with_threads(1, lambda: compute_svd_basis(w))
    s = reference_basis.sigma * (
        1 + 0.05 * torch.randn(64, generator=generator, dtype=torch.float64)
    )
    b = 0.1 * torch.randn(96, generator=generator, dtype=torch.float64)
    reference = trained_delta(reference_basis, b, s)
    two_threads = with_threads(2, lambda: compute_svd_basis(w))
    assert relative_error(trained_delta(two_threads, b, s), reference) < 1e-5
    # the delta computed in float32 from float32-cast bases (what a served layer does)
    assert relative_error(trained_delta(two_threads, b, s, torch.float32), reference) < 1e-5
    # even an SVD computed in float32 reproduces the delta within the contract
    f32_basis = compute_svd_basis(w, dtype=torch.float32)
    assert relative_error(trained_delta(f32_basis, b, s), reference) < 1e-5


def test_cache_computes_once_then_hits(tmp_path):
    cache = SvdBasisCache(tmp_path)
    w = random_weight(30, 20)
    first = cache.get(w)
    second = SvdBasisCache(tmp_path).get(w)
    assert cache.misses == 1
    assert torch.equal(first.U, second.U) and torch.equal(first.V, second.V)
    assert first.U.dtype == torch.float32
    assert len(list(tmp_path.glob("*.safetensors"))) == 1
    assert not list(tmp_path.glob("*.tmp"))


def corrupt_and_reload(tmp_path, damage) -> SvdBasisCache:
    w = random_weight(30, 20)
    SvdBasisCache(tmp_path).get(w)
    path = SvdBasisCache(tmp_path).path_for(layer_fingerprint(w))
    damage(path)
    cache = SvdBasisCache(tmp_path)
    basis = cache.get(w)
    torch.testing.assert_close(basis.reconstruct(), w, rtol=0, atol=1e-5)
    return cache


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def flip_payload_bytes(path):
    data = bytearray(path.read_bytes())
    for i in range(len(data) - 400, len(data), 7):
        data[i] ^= 0x5A
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [truncate, flip_payload_bytes, lambda p: p.write_bytes(b"")])
def test_damaged_cache_file_is_detected_and_recomputed(tmp_path, damage, caplog):
    cache = corrupt_and_reload(tmp_path, damage)
    assert cache.misses == 1 and cache.hits == 0
    assert "recomputed" in caplog.text
    assert SvdBasisCache(tmp_path).get(random_weight(30, 20)) is not None


def test_cache_file_of_other_weights_is_not_used(tmp_path):
    w, other = random_weight(30, 20, seed=1), random_weight(30, 20, seed=2)
    cache = SvdBasisCache(tmp_path)
    cache.get(other)
    # put the other weight's file under w's name, as a stale or mixed-up cache would
    os.replace(cache.path_for(layer_fingerprint(other)), cache.path_for(layer_fingerprint(w)))
    fresh = SvdBasisCache(tmp_path)
    basis = fresh.get(w)
    assert fresh.misses == 1
    torch.testing.assert_close(basis.reconstruct(), w, rtol=0, atol=1e-5)
