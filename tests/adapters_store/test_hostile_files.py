"""Hostile .svda files: deep nesting, inflation bombs, edited headers, probes switched off, and
a seeded mutator. Every read / load / verify either succeeds with the adapter's behaviour
unchanged or raises an ``AdapterFormatError`` subclass, with bounded memory."""

from __future__ import annotations

import base64
import json
import random
import struct
import tracemalloc
import zlib
from collections.abc import Callable

import pytest
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from svda.adapters_store.errors import (
    AdapterFormatError,
    AdapterMetadataError,
    HeaderHashMismatch,
    RegenerationMismatch,
    UnreadableAdapterFile,
)
from svda.adapters_store.format import export_adapter, payload_sha256, read_adapter
from svda.adapters_store.header import content_sha256
from svda.adapters_store.loader import load_adapter, verify_adapter
from svda.runtime import AdapterModel, SvdBasisCache
from tests.runtime.helpers import METHOD_CONFIGS, perturb, tiny_llama

MAX_PEAK_BYTES = 16 << 20  # tracemalloc peak allowed for reading one hostile file
TOKENS = torch.arange(12).view(2, 6)


@pytest.fixture(scope="module")
def svd_cache(tmp_path_factory) -> SvdBasisCache:
    return SvdBasisCache(tmp_path_factory.mktemp("svd"))


def trained(method: str, svd_cache: SvdBasisCache) -> AdapterModel:
    model = AdapterModel(tiny_llama(0), svd_cache=svd_cache)
    model.add_adapter("a", METHOD_CONFIGS[method]("all-linear"))
    perturb(model, "a")
    return model


@pytest.fixture(scope="module")
def good(svd_cache) -> bytes:
    return export_adapter(trained("svda", svd_cache), "a")


@pytest.fixture(scope="module")
def good_lora(svd_cache) -> bytes:
    return export_adapter(trained("lora", svd_cache), "a")


@pytest.fixture(scope="module")
def target(svd_cache) -> AdapterModel:
    return AdapterModel(tiny_llama(0), svd_cache=svd_cache)


def logits(model: AdapterModel, name: str) -> torch.Tensor:
    model.set_adapter(name)
    with torch.no_grad():
        return model(TOKENS).logits


# ----- file surgery (what an attacker does: no svda code involved) -----------------------------
def split(data: bytes) -> tuple[dict, dict[str, str], dict[str, torch.Tensor]]:
    (n,) = struct.unpack("<Q", data[:8])
    top = json.loads(data[8 : 8 + n])
    return top, dict(top.get("__metadata__", {})), load_safetensors(data)


