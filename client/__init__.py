"""svda.client: sync and async Python clients of the svda gRPC server, and ``svda-client``.

Depends only on ``grpc`` and the generated stubs in :mod:`svda.proto` (no torch).
"""

from .client import DEFAULT_TARGET, AsyncClient, Client, generate_request
from .types import (
    AdapterEntry,
    Cancelled,
    Completion,
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResidentAdapter,
    ResourceExhausted,
    ServerInfo,
    SvdaClientError,
    TokenChunk,
    Unauthenticated,
    Unavailable,
)

__all__ = [
    "DEFAULT_TARGET",
    "AdapterEntry",
    "AsyncClient",
    "Cancelled",
    "Client",
    "Completion",
    "DeadlineExceeded",
    "FailedPrecondition",
    "Internal",
    "InvalidArgument",
    "NotFound",
    "PermissionDenied",
    "ResidentAdapter",
    "ResourceExhausted",
    "ServerInfo",
    "SvdaClientError",
    "TokenChunk",
    "Unauthenticated",
    "Unavailable",
    "generate_request",
]
