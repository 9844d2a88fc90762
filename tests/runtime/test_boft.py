"""BOFT: the common method checks on plain OFT, PEFT parity (same parameters, same outputs), the butterfly
structure, exact multiplicative merge and unmerge, slot banks and the adapter file."""

from __future__ import annotations

import inspect

import pytest
import torch

from svda.runtime import AdapterConfigError, AdapterModel, config_from_dict
from svda.runtime.methods.boft import BoftConfig
from svda.runtime.methods.boft.ops import (
    butterfly_permutations,
    cayley,
    peft_to_upper,
    triangle_size,
    upper_to_peft,
)

from . import test_bank as bank_suite
from . import test_methods_common as common
from .helpers import METHOD_CONFIGS, perturb, tiny_llama


# The common suite (test_methods_common, test_bank) already runs METHOD_CONFIGS["boft"] (two
# butterfly factors, scale); here the same checks run on plain OFT (block_num, no scale).
def oft_config(targets: str) -> BoftConfig:
    return BoftConfig(targets=targets, block_size=0, block_num=4, scale=False)


COMMON_CHECKS = [
    common.test_untouched_adapter_changes_nothing,
    common.test_trained_adapter_changes_outputs,
    common.test_merged_equals_unmerged_and_unmerge_restores,
    common.test_reference_formula_equals_fast_path,
    common.test_save_load_round_trip,
    common.test_mixed_batch_equals_each_alone,
    common.test_batched_delta_equals_reference_delta,
]


@pytest.fixture
def oft(monkeypatch) -> str:
    """Plain OFT under the method name 'boft' in the common suite's table."""
    monkeypatch.setitem(METHOD_CONFIGS, "boft", oft_config)
    return "boft"


def run_check(check, **available):
    names = inspect.signature(check).parameters
    return check(**{name: available[name] for name in names})


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("check", COMMON_CHECKS, ids=lambda c: c.__name__[5:])
def test_common_checks_on_plain_oft(check, arch, oft, svd_cache, input_ids, tmp_path):
    run_check(
        check, method=oft, arch=arch, svd_cache=svd_cache, input_ids=input_ids, tmp_path=tmp_path
    )


def test_plain_oft_a_few_training_steps_lower_the_loss(oft, svd_cache):
    common.test_a_few_training_steps_lower_the_loss(oft, svd_cache)


@pytest.mark.parametrize(
    "check",
    [
        bank_suite.test_packed_adapters_equal_their_modules_alone_and_mixed,
        bank_suite.test_packed_adapter_delta_merge_and_tensors,
    ],
    ids=lambda c: c.__name__[5:],
)
def test_plain_oft_slot_banks(check, oft, svd_cache, input_ids):
    check(oft, svd_cache, input_ids)


def test_config_validation_and_round_trip():
    config = METHOD_CONFIGS["boft"]("q_proj")
    assert config_from_dict(config.to_dict()) == config
    for bad in (
        dict(block_size=4, block_num=2),
        dict(block_size=0, block_num=0),
        dict(block_size=1),
        dict(block_size=3, n_butterfly_factor=2),
        dict(block_size=0, block_num=6, n_butterfly_factor=3),
        dict(n_butterfly_factor=0),
        dict(dropout=1.0),
    ):
        with pytest.raises(AdapterConfigError):
            BoftConfig(**bad)
    model = AdapterModel(tiny_llama())
    with pytest.raises(
        AdapterConfigError, match=r"q_proj has 32 input features, not divisible by block_size 6"
    ):
        model.add_adapter("a", BoftConfig(targets="q_proj,down_proj", block_size=6))
    assert not model.layers  # q_proj (32 = 6 · 5 + 2) fails too, before anything is attached
    with pytest.raises(AdapterConfigError, match="butterfly"):  # 8 blocks of 4, 2^4 ∤ 8
        model.add_adapter("a", BoftConfig(targets="q_proj", block_size=4, n_butterfly_factor=5))


def test_parameter_count_is_half_of_peft_blocks():
    model = AdapterModel(tiny_llama())
    model.add_adapter("a", BoftConfig(targets="q_proj,down_proj", n_butterfly_factor=2))
    # q_proj: 32 inputs = 8 blocks of 4, 2 factors; down_proj: 48 = 12 blocks; + d_out scales
    expected = 2 * (2 * 8 * triangle_size(4) + 32 + 2 * 12 * triangle_size(4) + 32)  # 2 layers
    assert model.trainable_parameter_count("a") == expected == 608


