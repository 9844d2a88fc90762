"""What import-peft refuses (before any base model is loaded) and the PEFT features it converts
exactly: rsLoRA, rank/alpha patterns, BOFT, bias="all" without bias tensors; and the to-peft
folder (base path, suffix target modules) loading offline with AutoPeftModel."""

from __future__ import annotations

import json

import pytest
import torch
from peft import AutoPeftModelForCausalLM, BOFTConfig, PeftModel
from peft import LoraConfig as PeftLoraConfig
from peft import VeraConfig as PeftVeraConfig
from transformers import LlamaForCausalLM

from svda.adapters_store.cli import main
from svda.adapters_store.format import export_adapter
from svda.adapters_store.loader import load_adapter
from svda.adapters_store.peft_compat import (
    PeftConversionError,
    check_peft_folder,
    export_peft,
    import_peft,
)
from svda.runtime import AdapterModel, LoraConfig
from svda.runtime.methods import BoftConfig
from tests.adapters_store.test_peft_compat import peft_folder
from tests.runtime.helpers import perturb, tiny_gpt2, tiny_llama
from tests.tiny_base import tiny_base_folder

IDS = torch.arange(14).view(2, 7)


def edit_config(folder, **fields) -> None:
    path = folder / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))


def peft_deltas(peft_model) -> dict[str, torch.Tensor]:
    prefix = "base_model.model."
    return {
        name[len(prefix) :]: module.get_delta_weight("default")
        for name, module in peft_model.named_modules()
        if hasattr(module, "get_delta_weight") and hasattr(module, "base_layer")
    }


def assert_same_delta(peft_model, folder, make=tiny_llama) -> AdapterModel:
    """Imported ΔW equals PEFT's on every layer, and the outputs agree (within 1e-5)."""
    model = AdapterModel(make())
    import_peft(folder, model, "imported")
    ours, theirs = model.get_delta_weights("imported"), peft_deltas(peft_model)
    assert sorted(ours) == sorted(theirs)
    for layer, delta in theirs.items():
        torch.testing.assert_close(ours[layer], delta, rtol=0, atol=1e-5, msg=layer)
    model.set_adapter("imported")
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, peft_model(IDS).logits, rtol=0, atol=1e-5)
    return model


# ----- refusals ----------------------------------------------------------------------------
REFUSED_FOLDERS = {
    "lora_bias": (PeftLoraConfig(r=2, target_modules=["q_proj"], lora_bias=True), "lora_bias"),
    "embedding": (PeftLoraConfig(r=2, target_modules=["embed_tokens"]), "lora_embedding"),
    "trainable_tokens": (
        PeftLoraConfig(r=2, target_modules=["q_proj"], trainable_token_indices=[1, 2]),
        "trainable_token_indices",
    ),
    "vera_modules_to_save": (
        PeftVeraConfig(r=8, target_modules=["q_proj"], modules_to_save=["lm_head"]),
        "modules_to_save",
    ),
}


@pytest.mark.parametrize("case", list(REFUSED_FOLDERS))
def test_peft_folders_svda_cannot_represent_are_refused(case, tmp_path):
    peft_config, message = REFUSED_FOLDERS[case]
    peft_folder(tmp_path, peft_config)
    with pytest.raises(PeftConversionError, match=message):
        check_peft_folder(tmp_path)
    model = AdapterModel(tiny_llama())
    with pytest.raises(PeftConversionError, match=message):
        import_peft(tmp_path, model, "x")
    assert model.adapter_names() == []


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"alora_invocation_tokens": [5, 6]}, "alora_invocation_tokens"),
        ({"use_qalora": True}, "use_qalora"),
        ({"init_lora_weights": "pissa"}, "init_lora_weights"),
        ({"layer_replication": [[0, 1], [0, 1]]}, "layer_replication"),
        ({"a_field_from_a_newer_peft": 3}, "a_field_from_a_newer_peft"),
        ({"bias": "everything"}, "bias"),
    ],
)
def test_non_default_config_fields_are_refused_by_name(fields, message, tmp_path):
    peft_folder(tmp_path, PeftLoraConfig(r=2, target_modules=["q_proj"]))
    edit_config(tmp_path, **fields)
    with pytest.raises(PeftConversionError, match=f"{message}.*cannot represent"):
        check_peft_folder(tmp_path)


