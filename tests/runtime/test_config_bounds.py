"""Every config field of every method: wrong types and out-of-range or huge values are refused
with AdapterConfigError, fast, before any allocation, and leave nothing cached."""

from __future__ import annotations

import dataclasses
import math
import resource
import time
import typing
from typing import Any

import pytest
import torch

from svda.runtime import AdapterConfigError, AdapterModel
from svda.runtime.methods import available_methods, config_from_dict, get_method
from svda.runtime.methods.vera.layer import VeraWeights
from svda.runtime.targets import select_targets

from .helpers import METHOD_CONFIGS, tiny_llama

Q = "model.layers.0.self_attn.q_proj"
SEEDS = [-1, 2**63, 2**64]
POSITIVE_FLOAT = [0.0, -1.0, math.inf, math.nan]
UNIT = [-0.1, 1.0, math.inf, math.nan]  # for fields in [0, 1)
# field -> bad values; shape-dependent ones (1000 on a 32-wide model) fail at add time
BAD_VALUES: dict[str, list[Any]] = {
    "targets": ["", " , ", "re:(", "no_such_proj"],
    "feedforward_modules": ["", " , ", "re:("],  # names matching no target are fine (as PEFT)
    "r": [0, -3, 1000, 10**6, 10**9, 2**70],
    "target_r": [0, 10**6],
    "top_k": [0, 1000, 10**9],
    "bottleneck": [0, 1000, 10**9],
    "block_size": [-1, 1, 3, 10**9],
    "block_num": [-1, 7, 10**9],
    "n_butterfly_factor": [0, 6, 10**9],
    "init_seed": SEEDS,
    "projection_seed": SEEDS,
    "permutation_seed": SEEDS,
    "dropout": UNIT,
    "alpha": POSITIVE_FLOAT,
    "stable_gamma": POSITIVE_FLOAT,
    "d_init": [math.inf, math.nan],
    "s_constant": [math.inf, -math.inf, math.nan],
    "s_init": ["bogus"],
    "activation": ["bogus"],
    "gradient_batches": [0, 10**9],
    "lambda_init": [-0.1, 1.5, math.nan],
    "lambda_smoothing": UNIT,
    "lambda_min": [-0.1, 0.5, math.nan],
    "tinit": [-1, 2**63],
    "tfinal": [-1, 2**63],
    "delta_t": [0, 2**63],
    "beta1": UNIT,
    "beta2": UNIT,
    "orth_reg_weight": [-1.0, math.inf],
    "layer_ranks": [{Q: 0}, {Q: 10**6}, {Q: 10**9}, {"not.a.layer": 1}],
    "scale": [math.inf, math.nan],  # the bottleneck's float; BOFT's bool has only type errors
}


def wrong_types(hint: Any) -> list[Any]:
    """Values of other JSON types than ``hint`` allows (bool is not int, int is not str)."""
    candidates = ["7", 7, 7.5, True, None, [7], {"a": 1}]
    return [v for v in candidates if not _allowed(v, hint)]


def _allowed(value: Any, hint: Any) -> bool:
    args = typing.get_args(hint)
    if typing.get_origin(hint) is dict:
        return isinstance(value, dict) and value == {}
    if args:
        return any(_allowed(value, a) for a in args)
    if hint is float:
        return type(value) in (int, float)
    if hint is type(None):
        return value is None
    return type(value) is hint


def base_config(method: str) -> dict[str, Any]:
    return METHOD_CONFIGS[method]("q_proj,v_proj").to_dict()


# VeRA's r may exceed the layers' rank (as in PEFT): only its projections' size is bounded
ALLOWED = {("vera", "r", 1000)}


def _valid_here(method: str, field: str, value: Any) -> bool:
    return isinstance(value, int) and (method, field, value) in ALLOWED


def cases() -> list[tuple[str, str, Any]]:
    out = []
    for method in available_methods():
        cls = get_method(method).config_cls
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            out += [(method, f.name, v) for v in wrong_types(hints[f.name])]
            if hints[f.name] is not bool:
                bad = [v for v in BAD_VALUES[f.name] if not _valid_here(method, f.name, v)]
                out += [(method, f.name, v) for v in bad]
    return out


@pytest.fixture(scope="module")
def model() -> AdapterModel:
    return AdapterModel(tiny_llama())


def nothing_cached(model: AdapterModel) -> None:
    assert not model.configs and not model.banks and not model._ctx.memo
    for layer in model.layers.values():
        assert not layer.adapters and not len(layer.shared) and not layer.banks


