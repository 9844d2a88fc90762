"""Uploads, the store listing, adapter memory RPCs, eviction and reload over gRPC."""

from __future__ import annotations

from svda.client import Client
from tests.server.grpc_fixtures import grpc_server, metric, target


def test_upload_list_and_serve(tiny_base, store, adapter_bytes, tmp_path):
    path = tmp_path / "mine.svda"
    path.write_bytes(adapter_bytes["svda-b"])
    with grpc_server(tiny_base, store) as server, Client(target(server)) as client:
        entry = client.upload_adapter(path, "mine", tags=["prod"])
        assert (entry.adapter_id, entry.version, entry.method) == ("mine", 1, "svda")
        assert entry.compatible and not entry.resident and "prod" in entry.tags
        assert entry.size_bytes == len(adapter_bytes["svda-b"]) and entry.tenant is None
        again = client.upload_adapter(adapter_bytes["svda-b"], "mine")
        assert again.version == 2
        base = client.generate("hi", max_new_tokens=4)
        served = client.generate("hi", adapter="mine", max_new_tokens=4)
        assert served.adapter_id == "mine" and served.text != base.text
        listed = {(e.adapter_id, e.version): e for e in client.list_adapters(all_versions=True)}
        assert set(listed) == {("lora-a", 1), ("svda-b", 1), ("mine", 1), ("mine", 2)}
        assert listed["mine", 2].resident and not listed["mine", 1].resident
        assert [e.adapter_id for e in client.list_adapters(resident_only=True)] == ["mine"]
        assert [e.adapter_id for e in client.list_adapters(tag="prod")] == []  # latest: v2
        assert [e.adapter_id for e in client.list_adapters(method="lora")] == ["lora-a"]


def test_load_pin_unload(tiny_base, store):
    with grpc_server(tiny_base, store) as server, Client(target(server)) as client:
        loaded = client.load_adapter("lora-a")
        assert loaded.adapter_id == "lora-a" and loaded.bytes > 0 and not loaded.pinned
        assert client.pin_adapter("svda-b").pinned
        resident = {e.adapter_id: e for e in client.list_adapters(resident_only=True)}
        assert set(resident) == {"lora-a", "svda-b"} and resident["svda-b"].pinned
        assert not client.pin_adapter("svda-b", pinned=False).pinned
        assert client.unload_adapter("lora-a") is True
        assert client.unload_adapter("lora-a") is False
        assert [e.adapter_id for e in client.list_adapters(resident_only=True)] == ["svda-b"]
        assert metric(server, "svda_resident_adapters") == 1


def test_eviction_and_reload_under_a_small_budget(tiny_base, store):
    with grpc_server(tiny_base, store) as probe, Client(target(probe)) as client:
        sizes = {a: client.load_adapter(a).bytes for a in ("lora-a", "svda-b")}
    budget = max(sizes.values()) + 1  # room for one adapter at a time
    with (
        grpc_server(tiny_base, store, adapter_memory_bytes=budget) as server,
        Client(target(server)) as client,
    ):
        first = client.generate("hi", adapter="lora-a", max_new_tokens=4)
        client.generate("hi", adapter="svda-b", max_new_tokens=4)
        resident = [e.adapter_id for e in client.list_adapters(resident_only=True)]
        assert resident == ["svda-b"]  # lora-a was evicted (LRU)
        again = client.generate("hi", adapter="lora-a", max_new_tokens=4)
        assert again.text == first.text  # reloaded from the store, same output
        assert metric(server, "svda_adapter_evictions_total") >= 2


def test_async_client_adapter_calls(tiny_base, store, adapter_bytes):
    import asyncio

    from svda.client import AsyncClient, NotFound

    async def run(address: str):
        async with AsyncClient(address, timeout=30) as client:
            entry = await client.upload_adapter(adapter_bytes["lora-a"], "async-up", ["t"])
            loaded = await client.load_adapter("async-up")
            pinned = await client.pin_adapter("async-up")
            resident = await client.list_adapters(resident_only=True)
            unloaded = await client.unload_adapter("async-up")
            info = await client.info()
            try:
                await client.load_adapter("missing")
                missing = None
            except NotFound as exc:
                missing = exc
            return entry, loaded, pinned, resident, unloaded, info, missing

    with grpc_server(tiny_base, store) as server:
        entry, loaded, pinned, resident, unloaded, info, missing = asyncio.run(run(target(server)))
    assert entry.version == 1 and loaded.adapter_id == "async-up" and pinned.pinned
    assert [e.adapter_id for e in resident] == ["async-up"] and unloaded is True
    assert info.max_upload_bytes == 64 << 20 and "lora" in info.methods
    assert missing is not None and "missing" in missing.message
