"""Every error path maps to its status code, with a message that says what was wrong, and the
server keeps serving afterwards."""

from __future__ import annotations

import grpc
import pytest

from svda.adapters_store import AdapterStore, publish_adapter
from svda.client import Client, InvalidArgument, SvdaClientError
from tests.server.conftest import make_adapter
from tests.server.grpc_fixtures import grpc_server, metric, target
from tests.tiny_base import tiny_base_folder

S = grpc.StatusCode


@pytest.fixture(scope="module")
def other_base_adapter(tmp_path_factory) -> bytes:
    """An adapter made for another tiny base (same shapes, other weights)."""
    folder = tiny_base_folder(tmp_path_factory.mktemp("other-base"), seed=1, layers=2)
    return make_adapter(folder, "lora", seed=5)


def _corrupt(data: bytes) -> bytes:
    broken = bytearray(data)
    broken[-20] ^= 0xFF  # a payload byte: the payload hash no longer matches
    return bytes(broken)


def _code(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(SvdaClientError) as info:
        call()
    return info.value.code, info.value.message


def test_every_error_status(tiny_base, store, adapter_bytes, other_base_adapter):
    publish_adapter(store, other_base_adapter, "foreign")
    with (
        grpc_server(tiny_base, store, max_upload_bytes=200_000) as server,
        Client(target(server)) as client,
    ):
        cases = {
            "unknown adapter": (lambda: client.generate("hi", adapter="nope"), S.NOT_FOUND, "nope"),
            "unknown load": (lambda: client.load_adapter("nope"), S.NOT_FOUND, "not in the store"),
            "other base": (lambda: client.generate("hi", adapter="foreign"),
                           S.FAILED_PRECONDITION, "base"),
            "other base upload": (lambda: client.upload_adapter(other_base_adapter, "f2"),
                                  S.FAILED_PRECONDITION, "made for base"),
            "corrupt upload": (lambda: client.upload_adapter(_corrupt(adapter_bytes["lora-a"]), "c"),
                               S.INVALID_ARGUMENT, "payload hash"),
            "not an adapter": (lambda: client.upload_adapter(b"hello world", "c"),
                               S.INVALID_ARGUMENT, "header length"),
            "too large": (lambda: client.upload_adapter(bytes(300_000), "big"),
                          S.INVALID_ARGUMENT, "max_upload_bytes"),
            "bad id": (lambda: client.upload_adapter(adapter_bytes["lora-a"], "../x"),
                       S.INVALID_ARGUMENT, "invalid adapter id"),
            "prompt too long": (lambda: client.generate("x" * 300), S.INVALID_ARGUMENT,
                                "context length"),
            "bad top_p": (lambda: client.generate("hi", temperature=1.0, top_p=2.0),
                          S.INVALID_ARGUMENT, "top_p"),
            "bad max_new_tokens": (lambda: client.generate("hi", max_new_tokens=5000),
                                   S.INVALID_ARGUMENT, "max_new_tokens"),
            "empty prompt": (lambda: client.generate(""), S.INVALID_ARGUMENT, "empty"),
            "bad role": (lambda: client.generate(messages=[("robot", "hi")]),
                         S.INVALID_ARGUMENT, "role"),
            "no id": (lambda: client.pin_adapter(""), S.INVALID_ARGUMENT, "adapter_id"),
        }  # fmt: skip
        for what, (call, code, words) in cases.items():
            got, message = _code(call)
            assert got == code, (what, message)
            assert words in message, (what, message)
        assert client.generate("still serving", max_new_tokens=3).completion_tokens == 3
        ids = [e.adapter_id for e in client.list_adapters()]
        assert "c" not in ids and "big" not in ids and "f2" not in ids  # nothing half-written
    assert metric(server, "svda_requests_total", rpc="Generate", status="NOT_FOUND") == 1


def test_overload_is_resource_exhausted(tiny_base, store):
    with grpc_server(tiny_base, store, max_waiting=0) as server, Client(target(server)) as client:
        code, message = _code(lambda: client.generate("hi"))
        assert code == S.RESOURCE_EXHAUSTED and "max_waiting" in message
        assert client.info().max_batch_size == 16  # other RPCs still work


def test_client_rejects_bad_arguments_before_sending():
    with Client("127.0.0.1:1") as client:
        with pytest.raises(ValueError, match="exactly one"):
            client.generate()
        with pytest.raises(ValueError, match="mode"):
            client.generate("hi", mode="sideways")
        with pytest.raises(SvdaClientError) as info:
            client.info(timeout=2)  # nothing listens on port 1
        assert info.value.code in (S.UNAVAILABLE, S.DEADLINE_EXCEEDED)
    assert issubclass(InvalidArgument, SvdaClientError)


def test_corrupt_object_in_store_is_data_loss(tiny_base, tmp_path, adapter_bytes):
    store = AdapterStore(tmp_path / "store2")
    entry = publish_adapter(store, adapter_bytes["lora-a"], "lora-a")
    path = store.root / "objects" / entry.key
    path.write_bytes(_corrupt(path.read_bytes()))
    with grpc_server(tiny_base, store) as server, Client(target(server)) as client:
        code, message = _code(lambda: client.generate("hi", adapter="lora-a"))
        assert code == S.DATA_LOSS and "corrupt" in message
        assert client.generate("base still fine", max_new_tokens=2).completion_tokens == 2
