"""The gRPC servicer of ``svda.v1.Serving``: protobuf <-> domain objects, nothing more.

Each handler authenticates the caller (:mod:`svda.server.auth`), converts the request into
:mod:`svda.server.domain` objects, calls the engine or the store, and converts the result back.
Errors are raised as they are; :mod:`svda.server.interceptor` turns them into status codes.
Blocking work (adapter loads, store queries, upload checks) runs in worker threads so the event
loop keeps serving other calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING

from grpc import aio

from svda.adapters_store import AdapterFormatError, BaseMismatch
from svda.adapters_store.store import AdapterStore, StoreEntry
from svda.proto.svda.v1 import serving_pb2 as pb
from svda.proto.svda.v1 import serving_pb2_grpc

from . import convert
from .auth import Authenticator, Caller
from .domain import (
    Completion,
    FinishReason,
    GenerationRequest,
    InvalidRequest,
    Overloaded,
    ServingError,
    TokenChunk,
    check_adapter_id,
)
from .interceptor import DeadlinePassed, UploadStalled

if TYPE_CHECKING:  # the engine package loads the model code; the servicer only calls it
    from .engine import EngineEvent, RequestHandle, ServingEngine
    from .engine.sequence import EventCallback

log = logging.getLogger("svda.server")


class ServingServicer(serving_pb2_grpc.ServingServicer):
    """Implements every RPC of ``svda/v1/serving.proto`` on one engine and one store."""

    def __init__(
        self,
        engine: ServingEngine,
        store: AdapterStore,
        auth: Authenticator,
        max_upload_bytes: int,
        *,
        upload_stall_timeout_s: float = 30.0,
        max_concurrent_uploads: int = 4,
    ) -> None:
        self.engine = engine
        self.store = store
        self.auth = auth
        self.max_upload_bytes = max_upload_bytes
        self.upload_stall_timeout_s = upload_stall_timeout_s
        self.max_concurrent_uploads = max_concurrent_uploads
        self._uploads = 0  # running uploads (only touched on the event loop)
        self.info = engine.info()  # fixed for the server's lifetime

    def _caller(self, context: aio.ServicerContext) -> Caller:
        return self.auth.authenticate(context.invocation_metadata())

    # ----- generation --------------------------------------------------------------------------
    async def Generate(self, request: pb.GenerateRequest, context: aio.ServicerContext):
        gen = self._generation(request, context)
        completion = None
        async for event in self._events(gen):
            if isinstance(event, Completion):
                completion = event
        return convert.completion_pb(completion, gen.request_id)

    async def GenerateStream(self, request: pb.GenerateRequest, context: aio.ServicerContext):
        gen = self._generation(request, context)
        async for event in self._events(gen):
            if isinstance(event, TokenChunk):
                yield pb.GenerateStreamResponse(
                    chunk=pb.TokenChunk(text=event.text, token_ids=event.token_ids)
                )
            else:
                yield pb.GenerateStreamResponse(done=convert.completion_pb(event, gen.request_id))

    def _generation(self, request: pb.GenerateRequest, context: aio.ServicerContext):
        caller = self._caller(context)
        remaining = context.time_remaining()
        deadline = None if remaining is None else time.monotonic() + remaining
        request_id = request.request_id or uuid.uuid4().hex[:16]
        gen = convert.generation_request(request, caller.tenant, deadline, request_id)
        gen.params.validate(self.info.max_new_tokens)
        return gen

    async def _events(self, gen) -> AsyncIterator[TokenChunk | Completion]:
        """The engine's events for ``gen``; cancels the request if the RPC goes away first."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def on_event(event: EngineEvent) -> None:  # called from the scheduler thread
            # RuntimeError: the event loop is closed, the server is shutting down
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(queue.put_nowait, event)

        handle = await _submit(self.engine, gen, on_event)
        finished = False
        try:
            while not finished:
                event = await queue.get()
                if isinstance(event, BaseException):
                    finished = True
                    raise event
                finished = isinstance(event, Completion)
                if finished:  # the engine logs one line per request
                    _check_deadline(gen, event)
                yield event
        finally:
            if not finished:  # client cancelled, deadline passed, or the server is stopping
                handle.cancel()

    # ----- adapter memory ----------------------------------------------------------------------
    async def LoadAdapter(self, request: pb.LoadAdapterRequest, context: aio.ServicerContext):
        caller = self._caller(context)
        adapter_id = _required_id(request.adapter_id)
        resident = await asyncio.to_thread(self.engine.load_adapter, adapter_id, caller.tenant)
        return pb.LoadAdapterResponse(adapter=convert.resident_pb(resident))

    async def UnloadAdapter(self, request: pb.UnloadAdapterRequest, context: aio.ServicerContext):
        caller = self._caller(context)
        if not request.adapter_id:
            raise InvalidRequest("adapter_id is required")
        adapter_id = request.adapter_id  # malformed, absent or foreign: NOT_FOUND alike
        unloaded = await asyncio.to_thread(self.engine.unload_adapter, adapter_id, caller.tenant)
        return pb.UnloadAdapterResponse(unloaded=bool(unloaded))

    async def PinAdapter(self, request: pb.PinAdapterRequest, context: aio.ServicerContext):
        caller = self._caller(context)
        adapter_id = _required_id(request.adapter_id)
        resident = await asyncio.to_thread(
            self.engine.pin_adapter, adapter_id, caller.tenant, request.pinned
        )
        return pb.PinAdapterResponse(adapter=convert.resident_pb(resident))

    # ----- the store ---------------------------------------------------------------------------
    async def ListAdapters(self, request: pb.ListAdaptersRequest, context: aio.ServicerContext):
        caller = self._caller(context)
        entries = await asyncio.to_thread(
            self.store.list,
            tenant=caller.tenant,
            method=request.method or None,
            tag=request.tag or None,
            latest_only=not request.all_versions,
        )
        resident = {
            (r.tenant, r.adapter_id, r.version): r
            for r in self.engine.resident_adapters(caller.tenant)
        }
        out = []
        for entry in entries:
            r = resident.get((entry.tenant, entry.id, entry.version))
            if request.resident_only and r is None:
                continue
            out.append(convert.entry_pb(entry, self.info.base_fingerprint, r))
        return pb.ListAdaptersResponse(adapters=out)

    async def UploadAdapter(self, request_iterator, context: aio.ServicerContext):
        caller = self._caller(context)
        if self._uploads >= self.max_concurrent_uploads:
            raise Overloaded(
                f"{self._uploads} uploads are running, the server's limit "
                "(max_concurrent_uploads); retry in a moment"
            )
        self._uploads += 1
        path: Path | None = None
        try:
            path = self.store.staging_file()
            header = await self._receive_upload(request_iterator, path)
            entry = await asyncio.to_thread(self._check_and_publish, header, path, caller.tenant)
        finally:
            self._uploads -= 1
            if path is not None:
                path.unlink(missing_ok=True)
        log.info(json.dumps({"rpc": "UploadAdapter", "adapter_id": entry.id, "version": entry.version,
                             "tenant": caller.tenant, "bytes": entry.size}))  # fmt: skip
        return pb.UploadAdapterResponse(adapter=convert.entry_pb(entry, self.info.base_fingerprint))

    async def _receive_upload(self, request_iterator, path: Path) -> pb.UploadHeader:
        """Stream the upload into ``path`` (never whole in memory); return its header."""
        header, size = None, 0
        parts = request_iterator.__aiter__()
        with path.open("wb") as out:
            while True:
                try:
                    part = await asyncio.wait_for(
                        parts.__anext__(), timeout=self.upload_stall_timeout_s
                    )
                except StopAsyncIteration:
                    break
                except asyncio.TimeoutError:
                    raise UploadStalled(
                        f"the upload sent nothing for {self.upload_stall_timeout_s:g} s "
                        "(upload_stall_timeout_s); send the file without pauses"
                    ) from None
                kind = part.WhichOneof("part")
                if kind == "header" and header is None:
                    header = part.header
                    _required_id(header.adapter_id)
                    self._check_size(header.size_bytes)
                elif kind == "chunk" and header is not None:
                    size += len(part.chunk)
                    self._check_size(size)
                    out.write(part.chunk)
                else:
                    raise InvalidRequest(
                        "an upload is one `header` message followed by `chunk` messages"
                    )
        if header is None or not size:
            raise InvalidRequest("empty upload: send a `header` message, then the file's bytes")
        return header

    def _check_size(self, size: int) -> None:
        if size > self.max_upload_bytes:
            raise InvalidRequest(
                f"upload of {size} bytes exceeds the server's limit of {self.max_upload_bytes} "
                "bytes (max_upload_bytes)"
            )

    def _check_and_publish(self, header: pb.UploadHeader, path: Path, tenant: str | None):
        """Every load check against the served model, then publish: a file that cannot be
        served is never stored."""
        adapter_file = self._verify(header.adapter_id, path)
        adapter = adapter_file.header
        del adapter_file  # the tensors: publish copies from the file
        entry: StoreEntry = self.store.publish(
            path,
            header.adapter_id,
            tenant=tenant,
            tags=[*adapter.tags, *header.tags],
            method=adapter.method,
            base_fingerprint=adapter.base_fingerprint,
            name=adapter.name,
        )
        return entry

    def _verify(self, adapter_id: str, path: Path):
        try:
            adapter_file = self.engine.verify_adapter(path)
        except BaseMismatch as exc:
            raise BaseMismatch(
                f"adapter {adapter_id!r} was made for base other than the served one: {exc}; this server serves "
                f"{self.info.base_model} ({self.info.base_fingerprint[:16]}…)"
            ) from exc
        except (AdapterFormatError, ServingError):
            raise
        except Exception as exc:  # a file no check anticipated: still the file's fault
            log.info("upload of %r failed a load check", adapter_id, exc_info=exc)
            raise InvalidRequest(
                f"adapter {adapter_id!r} cannot be loaded into the served model "
                f"({type(exc).__name__}: {str(exc)[:200]}); check it with "
                "`svda-pack verify` against this base and export it again"
            ) from exc
        return adapter_file

    # ----- server ------------------------------------------------------------------------------
    async def GetServerInfo(self, request: pb.GetServerInfoRequest, context: aio.ServicerContext):
        caller = self._caller(context)
        return convert.info_pb(self.info, self.max_upload_bytes, caller, self.auth.enabled)


async def _submit(
    engine: ServingEngine, gen: GenerationRequest, on_event: EventCallback
) -> RequestHandle:
    """``engine.submit`` in a worker thread; if the RPC is cancelled meanwhile, cancel the
    request as soon as it exists, so it never runs for nobody."""
    future = asyncio.get_running_loop().run_in_executor(None, engine.submit, gen, on_event)
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        future.add_done_callback(lambda f: f.exception() is None and f.result().cancel())
        raise


def _check_deadline(gen, done: Completion) -> None:
    """A request the engine dropped because its deadline passed ends as DEADLINE_EXCEEDED."""
    if done.finish_reason == FinishReason.CANCELLED and gen.expired():
        raise DeadlinePassed(
            f"the deadline passed after {done.completion_tokens} generated tokens; "
            "give the call a longer timeout or ask for fewer max_new_tokens"
        )


def _required_id(adapter_id: str) -> str:
    if not adapter_id:
        raise InvalidRequest("adapter_id is required")
    return check_adapter_id(adapter_id)
