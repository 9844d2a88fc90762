"""Typed results and errors of the svda client (plain dataclasses, no protobuf in sight)."""

from __future__ import annotations

from dataclasses import dataclass

import grpc

from svda.proto.svda.v1 import serving_pb2 as pb


# ----- results -------------------------------------------------------------------------------
@dataclass(frozen=True)
class TokenChunk:
    """New text of a streamed generation since the previous chunk."""

    text: str
    token_ids: tuple[int, ...]


@dataclass(frozen=True)
class Completion:
    """A finished generation (the result of ``generate``, the last event of ``stream``)."""

    text: str
    finish_reason: str  # "length" | "stop" | "eos" | "cancelled"
    prompt_tokens: int
    completion_tokens: int
    adapter_id: str | None  # None: the base model
    merged: bool
    latency_s: float
    time_to_first_token_s: float
    request_id: str

    @classmethod
    def from_pb(cls, m: pb.GenerateResponse) -> Completion:
        reason = pb.FinishReason.Name(m.finish_reason).removeprefix("FINISH_REASON_").lower()
        return cls(
            text=m.text,
            finish_reason=reason,
            prompt_tokens=m.prompt_tokens,
            completion_tokens=m.completion_tokens,
            adapter_id=m.adapter_id or None,
            merged=m.merged,
            latency_s=m.latency_s,
            time_to_first_token_s=m.time_to_first_token_s,
            request_id=m.request_id,
        )


@dataclass(frozen=True)
class ResidentAdapter:
    adapter_id: str
    version: int
    method: str
    bytes: int
    pinned: bool
    last_used: float  # unix time
    uses: int
    tenant: str | None = None  # its namespace; None: the shared one

    @classmethod
    def from_pb(cls, m: pb.ResidentAdapter) -> ResidentAdapter:
        fields = (m.adapter_id, m.version, m.method, m.bytes, m.pinned, m.last_used, m.uses)
        return cls(*fields, m.tenant or None)


@dataclass(frozen=True)
class AdapterEntry:
    """One version of an adapter in the server's store."""

    adapter_id: str
    version: int
    tenant: str | None  # None: the shared namespace
    name: str | None
    method: str
    base_fingerprint: str
    size_bytes: int
    sha256: str
    created: str
    tags: tuple[str, ...]
    compatible: bool  # made for the served base model
    resident: bool
    pinned: bool

    @classmethod
    def from_pb(cls, m: pb.AdapterEntry) -> AdapterEntry:
        return cls(
            adapter_id=m.adapter_id,
            version=m.version,
            tenant=m.tenant or None,
            name=m.name or None,
            method=m.method,
            base_fingerprint=m.base_fingerprint,
            size_bytes=m.size_bytes,
            sha256=m.sha256,
            created=m.created,
            tags=tuple(m.tags),
            compatible=m.compatible,
            resident=m.resident,
            pinned=m.pinned,
        )


@dataclass(frozen=True)
class ServerInfo:
    base_model: str
    base_fingerprint: str
    methods: tuple[str, ...]
    max_context_tokens: int
    max_new_tokens: int
    max_batch_size: int
    adapter_memory_bytes: int
    max_upload_bytes: int
    version: str
    tenant: str | None  # the caller's tenant; None: admin or no authentication
    auth_enabled: bool

    @classmethod
    def from_pb(cls, m: pb.GetServerInfoResponse) -> ServerInfo:
        return cls(
            base_model=m.base_model,
            base_fingerprint=m.base_fingerprint,
            methods=tuple(m.methods),
            max_context_tokens=m.max_context_tokens,
            max_new_tokens=m.max_new_tokens,
            max_batch_size=m.max_batch_size,
            adapter_memory_bytes=m.adapter_memory_bytes,
            max_upload_bytes=m.max_upload_bytes,
            version=m.version,
            tenant=m.tenant or None,
            auth_enabled=m.auth_enabled,
        )


# ----- errors --------------------------------------------------------------------------------
class SvdaClientError(Exception):
    """A failed call: ``code`` is the gRPC status, ``message`` the server's explanation."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"


class NotFound(SvdaClientError):
    code = grpc.StatusCode.NOT_FOUND


class InvalidArgument(SvdaClientError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class FailedPrecondition(SvdaClientError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhausted(SvdaClientError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unauthenticated(SvdaClientError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(SvdaClientError):
    code = grpc.StatusCode.PERMISSION_DENIED


class Unavailable(SvdaClientError):
    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(SvdaClientError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Cancelled(SvdaClientError):
    code = grpc.StatusCode.CANCELLED


class Internal(SvdaClientError):
    code = grpc.StatusCode.INTERNAL


_ERRORS = {cls.code: cls for cls in SvdaClientError.__subclasses__()}


def error_from_rpc(exc: grpc.RpcError) -> SvdaClientError:
    """The :class:`SvdaClientError` subclass for a failed gRPC call."""
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    details = exc.details() if hasattr(exc, "details") else str(exc)
    cls = _ERRORS.get(code, SvdaClientError)
    return cls(details or code.name, code)
