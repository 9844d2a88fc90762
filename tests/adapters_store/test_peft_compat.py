"""PEFT LoRA/VeRA folders in and out of svda, checked against PEFT itself."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from peft import VeraConfig as PeftVeraConfig
from safetensors.torch import load_file, save_file

from svda.adapters_store.format import export_adapter, read_adapter
from svda.adapters_store.loader import load_adapter
from svda.adapters_store.peft_compat import PeftConversionError, export_peft, import_peft
from svda.runtime import AdapterModel, LoraConfig, VeraConfig
from svda.runtime.methods import DoraConfig, Ia3Config
from tests.runtime.helpers import perturb, tiny_gpt2, tiny_llama

IDS = torch.arange(14).view(2, 7)


@torch.no_grad()
def peft_folder(tmp_path, peft_config, make=tiny_llama):
    peft_model = get_peft_model(make(), peft_config)
    for name, p in peft_model.named_parameters():
        if p.requires_grad:
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))))
    peft_model.save_pretrained(tmp_path)
    return peft_model.eval()


@torch.no_grad()
def ours_logits(model: AdapterModel, name: str) -> torch.Tensor:
    model.set_adapter(name)
    return model(IDS).logits


@pytest.mark.parametrize(
    "peft_config",
    [
        PeftLoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        PeftVeraConfig(r=8, target_modules=["q_proj", "v_proj"], projection_prng_key=5),
        PeftVeraConfig(r=8, target_modules=["q_proj"], save_projection=False),
    ],
    ids=["lora", "vera", "vera-no-projection"],
)
def test_import_peft_matches_peft_outputs_and_round_trips_the_format(
    peft_config, tmp_path, svd_cache
):
    peft_model = peft_folder(tmp_path, peft_config)
    model = AdapterModel(tiny_llama(), svd_cache=svd_cache)
    import_peft(tmp_path, model, "imported")
    with torch.no_grad():
        torch.testing.assert_close(
            ours_logits(model, "imported"), peft_model(IDS).logits, rtol=0, atol=1e-5
        )
    data = export_adapter(model, "imported")
    assert not any(
        k.startswith("vera_A") for k in read_adapter(data).tensors
    )  # projections dropped
    again = AdapterModel(tiny_llama(), svd_cache=svd_cache)
    load_adapter(data, again)
    torch.testing.assert_close(
        ours_logits(again, "imported"), ours_logits(model, "imported"), rtol=0, atol=0
    )


def test_vera_projections_that_do_not_regenerate_are_refused(tmp_path, svd_cache):
    peft_folder(tmp_path, PeftVeraConfig(r=8, target_modules=["q_proj"]))
    path = tmp_path / "adapter_model.safetensors"
    tensors = load_file(str(path))
    tensors["base_model.vera_A"] = tensors["base_model.vera_A"] + 1e-3
    save_file(tensors, str(path))
    model = AdapterModel(tiny_llama(), svd_cache=svd_cache)
    with pytest.raises(PeftConversionError, match="differ from those regenerated"):
        import_peft(tmp_path, model, "x")
    assert model.adapter_names() == []


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"use_dora": True}, r"lacks.*lora_magnitude_vector"),  # DoRA needs its magnitudes
        ({"peft_type": "LOHA"}, "cannot be imported"),
    ],
)
def test_unsupported_peft_adapters_are_refused(edit, message, tmp_path, svd_cache):
    peft_folder(tmp_path, PeftLoraConfig(r=2, target_modules=["q_proj"]))
    config_path = tmp_path / "adapter_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), **edit}))
    with pytest.raises(PeftConversionError, match=message):
        import_peft(tmp_path, AdapterModel(tiny_llama(), svd_cache=svd_cache), "x")


def test_not_a_peft_folder(tmp_path, svd_cache):
    with pytest.raises(PeftConversionError, match="not a PEFT adapter folder"):
        import_peft(tmp_path, AdapterModel(tiny_llama(), svd_cache=svd_cache), "x")


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
@pytest.mark.parametrize(
    "config",
    [
        LoraConfig(targets="all-linear", r=3),
        VeraConfig(targets="all-linear", r=8),
        DoraConfig(targets="all-linear", r=3),
        Ia3Config(targets="all-linear", feedforward_modules="down_proj,c_proj"),
    ],
    ids=["lora", "vera", "dora", "ia3"],
)
def test_to_peft_loads_in_peft_with_the_same_outputs(config, make, tmp_path, svd_cache):
    model = AdapterModel(make(), svd_cache=svd_cache)
    model.add_adapter("a", config)
    perturb(model, "a")
    export_peft(model, "a", tmp_path)
    peft_model = PeftModel.from_pretrained(copy.deepcopy(make()), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(
            peft_model(IDS).logits, ours_logits(model, "a"), rtol=0, atol=1e-5
        )
