"""With the same parameter values, svda's LoRA and VeRA layers give HF PEFT's outputs."""

from __future__ import annotations

import copy

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import VeraConfig as PeftVeraConfig
from peft import get_peft_model

from svda.runtime import AdapterModel, LoraConfig, VeraConfig

from .helpers import perturb, tiny_llama


def peft_layer_params(peft_model, suffix: str) -> dict[str, torch.Tensor]:
    """``"<layer name>" -> tensor`` for PEFT parameters named ``...<layer>.<suffix>.default``."""
    out = {}
    for name, p in peft_model.named_parameters():
        if name.endswith(f".{suffix}.default") or name.endswith(f".{suffix}.default.weight"):
            layer = name.split(f".{suffix}.default")[0].removeprefix("base_model.model.")
            out[layer] = p
    return out


@torch.no_grad()
def test_lora_matches_peft(svd_cache, input_ids):
    base = tiny_llama()
    ours = AdapterModel(copy.deepcopy(base), svd_cache=svd_cache)
    ours.add_adapter("a", LoraConfig(targets="q_proj,v_proj", r=4, alpha=12.0))
    perturb(ours, "a")
    ours.set_adapter("a")
    theirs = get_peft_model(
        copy.deepcopy(base), PeftLoraConfig(r=4, lora_alpha=12, target_modules=["q_proj", "v_proj"])
    ).eval()
    a_params, b_params = peft_layer_params(theirs, "lora_A"), peft_layer_params(theirs, "lora_B")
    assert len(a_params) == len(ours.layers) == 4
    for layer in ours.layers.values():
        w = layer.adapters["a"]
        a_params[layer.layer_name].copy_(w.lora_A)
        b_params[layer.layer_name].copy_(w.lora_B)
    torch.testing.assert_close(ours(input_ids).logits, theirs(input_ids).logits, rtol=0, atol=1e-5)


@torch.no_grad()
def test_vera_matches_peft_including_regenerated_projections(svd_cache, input_ids):
    base = tiny_llama()
    ours = AdapterModel(copy.deepcopy(base), svd_cache=svd_cache)
    ours.add_adapter("a", VeraConfig(targets="q_proj,v_proj", r=8, projection_seed=42))
    perturb(ours, "a")
    ours.set_adapter("a")
    peft_config = PeftVeraConfig(r=8, target_modules=["q_proj", "v_proj"], projection_prng_key=42)
    theirs = get_peft_model(copy.deepcopy(base), peft_config).eval()
    d_params, b_params = (
        peft_layer_params(theirs, "vera_lambda_d"),
        peft_layer_params(theirs, "vera_lambda_b"),
    )
    for layer in ours.layers.values():
        w = layer.adapters["a"]
        d_params[layer.layer_name].copy_(w.vera_d)
        b_params[layer.layer_name].copy_(w.vera_b)
    # the frozen projections were not copied: both sides regenerated them from the seed
    torch.testing.assert_close(ours(input_ids).logits, theirs(input_ids).logits, rtol=0, atol=1e-5)