def refuse(model: AdapterModel, data: dict[str, Any]) -> str:
    """The config is refused by config_from_dict, add_adapter or add_packed_adapter (both are
    tried, as the loader would); returns the message."""
    try:
        config = config_from_dict(data)
    except AdapterConfigError as error:
        return str(error)
    with pytest.raises(AdapterConfigError) as error:
        model.add_adapter("x", config)
    nothing_cached(model)
    kind = get_method(config.method).weights_cls.target_kind
    try:
        layers = [(n, {}) for n in select_targets(model.model, config.targets, kind)]
    except AdapterConfigError:
        return str(error.value)  # a file's layers are checked against the base separately
    with pytest.raises(AdapterConfigError) as packed_error:
        model.add_packed_adapter("x", config, {}, layers)
    assert str(error.value) == str(packed_error.value)
    return str(error.value)


def test_every_field_of_every_method_has_bad_values():
    for method in available_methods():
        for f in dataclasses.fields(get_method(method).config_cls):
            assert f.name in BAD_VALUES, f"add bad values for {method}.{f.name} to BAD_VALUES"


@pytest.mark.parametrize(("method", "field", "value"), cases())
def test_bad_field_is_refused_fast_and_leaves_nothing(model, method, field, value):
    data = {**base_config(method), field: value}
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    message = refuse(model, data)
    elapsed = time.perf_counter() - start
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
    assert elapsed < 1.0, f"{method}.{field}={value!r} took {elapsed:.2f}s to refuse"
    assert grown_mb < 64, f"{method}.{field}={value!r} grew the peak RSS by {grown_mb:.0f} MB"
    nothing_cached(model)
    if field != "targets":
        assert field in message, message


@pytest.mark.parametrize("method", sorted(METHOD_CONFIGS))
def test_valid_configs_still_attach(method):
    model = AdapterModel(tiny_llama())
    model.add_adapter("ok", config_from_dict(base_config(method)))
    assert model.adapter_names() == ["ok"]


def test_messages_name_field_value_and_range(model):
    with pytest.raises(
        AdapterConfigError, match=r"vera r=1000000 needs shared projections.*lower r"
    ):
        model.add_adapter("x", config_from_dict({**base_config("vera"), "r": 10**6}))
    with pytest.raises(AdapterConfigError, match=r"boft n_butterfly_factor=1000000000 .*\[1, 20\]"):
        config_from_dict({**base_config("boft"), "n_butterfly_factor": 10**9})
    with pytest.raises(AdapterConfigError, match=r"'init_seed' must be an integer, got str"):
        config_from_dict({**base_config("lora"), "init_seed": "str"})
    with pytest.raises(AdapterConfigError, match=r"'dropout' must be a number, got NoneType"):
        config_from_dict({**base_config("lora"), "dropout": None})
    with pytest.raises(AdapterConfigError, match=r"'targets' must be a string, got int 5"):
        config_from_dict({**base_config("lora"), "targets": 5})
    nothing_cached(model)


def test_failed_add_keeps_no_shared_projections(monkeypatch):
    """A failure after the projections are regenerated (here: the second layer's weights) undoes
    the layers already added and drops the memoised pair."""
    model = AdapterModel(tiny_llama())
    calls = {"n": 0}
    original = VeraWeights.__init__

    def failing(self, config, target, shared):
        calls["n"] += 1
        if calls["n"] == 2:
            raise AdapterConfigError("injected failure")
        original(self, config, target, shared)

    monkeypatch.setattr(VeraWeights, "__init__", failing)
    with pytest.raises(AdapterConfigError, match="injected"):
        model.add_adapter("x", config_from_dict(base_config("vera")))
    nothing_cached(model)
    assert model.shared_frozen_bytes() == 0
    monkeypatch.setattr(VeraWeights, "__init__", original)
    model.add_adapter("x", config_from_dict(base_config("vera")))
    assert torch.isfinite(
        model(torch.zeros(1, 3, dtype=torch.long), adapter_rows=["x"]).logits
    ).all()


@pytest.mark.parametrize("data", [5, None, ["lora"], {"method": ["lora"]}, {"method": 5}])
def test_config_that_is_not_an_object_is_refused(data):
    with pytest.raises(AdapterConfigError):
        config_from_dict(data)


def test_packed_layer_table_with_huge_shapes_is_refused_before_the_bank(model):
    config = config_from_dict(base_config("vera"))
    layers = [(Q, {"vera_d": [10**9], "vera_b": [32]})]
    start = time.perf_counter()
    with pytest.raises(AdapterConfigError, match="do not match the method's"):
        model.add_packed_adapter("x", config, {}, layers)
    assert time.perf_counter() - start < 1.0
    nothing_cached(model)
    with pytest.raises(AdapterConfigError, match="not layers or blocks of this base"):
        model.add_packed_adapter("x", config, {}, [("model.nowhere", {})])
    nothing_cached(model)
