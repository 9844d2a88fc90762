"""Limits an attacker could push: upload checks, upload memory/stalls/concurrency, sampling
ranges, huge prompts, ids, undecodable messages. Everything runs on loopback, bounded."""

from __future__ import annotations

import ctypes
import threading
import time
from pathlib import Path

import grpc
import pytest
import torch

from svda.adapters_store import loader
from svda.adapters_store.errors import RegenerationMismatch
from svda.client import Client, SvdaClientError
from svda.proto.svda.v1 import serving_pb2 as pb
from svda.proto.svda.v1 import serving_pb2_grpc
from svda.server.domain import InvalidRequest, SamplingParams
from svda.server.engine.sampling import RowSampler
from svda.server.interceptor import status_of
from svda.server.servicer import ServingServicer
from tests.server.grpc_fixtures import grpc_server, target

S = grpc.StatusCode
ACME, GLOBEX = "acme-token-0123456789", "globex-token-0123456789"


def _code(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(SvdaClientError) as info:
        call()
    return info.value.code, info.value.message


def _rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def _staged(store) -> list[str]:
    return [p.name for p in (store.root / "tmp").iterdir()]


@pytest.fixture
def tokens_file(tmp_path):
    path = tmp_path / "tokens.txt"
    path.write_text(f"{ACME} acme\n{GLOBEX} globex\n")
    return path


# ----- upload runs every load check ---------------------------------------------------------------
def test_upload_runs_the_regeneration_probe_and_stores_nothing_on_failure(
    tiny_base, store, adapter_bytes, monkeypatch
):
    probed: list[str] = []

    def failing_probe(adapter_file, model, name):
        probed.append(name)
        raise RegenerationMismatch("layer x: regenerated ΔW differs (test)")

    monkeypatch.setattr(loader, "check_probe", failing_probe)
    with grpc_server(tiny_base, store) as server, Client(target(server)) as client:
        code, message = _code(lambda: client.upload_adapter(adapter_bytes["lora-a"], "probed"))
        assert code == S.INVALID_ARGUMENT and "regenerated" in message
        assert probed  # the probe ran at upload time, not at the first load
        assert "probed" not in {e.adapter_id for e in client.list_adapters()}
        assert client.generate("hi", adapter="lora-a", max_new_tokens=2)  # model left clean
    assert _staged(store) == []


def test_an_unexpected_check_error_is_invalid_argument_not_internal(
    tiny_base, store, adapter_bytes, monkeypatch
):
    def broken_check(adapter_file, model):  # a file no check anticipated
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(loader, "check_shapes", broken_check)
    with grpc_server(tiny_base, store) as server, Client(target(server)) as client:
        code, message = _code(lambda: client.upload_adapter(adapter_bytes["lora-a"], "badcfg"))
        assert code == S.INVALID_ARGUMENT and "cannot be loaded" in message, message
        assert "badcfg" not in {e.adapter_id for e in client.list_adapters()}


def test_verify_wraps_unexpected_errors():
    class Engine:
        def info(self):
            return type("Info", (), {"base_model": "m", "base_fingerprint": "f" * 64})()

        def verify_adapter(self, path):
            raise KeyError("lora_alpha")

    servicer = ServingServicer(Engine(), None, None, 1 << 20)
    with pytest.raises(InvalidRequest) as info:
        servicer._verify("x", Path("/nonexistent"))
    assert status_of(info.value)[0] == S.INVALID_ARGUMENT


# ----- upload memory, stalls, concurrency ------------------------------------------------------
def test_upload_flood_keeps_memory_bounded_and_refuses_extras(tiny_base, store):
    """Two rounds of 12 concurrent 24 MiB uploads: buffered whole they held >= 2 x 24 MiB
    each (1.1 GiB in all, and kept it); streamed to staging files with at most 3 at once, the
    process grows by a bounded amount that does not add up from round to round."""
    size, count, rounds = 24 << 20, 12, 2
    data = bytes(size)  # not an adapter: fails the first check after it is received
    trim = ctypes.CDLL("libc.so.6").malloc_trim  # give freed heap back before measuring
    with grpc_server(
        tiny_base, store, max_upload_bytes=32 << 20, max_concurrent_uploads=3
    ) as server:
        results: list[grpc.StatusCode] = []
        lock = threading.Lock()
        address = target(server)

        def upload(i: int) -> None:
            with Client(address) as client:
                code, _ = _code(lambda: client.upload_adapter(data, f"flood-{i}", timeout=60))
            with lock:
                results.append(code)

        trim(0)
        before = peak = _rss_bytes()
        for _ in range(rounds):
            threads = [threading.Thread(target=upload, args=(i,)) for i in range(count)]
            for t in threads:
                t.start()
            while any(t.is_alive() for t in threads):
                peak = max(peak, _rss_bytes())
                time.sleep(0.01)
            for t in threads:
                t.join()
        trim(0)
        after = _rss_bytes()
        assert len(results) == count * rounds
        assert S.RESOURCE_EXHAUSTED in results  # more than max_concurrent_uploads at once
        assert set(results) <= {S.RESOURCE_EXHAUSTED, S.INVALID_ARGUMENT}
        mib = (before >> 20, peak >> 20, after >> 20)
        # the clients run in this process too (their gRPC buffers count); buffered whole, the
        # server alone held >= 2 x 24 MiB per upload: >= 576 MiB for one round of 12
        assert peak - before < 480 << 20, mib
        assert after - before < 400 << 20, mib
        with Client(address) as client:
            assert client.info().max_batch_size == 16  # still serving
    assert _staged(store) == []


def test_stalled_uploads_time_out_and_free_their_slot(tiny_base, store, adapter_bytes):
    with grpc_server(
        tiny_base, store, upload_stall_timeout_s=0.5, max_concurrent_uploads=1
    ) as server:
        channel = grpc.insecure_channel(target(server))
        stub = serving_pb2_grpc.ServingStub(channel)

        def stalling():
            yield pb.UploadAdapterRequest(header=pb.UploadHeader(adapter_id="slow"))
            yield pb.UploadAdapterRequest(chunk=b"x" * 100)
            time.sleep(5)  # never sends the rest

        start = time.monotonic()
        with pytest.raises(grpc.RpcError) as info:
            stub.UploadAdapter(stalling(), timeout=10)
        assert info.value.code() == S.DEADLINE_EXCEEDED
        assert "upload_stall_timeout_s" in info.value.details()
        assert time.monotonic() - start < 4
        channel.close()
        with Client(target(server)) as client:  # the slot is free again
            assert client.upload_adapter(adapter_bytes["lora-a"], "after-stall").version == 1
    assert _staged(store) == []


def test_upload_over_the_limit_is_refused_while_streaming(tiny_base, store):
    with grpc_server(tiny_base, store, max_upload_bytes=3 << 20) as server:
        channel = grpc.insecure_channel(target(server))
        stub = serving_pb2_grpc.ServingStub(channel)
        sent = []

        def lying():  # the header claims a small file, then the chunks keep coming
            yield pb.UploadAdapterRequest(header=pb.UploadHeader(adapter_id="liar", size_bytes=10))
            for _ in range(50):
                sent.append(1)
                yield pb.UploadAdapterRequest(chunk=bytes(1 << 20))

        with pytest.raises(grpc.RpcError) as info:
            stub.UploadAdapter(lying(), timeout=30)
        assert info.value.code() == S.INVALID_ARGUMENT
        assert "max_upload_bytes" in info.value.details()
        assert len(sent) < 50  # refused before the whole stream arrived
        channel.close()
    assert _staged(store) == []


# ----- sampling, prompts --------------------------------------------------------------------------
@pytest.mark.parametrize(
    "params",
    [
        {"temperature": 1e-300},
        {"repetition_penalty": 1e-300},
        {"temperature": 1.0, "repetition_penalty": 1e-300},
        {"temperature": 1e300},
        {"repetition_penalty": 1e300},
        {"temperature": 1.0, "top_k": 1 << 30},
    ],
)
def test_bad_sampling_values_are_invalid_argument(tiny_base, store, params):
    with grpc_server(tiny_base, store) as server, Client(target(server)) as client:
        code, message = _code(lambda: client.generate("hi", max_new_tokens=2, **params))
        assert code == S.INVALID_ARGUMENT, message
        assert next(iter(params if len(params) == 1 else list(params)[1:])) in message
        assert client.generate("hi", temperature=0.01, max_new_tokens=2).completion_tokens == 2


def test_sampler_survives_overflowing_logits():
    for temperature, penalty in ((0.01, 0.01), (100.0, 10.0), (0.0, 0.01)):
        params = SamplingParams(temperature=temperature, repetition_penalty=penalty, seed=0)
        sampler = RowSampler(params, [1, 2, 3])
        logits = torch.tensor([float("inf"), float("nan"), 3e38, -float("inf"), 1.0])
        assert 0 <= sampler.choose(logits) < 5
        huge = torch.full((5,), 3e38)
        assert 0 <= sampler.choose(huge) < 5


def test_huge_prompt_is_refused_before_tokenizing(tiny_base, store):
    with grpc_server(tiny_base, store) as server, Client(target(server)) as client:
        start = time.monotonic()
        code, message = _code(lambda: client.generate("x" * (6 << 20)))
        assert code == S.INVALID_ARGUMENT and "characters" in message
        assert time.monotonic() - start < 5
        chat = [("user", "y" * (3 << 20))]
        code, message = _code(lambda: client.generate(messages=chat))
        assert code == S.INVALID_ARGUMENT and "characters" in message


# ----- ids -----------------------------------------------------------------------------------------
def test_ids_tenants_and_unload(tiny_base, store, adapter_bytes, tokens_file):
    with grpc_server(tiny_base, store, tokens_file=tokens_file) as server:
        address = target(server)
        with Client(address, token=ACME) as acme, Client(address, token=GLOBEX) as globex:
            acme.upload_adapter(adapter_bytes["lora-a"], "acme-only")
            acme.load_adapter("acme-only")
            # unload: another tenant's id and an id nobody has answer alike
            foreign = _code(lambda: globex.unload_adapter("acme-only"))
            missing = _code(lambda: globex.unload_adapter("no-such-id"))
            malformed = _code(lambda: globex.unload_adapter("../bad"))
            assert foreign[0] == missing[0] == malformed[0] == S.NOT_FOUND
            assert foreign[1].replace("acme-only", "ID") == missing[1].replace("no-such-id", "ID")
            assert acme.unload_adapter("acme-only") is True  # the owner still can
            # upload to an id another tenant has: globex's own, first version (nothing leaks);
            # to a shared id: globex's own, shadowing the shared one for globex only
            for adapter_id in ("acme-only", "lora-a"):
                entry = globex.upload_adapter(adapter_bytes["svda-b"], adapter_id)
                assert (entry.tenant, entry.version) == ("globex", 1)
                assert globex.load_adapter(adapter_id).method == "svda"
            assert [e.method for e in acme.list_adapters() if e.adapter_id == "acme-only"] == [
                "lora"
            ]
            assert acme.load_adapter("lora-a").method == "lora"  # acme still gets the shared one
            # a 10 KB id: refused, and only a short prefix comes back
            huge = "a" * 10_000
            for call in (
                lambda: globex.upload_adapter(adapter_bytes["lora-a"], huge),
                lambda: globex.load_adapter(huge),
                lambda: globex.unload_adapter(huge),
                lambda: globex.generate("hi", adapter=huge),
            ):
                code, message = _code(call)
                assert code in (S.INVALID_ARGUMENT, S.NOT_FOUND), message
                assert len(message) < 400, message
            assert globex.info().tenant == "globex"


def test_invalid_utf8_is_invalid_argument(tiny_base, store):
    with grpc_server(tiny_base, store) as server:
        channel = grpc.insecure_channel(target(server))
        raw_generate = channel.unary_unary(
            "/svda.v1.Serving/Generate",
            request_serializer=None,
            response_deserializer=pb.GenerateResponse.FromString,
        )
        good = pb.GenerateRequest(prompt="AAAA", max_new_tokens=2).SerializeToString()
        bad = good.replace(b"AAAA", b"\xff\xfe\xff\xfe")
        with pytest.raises(grpc.RpcError) as info:
            raw_generate(bad, timeout=10)
        assert info.value.code() == S.INVALID_ARGUMENT, info.value.details()
        assert "UTF-8" in info.value.details()

        raw_upload = channel.stream_unary(
            "/svda.v1.Serving/UploadAdapter",
            request_serializer=None,
            response_deserializer=pb.UploadAdapterResponse.FromString,
        )
        header = pb.UploadAdapterRequest(header=pb.UploadHeader(adapter_id="BBBB"))
        bad_header = header.SerializeToString().replace(b"BBBB", b"\xff\xfe\xff\xfe")
        with pytest.raises(grpc.RpcError) as info:
            raw_upload(iter([bad_header]), timeout=10)
        assert info.value.code() == S.INVALID_ARGUMENT, info.value.details()
        assert raw_generate(good, timeout=30).completion_tokens == 2  # still serving
        channel.close()


def test_status_messages_are_bounded():
    code, message = status_of(InvalidRequest("x" * 100_000))
    assert code == S.INVALID_ARGUMENT and len(message) < 2100
    code, message = status_of(RuntimeError("y" * 100_000))
    assert code == S.INTERNAL and len(message) < 400
