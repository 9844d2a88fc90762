"""Parts of the gRPC layer that need no engine: auth, settings, the status interceptor, the
generated stubs, and ``svda serve`` argument parsing."""

from __future__ import annotations

import asyncio
import json
import logging

import grpc
import pytest
from grpc import aio

from svda.adapters_store import BaseMismatch, PayloadHashMismatch
from svda.adapters_store.store import (
    AdapterNotFound,
    CorruptObjectError,
    InvalidAdapterId,
    StorePermissionError,
)
from svda.server import cli
from svda.server.auth import Authenticator, TokenFileError, read_token_file
from svda.server.domain import (
    InvalidRequest,
    Overloaded,
    PermissionDenied,
    Unauthenticated,
)
from svda.server.interceptor import StatusInterceptor, status_of
from svda.server.metrics import Metrics
from svda.server.settings import ConfigError, load_settings

TOKEN_A, TOKEN_B, TOKEN_ADMIN = "a" * 20, "b" * 20, "root-token-0123456789"


# ----- auth -------------------------------------------------------------------------------------
def test_token_file_formats(tmp_path):
    lines = tmp_path / "tokens.txt"
    lines.write_text(f"# comment\n{TOKEN_A} acme\n\n{TOKEN_B} globex  # trailing\n")
    yml = tmp_path / "tokens.yaml"
    yml.write_text(f"tokens:\n  - token: {TOKEN_A}\n    tenant: acme\n")
    js = tmp_path / "tokens.json"
    js.write_text(json.dumps({TOKEN_B: "globex"}))
    assert read_token_file(lines) == [(TOKEN_A, "acme"), (TOKEN_B, "globex")]
    assert read_token_file(yml) == [(TOKEN_A, "acme")]
    assert read_token_file(js) == [(TOKEN_B, "globex")]


@pytest.mark.parametrize(
    "text, match",
    [("short acme\n", "at least 16"), (f"{TOKEN_A} acme extra\n", "TOKEN TENANT"),
     (f"{TOKEN_A} ../etc\n", "invalid tenant"), ("", "no tokens")],
)  # fmt: skip
def test_bad_token_files(tmp_path, text, match):
    path = tmp_path / "tokens.txt"
    path.write_text(text)
    with pytest.raises(TokenFileError, match=match):
        Authenticator.from_file(path)
    with pytest.raises(TokenFileError, match="cannot read"):
        Authenticator.from_file(tmp_path / "missing.txt")


def test_authenticate(tmp_path):
    auth = Authenticator([(TOKEN_A, "acme"), (TOKEN_ADMIN, "admin")])
    assert auth.authenticate([("authorization", f"Bearer {TOKEN_A}")]).tenant == "acme"
    assert auth.authenticate([("authorization", f"bearer {TOKEN_ADMIN}")]).tenant is None
    for metadata, match in [([], "requires a bearer token"),
                            ([("authorization", "Basic xyz")], "malformed"),
                            ([("authorization", f"Bearer {TOKEN_B}")], "unknown bearer token")]:  # fmt: skip
        with pytest.raises(Unauthenticated, match=match):
            auth.authenticate(metadata)
    assert Authenticator.disabled().authenticate([]).tenant is None


# ----- settings ---------------------------------------------------------------------------------
def test_settings_precedence(tmp_path, monkeypatch):
    config = tmp_path / "svda.yaml"
    config.write_text("port: 6000\nmax-batch-size: 4\nmetrics_port: 7000\n")
    assert load_settings(config).port == 6000
    monkeypatch.setenv("SVDA_PORT", "6001")
    s = load_settings(config)
    assert (s.port, s.max_batch_size, s.metrics_port) == (6001, 4, 7000)  # env > file
    assert load_settings(config, port=6002).port == 6002  # overrides (CLI) > env
    monkeypatch.setenv("SVDA_METRICS_PORT", "none")
    assert load_settings(config).metrics_port is None
    toml = tmp_path / "svda.toml"
    toml.write_text("max_waiting = 3\n")
    assert load_settings(toml).max_waiting == 3
    monkeypatch.setenv("SVDA_CONFIG", str(toml))
    assert load_settings().max_waiting == 3


def test_settings_errors(tmp_path):
    bad = tmp_path / "svda.yaml"
    bad.write_text("prot: 1\n")
    with pytest.raises(ConfigError, match="unknown settings"):
        load_settings(bad)
    (tmp_path / "x.ini").write_text("port = 1\n")
    with pytest.raises(ConfigError, match="use a yaml"):
        load_settings(tmp_path / "x.ini")
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings(tmp_path / "missing.yaml")
    with pytest.raises(ValueError, match="both tls_cert and tls_key"):
        load_settings(tls_cert=tmp_path / "c.pem")
    with pytest.raises(ValueError, match="less than or equal to 65535"):
        load_settings(port=70000)


def test_serve_argument_parsing(tmp_path, capsys):
    config = tmp_path / "svda.json"
    config.write_text(json.dumps({"port": 7001, "store": str(tmp_path / "store")}))
    argv = ["serve", "--config", str(config), "--max-batch-size", "8", "--metrics-port", "none",
            "--print-settings"]  # fmt: skip
    assert cli.main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["port"] == 7001 and printed["max_batch_size"] == 8
    assert printed["metrics_port"] is None and printed["store"] == str(tmp_path / "store")
    assert cli.main(["serve", "--tls-key", "k.pem", "--print-settings"]) == 2
    assert "both tls_cert and tls_key" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["serve", "--port", "eighty"])


