"""PEFT DoRA (``use_dora=True``) and IA3 folders in and out of svda: the imported adapter gives
PEFT's logits, survives the .svda format, is served from a slot bank in mixed batches (rows at
-1 are the base), and to-peft folders load in PEFT with the same logits."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import IA3Config as PeftIa3Config
from peft import LoraConfig as PeftLoraConfig
from safetensors.torch import load_file, save_file

from svda.adapters_store.format import export_adapter, read_adapter
from svda.adapters_store.loader import load_adapter
from svda.adapters_store.peft_compat import PeftConversionError, import_peft
from svda.runtime import AdapterModel
from tests.adapters_store.test_peft_compat import peft_folder
from tests.runtime.helpers import tiny_gpt2, tiny_llama

IDS = torch.arange(21).view(3, 7) % 90
PEFT_CASES = {
    "dora-llama": (
        PeftLoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_dora=True),
        tiny_llama,
    ),
    "dora-rslora-gpt2": (
        PeftLoraConfig(
            r=4, lora_alpha=8, target_modules=["c_attn"], use_dora=True, use_rslora=True
        ),
        tiny_gpt2,
    ),
    "ia3-llama": (
        PeftIa3Config(
            target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]
        ),
        tiny_llama,
    ),
    "ia3-gpt2": (
        PeftIa3Config(target_modules=["c_attn", "c_fc"], feedforward_modules=["c_fc"]),
        tiny_gpt2,
    ),
}


@torch.no_grad()
def logits(model: AdapterModel, name: str | None, ids: torch.Tensor = IDS) -> torch.Tensor:
    model.set_adapter(name)
    return model(ids).logits


@pytest.mark.parametrize("case", list(PEFT_CASES))
def test_imported_peft_adapter_gives_peft_logits_and_serves_mixed_batches(
    case, tmp_path, svd_cache
):
    peft_config, make = PEFT_CASES[case]
    peft_model = peft_folder(tmp_path, peft_config, make)
    with torch.no_grad():
        expected = peft_model(IDS).logits
    model = AdapterModel(make(), svd_cache=svd_cache)
    import_peft(tmp_path, model, "imported")
    assert model.configs["imported"].method == case.split("-")[0]
    torch.testing.assert_close(logits(model, "imported"), expected, rtol=0, atol=1e-5)

    served = AdapterModel(make(), svd_cache=svd_cache)  # from the .svda file, into a slot bank
    header = load_adapter(export_adapter(model, "imported"), served)
    assert served.is_frozen(header.name)
    torch.testing.assert_close(logits(served, header.name), expected, rtol=0, atol=1e-5)
    base = logits(served, None)
    with torch.no_grad():
        mixed = served(IDS, adapter_rows=[header.name, None, header.name]).logits
    torch.testing.assert_close(mixed[[0, 2]], expected[[0, 2]], rtol=0, atol=1e-5)
    assert torch.equal(mixed[1], base[1])


@pytest.mark.parametrize("case", ["dora-llama", "ia3-llama"])
def test_two_served_adapters_and_the_base_in_one_batch(case, tmp_path, svd_cache):
    peft_config, make = PEFT_CASES[case]
    served = AdapterModel(make(), svd_cache=svd_cache)
    alone = []
    for i in range(2):
        folder = tmp_path / str(i)
        peft_model = peft_folder(folder, copy.deepcopy(peft_config), make)
        with torch.no_grad():
            for p in peft_model.parameters():  # two different adapters
                if p.requires_grad:
                    p.mul_(1 + 0.5 * i)
        peft_model.save_pretrained(folder)
        model = AdapterModel(make(), svd_cache=svd_cache)
        import_peft(folder, model, f"a{i}")
        load_adapter(export_adapter(model, f"a{i}"), served)
        alone.append(logits(served, f"a{i}"))
    base = logits(served, None)
    with torch.no_grad():
        mixed = served(IDS, adapter_rows=["a1", None, "a0"]).logits
    torch.testing.assert_close(mixed[0], alone[1][0], rtol=0, atol=1e-5)
    torch.testing.assert_close(mixed[2], alone[0][2], rtol=0, atol=1e-5)
    assert torch.equal(mixed[1], base[1])
    assert (alone[0] - alone[1]).abs().max() > 1e-3


def test_dora_folder_without_magnitudes_is_refused(tmp_path, svd_cache):
    peft_folder(tmp_path, PeftLoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
    path = tmp_path / "adapter_model.safetensors"
    tensors = {k: v for k, v in load_file(str(path)).items() if "magnitude" not in k}
    save_file(tensors, str(path))
    model = AdapterModel(tiny_llama(), svd_cache=svd_cache)
    with pytest.raises(PeftConversionError, match=r"lacks.*lora_magnitude_vector"):
        import_peft(tmp_path, model, "x")
    assert model.adapter_names() == []


def test_dora_file_stores_only_the_trainable_tensors(tmp_path, svd_cache):
    peft_folder(tmp_path, PeftLoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
    model = AdapterModel(tiny_llama(), svd_cache=svd_cache)
    import_peft(tmp_path, model, "d")
    kinds = set(read_adapter(export_adapter(model, "d")).tensors)
    assert kinds == {"lora_A", "lora_B", "dora_m"}
