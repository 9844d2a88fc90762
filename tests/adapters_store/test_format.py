"""The .svda format: round trips for every method, size, and a corpus of broken files."""

from __future__ import annotations

import contextlib
import json
import re
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save as save_safetensors

from svda.adapters_store import AdapterStore, publish_adapter, read_stored_adapter
from svda.adapters_store.errors import (
    AdapterFormatError,
    AdapterMetadataError,
    BaseMismatch,
    LayerShapeMismatch,
    PayloadError,
    PayloadHashMismatch,
    RegenerationMismatch,
    UnreadableAdapterFile,
    UnsupportedFormatVersion,
)
from svda.adapters_store.format import export_adapter, read_adapter
from svda.adapters_store.loader import CHECKS, load_adapter, verify_adapter
from svda.adapters_store.store import CorruptObjectError
from svda.runtime import AdapterModel, SvdBasisCache
from tests.runtime.helpers import METHOD_CONFIGS, perturb, tiny_gpt2, tiny_llama

TARGETS = {"llama": (tiny_llama, "all-linear"), "gpt2": (tiny_gpt2, "c_attn,c_fc")}


@pytest.fixture(scope="module")
def svd_cache(tmp_path_factory) -> SvdBasisCache:
    return SvdBasisCache(tmp_path_factory.mktemp("svd"))


def trained(method: str, svd_cache, arch: str = "llama", seed: int = 0) -> AdapterModel:
    make, targets = TARGETS[arch]
    model = AdapterModel(make(seed), svd_cache=svd_cache)
    model.add_adapter("a", METHOD_CONFIGS[method](targets))
    perturb(model, "a")
    return model


def fresh(svd_cache, arch: str = "llama", seed: int = 0) -> AdapterModel:
    return AdapterModel(TARGETS[arch][0](seed), svd_cache=svd_cache)


def logits(model: AdapterModel, name: str) -> torch.Tensor:
    model.set_adapter(name)
    with torch.no_grad():
        return model(torch.arange(12).view(2, 6)).logits


@pytest.mark.parametrize("arch", list(TARGETS))
@pytest.mark.parametrize("method", list(METHOD_CONFIGS))
def test_round_trip_gives_identical_outputs(method, arch, svd_cache):
    source = trained(method, svd_cache, arch)
    data = export_adapter(source, "a", name="acme", tags=["t1"], user_metadata={"k": "v"})
    target = fresh(svd_cache, arch)
    header = load_adapter(data, target)
    assert header.name == "acme" and header.tags == ["t1"] and header.user_metadata == {"k": "v"}
    torch.testing.assert_close(logits(target, "acme"), logits(source, "a"), rtol=0, atol=0)


@pytest.mark.parametrize("method", list(METHOD_CONFIGS))
def test_loaded_adapters_are_frozen_unless_trainable_and_export_identically(method, svd_cache):
    data = export_adapter(trained(method, svd_cache), "a")
    payload_hash = read_adapter(data).header.payload_sha256
    target = fresh(svd_cache)
    load_adapter(data, target, "served")
    load_adapter(data, target, "tuned", trainable=True)
    assert target.is_frozen("served") and not target.is_frozen("tuned")
    assert not any(p.requires_grad for p in target.adapter_parameters("served").values())
    assert any(p.requires_grad for p in target.adapter_parameters("tuned").values())
    for name in ("served", "tuned"):
        assert read_adapter(export_adapter(target, name)).header.payload_sha256 == payload_hash
    torch.testing.assert_close(logits(target, "served"), logits(target, "tuned"), rtol=0, atol=0)