def rebuild(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> bytes:
    return save_safetensors(tensors, metadata=meta)


def edit(
    data: bytes,
    head: Callable[[dict], None] | None = None,
    meta_edit: Callable[[dict], None] | None = None,
    tensors_edit: Callable[[dict], None] | None = None,
    rehash: bool = False,
) -> bytes:
    """Edit the svda.header fields, the metadata map or the tensors; ``rehash`` recomputes the
    payload hash and the content hash, as an attacker who knows the format can."""
    _, meta, tensors = split(data)
    tensors = dict(tensors)
    fields = json.loads(meta["svda.header"])
    if head:
        head(fields)
    if tensors_edit:
        tensors_edit(tensors)
    if rehash:
        fields["payload_sha256"] = payload_sha256(tensors)
    meta["svda.header"] = json.dumps(fields)
    if meta_edit:
        meta_edit(meta)
    if rehash:
        meta["svda.content_sha256"] = content_sha256(json.loads(meta["svda.header"]), meta)
    return rebuild(tensors, meta)


def set_field(key: str, value) -> Callable[[dict], None]:
    return lambda fields: fields.__setitem__(key, value)


def table(meta: dict[str, str]) -> dict:
    return json.loads(zlib.decompress(base64.b64decode(meta["svda.layers"])))


def pack_table(text: bytes) -> str:
    return base64.b64encode(zlib.compress(text, 9)).decode()


def probes(meta: dict[str, str]) -> list[float]:
    blob = base64.b64decode(meta["svda.probes"])
    return list(struct.unpack(f"<{len(blob) // 4}f", blob))


def pack_probes(values: list[float]) -> str:
    return base64.b64encode(struct.pack(f"<{len(values)}f", *values)).decode()


def deep(depth: int, opener: str = "[", closer: str = "]") -> str:
    return opener * depth + closer * depth


# ----- deep nesting, huge lists, inflation ------------------------------------------------------
def raw_header(text: str, rest: bytes = b"") -> bytes:
    body = text.encode()
    return struct.pack("<Q", len(body)) + body + rest


NESTED = {
    "safetensors-header": lambda d: raw_header('{"x":' + deep(200_000) + "}"),
    "svda.header": lambda d: edit(d, set_field("config", json.loads(deep(50)))),
    "svda.header-raw": lambda d: edit(
        d, meta_edit=lambda m: m.__setitem__("svda.header", deep(5000, '{"a":', "}"))
    ),
    "layer-table": lambda d: edit(
        d, meta_edit=lambda m: m.__setitem__("svda.layers", pack_table(deep(200_000).encode()))
    ),
}


@pytest.mark.parametrize("case", list(NESTED))
def test_deep_nesting_is_refused_before_parsing(case, good):
    with pytest.raises(AdapterFormatError) as info:
        read_adapter(NESTED[case](good))
    assert not isinstance(info.value.__cause__, RecursionError)
    assert "nests deeper" in str(info.value) or "limit" in str(info.value)


def test_brackets_inside_strings_do_not_count_as_nesting(good):
    text = "[{" * 20_000
    adapter_file = read_adapter(edit(good, set_field("user_metadata", {"k": text})))
    assert adapter_file.header.user_metadata == {"k": text}


def inflation_bomb(good: bytes, megabytes: int) -> bytes:
    """A layer table that inflates to ``megabytes`` MB of a 'name' column (a few hundred KB)."""
    zipper = zlib.compressobj(9)
    chunk = b'"a",' * (1 << 18)
    parts = [zipper.compress(b'{"name":[')]
    parts += [zipper.compress(chunk) for _ in range(megabytes)]
    parts.append(zipper.compress(b'"a"],"d_out":[],"d_in":[],"fingerprint":[],"params":[]}'))
    parts.append(zipper.flush())
    packed = base64.b64encode(b"".join(parts)).decode()
    return edit(good, meta_edit=lambda m: m.__setitem__("svda.layers", packed), rehash=True)


def peak_bytes(action: Callable[[], object]) -> int:
    tracemalloc.start()
    try:
        action()
    except AdapterFormatError:
        pass
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak


HUGE = {
    "inflation-bomb": lambda d: inflation_bomb(d, 240),
    "60k-layers-small-table": lambda d: edit(
        d,
        meta_edit=lambda m: m.__setitem__(
            "svda.layers",
            pack_table(
                json.dumps(
                    {
                        c: [v] * 60_000
                        for c, v in (
                            ("name", "a"),
                            ("d_out", 1),
                            ("d_in", 1),
                            ("fingerprint", "0" * 16),
                            ("params", {}),
                        )
                    }
                ).encode()
            ),
        ),
    ),
    "huge-tags": lambda d: edit(d, set_field("tags", ["t"] * 50_000)),
    "huge-probe-blob": lambda d: edit(
        d, meta_edit=lambda m: m.__setitem__("svda.probes", pack_probes([0.0] * 150_000))
    ),
    "huge-dims": lambda d: edit(
        d,
        meta_edit=lambda m: m.__setitem__(
            "svda.layers",
            pack_table(
                json.dumps({**table(m), "params": [{"svda_s": [1 << 19, 1 << 19]}] * 14}).encode()
            ),
        ),
        rehash=True,
    ),
    "rank-10-shapes": lambda d: edit(
        d,
        meta_edit=lambda m: m.__setitem__(
            "svda.layers",
            pack_table(json.dumps({**table(m), "params": [{"svda_s": [1] * 10}] * 14}).encode()),
        ),
    ),
    "many-kinds": lambda d: edit(
        d,
        meta_edit=lambda m: m.__setitem__(
            "svda.layers",
            pack_table(
                json.dumps(
                    {**table(m), "params": [{f"k{i}": [1] for i in range(50)}] * 14}
                ).encode()
            ),
        ),
    ),
}


@pytest.mark.parametrize("case", list(HUGE))
def test_huge_tables_are_refused_with_bounded_memory(case, good):
    hostile = HUGE[case](good)
    assert len(hostile) < 1 << 20  # small files: the danger is what they expand to
    with pytest.raises(AdapterFormatError):
        read_adapter(hostile)
    assert peak_bytes(lambda: read_adapter(hostile)) < MAX_PEAK_BYTES


# ----- the header is covered by a hash; the probe cannot be switched off -----------------------
def test_unknown_method_is_refused_at_read_time(good):
    hostile = edit(
        good,
        lambda f: f.update(method="foo", config={**f["config"], "method": "foo"}),
        rehash=True,
    )
    with pytest.raises(AdapterMetadataError, match="'foo' is not registered"):
        read_adapter(hostile)
    report = verify_adapter(hostile, None)
    assert [(r.check, r.ok) for r in report][:2] == [("readable", True), ("metadata", False)]


def test_header_edits_without_the_content_hash_are_refused(good, good_lora):
    alpha = edit(good_lora, lambda f: f["config"].__setitem__("alpha", 9.0))
    for hostile in (
        alpha,
        edit(good, set_field("method", "foo")),
        edit(good, set_field("frozen_sha256", "1" * 64)),
        edit(good, lambda f: f["probe"].__setitem__("seed", 7)),
        edit(good, meta_edit=lambda m: m.__setitem__("svda.probes", pack_probes(probes(m)[::-1]))),
    ):
        with pytest.raises(AdapterMetadataError):
            read_adapter(hostile)
    with pytest.raises(HeaderHashMismatch, match="re-export"):
        read_adapter(alpha)


def test_scaled_payload_with_recomputed_hashes_fails_verify(good, target):
    def scale(tensors):
        tensors["svda_b"] = tensors["svda_b"] * 3

    def huge_norms(meta):
        values = probes(meta)
        values[3::4] = [1e30] * len(values[3::4])
        meta["svda.probes"] = pack_probes(values)

    hostile = edit(good, tensors_edit=scale, meta_edit=huge_norms, rehash=True)
    report = {r.check: r for r in verify_adapter(hostile, target)}
    assert not report["regeneration-probe"].ok
    assert "could not be reproduced" in report["regeneration-probe"].message
    with pytest.raises(RegenerationMismatch):
        load_adapter(hostile, target, "x", probe="always")
    assert "x" not in target.adapter_names()


def test_non_finite_probe_values_are_refused(good):
    for value in (float("nan"), float("inf")):

        def poison(meta, value=value):
            values = probes(meta)
            values[0] = value
            meta["svda.probes"] = pack_probes(values)

        with pytest.raises(AdapterMetadataError, match="finite"):
            read_adapter(edit(good, meta_edit=poison, rehash=True))


def test_probe_tolerance_cannot_be_loosened(good):
    hostile = edit(good, lambda f: f["probe"].__setitem__("tolerance", 0.5), rehash=True)
    with pytest.raises(AdapterMetadataError, match=r"probe\.tolerance"):
        read_adapter(hostile)


def test_lora_alpha_change_with_rehash_is_caught_by_verify(good_lora, target):
    hostile = edit(good_lora, lambda f: f["config"].__setitem__("alpha", 9.0), rehash=True)
    report = {r.check: r for r in verify_adapter(hostile, target)}
    assert not report["regeneration-probe"].ok


def as_version_1(data: bytes, **head) -> bytes:
    def drop_hash(meta):
        meta.pop("svda.content_sha256")

    return edit(data, lambda f: f.update(format_version=1, **head), meta_edit=drop_hash)


def test_version_1_files_load_and_always_run_the_probe(good, good_lora, target, monkeypatch):
    from svda.adapters_store import loader

    calls = []
    real = loader.check_probe
    monkeypatch.setattr(loader, "check_probe", lambda *a: calls.append(1) or real(*a))
    header = load_adapter(as_version_1(good), target, "v1")
    assert header.format_version == 1 and not header.content_hashed and calls == [1]
    target.delete_adapter("v1")
    edited = as_version_1(good_lora)
    edited = edit(edited, lambda f: f["config"].__setitem__("alpha", 9.0))
    with pytest.raises(RegenerationMismatch):
        load_adapter(edited, target, "v1")
    assert "v1" not in target.adapter_names()


def test_version_2_without_content_hash_is_refused(good):
    hostile = edit(good, meta_edit=lambda m: m.pop("svda.content_sha256"))
    with pytest.raises(AdapterMetadataError, match="content_sha256 is missing"):
        read_adapter(hostile)


def test_pruning_uses_recomputed_norms(good, target, monkeypatch):
    def tiny_norms(meta):
        values = probes(meta)
        values[3::4] = [1e-30] * len(values[3::4])
        meta["svda.probes"] = pack_probes(values)

    hostile = edit(good, meta_edit=tiny_norms, rehash=True)
    seen, prune = [], target.prune_adapter
    monkeypatch.setattr(
        target,
        "prune_adapter",
        lambda name, tol, norms=None: seen.append(norms) or prune(name, tol, norms),
    )
    load_adapter(hostile, target, "p", prune_tolerance=0.1)  # probe skipped: frozen identical
    assert seen == [None]  # the model's own norms (bounds or exact), not the file's
    assert min(target.pruning_norms("p").tolist()) > 1e-6
    target.delete_adapter("p")


# ----- not a .svda file at all -----------------------------------------------------------------
@pytest.mark.parametrize(
    "blob",
    [
        b"hello world, this is a text file\n",
        random.Random(3).randbytes(4096),
        b"\x00" * 8,
        b"PK\x03",
    ],
)
def test_non_svda_bytes_say_so_plainly(blob):
    with pytest.raises(UnreadableAdapterFile, match=r"not a \.svda adapter file"):
        read_adapter(blob)


# ----- the seeded mutator -----------------------------------------------------------------------
HOSTILE_VALUES = [
    None,
    -1,
    0,
    2**63,
    1e308,
    float("nan"),
    "",
    "x" * 300,
    [],
    {},
    [1, [2, [3]]],
    {"method": "svda"},
    True,
    deep(30),
]


def _json_value(rng: random.Random):
    value = rng.choice(HOSTILE_VALUES)
    return json.loads(value) if isinstance(value, str) and value.startswith("[[") else value


def mutate(data: bytes, rng: random.Random) -> bytes:
    """One random hostile edit of a valid file."""
    kind = rng.randrange(7)
    (n,) = struct.unpack("<Q", data[:8])
    if kind == 0:  # byte flips anywhere
        out = bytearray(data)
        for _ in range(rng.randint(1, 6)):
            out[rng.randrange(len(out))] ^= 1 << rng.randrange(8)
        return bytes(out)
    if kind == 1:  # byte flips in the header
        out = bytearray(data)
        for _ in range(rng.randint(1, 3)):
            out[8 + rng.randrange(n)] = rng.randrange(256)
        return bytes(out)
    if kind == 2:  # truncation
        return data[: rng.randrange(len(data))]
    if kind == 3:  # a header field set to a hostile value
        _, meta, _ = split(data)
        key = rng.choice([*json.loads(meta["svda.header"]), "extra"])
        return edit(data, set_field(key, _json_value(rng)), rehash=rng.random() < 0.5)
    if kind == 4:  # a layer-table entry set to a hostile value
        _, meta, _ = split(data)
        columns = table(meta)
        column = rng.choice(list(columns))
        columns[column][rng.randrange(len(columns[column]))] = _json_value(rng)
        text = json.dumps(columns).encode()
        return edit(
            data,
            meta_edit=lambda m: m.__setitem__("svda.layers", pack_table(text)),
            rehash=rng.random() < 0.5,
        )
    if kind == 5:  # probe floats
        _, meta, _ = split(data)
        values = probes(meta)
        i = rng.randrange(len(values))
        values[i] = rng.choice([float("nan"), float("inf"), 1e30, -1.0, 0.0, values[i] * 1.5])
        cut = rng.choice([None, None, -1, 1])
        values = values[:cut] if cut else values
        return edit(
            data,
            meta_edit=lambda m: m.__setitem__("svda.probes", pack_probes(values)),
            rehash=rng.random() < 0.5,
        )
    key = rng.choice(["svda.format", "svda.header", "svda.layers", "svda.probes"])
    garbage = rng.choice(["", "{}", "AAAA", "!!", deep(40), base64.b64encode(b"x" * 99).decode()])
    return edit(data, meta_edit=lambda m: m.__setitem__(key, garbage))


def behaviour_unchanged(hostile: bytes, good: bytes) -> bool:
    """A file that passes may differ from ``good`` only in cosmetic fields."""
    ours, theirs = read_adapter(hostile), read_adapter(good)
    same = all(torch.equal(ours.tensors[k], theirs.tensors[k]) for k in theirs.tensors)
    fields = ("method", "config", "payload_dtype", "base_fingerprint")
    return same and all(getattr(ours.header, f) == getattr(theirs.header, f) for f in fields)


def test_seeded_mutations_load_or_fail_cleanly(good, target):
    rng = random.Random(20261202)
    expected = None
    outcomes = {"ok": 0, "refused": 0}
    for case in range(300):
        hostile = mutate(good, rng)
        try:
            read_adapter(hostile)
        except AdapterFormatError:
            outcomes["refused"] += 1
            continue
        try:
            load_adapter(hostile, target, "m", probe="always" if case % 2 else "auto")
        except AdapterFormatError:
            outcomes["refused"] += 1
            continue
        if expected is None:
            load_adapter(good, target, "reference")
            expected = logits(target, "reference")
            target.delete_adapter("reference")
        assert behaviour_unchanged(hostile, good), f"case {case} changed the adapter"
        torch.testing.assert_close(logits(target, "m"), expected, rtol=0, atol=0)
        target.delete_adapter("m")
        outcomes["ok"] += 1
        if case % 5 == 0:
            assert all(r.ok for r in verify_adapter(hostile, target))
    assert outcomes["refused"] > 200 and target.adapter_names() == []


def test_seeded_mutations_verify_never_raises(good, target):
    rng = random.Random(7)
    for _ in range(100):
        report = verify_adapter(mutate(good, rng), target)
        assert len(report) == 8
    assert target.adapter_names() == []
