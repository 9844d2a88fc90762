"""Pieces of the cluster without a running cluster: the store service and what replicas read
through it (the ingress's store, tenant rules, bytes checked again on arrival), and the ingress's
answer when a replica dies in the middle of a stream (UNAVAILABLE, not RESOURCE_EXHAUSTED)."""

from __future__ import annotations

import dataclasses
import threading

import grpc
import pytest

from svda.adapters_store import AdapterStore, publish_adapter
from svda.adapters_store.store_types import AdapterNotFound, CorruptObjectError
from svda.server.cluster.store_service import RemoteStore, StoreService
from svda.server.domain import (
    Completion,
    GenerationRequest,
    SamplingParams,
    ServerInfo,
    TokenChunk,
    Unavailable,
)
from svda.server.interceptor import status_of
from tests.server.cluster.conftest import NO_RAY


class _LocalRemoteStore(RemoteStore):
    """A replica's store whose service runs in this process (what Ray would carry, copied)."""

    def __init__(self, service: StoreService, tamper: bool = False) -> None:
        super().__init__("svda")
        self.service, self.tamper = service, tamper

    def _call(self, method: str, *args):
        result = getattr(self.service, method)(*args)
        if isinstance(result, bytes) and self.tamper:
            result = result[:-1] + bytes([result[-1] ^ 1])  # one bit flipped on the way
        if isinstance(result, BaseException):
            raise result
        return result


def test_replicas_read_entries_and_bytes_from_the_ingress_store(tmp_path, adapter_bytes):
    store = AdapterStore(tmp_path / "store")
    publish_adapter(store, adapter_bytes["lora-a"], "shared")
    publish_adapter(store, adapter_bytes["svda-b"], "mine", tenant="acme")
    service = StoreService(str(store.root))
    remote = _LocalRemoteStore(service)
    entry = remote.get("mine", tenant="acme")
    assert entry == store.get("mine", tenant="acme")
    assert remote.read_bytes(entry) == adapter_bytes["svda-b"]
    assert service.stats() == {"acme/mine@1": 1}
    assert remote.get("shared", tenant="globex").id == "shared"  # shared ones: every tenant
    with pytest.raises(AdapterNotFound):  # another tenant's: as absent, as on one server
        remote.get("mine", tenant="globex")
    with pytest.raises(CorruptObjectError, match="as received"):
        _LocalRemoteStore(service, tamper=True).read_bytes(entry)


class _DyingStream:
    """A replica stream that sends ``batches`` then dies as Ray reports it."""

    def __init__(self, batches: list) -> None:
        self.batches = batches

    def __aiter__(self):
        return self._events()

    async def _events(self):
        import ray.exceptions

        for batch in self.batches:
            yield batch
        raise ray.exceptions.ActorDiedError()

    def cancel(self) -> None:
        pass


class _DyingHandle:
    """A deployment handle whose every replica dies mid-stream, after ``batches``."""

    def __init__(self, batches: list) -> None:
        self.batches, self.calls = batches, 0
        self.generate = self

    def options(self, **_):
        return self

    def remote(self, *_):
        self.calls += 1
        return _DyingStream(self.batches)


def _run(engine, request: GenerationRequest) -> list:
    events, done = [], threading.Event()

    def on_event(event) -> None:
        events.append(event)
        if isinstance(event, (BaseException, Completion)):
            done.set()

    engine.submit(request, on_event)
    assert done.wait(30), "the cluster engine did not finish the request"
    return events


def test_a_replica_dying_mid_stream_ends_unavailable(tmp_path):
    pytest.importorskip("ray.serve", reason=NO_RAY)
    from svda.server.cluster.engine import ClusterEngine

    info = ServerInfo("tiny", "f" * 64, ("lora",), 128, 64, 4, 1 << 20, 1 << 20, "0")
    request = GenerationRequest(adapter_id=None, prompt="hi", params=SamplingParams(8))
    chunk = TokenChunk(text="ab", token_ids=(5, 6))
    mid, early = _DyingHandle([[chunk]]), _DyingHandle([])
    last = {}
    for name, handle in (("mid", mid), ("early", early)):
        engine = ClusterEngine(handle, AdapterStore(tmp_path / "store"), timeout_s=30)
        engine._info = info  # no replica to ask
        engine.start()
        try:
            events = _run(engine, dataclasses.replace(request))
        finally:
            engine.stop()
        assert isinstance(events[-1], Unavailable), events
        assert status_of(events[-1])[0] == grpc.StatusCode.UNAVAILABLE
        last[name] = str(events[-1])
    assert mid.calls == 1  # tokens were sent: not sent again (the caller has half an answer)
    assert "died after sending 2 tokens" in last["mid"] and "incomplete" in last["mid"]
    assert early.calls == 3  # nothing was sent yet: sent again twice, then UNAVAILABLE
    assert "died, 3 times" in last["early"]
