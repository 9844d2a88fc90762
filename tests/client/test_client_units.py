"""The client's request building and error mapping (no server needed)."""

from __future__ import annotations

import grpc
import pytest

from svda.client import (
    Completion,
    FailedPrecondition,
    NotFound,
    SvdaClientError,
    generate_request,
)
from svda.client.client import UPLOAD_CHUNK_BYTES, upload_messages
from svda.client.types import error_from_rpc
from svda.proto.svda.v1 import serving_pb2 as pb


def test_generate_request_fields():
    r = generate_request("hi", adapter="acme", max_new_tokens=9, temperature=0.7, top_p=0.9,
                         top_k=5, repetition_penalty=1.1, stop=["\n"], seed=3, mode="merged")  # fmt: skip
    assert (r.prompt, r.adapter_id, r.max_new_tokens, r.top_k) == ("hi", "acme", 9, 5)
    assert (r.temperature, r.top_p, r.repetition_penalty, r.seed) == (0.7, 0.9, 1.1, 3)
    assert list(r.stop) == ["\n"] and r.mode == pb.MERGE_MODE_MERGED
    plain = generate_request(messages=[("system", "be brief"), {"role": "user", "content": "hi"}])
    assert plain.WhichOneof("input") == "chat" and len(plain.chat.messages) == 2
    assert not plain.HasField("temperature") and not plain.HasField("seed")  # server defaults
    assert plain.adapter_id == ""  # the base model
    with pytest.raises(ValueError, match="exactly one"):
        generate_request("hi", messages=[("user", "hi")])


def test_upload_messages_are_a_header_then_chunks():
    data = bytes(range(256)) * (UPLOAD_CHUNK_BYTES // 256 * 2 + 1)
    messages = list(upload_messages(data, "acme", tags=["a"]))
    assert messages[0].WhichOneof("part") == "header"
    assert messages[0].header.size_bytes == len(data) and list(messages[0].header.tags) == ["a"]
    assert b"".join(m.chunk for m in messages[1:]) == data
    assert max(len(m.chunk) for m in messages[1:]) == UPLOAD_CHUNK_BYTES


class _FakeRpcError(grpc.RpcError):
    def __init__(self, code, details):
        self._code, self._details = code, details

    def code(self):
        return self._code

    def details(self):
        return self._details


def test_upload_messages_of_a_file_check_it_before_any_stream(tmp_path):
    path = tmp_path / "a.svda"
    path.write_bytes(b"x" * (UPLOAD_CHUNK_BYTES + 5))
    messages = list(upload_messages(path, "acme"))
    assert messages[0].header.size_bytes == path.stat().st_size
    assert b"".join(m.chunk for m in messages[1:]) == path.read_bytes()
    with pytest.raises(FileNotFoundError, match=r"missing\.svda does not exist; give the path"):
        upload_messages(tmp_path / "missing.svda", "acme")  # raised by the call, not the stream
    with pytest.raises(IsADirectoryError, match="is not a file"):
        upload_messages(tmp_path, "acme")


def test_cli_upload_of_a_missing_file_says_so(tmp_path, capsys):
    from svda.client.cli import main

    missing = tmp_path / "nope.svda"
    argv = ["--target", "127.0.0.1:9", "--timeout", "5", "upload", str(missing), "--id", "x"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"adapter file {missing} does not exist" in err and "iterating" not in err


def test_errors_carry_status_and_message():
    err = error_from_rpc(_FakeRpcError(grpc.StatusCode.NOT_FOUND, "adapter 'x' is unknown"))
    assert isinstance(err, NotFound) and err.code == grpc.StatusCode.NOT_FOUND
    assert err.message == "adapter 'x' is unknown" and str(err).startswith("NOT_FOUND: ")
    assert isinstance(error_from_rpc(_FakeRpcError(grpc.StatusCode.FAILED_PRECONDITION, "m")),
                      FailedPrecondition)  # fmt: skip
    other = error_from_rpc(_FakeRpcError(grpc.StatusCode.ABORTED, "m"))
    assert type(other) is SvdaClientError and other.code == grpc.StatusCode.ABORTED


def test_completion_from_wire():
    m = pb.GenerateResponse(text="x", finish_reason=pb.FINISH_REASON_EOS, prompt_tokens=3,
                            completion_tokens=1, adapter_id="", request_id="r")  # fmt: skip
    done = Completion.from_pb(m)
    assert done.finish_reason == "eos" and done.adapter_id is None and done.text == "x"


def test_client_imports_no_torch():
    import subprocess
    import sys

    code = "import sys, svda.client, svda.client.cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
