"""Adapter memory: hot loading, LRU eviction and reload, pinning, loading once, tenants, versions."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from svda.adapters_store import load_adapter, publish_adapter
from svda.adapters_store.store_types import AdapterNotFound
from svda.runtime import AdapterModel, load_base_model
from svda.server.domain import Overloaded, PermissionDenied
from svda.server.engine import EngineSettings
from svda.server.engine.adapters import AdapterManager, Key, key_of
from tests.server.conftest import make_adapter
from tests.server.engine_helpers import metric, reference_tokens, request, running_engine, submit

LORA_BYTES, SVDA_BYTES = 7168, 6656  # float64 tensors of the two fixture adapters


def resident(engine, tenant=None):
    return {(r.adapter_id, r.version): r for r in engine.resident_adapters(tenant)}


def test_adapter_bytes_are_the_tensors_of_the_adapter(tiny_base, store):
    with running_engine(tiny_base, store) as engine:
        assert engine.load_adapter("lora-a").bytes == LORA_BYTES
        assert engine.load_adapter("svda-b").bytes == SVDA_BYTES
        assert metric(engine, "svda_adapter_memory_bytes") == LORA_BYTES + SVDA_BYTES
        assert metric(engine, "svda_resident_adapters") == 2


def test_loads_run_torch_on_one_core_and_other_threads_keep_theirs(tiny_base, store):
    with running_engine(tiny_base, store) as engine:
        before = torch.get_num_threads()
        loader = engine.adapters._pool.submit(torch.get_num_threads)
        assert loader.result(timeout=10) == 1
        engine.load_adapter("svda-b")  # a real load on that pool
        assert torch.get_num_threads() == before  # set per calling thread: this one keeps its


def test_lru_eviction_and_reload_under_a_small_budget(tiny_folder, tiny_base, store, adapter_bytes):
    want = {
        a: reference_tokens(tiny_folder, adapter_bytes[a], "evict", 8) for a in ("lora-a", "svda-b")
    }
    with running_engine(tiny_base, store, adapter_memory_bytes=LORA_BYTES + 100) as engine:
        for adapter_id in ("lora-a", "svda-b", "lora-a", "svda-b"):
            collector = submit(engine, request(adapter_id, "evict", 8))
            collector.wait()
            assert collector.token_ids == want[adapter_id]
            assert set(resident(engine)) == {(adapter_id, 1)}  # the other one was evicted
        assert metric(engine, "svda_adapter_loads_total", result="ok") == 4
        assert metric(engine, "svda_adapter_evictions_total") == 3
        assert sorted(engine.model.configs) == [engine.adapters.name_of(Key("", "svda-b", 1))]


def test_pinned_adapters_stay_and_cannot_overfill_memory(tiny_base, store, adapter_bytes):
    publish_adapter(store, adapter_bytes["lora-a"], "lora-copy")
    budget = 2 * LORA_BYTES + 100  # lora-a pinned + one more
    with running_engine(tiny_base, store, adapter_memory_bytes=budget) as engine:
        assert engine.pin_adapter("lora-a").pinned
        for adapter_id in ("svda-b", "lora-copy", "svda-b"):
            submit(engine, request(adapter_id, "pin", 4)).wait()
            assert ("lora-a", 1) in resident(engine)  # never evicted while pinned
        assert engine.pin_adapter("svda-b").pinned
        with pytest.raises(Overloaded, match="pinned"):
            submit(engine, request("lora-copy", "no room", 4)).wait()
        assert not engine.pin_adapter("svda-b", pinned=False).pinned
        assert submit(engine, request("lora-copy", "room", 4)).wait().completion_tokens > 0
        assert set(resident(engine)) == {("lora-a", 1), ("lora-copy", 1)}


def test_concurrent_first_requests_load_once(tiny_base, store, monkeypatch):
    calls = []
    original = AdapterManager._attach

    def slow_attach(self, entry):
        calls.append(entry.id)
        time.sleep(0.2)  # every other request arrives while this load runs
        return original(self, entry)

    monkeypatch.setattr(AdapterManager, "_attach", slow_attach)
    with running_engine(tiny_base, store) as engine:
        barrier = threading.Barrier(8)
        collectors, loaded = [], []

        def client(i):
            barrier.wait()
            if i % 2:
                loaded.append(engine.load_adapter("svda-b"))
            else:
                collectors.append(submit(engine, request("svda-b", f"concurrent {i}", 4)))

        threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for collector in collectors:
            collector.wait()
    assert calls == ["svda-b"]
    assert len(loaded) == 4 and all(r.version == 1 for r in loaded)
    assert metric(engine, "svda_adapter_loads_total", result="ok") == 1


def test_a_gated_load_starts_when_its_gate_opens(tiny_base, store, monkeypatch):
    """acquire(entry, gate): the load it begins waits for the gate (the vLLM engine hands a
    request to vLLM first); a later acquire of the same adapter shares that load."""
    started = threading.Event()
    original = AdapterManager._attach

    def attach(self, entry):
        started.set()
        return original(self, entry)

    monkeypatch.setattr(AdapterManager, "_attach", attach)
    with running_engine(tiny_base, store) as engine:
        manager, gate = engine.adapters, threading.Event()
        entry = manager.resolve("svda-b")
        future = manager.acquire(entry, gate)
        assert not started.wait(0.3), "the load began before its gate opened"
        assert key_of(entry) in manager.held_keys() - manager.resident_keys()
        assert manager.acquire(entry) is future
        gate.set()
        assert future.result(timeout=30) and started.is_set()
        for _ in range(2):
            manager.release(key_of(entry))


def test_tenants_see_their_own_and_shared_adapters(tiny_base, store, adapter_bytes):
    publish_adapter(store, adapter_bytes["svda-b"], "acme.private", tenant="acme")
    with running_engine(tiny_base, store) as engine:
        assert submit(engine, request("acme.private", "mine", 4, tenant="acme")).wait()
        assert submit(engine, request("lora-a", "shared", 4, tenant="globex")).wait()
        with pytest.raises(AdapterNotFound, match=r"acme\.private"):
            engine.submit(request("acme.private", "not yours", 4, tenant="globex"), print)
        with pytest.raises(AdapterNotFound):
            engine.load_adapter("acme.private", tenant="globex")
        assert ("acme.private", 1) not in resident(engine, tenant="globex")
        assert ("acme.private", 1) in resident(engine, tenant="acme")
        assert ("lora-a", 1) in resident(engine, tenant="globex")
        with pytest.raises(AdapterNotFound):
            engine.unload_adapter("acme.private", tenant="globex")
        with pytest.raises(PermissionDenied, match="shared"):
            engine.pin_adapter("lora-a", tenant="acme")
        assert engine.unload_adapter("acme.private", tenant="acme")
        assert ("acme.private", 1) not in resident(engine)


def test_a_newer_version_is_served_on_the_next_request(tiny_folder, tiny_base, store):
    v2 = make_adapter(tiny_folder, "lora", seed=9)
    want_v2 = reference_tokens(tiny_folder, v2, "versions", 8)
    with running_engine(tiny_base, store) as engine:
        engine.pin_adapter("lora-a")
        first = submit(engine, request("lora-a", "versions", 8))
        first.wait()
        publish_adapter(store, v2, "lora-a")
        second = submit(engine, request("lora-a", "versions", 8))
        second.wait()
        assert second.token_ids == want_v2 != first.token_ids
        versions = resident(engine)
        assert ("lora-a", 1) not in versions  # the old version left once unused
        assert versions[("lora-a", 2)].pinned  # and its pin moved on


def test_unload_detaches_now_or_after_the_running_request(tiny_base, store):
    with running_engine(tiny_base, store) as engine:
        engine.load_adapter("svda-b")
        assert engine.unload_adapter("svda-b")
        assert not resident(engine) and not engine.model.configs
        assert not engine.unload_adapter("svda-b")


def test_svda_adapters_are_served_pruned_by_default_within_the_bound(tiny_base, store):
    assert EngineSettings().svda_prune_tolerance == 0.05
    exact = AdapterModel(load_base_model(tiny_base.source).model)
    load_adapter(store.read_bytes(store.get("svda-b")), exact, "exact")
    with running_engine(tiny_base, store, svda_prune_tolerance=0.3) as engine:
        engine.load_adapter("svda-b")
        name = engine.adapters.name_of(Key("", "svda-b", 1))
        pruned = engine.model.get_delta_weights(name)
    reference = exact.get_delta_weights("exact")
    assert any(not torch.equal(pruned[k], reference[k]) for k in reference)
    for k, delta in reference.items():
        assert torch.linalg.norm(pruned[k] - delta) <= 0.3 * torch.linalg.norm(delta) + 1e-6


def _rows(engine) -> set[tuple[str | None, str]]:
    return {(r.tenant, r.adapter_id) for r in engine.resident_adapters()}


def test_drop_detaches_exactly_one_key_once_no_request_holds_it(tiny_base, store, adapter_bytes):
    publish_adapter(store, adapter_bytes["svda-b"], "lora-a", tenant="acme")  # a namesake
    acme = Key("acme", "lora-a", 1)
    with running_engine(tiny_base, store, start=False, merge_policy="never") as engine:
        engine.load_adapter("lora-a")
        engine.load_adapter("lora-a", tenant="acme")
        engine.pin_adapter("svda-b")
        held = submit(engine, request("lora-a", "held", 4, tenant="acme"))  # queued: holds it
        assert engine.adapters.drop(acme)
        assert ("acme", "lora-a") in _rows(engine)  # stays while the queued request holds it
        assert not engine.adapters.drop(Key("", "svda-b", 1))  # pinned: stays
        assert not engine.adapters.drop(Key("globex", "lora-a", 1))  # not resident
        engine.start()
        assert held.wait().completion_tokens == 4
        deadline = time.monotonic() + 30
        while ("acme", "lora-a") in _rows(engine):  # released just after the completion
            assert time.monotonic() < deadline, "the dropped adapter stayed after its request"
            time.sleep(0.05)
        assert _rows(engine) == {(None, "lora-a"), (None, "svda-b")}  # the namesake stays
        assert engine.adapters.resident_keys() == {Key("", "lora-a", 1), Key("", "svda-b", 1)}
        assert engine.adapters.drop(Key("", "lora-a", 1))
        assert _rows(engine) == {(None, "svda-b")} and not engine.adapters.drop(acme)