def test_unknown_fields_left_unset_are_accepted(tmp_path):
    peft = peft_folder(tmp_path, PeftLoraConfig(r=2, target_modules=["q_proj"]))
    edit_config(tmp_path, a_field_from_a_newer_peft=None, another_one=False)
    assert_same_delta(peft, tmp_path)


def test_bias_all_with_bias_tensors_is_refused(tmp_path):
    peft_folder(tmp_path, PeftLoraConfig(r=2, target_modules=["c_attn"], bias="all"), tiny_gpt2)
    with pytest.raises(PeftConversionError, match="bias"):
        check_peft_folder(tmp_path)


def test_refusal_comes_before_the_base_model_is_loaded(tmp_path, capsys):
    peft_folder(tmp_path / "peft", PeftLoraConfig(r=2, target_modules=["q_proj"], lora_bias=True))
    missing_base = tmp_path / "no-such-base"
    argv = ["import-peft", str(tmp_path / "peft"), "--base", str(missing_base)]
    assert main([*argv, "--out-file", str(tmp_path / "x.svda")]) == 2
    err = capsys.readouterr().err
    assert "lora_bias" in err and "no-such-base" not in err


# ----- exact conversions -------------------------------------------------------------------
@pytest.mark.parametrize(
    "peft_config",
    [
        PeftLoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_rslora=True),
        PeftLoraConfig(
            r=4,
            lora_alpha=8,
            target_modules=["q_proj", "v_proj", "down_proj"],
            rank_pattern={"v_proj": 2, "layers.1.self_attn.q_proj": 6},
            alpha_pattern={"down_proj": 3},
        ),
        PeftLoraConfig(
            r=2,
            lora_alpha=4,
            target_modules=["q_proj", "o_proj"],
            rank_pattern={"o_proj": 5},
            alpha_pattern={"q_proj": 1},
            use_rslora=True,
        ),
        PeftLoraConfig(r=3, target_modules=["q_proj"], bias="all"),  # no bias in a Llama
    ],
    ids=["rslora", "rank-alpha-patterns", "patterns-rslora", "bias-all-no-bias"],
)
def test_lora_variants_import_with_exact_delta_weights(peft_config, tmp_path):
    peft_model = peft_folder(tmp_path, peft_config)
    model = assert_same_delta(peft_model, tmp_path)
    round_trip = AdapterModel(tiny_llama())
    load_adapter(export_adapter(model, "imported"), round_trip, "again")
    for layer, delta in model.get_delta_weights("imported").items():
        torch.testing.assert_close(round_trip.get_delta_weights("again")[layer], delta)


def boft_peft(monkeypatch, n_factors: int, cuda: bool) -> BOFTConfig:
    """PEFT's BOFT; without its CUDA extension (``cuda=False``, as on any CPU) PEFT trains one
    factor whatever the config says; with it faked, ``torch.block_diag`` stands in."""
    import peft.tuners.boft.layer as peft_boft

    monkeypatch.setattr(peft_boft, "get_fbd_cuda", (lambda: object()) if cuda else (lambda: None))
    if cuda:
        fake = staticmethod(lambda blocks: torch.stack([torch.block_diag(*b) for b in blocks]))
        monkeypatch.setattr(peft_boft.FastBlockDiag, "apply", fake)
    return BOFTConfig(
        boft_block_size=4,
        boft_n_butterfly_factor=n_factors,
        target_modules=["q_proj", "v_proj", "down_proj"],
        init_weights=False,
    )