def test_permutations_match_peft():
    from peft.tuners.boft.layer import BOFTLayer

    for d, block_num, block_size, m in [
        (32, 8, 4, 2),
        (48, 12, 4, 3),
        (64, 4, 16, 3),
        (24, 6, 4, 2),
    ]:
        ours = butterfly_permutations(d, block_num, block_size, m)
        for i in range(m):
            peft = BOFTLayer.block_butterfly_perm(
                None, d, block_num // 2**i, block_size // 2, m - 1
            )
            assert torch.equal(ours[i], peft), (d, block_num, block_size, i)


def test_conversion_to_and_from_peft_round_trips():
    q = torch.randn(2, 3, triangle_size(4), generator=torch.Generator().manual_seed(1))
    assert torch.equal(peft_to_upper(upper_to_peft(q, 4)), q)


def test_cayley_blocks_are_orthogonal_and_identity_at_zero():
    q = torch.randn(3, 5, triangle_size(6), generator=torch.Generator().manual_seed(0))
    blocks = cayley(q, 6)
    eye = torch.eye(6).expand_as(blocks)
    torch.testing.assert_close(blocks.transpose(-1, -2) @ blocks, eye, rtol=0, atol=1e-5)
    assert torch.equal(cayley(torch.zeros(2, triangle_size(6)), 6), torch.eye(6).expand(2, 6, 6))


@pytest.mark.parametrize("n_factors", [1, 2, 3])
def test_rotation_is_orthogonal_after_updates(n_factors):
    model = AdapterModel(tiny_llama())
    model.add_adapter(
        "a", BoftConfig(targets="down_proj", block_size=4, n_butterfly_factor=n_factors)
    )
    perturb(model, "a", scale=0.5)
    layer = next(iter(model.layers.values()))
    r = layer.adapters["a"].rotation(layer.shared_of("a"))
    torch.testing.assert_close(r.T @ r, torch.eye(48), rtol=0, atol=1e-5)
    assert (r - torch.eye(48)).abs().max() > 0.1


# ----- HF PEFT parity --------------------------------------------------------------------------
def peft_boft_model(n_factors: int, targets: list[str], monkeypatch):
    """PEFT's BOFT on a tiny Llama with random parameters (``init_weights=False``). PEFT falls
    back to one butterfly factor when its CUDA extension does not build (always on CPU); for
    m > 1 its block-diagonal kernel is replaced by ``torch.block_diag`` (the same product)."""
    import peft.tuners.boft.layer as peft_boft
    from peft import BOFTConfig, get_peft_model

    if n_factors == 1:
        monkeypatch.setattr(peft_boft, "get_fbd_cuda", lambda: None)
    else:
        monkeypatch.setattr(peft_boft, "get_fbd_cuda", lambda: object())
        fake = staticmethod(lambda blocks: torch.stack([torch.block_diag(*b) for b in blocks]))
        monkeypatch.setattr(peft_boft.FastBlockDiag, "apply", fake)
    torch.manual_seed(3)
    config = BOFTConfig(
        boft_block_size=4,
        boft_n_butterfly_factor=n_factors,
        target_modules=targets,
        init_weights=False,
    )
    return get_peft_model(tiny_llama(), config).eval()


@pytest.mark.parametrize("n_factors", [1, 2, 3])
@torch.no_grad()
def test_outputs_equal_peft_boft_with_the_same_parameters(n_factors, monkeypatch, input_ids):
    targets = ["q_proj", "v_proj", "down_proj"]
    peft_model = peft_boft_model(n_factors, targets, monkeypatch)
    model = AdapterModel(tiny_llama())
    model.add_adapter("a", BoftConfig(targets=",".join(targets), n_butterfly_factor=n_factors))
    tensors = {}
    for name in model.layers:
        peft_layer = peft_model.base_model.model.get_submodule(name)
        assert peft_layer.boft_R["default"].shape[0] == n_factors  # the factors really used
        tensors[f"{name}.boft_q"] = peft_to_upper(peft_layer.boft_R["default"])
        tensors[f"{name}.boft_ds"] = peft_layer.boft_s["default"][:, 0] - 1.0
    model.load_adapter_state_dict("a", tensors)
    expected = peft_model(input_ids).logits
    model.set_adapter("a")
    base = model(input_ids, adapter_rows=[None] * 4).logits
    assert (expected - base).abs().max() > 1e-2  # PEFT's adapter really changes the outputs
    torch.testing.assert_close(model(input_ids).logits, expected, rtol=0, atol=1e-5)
    model.merge("a")
    torch.testing.assert_close(model(input_ids).logits, expected, rtol=0, atol=1e-5)