# ----- the interceptor --------------------------------------------------------------------------
ERRORS = [
    (AdapterNotFound("adapter 'x' is not in the store"), grpc.StatusCode.NOT_FOUND),
    (AdapterNotFound("no version 3"), grpc.StatusCode.NOT_FOUND),
    (BaseMismatch("made for base 1234"), grpc.StatusCode.FAILED_PRECONDITION),
    (BaseMismatch("trained on base 1234"), grpc.StatusCode.FAILED_PRECONDITION),
    (PayloadHashMismatch("payload hash differs"), grpc.StatusCode.INVALID_ARGUMENT),
    (InvalidRequest("top_p must be in (0, 1]"), grpc.StatusCode.INVALID_ARGUMENT),
    (InvalidAdapterId("invalid adapter id"), grpc.StatusCode.INVALID_ARGUMENT),
    (Overloaded("queue full"), grpc.StatusCode.RESOURCE_EXHAUSTED),
    (Unauthenticated("unknown bearer token"), grpc.StatusCode.UNAUTHENTICATED),
    (PermissionDenied("not yours"), grpc.StatusCode.PERMISSION_DENIED),
    (StorePermissionError("another tenant's"), grpc.StatusCode.PERMISSION_DENIED),
    (CorruptObjectError("sha256 differs"), grpc.StatusCode.DATA_LOSS),
    (ZeroDivisionError("division by zero"), grpc.StatusCode.INTERNAL),
]


def test_status_of_every_error():
    for exc, code in ERRORS:
        assert status_of(exc)[0] == code, exc
    assert "ZeroDivisionError" in status_of(ZeroDivisionError("x"))[1]


def _raising_service(errors: dict[str, BaseException]) -> grpc.GenericRpcHandler:
    """A raw-bytes service: Unary/<key> and Stream/<key> raise ``errors[key]`` (after one
    streamed message); key 'ok' succeeds."""

    async def unary(request: bytes, context):
        if request.decode() in errors:
            raise errors[request.decode()]
        return b"fine"

    async def stream(request: bytes, context):
        yield b"first"
        if request.decode() in errors:
            raise errors[request.decode()]
        yield b"second"

    return grpc.method_handlers_generic_handler(
        "test.Raising",
        {"Unary": grpc.unary_unary_rpc_method_handler(unary),
         "Stream": grpc.unary_stream_rpc_method_handler(stream)},
    )  # fmt: skip


async def _call_all(errors: dict[str, BaseException], metrics: Metrics) -> dict:
    server = aio.server(interceptors=[StatusInterceptor(metrics)])
    server.add_generic_rpc_handlers([_raising_service(errors)])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    results = {}
    try:
        async with aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            unary = channel.unary_unary("/test.Raising/Unary")
            stream = channel.unary_stream("/test.Raising/Stream")
            for key in [*errors, "ok"]:
                for kind, call in (("unary", unary), ("stream", stream)):
                    try:
                        got = await call(key.encode()) if kind == "unary" else [
                            m async for m in call(key.encode())]  # fmt: skip
                        results[key, kind] = (grpc.StatusCode.OK, got)
                    except aio.AioRpcError as exc:
                        results[key, kind] = (exc.code(), exc.details())
    finally:
        await server.stop(0)
    return results


def test_interceptor_maps_errors_over_grpc(caplog):
    errors = {f"e{i}": exc for i, (exc, _) in enumerate(ERRORS)}
    metrics = Metrics()
    with caplog.at_level(logging.INFO, logger="svda.server"):
        results = asyncio.run(_call_all(errors, metrics))
    for i, (exc, code) in enumerate(ERRORS):
        for kind in ("unary", "stream"):
            got_code, details = results[f"e{i}", kind]
            assert got_code == code, (exc, kind)
            assert str(exc) in details  # the message says what was wrong
    assert results["ok", "unary"] == (grpc.StatusCode.OK, b"fine")
    assert results["ok", "stream"] == (grpc.StatusCode.OK, [b"first", b"second"])
    assert any("Traceback" in (r.exc_text or "") for r in caplog.records if r.levelname == "ERROR")
    text = metrics.render().decode()
    assert 'svda_requests_total{rpc="Unary",status="NOT_FOUND"} 2.0' in text
    assert 'svda_requests_total{rpc="Stream",status="OK"} 1.0' in text
    assert 'svda_request_latency_seconds_count{rpc="Stream",status="INTERNAL"} 1.0' in text


# ----- generated stubs --------------------------------------------------------------------------
def test_generated_stubs_are_up_to_date():
    pytest.importorskip("grpc_tools")
    from svda.proto import generate

    assert generate.stale_files() == [], "run `make proto` and commit the regenerated stubs"


def test_stub_check_ignores_only_the_grpc_tools_version_stamp(tmp_path):
    from svda.proto.generate import _same_stub

    old, new, other = (tmp_path / n for n in ("old.py", "new.py", "other.py"))
    old.write_text("import grpc\nGRPC_GENERATED_VERSION = '1.85.1'\nX = 1\n")
    new.write_text("import grpc\nGRPC_GENERATED_VERSION = '1.85.4'\nX = 1\n")
    other.write_text("import grpc\nGRPC_GENERATED_VERSION = '1.85.1'\nX = 2\n")
    assert _same_stub(new, old)
    assert not _same_stub(other, old)
