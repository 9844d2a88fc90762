"""Target selection by name pattern, and base fingerprints."""

from __future__ import annotations

import pytest
import torch

from svda.runtime import AdapterConfigError, AdapterModel, LoraConfig, VeraConfig, base_fingerprint
from svda.runtime.targets import select_targets

from .helpers import tiny_gpt2, tiny_llama


def test_patterns_select_by_suffix_regex_and_all_linear():
    model = tiny_llama()
    assert select_targets(model, "q_proj,v_proj") == [
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.self_attn.v_proj",
        "model.layers.1.self_attn.q_proj",
        "model.layers.1.self_attn.v_proj",
    ]
    assert select_targets(model, r"re:.*layers\.1\..*_proj") == [
        n for n in select_targets(model, "all-linear") if ".layers.1." in n
    ]
    everything = select_targets(model, "all-linear")
    assert len(everything) == 2 * 7 and not any("lm_head" in n for n in everything)


def test_unknown_target_names_the_layers_that_exist():
    with pytest.raises(AdapterConfigError, match=r"matches no linear layer.*q_proj"):
        select_targets(tiny_llama(), "query")


def test_targets_still_resolve_after_wrapping(svd_cache):
    model = AdapterModel(tiny_llama(), svd_cache=svd_cache)
    model.add_adapter("a", LoraConfig(targets="q_proj"))
    model.add_adapter("b", VeraConfig(targets="q_proj,k_proj", r=4))
    assert len(model.layers) == 4
    assert set(model.layers["model.layers.0.self_attn.q_proj"].adapters) == {"a", "b"}


def test_fingerprint_is_stable_and_tracks_weights(svd_cache):
    a, b = base_fingerprint(tiny_llama(seed=0)), base_fingerprint(tiny_llama(seed=0))
    assert a == b and len(a.layers) == 14
    other = tiny_llama(seed=0)
    with torch.no_grad():
        other.model.layers[1].mlp.down_proj.weight[0, 0] += 1e-3
    c = base_fingerprint(other)
    assert c.whole != a.whole
    changed = [n for n in a.layers if a.layers[n] != c.layers[n]]
    assert changed == ["model.layers.1.mlp.down_proj"]


def test_fingerprint_ignores_dtype_that_holds_the_same_values():
    model = tiny_llama().to(torch.bfloat16)
    as_float = tiny_llama()
    as_float.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    assert base_fingerprint(model) == base_fingerprint(as_float)


def test_fingerprint_sees_conv1d_as_out_in_and_survives_attachment(svd_cache):
    model = tiny_gpt2()
    before = base_fingerprint(model)
    adapted = AdapterModel(model, svd_cache=svd_cache)
    adapted.add_adapter("a", LoraConfig(targets="c_attn"))
    assert adapted.fingerprint == before == base_fingerprint(model)
