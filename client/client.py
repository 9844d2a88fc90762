"""Sync and async Python clients of the svda server (``svda.v1.Serving`` over gRPC).

    from svda.client import Client

    with Client("127.0.0.1:50051", token="...") as client:
        print(client.generate("Hello", adapter="acme", max_new_tokens=32).text)
        for event in client.stream("Hello", adapter="acme"):
            print(getattr(event, "text", ""), end="", flush=True)

``AsyncClient`` has the same methods as coroutines (``stream`` is an async iterator). Failed
calls raise :class:`~svda.client.types.SvdaClientError` subclasses carrying the status code.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc
from grpc import aio

from svda.proto.svda.v1 import serving_pb2 as pb
from svda.proto.svda.v1 import serving_pb2_grpc

from .types import (
    AdapterEntry,
    Completion,
    ResidentAdapter,
    ServerInfo,
    TokenChunk,
    error_from_rpc,
)

DEFAULT_TARGET = "127.0.0.1:50051"
UPLOAD_CHUNK_BYTES = 1 << 20
_MODES = {
    "auto": pb.MERGE_MODE_AUTO,
    "unmerged": pb.MERGE_MODE_UNMERGED,
    "merged": pb.MERGE_MODE_MERGED,
}
Message = tuple[str, str] | dict[str, str]  # (role, content) or {"role": ..., "content": ...}


def generate_request(
    prompt: str | None = None,
    *,
    adapter: str | None = None,
    messages: Sequence[Message] | None = None,
    max_new_tokens: int = 0,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int = 0,
    repetition_penalty: float | None = None,
    stop: Sequence[str] = (),
    seed: int | None = None,
    mode: str = "auto",
    request_id: str = "",
) -> pb.GenerateRequest:
    """The wire request; ``None`` leaves a setting to the server's default."""
    if (prompt is None) == (messages is None):
        raise ValueError("give exactly one of `prompt` and `messages`")
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {', '.join(_MODES)}, not {mode!r}")
    request = pb.GenerateRequest(
        adapter_id=adapter or "", max_new_tokens=max_new_tokens, top_k=top_k, stop=list(stop),
        mode=_MODES[mode], request_id=request_id,
    )  # fmt: skip
    if prompt is not None:
        request.prompt = prompt
    else:
        request.chat.messages.extend(_chat_message(m) for m in messages)
    for name, value in (("temperature", temperature), ("top_p", top_p), ("seed", seed),
                        ("repetition_penalty", repetition_penalty)):  # fmt: skip
        if value is not None:
            setattr(request, name, value)
    return request


def list_request(
    resident_only: bool, all_versions: bool, method: str | None, tag: str | None
) -> pb.ListAdaptersRequest:
    """The wire request of ``list_adapters`` (empty method/tag: no filter)."""
    return pb.ListAdaptersRequest(
        resident_only=resident_only, all_versions=all_versions, method=method or "", tag=tag or ""
    )


def _chat_message(m: Message) -> pb.ChatMessage:
    role, content = (m["role"], m["content"]) if isinstance(m, dict) else m
    return pb.ChatMessage(role=role, content=content)