def test_pruning_applies_after_the_probe_check(svd_cache):
    source = trained("svda", svd_cache)
    data = export_adapter(source, "a")
    target = fresh(svd_cache)
    load_adapter(data, target, "exact", probe="always")
    load_adapter(data, target, "pruned", probe="always", prune_tolerance=0.3)
    exact, pruned = target.get_delta_weights("exact"), target.get_delta_weights("pruned")
    assert any(not torch.equal(exact[k], pruned[k]) for k in exact)
    for k, delta in exact.items():
        assert torch.linalg.norm(pruned[k] - delta) <= 0.3 * torch.linalg.norm(delta) + 1e-6


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_payload_loads_and_verifies(dtype, svd_cache):
    source = trained("svda", svd_cache)
    data = export_adapter(source, "a", dtype=dtype)
    assert read_adapter(data).tensors["svda_b"].dtype == getattr(torch, dtype)
    target = fresh(svd_cache)
    load_adapter(data, target)
    torch.testing.assert_close(logits(target, "a"), logits(source, "a"), rtol=0, atol=5e-3)


@pytest.mark.parametrize("method", list(METHOD_CONFIGS))
def test_file_is_payload_plus_a_small_header_and_no_frozen_tensor(method, svd_cache):
    model = trained(method, svd_cache)
    adapter_file = read_adapter(export_adapter(model, "a"))
    stored = sum(p.numel() for p in model.adapter_parameters("a").values())
    assert adapter_file.parameter_count == stored
    assert adapter_file.size - adapter_file.payload_bytes < 4096
    assert set(adapter_file.tensors) == {k.rsplit(".", 1)[1] for k in model.adapter_parameters("a")}


def test_export_is_deterministic_but_for_the_creation_time(svd_cache):
    model = trained("vera", svd_cache)
    first, second = (
        read_adapter(export_adapter(model, "a")),
        read_adapter(export_adapter(model, "a")),
    )
    assert first.header.model_copy(update={"created": ""}) == second.header.model_copy(
        update={"created": ""}
    )


# ----- the corpus of broken files ---------------------------------------------------------------
@pytest.fixture(scope="module")
def good(svd_cache) -> bytes:
    return export_adapter(trained("svda", svd_cache), "a")


def rewrite(data: bytes, edit_tensors=None, edit_meta=None) -> bytes:
    """Re-save ``data`` after editing its tensors or its metadata dict."""
    adapter_file = read_adapter(data)
    tensors = dict(adapter_file.tensors)
    meta = adapter_file.header.to_safetensors_metadata()
    if edit_tensors:
        edit_tensors(tensors)
    if edit_meta:
        edit_meta(meta)
    return save_safetensors(tensors, metadata=meta)


def edit_header(field, value):
    def edit(meta):
        head = json.loads(meta["svda.header"])
        head[field] = value
        meta["svda.header"] = json.dumps(head)

    return edit


def flip(data: bytes, start: int, stop: int) -> bytes:
    out = bytearray(data)
    for i in range(start, stop):
        out[i] ^= 0xFF
    return bytes(out)


def header_length(data: bytes) -> int:
    return struct.unpack("<Q", data[:8])[0]