@pytest.mark.parametrize(
    ("n_factors", "cuda"), [(1, False), (2, False), (2, True)], ids=["m1", "m2-cpu", "m2"]
)
def test_boft_imports_with_exact_delta_weights(n_factors, cuda, monkeypatch, tmp_path):
    peft_model = peft_folder(tmp_path, boft_peft(monkeypatch, n_factors, cuda))
    svda_config, _ = check_peft_folder(tmp_path)
    assert svda_config.n_butterfly_factor == (n_factors if cuda else 1)
    model = AdapterModel(tiny_llama())
    import_peft(tmp_path, model, "imported")
    ours = model.get_delta_weights("imported")
    for name, module in peft_model.named_modules():
        if hasattr(module, "boft_R") and hasattr(module, "base_layer"):
            rotation, scale = module.get_delta_weight("default")
            w0 = module.get_base_layer().weight
            theirs = scale * (w0 @ rotation.T) - w0  # PEFT merges W0 into s ⊙ (W0 Rᵀ)
            layer = name[len("base_model.model.") :]
            torch.testing.assert_close(ours[layer], theirs, rtol=0, atol=1e-5, msg=layer)
    model.set_adapter("imported")
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, peft_model(IDS).logits, rtol=0, atol=1e-5)


# ----- to-peft -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "config",
    [
        LoraConfig(targets="q_proj,v_proj", r=3),
        BoftConfig(targets="q_proj,down_proj", block_size=4),
    ],
    ids=["lora", "boft"],
)
def test_to_peft_names_the_local_base_and_suffix_targets(config, tmp_path, monkeypatch):
    monkeypatch.setenv("SVDA_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    base = tiny_base_folder(tmp_path / "base")
    model = AdapterModel(LlamaForCausalLM.from_pretrained(base).eval())
    model.add_adapter("a", config)
    perturb(model, "a")
    (tmp_path / "a.svda").write_bytes(export_adapter(model, "a"))
    out = tmp_path / "peft"
    assert main(["to-peft", str(tmp_path / "a.svda"), "--base", str(base), "--out", str(out)]) == 0
    written = json.loads((out / "adapter_config.json").read_text())
    assert written["base_model_name_or_path"] == str(base.resolve())
    assert sorted(written["target_modules"]) == sorted(config.targets.split(","))
    peft_model = AutoPeftModelForCausalLM.from_pretrained(out).eval()  # the base, offline
    model.set_adapter("a")
    with torch.no_grad():
        torch.testing.assert_close(peft_model(IDS).logits, model(IDS).logits, rtol=0, atol=1e-5)


def test_to_peft_targets_a_regex_when_suffixes_would_select_more(tmp_path):
    model = AdapterModel(tiny_llama())
    model.add_adapter("a", LoraConfig(targets=r"re:model\.layers\.0\.self_attn\.q_proj", r=2))
    perturb(model, "a")
    export_peft(model, "a", tmp_path)
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert isinstance(written["target_modules"], str)
    peft_model = PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    assert sorted(peft_deltas(peft_model)) == ["model.layers.0.self_attn.q_proj"]
    model.set_adapter("a")
    with torch.no_grad():
        torch.testing.assert_close(peft_model(IDS).logits, model(IDS).logits, rtol=0, atol=1e-5)


def test_to_peft_with_the_default_base_writes_its_local_folder(tmp_path, monkeypatch):
    """Without --base the embedded SmolLM2 is used: the folder svda converted it into (under
    $SVDA_HOME) is written, never null (stood in for here by a tiny base)."""
    import svda.adapters_store.cli as cli
    from svda.runtime import load_base_model

    base = tiny_base_folder(tmp_path / "converted-default")
    monkeypatch.setattr(cli, "load_base_model", lambda path: load_base_model(path or base))
    model = AdapterModel(LlamaForCausalLM.from_pretrained(base).eval())
    model.add_adapter("a", LoraConfig(targets="q_proj", r=2))
    (tmp_path / "a.svda").write_bytes(export_adapter(model, "a"))
    assert main(["to-peft", str(tmp_path / "a.svda"), "--out", str(tmp_path / "peft")]) == 0
    written = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert written["base_model_name_or_path"] == str(base.resolve())
