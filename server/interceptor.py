"""The one server interceptor: maps exceptions to gRPC status codes and records metrics.

Every RPC (unary or streaming, grpc.aio) runs inside :class:`StatusInterceptor`. An exception
that escapes a handler becomes a status with the exception's message (which says what was
wrong); anything unexpected becomes ``INTERNAL`` with its traceback in the server log. The
interceptor also counts every finished RPC and its latency by method and status, and logs one
JSON line per failed RPC (the engine logs one per generation).
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from grpc import aio

from svda.adapters_store import AdapterFormatError, BaseMismatch
from svda.adapters_store.store import (
    AdapterNotFound,
    CorruptObjectError,
    InvalidMetadata,
    StorePermissionError,
)

from .domain import (
    InvalidRequest,
    Overloaded,
    PermissionDenied,
    ServingError,
    Unauthenticated,
    Unavailable,
)
from .metrics import Metrics

log = logging.getLogger("svda.server")


class DeadlinePassed(ServingError):
    """The request's deadline passed before it finished (DEADLINE_EXCEEDED)."""


class UploadStalled(ServingError):
    """An upload sent nothing for ``upload_stall_timeout_s`` (DEADLINE_EXCEEDED)."""


# Checked in order: the first class the exception is an instance of wins (BaseMismatch is an
# AdapterFormatError, so it comes first).
STATUS_OF: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (
    (AdapterNotFound, grpc.StatusCode.NOT_FOUND),
    (BaseMismatch, grpc.StatusCode.FAILED_PRECONDITION),
    (AdapterFormatError, grpc.StatusCode.INVALID_ARGUMENT),
    (InvalidRequest, grpc.StatusCode.INVALID_ARGUMENT),
    (InvalidMetadata, grpc.StatusCode.INVALID_ARGUMENT),  # bad adapter id, tag, tenant
    (Overloaded, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (Unavailable, grpc.StatusCode.UNAVAILABLE),
    (Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    (StorePermissionError, grpc.StatusCode.PERMISSION_DENIED),
    (CorruptObjectError, grpc.StatusCode.DATA_LOSS),
    (DeadlinePassed, grpc.StatusCode.DEADLINE_EXCEEDED),
    (UploadStalled, grpc.StatusCode.DEADLINE_EXCEEDED),
)


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and message a client gets for ``exc``."""
    for cls, code in STATUS_OF:
        if isinstance(exc, cls):
            return code, _bounded(str(exc)) or cls.__name__
    return grpc.StatusCode.INTERNAL, (
        f"internal error ({type(exc).__name__}: {str(exc)[:200]}); the server log has the traceback"
    )


MAX_MESSAGE_CHARS = 2000  # status details travel in a header: keep them well under its limit


def _bounded(message: str) -> str:
    if len(message) <= MAX_MESSAGE_CHARS:
        return message
    return f"{message[: MAX_MESSAGE_CHARS - 20]}… ({len(message)} characters)"


class StatusInterceptor(aio.ServerInterceptor):
    """Wraps every handler: exception -> status, and per-RPC metrics."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Any],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        rpc = handler_call_details.method.rsplit("/", 1)[-1]
        if handler.request_deserializer is not None:
            handler = handler._replace(request_deserializer=_tolerant(handler.request_deserializer))
        if handler.unary_unary:
            return handler._replace(unary_unary=self._unary(rpc, handler.unary_unary))
        if handler.stream_unary:
            return handler._replace(stream_unary=self._unary(rpc, handler.stream_unary))
        if handler.unary_stream:
            return handler._replace(unary_stream=self._streaming(rpc, handler.unary_stream))
        return handler._replace(stream_stream=self._streaming(rpc, handler.stream_stream))

    def _unary(self, rpc: str, behavior: Callable) -> Callable:
        async def wrapper(request: Any, context: aio.ServicerContext) -> Any:
            start = time.perf_counter()
            try:
                result = behavior(_checked(request), context)
                response = await result if inspect.isawaitable(result) else result
            except BaseException as exc:
                await self._fail(rpc, exc, context, start)
                raise
            self._record(rpc, _final_code(context), start)
            return response

        return wrapper

    def _streaming(self, rpc: str, behavior: Callable) -> Callable:
        async def wrapper(request: Any, context: aio.ServicerContext) -> AsyncIterator[Any]:
            start = time.perf_counter()
            try:
                result = behavior(_checked(request), context)
                if hasattr(result, "__aiter__"):
                    async for item in result:
                        yield item
                elif inspect.isawaitable(result):  # a handler that writes with context.write
                    await result
                else:
                    for item in result:
                        yield item
            except BaseException as exc:
                await self._fail(rpc, exc, context, start)
                raise
            self._record(rpc, _final_code(context), start)

        return wrapper

    async def _fail(
        self, rpc: str, exc: BaseException, context: aio.ServicerContext, start: float
    ) -> None:
        """Record ``exc`` and turn it into a status: re-raises (abort) unless it already is one."""
        if isinstance(exc, aio.AbortError):  # the handler aborted with its own status
            self._record(rpc, _final_code(context), start)
            return
        if isinstance(exc, (asyncio.CancelledError, GeneratorExit, KeyboardInterrupt, SystemExit)):
            self._record(rpc, grpc.StatusCode.CANCELLED, start)
            return
        code, message = status_of(exc)
        self._record(rpc, code, start)
        line = json.dumps({"rpc": rpc, "status": code.name, "message": message})
        if code == grpc.StatusCode.INTERNAL:
            log.error(line, exc_info=exc)
        else:
            log.info(line)
        await context.abort(code, message)  # raises AbortError, which replaces ``exc``

    def _record(self, rpc: str, code: grpc.StatusCode, start: float) -> None:
        elapsed = time.perf_counter() - start
        self.metrics.requests.labels(rpc=rpc, status=code.name).inc()
        self.metrics.request_latency.labels(rpc=rpc, status=code.name).observe(elapsed)


class Undecodable:
    """Stands for a request message that failed to parse (e.g. invalid UTF-8 in a string)."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    def invalid(self) -> InvalidRequest:
        return InvalidRequest(
            f"the request message could not be parsed ({type(self.error).__name__}: "
            f"{str(self.error)[:200]}); string fields must be valid UTF-8"
        )


def _tolerant(deserializer: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    """``deserializer`` that returns :class:`Undecodable` instead of raising: grpc would
    answer UNKNOWN, the handler wrapper answers INVALID_ARGUMENT."""

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as exc:  # protobuf DecodeError and friends
            return Undecodable(exc)

    return deserialize


def _checked(request: Any) -> Any:
    """``request`` (a message or a stream of them) with :class:`Undecodable` raised."""
    if isinstance(request, Undecodable):
        raise request.invalid()
    if hasattr(request, "__aiter__"):
        return _checked_stream(request)
    return request


async def _checked_stream(requests: Any) -> AsyncIterator[Any]:
    async for message in requests:
        if isinstance(message, Undecodable):
            raise message.invalid()
        yield message


def _final_code(context: aio.ServicerContext) -> grpc.StatusCode:
    code = context.code()
    if code is None:
        return grpc.StatusCode.OK
    if isinstance(code, grpc.StatusCode):
        return code
    return next((c for c in grpc.StatusCode if c.value[0] == code), grpc.StatusCode.UNKNOWN)