# ----- merge, unmerge, banks, files ------------------------------------------------------------
@torch.no_grad()
def test_merge_is_multiplicative_and_unmerge_uses_the_transpose():
    model = AdapterModel(tiny_llama())
    model.add_adapter("a", METHOD_CONFIGS["boft"]("q_proj,down_proj"))
    perturb(model, "a", scale=0.3)
    layer = model.layers["model.layers.0.mlp.down_proj"]
    w0 = layer.weight.detach().clone()
    weights, shared = layer.adapters["a"], layer.shared_of("a")
    r = weights.rotation(shared, torch.float64)
    scale = 1.0 + weights.boft_ds.double()
    model.merge("a")
    expected = (scale[:, None] * (w0.double() @ r.T)).float()
    torch.testing.assert_close(layer.weight, expected, rtol=0, atol=1e-6)
    model.unmerge()
    torch.testing.assert_close(layer.weight, w0, rtol=0, atol=1e-6)


@torch.no_grad()
def test_a_zero_scale_is_unmerged_from_the_kept_weight(input_ids):
    model = AdapterModel(tiny_llama())
    model.add_adapter("a", METHOD_CONFIGS["boft"]("down_proj"))
    perturb(model, "a")
    before = {n: layer.weight.detach().clone() for n, layer in model.layers.items()}
    layer = model.layers["model.layers.1.mlp.down_proj"]
    layer.adapters["a"].boft_ds[3] = -1.0  # s_3 = 0: that output channel is switched off
    model.set_adapter("a")
    unmerged = model(input_ids).logits
    model.merge("a")
    assert torch.all(layer.weight[3] == 0)
    torch.testing.assert_close(model(input_ids).logits, unmerged, rtol=0, atol=1e-5)
    model.unmerge()
    for name, other in model.layers.items():
        torch.testing.assert_close(other.weight, before[name], rtol=0, atol=1e-6)
    assert torch.equal(layer.weight, before[layer.layer_name])  # the kept copy, bit for bit


@torch.no_grad()
def test_mixed_rows_use_their_own_rotation_and_base_rows_are_untouched():
    model = AdapterModel(tiny_llama())
    for name, seed in (("a", 1), ("b", 2)):
        model.add_adapter(name, METHOD_CONFIGS["boft"]("all-linear"))
        perturb(model, name, scale=0.3, seed=seed)
    ids = torch.randint(0, 96, (5, 6), generator=torch.Generator().manual_seed(4))
    rows = ["b", None, "a", "a", None]
    mixed = model(ids, adapter_rows=rows).logits
    base = model(ids, adapter_rows=[None] * 5).logits
    assert torch.equal(mixed[1], base[1]) and torch.equal(mixed[4], base[4])
    for i in (0, 2, 3):
        alone = model(ids[i : i + 1], adapter_rows=[rows[i]]).logits
        torch.testing.assert_close(mixed[i : i + 1], alone, rtol=0, atol=1e-5)


def test_dropout_replaces_blocks_in_training_only(input_ids):
    model = AdapterModel(tiny_llama())
    model.add_adapter("a", BoftConfig(targets="q_proj", n_butterfly_factor=2, dropout=0.5))
    perturb(model, "a", scale=0.5)
    model.set_adapter("a")
    model.eval()
    with torch.no_grad():
        evaluated = [model(input_ids).logits for _ in range(2)]
    torch.testing.assert_close(evaluated[0], evaluated[1], rtol=0, atol=0)
    model.train()
    torch.manual_seed(0)
    with torch.no_grad():
        trained = model(input_ids).logits
    assert (trained - evaluated[0]).abs().max() > 1e-4


def test_adapter_file_round_trip(svd_cache, input_ids):
    from svda.adapters_store import export_adapter, load_adapter, read_adapter

    model = AdapterModel(tiny_llama(), svd_cache=svd_cache)
    model.add_adapter("a", METHOD_CONFIGS["boft"]("q_proj,v_proj,down_proj"))
    perturb(model, "a")
    data = export_adapter(model, "a")
    stored = read_adapter(data)
    assert sorted(stored.tensors) == ["boft_ds", "boft_q"]
    assert sum(t.numel() for t in stored.tensors.values()) == model.trainable_parameter_count("a")
    model.set_adapter("a")
    expected = model(input_ids).logits
    fresh = AdapterModel(tiny_llama(), svd_cache=svd_cache)
    load_adapter(data, fresh, "served", probe="always")
    fresh.set_adapter("served")
    torch.testing.assert_close(fresh(input_ids).logits, expected, rtol=0, atol=1e-6)
