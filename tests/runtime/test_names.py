"""One naming rule for adapter names and store ids (svda.runtime.names)."""

from __future__ import annotations

import pytest

from svda.runtime import AdapterModel, LoraConfig
from svda.runtime.errors import AdapterConfigError
from svda.runtime.names import NAME_PATTERN, NAME_RULE, check_adapter_name, is_valid_name

from .helpers import tiny_llama


@pytest.mark.parametrize("name", ["acme", "acme.v2", "a_b-c.d", "x" * 128, "0"])
def test_names_that_store_ids_allow_are_valid_adapter_names(name):
    assert is_valid_name(name) and check_adapter_name(name) == name


@pytest.mark.parametrize("name", ["", ".acme", "a..b", "a/b", "a b", "x" * 129, None, 7])
def test_invalid_names_say_the_rule(name):
    with pytest.raises(AdapterConfigError, match="invalid") as info:
        check_adapter_name(name)
    assert NAME_RULE in str(info.value)


def test_a_dotted_name_attaches_trains_and_deletes(input_ids):
    model = AdapterModel(tiny_llama())
    model.add_adapter("acme.v2", LoraConfig(targets="q_proj", r=2))
    model.add_adapter("acme", LoraConfig(targets="q_proj", r=2))
    assert sorted(model.adapter_names()) == ["acme", "acme.v2"]
    params = model.adapter_parameters("acme.v2")
    assert params and all(p.requires_grad for p in params.values())
    model.set_adapter("acme.v2")
    model(input_ids).logits.sum().backward()
    assert all(p.grad is not None for p in params.values())
    model.delete_adapter("acme.v2")
    assert model.adapter_names() == ["acme"]
    with pytest.raises(AdapterConfigError, match=r"use 1-128 characters from \[A-Za-z0-9._-\]"):
        model.add_adapter("acme..v3", LoraConfig(targets="q_proj", r=2))


def test_the_store_states_the_same_rule():
    from svda.adapters_store import store_types

    assert store_types._ID_RE.pattern == NAME_PATTERN.pattern
    assert store_types.NAME_RULE == NAME_RULE