def upload_messages(
    source: str | os.PathLike | bytes, adapter_id: str, tags: Sequence[str] = ()
) -> Iterator[pb.UploadAdapterRequest]:
    """The header message, then the file's bytes in chunks (a file is read chunk by chunk).

    A path is checked here, before any stream starts: a missing, unreadable or non-regular file
    raises ``FileNotFoundError`` / ``IsADirectoryError`` / ``PermissionError`` saying so (inside
    the stream gRPC would report only "Exception iterating requests!")."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return _byte_messages(memoryview(source).cast("B"), adapter_id, tags)
    path = Path(source).expanduser()
    return _file_messages(path, check_upload_file(path), adapter_id, tags)


def check_upload_file(path: Path) -> int:
    """The size of the ``.svda`` file at ``path``, or an ``OSError`` that says what to do."""
    if not path.exists():
        raise FileNotFoundError(
            f"adapter file {path} does not exist; give the path of a .svda file (svda-train "
            "--out-file or svda-pack get ID write one)"
        )
    if not path.is_file():
        raise IsADirectoryError(f"{path} is not a file; give the path of a .svda file")
    if not os.access(path, os.R_OK):
        raise PermissionError(f"adapter file {path} is not readable by this user")
    return path.stat().st_size


def _byte_messages(
    data: memoryview, adapter_id: str, tags: Sequence[str]
) -> Iterator[pb.UploadAdapterRequest]:
    header = pb.UploadHeader(adapter_id=adapter_id, tags=list(tags), size_bytes=len(data))
    yield pb.UploadAdapterRequest(header=header)
    for start in range(0, len(data), UPLOAD_CHUNK_BYTES):
        yield pb.UploadAdapterRequest(chunk=bytes(data[start : start + UPLOAD_CHUNK_BYTES]))


def _file_messages(
    path: Path, size: int, adapter_id: str, tags: Sequence[str]
) -> Iterator[pb.UploadAdapterRequest]:
    yield pb.UploadAdapterRequest(
        header=pb.UploadHeader(adapter_id=adapter_id, tags=list(tags), size_bytes=size)
    )
    with path.open("rb") as file:
        while chunk := file.read(UPLOAD_CHUNK_BYTES):
            yield pb.UploadAdapterRequest(chunk=chunk)


def _stream_event(response: pb.GenerateStreamResponse) -> TokenChunk | Completion:
    if response.WhichOneof("event") == "chunk":
        return TokenChunk(text=response.chunk.text, token_ids=tuple(response.chunk.token_ids))
    return Completion.from_pb(response.done)


def _pem(value: str | os.PathLike | bytes | None) -> bytes | None:
    if value is None or isinstance(value, bytes):
        return value
    return Path(value).expanduser().read_bytes()


class _Options:
    """Connection options shared by both clients."""

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        token: str | None = None,
        tls: bool = False,
        ca_cert: str | os.PathLike | bytes | None = None,
        client_cert: str | os.PathLike | bytes | None = None,
        client_key: str | os.PathLike | bytes | None = None,
        server_name: str | None = None,
        timeout: float | None = None,
        max_message_bytes: int = 8 << 20,
    ) -> None:
        if (client_cert is None) != (client_key is None):
            raise ValueError("give both client_cert and client_key (mutual TLS), or neither")
        self.target = target
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.tls = tls or ca_cert is not None or client_cert is not None
        self.timeout = timeout
        self.channel_options = [("grpc.max_receive_message_length", max_message_bytes),
                                ("grpc.max_send_message_length", max_message_bytes)]  # fmt: skip
        if server_name:  # the name the server certificate must carry, if not the target's host
            self.channel_options.append(("grpc.ssl_target_name_override", server_name))
        self.credentials = (
            grpc.ssl_channel_credentials(_pem(ca_cert), _pem(client_key), _pem(client_cert))
            if self.tls
            else None
        )

    def call(self, timeout: float | None) -> dict[str, Any]:
        return {
            "metadata": self.metadata,
            "timeout": timeout if timeout is not None else self.timeout,
        }


class Client:
    """Blocking client. Arguments: see :class:`AsyncClient` (the same)."""

    def __init__(self, target: str = DEFAULT_TARGET, **options: Any) -> None:
        self._opts = _Options(target, **options)
        o = self._opts
        self.channel = (
            grpc.secure_channel(o.target, o.credentials, o.channel_options)
            if o.tls
            else grpc.insecure_channel(o.target, o.channel_options)
        )
        self.stub = serving_pb2_grpc.ServingStub(self.channel)

    def _unary(self, method: str, request: Any, timeout: float | None = None) -> Any:
        try:
            return getattr(self.stub, method)(request, **self._opts.call(timeout))
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None

    def generate(
        self, prompt: str | None = None, *, timeout: float | None = None, **kw: Any
    ) -> Completion:
        """One generation; see :func:`generate_request` for the arguments."""
        return Completion.from_pb(self._unary("Generate", generate_request(prompt, **kw), timeout))

    def stream(
        self, prompt: str | None = None, *, timeout: float | None = None, **kw: Any
    ) -> Iterator[TokenChunk | Completion]:
        """Token chunks as they are generated, then the :class:`Completion`. Leaving the loop
        early (``break``) cancels the request on the server."""
        call = self.stub.GenerateStream(generate_request(prompt, **kw), **self._opts.call(timeout))
        try:
            for response in call:
                yield _stream_event(response)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None
        finally:
            call.cancel()  # a no-op once the stream has finished

    def load_adapter(self, adapter_id: str, *, timeout: float | None = None) -> ResidentAdapter:
        response = self._unary("LoadAdapter", pb.LoadAdapterRequest(adapter_id=adapter_id), timeout)
        return ResidentAdapter.from_pb(response.adapter)

    def unload_adapter(self, adapter_id: str, *, timeout: float | None = None) -> bool:
        request = pb.UnloadAdapterRequest(adapter_id=adapter_id)
        return self._unary("UnloadAdapter", request, timeout).unloaded

    def pin_adapter(
        self, adapter_id: str, pinned: bool = True, *, timeout: float | None = None
    ) -> ResidentAdapter:
        request = pb.PinAdapterRequest(adapter_id=adapter_id, pinned=pinned)
        return ResidentAdapter.from_pb(self._unary("PinAdapter", request, timeout).adapter)

    def upload_adapter(
        self,
        source: str | os.PathLike | bytes,
        adapter_id: str,
        tags: Sequence[str] = (),
        *,
        timeout: float | None = None,
    ) -> AdapterEntry:
        """Upload a ``.svda`` file (path or bytes) as the next version of ``adapter_id``."""
        messages = upload_messages(source, adapter_id, tags)
        return AdapterEntry.from_pb(self._unary("UploadAdapter", messages, timeout).adapter)

    def list_adapters(
        self,
        *,
        resident_only: bool = False,
        all_versions: bool = False,
        method: str | None = None,
        tag: str | None = None,
        timeout: float | None = None,
    ) -> list[AdapterEntry]:
        request = list_request(resident_only, all_versions, method, tag)
        return [
            AdapterEntry.from_pb(a) for a in self._unary("ListAdapters", request, timeout).adapters
        ]

    def info(self, *, timeout: float | None = None) -> ServerInfo:
        return ServerInfo.from_pb(self._unary("GetServerInfo", pb.GetServerInfoRequest(), timeout))

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class AsyncClient:
    """asyncio client.

    Args:
        target: ``host:port`` of the server.
        token: bearer token (sent as ``authorization: Bearer <token>``).
        tls: use TLS with the system's root certificates (implied by ``ca_cert``/``client_cert``).
        ca_cert: PEM (path or bytes) of the CA that signed the server certificate.
        client_cert, client_key: PEM of this client's certificate and key (mutual TLS).
        server_name: host name to check the server certificate against, if not the target's.
        timeout: default deadline of every call, in seconds (None: no deadline).
    """

    def __init__(self, target: str = DEFAULT_TARGET, **options: Any) -> None:
        self._opts = _Options(target, **options)
        o = self._opts
        self.channel = (
            aio.secure_channel(o.target, o.credentials, o.channel_options)
            if o.tls
            else aio.insecure_channel(o.target, o.channel_options)
        )
        self.stub = serving_pb2_grpc.ServingStub(self.channel)

    async def _unary(self, method: str, request: Any, timeout: float | None = None) -> Any:
        try:
            return await getattr(self.stub, method)(request, **self._opts.call(timeout))
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None

    async def generate(
        self, prompt: str | None = None, *, timeout: float | None = None, **kw: Any
    ) -> Completion:
        request = generate_request(prompt, **kw)
        return Completion.from_pb(await self._unary("Generate", request, timeout))

    async def stream(
        self, prompt: str | None = None, *, timeout: float | None = None, **kw: Any
    ) -> AsyncIterator[TokenChunk | Completion]:
        call = self.stub.GenerateStream(generate_request(prompt, **kw), **self._opts.call(timeout))
        try:
            async for response in call:
                yield _stream_event(response)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None
        finally:
            call.cancel()

    async def load_adapter(
        self, adapter_id: str, *, timeout: float | None = None
    ) -> ResidentAdapter:
        request = pb.LoadAdapterRequest(adapter_id=adapter_id)
        return ResidentAdapter.from_pb((await self._unary("LoadAdapter", request, timeout)).adapter)

    async def unload_adapter(self, adapter_id: str, *, timeout: float | None = None) -> bool:
        request = pb.UnloadAdapterRequest(adapter_id=adapter_id)
        return (await self._unary("UnloadAdapter", request, timeout)).unloaded

    async def pin_adapter(
        self, adapter_id: str, pinned: bool = True, *, timeout: float | None = None
    ) -> ResidentAdapter:
        request = pb.PinAdapterRequest(adapter_id=adapter_id, pinned=pinned)
        return ResidentAdapter.from_pb((await self._unary("PinAdapter", request, timeout)).adapter)

    async def upload_adapter(
        self,
        source: str | os.PathLike | bytes,
        adapter_id: str,
        tags: Sequence[str] = (),
        *,
        timeout: float | None = None,
    ) -> AdapterEntry:
        messages = _aiter(upload_messages(source, adapter_id, tags))
        return AdapterEntry.from_pb((await self._unary("UploadAdapter", messages, timeout)).adapter)

    async def list_adapters(
        self,
        *,
        resident_only: bool = False,
        all_versions: bool = False,
        method: str | None = None,
        tag: str | None = None,
        timeout: float | None = None,
    ) -> list[AdapterEntry]:
        request = list_request(resident_only, all_versions, method, tag)
        response = await self._unary("ListAdapters", request, timeout)
        return [AdapterEntry.from_pb(a) for a in response.adapters]

    async def info(self, *, timeout: float | None = None) -> ServerInfo:
        request = pb.GetServerInfoRequest()
        return ServerInfo.from_pb(await self._unary("GetServerInfo", request, timeout))

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()


async def _aiter(items: Iterable[Any]) -> AsyncIterator[Any]:
    for item in items:
        yield item