BROKEN = {
    "empty": (lambda d: b"", UnreadableAdapterFile),
    "truncated": (lambda d: d[: len(d) // 2], UnreadableAdapterFile),
    "truncated-in-payload": (lambda d: d[:-10], UnreadableAdapterFile),
    "flipped-header-bytes": (lambda d: flip(d, 20, 40), UnreadableAdapterFile),
    "flipped-payload-bytes": (lambda d: flip(d, len(d) - 40, len(d) - 20), PayloadHashMismatch),
    "header-length-lies": (lambda d: struct.pack("<Q", len(d)) + d[8:], UnreadableAdapterFile),
    "huge-header": (lambda d: struct.pack("<Q", 1 << 40) + d[8:], UnreadableAdapterFile),
    "no-svda-metadata": (lambda d: save_safetensors(read_adapter(d).tensors), AdapterMetadataError),
    "unknown-version": (
        lambda d: rewrite(d, edit_meta=edit_header("format_version", 99)),
        UnsupportedFormatVersion,
    ),
    "invalid-field": (
        lambda d: rewrite(d, edit_meta=edit_header("base_fingerprint", "xyz")),
        AdapterMetadataError,
    ),
    "unknown-method": (
        lambda d: rewrite(d, edit_meta=edit_header("config", {"method": "nope"})),
        AdapterMetadataError,
    ),
    "wrong-dtype": (
        lambda d: rewrite(d, lambda t: t.update(svda_b=t["svda_b"].double())),
        PayloadError,
    ),
    "nan": (lambda d: rewrite(d, lambda t: t["svda_b"].__setitem__(0, float("nan"))), PayloadError),
    "inf": (lambda d: rewrite(d, lambda t: t["svda_s"].__setitem__(1, float("inf"))), PayloadError),
    "missing-tensor": (lambda d: rewrite(d, lambda t: t.pop("svda_s")), PayloadError),
    "extra-tensor": (lambda d: rewrite(d, lambda t: t.update(U=torch.zeros(3))), PayloadError),
    "short-tensor": (
        lambda d: rewrite(d, lambda t: t.update(svda_b=t["svda_b"][:-1].clone())),
        PayloadError,
    ),
    "edited-values": (lambda d: rewrite(d, lambda t: t["svda_b"].add_(1.0)), PayloadHashMismatch),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_file_gives_its_specific_error(case, good, svd_cache):
    damage, error = BROKEN[case]
    target = fresh(svd_cache)
    with pytest.raises(error) as info:
        load_adapter(damage(good), target)
    assert str(info.value)
    assert target.adapter_names() == []  # nothing half-attached


def test_wrong_base_names_both_fingerprints(good, svd_cache):
    other = fresh(svd_cache, seed=1)
    with pytest.raises(BaseMismatch) as info:
        load_adapter(good, other)
    ours = read_adapter(good).header.base_fingerprint
    assert ours[:16] in str(info.value) and other.fingerprint.whole[:16] in str(info.value)


def test_wrong_architecture_is_a_shape_error(good, svd_cache):
    with pytest.raises(LayerShapeMismatch):
        load_adapter(good, fresh(svd_cache, arch="gpt2"))


def with_header(data: bytes, **update) -> bytes:
    header = read_adapter(data).header.model_copy(update=update)
    return rewrite(data, edit_meta=lambda meta: meta.update(header.to_safetensors_metadata()))


BAD_LAYER_FIELDS = [
    ("d_out", 0, "layers.1.d_out: must be a positive integer"),
    ("d_in", 2.5, "layers.1.d_in: must be a positive integer"),
    ("d_out", True, "layers.1.d_out: must be a positive integer"),
    ("name", "", "layers.1.name: must be a string"),
    ("fingerprint", "XYZ", "layers.1.fingerprint: must be 16 to 64 lowercase hex"),
    ("params", {"svda_s": [-1]}, "layers.1.params: must map tensor kinds"),
    ("params", [1, 2], "layers.1.params: must map tensor kinds"),
    ("delta_norm", float("nan"), "layers.1.delta_norm: must be finite"),
    ("delta_norm", -1.0, "layers.1.delta_norm: must be finite"),
]


@pytest.mark.parametrize(("field", "value", "message"), BAD_LAYER_FIELDS)
def test_invalid_layer_table_entries_are_metadata_errors(field, value, message, good):
    layers = read_adapter(good).header.layers
    setattr(layers[1], field, value)
    with pytest.raises(AdapterMetadataError, match=re.escape(message)):
        read_adapter(with_header(good, layers=layers))


def test_stored_adapter_is_checked_by_its_content_address(good, tmp_path):
    """From a store, the object's SHA-256 (recorded when publish_adapter validated the bytes)
    stands in for the payload hash: same tensors, and a damaged object is refused."""
    store = AdapterStore(tmp_path / "store")
    entry = publish_adapter(store, good, "stored")
    stored, direct = read_stored_adapter(store, entry), read_adapter(good)
    assert stored.header == direct.header and stored.tensors.keys() == direct.tensors.keys()
    for kind, tensor in direct.tensors.items():
        assert torch.equal(stored.tensors[kind], tensor)
    Path(entry.path).write_bytes(rewrite(good, lambda t: t["svda_b"].add_(1.0)))
    with pytest.raises(CorruptObjectError, match="corrupt"):
        read_stored_adapter(store, entry)


def test_files_of_one_layout_share_a_bank_and_a_decoded_layer_table(svd_cache):
    model = trained("svda", svd_cache)
    files = [export_adapter(model, "a")]
    perturb(model, "a", seed=1)
    files.append(export_adapter(model, "a"))
    headers = [read_adapter(data).header for data in files]
    assert headers[0].encoded_layer_table == headers[1].encoded_layer_table is not None
    assert headers[0].layers[0].probe != headers[1].layers[0].probe  # per-file probes
    target = fresh(svd_cache)
    for i, data in enumerate(files):
        load_adapter(data, target, f"x{i}")
    assert len(target.banks) == 1
    torch.testing.assert_close(logits(target, "x1"), logits(model, "a"), rtol=0, atol=1e-5)


def test_probe_detects_frozen_tensors_that_do_not_reproduce(good, svd_cache):
    """An exporter whose frozen tensors were not bit-identical to ours (another machine), and
    whose ΔW differs from what we regenerate: the probe refuses it."""
    layers = read_adapter(good).header.layers
    layers[0].probe[0] += 10 * max(layers[0].delta_norm, 1.0) * 1e-3
    skewed = with_header(good, layers=layers, frozen_sha256="0" * 64)
    target = fresh(svd_cache)
    with pytest.raises(RegenerationMismatch, match="could not be reproduced"):
        load_adapter(skewed, target)
    assert target.adapter_names() == []


@pytest.mark.parametrize(
    ("identity", "probe", "probes_run"),
    [("same", "auto", 0), ("same", "always", 1), ("other", "auto", 1), ("", "auto", 1)],
)
def test_probe_is_skipped_only_for_bit_identical_frozen_tensors(
    identity, probe, probes_run, good, svd_cache, monkeypatch
):
    from svda.adapters_store import loader

    calls = []
    real = loader.check_probe
    monkeypatch.setattr(loader, "check_probe", lambda *a: calls.append(1) or real(*a))
    frozen = {"same": read_adapter(good).header.frozen_sha256, "other": "1" * 64, "": ""}[identity]
    assert len(read_adapter(good).header.frozen_sha256) == 64
    load_adapter(with_header(good, frozen_sha256=frozen), fresh(svd_cache), probe=probe)
    assert len(calls) == probes_run


def test_verify_reports_every_check(good, svd_cache):
    report = verify_adapter(good, fresh(svd_cache))
    assert [r.check for r in report] == list(CHECKS) and all(r.ok for r in report)
    bad = verify_adapter(good, fresh(svd_cache, seed=1))
    assert [(r.check, r.ok) for r in bad][-2:] == [
        ("base-fingerprint", False),
        ("regeneration-probe", False),
    ]
    assert bad[-1].message == "skipped"
    unknown = BROKEN["unknown-version"][0](good)
    early = [(r.check, r.ok) for r in verify_adapter(unknown, fresh(svd_cache))][:4]
    assert early == [
        ("readable", True),
        ("metadata", True),
        ("format-version", False),
        ("payload", False),
    ]


def test_missing_file_is_unreadable(tmp_path):
    with pytest.raises(UnreadableAdapterFile, match="cannot read"):
        read_adapter(tmp_path / "nope.svda")


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_fuzzed_files_load_or_fail_cleanly(good, svd_cache, data):
    blob = bytearray(good)
    for _ in range(data.draw(st.integers(1, 8))):
        blob[data.draw(st.integers(0, len(blob) - 1))] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        blob = blob[: data.draw(st.integers(0, len(blob)))]
    with contextlib.suppress(AdapterFormatError):
        load_adapter(bytes(blob), fresh(svd_cache))


def test_exported_files_are_format_2_with_a_content_hash(good):
    adapter_file = read_adapter(good)
    assert adapter_file.header.format_version == 2 and adapter_file.header.content_hashed
    with pytest.raises(UnreadableAdapterFile, match=r"not a \.svda adapter file"):
        read_adapter(b"just some text, not an adapter\n")
