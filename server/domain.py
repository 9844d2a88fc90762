"""Domain objects of the serving layer: what the gRPC servicer hands the engine and gets back.

The servicer (``svda.server.servicer``) converts protobuf messages to these and back; the engine
(``svda.server.engine``) never sees protobuf. Errors raised by the engine are the classes below
or the store's / format's own errors, one name per concept: an adapter the caller may not see is
``svda.adapters_store.AdapterNotFound`` (NOT_FOUND), one made for another base is
``svda.adapters_store.BaseMismatch`` (FAILED_PRECONDITION)); one interceptor maps them to gRPC status codes
(``svda.server.interceptor``).
"""

from __future__ import annotations

import enum
import math
import time
from dataclasses import dataclass, field

from svda.runtime.names import MAX_NAME_CHARS, NAME_RULE, is_valid_name, short


# ----- errors (mapped to gRPC status codes by the interceptor) -----------------------------------
class ServingError(Exception):
    """Base class of errors the server reports to a client."""


class InvalidRequest(ServingError, ValueError):
    """Bad sampling parameters, an empty prompt, a prompt over the context length (INVALID_ARGUMENT)."""


class Overloaded(ServingError):
    """Queue full, or adapter memory full of pinned adapters (RESOURCE_EXHAUSTED)."""


class Unavailable(ServingError):
    """What served the request went away, e.g. a cluster replica that died (UNAVAILABLE): retry."""


class Unauthenticated(ServingError):
    """Missing or unknown bearer token (UNAUTHENTICATED)."""


class PermissionDenied(ServingError):
    """The caller's tenant may not do this (PERMISSION_DENIED)."""


MAX_ID_CHARS = MAX_NAME_CHARS


def short_id(adapter_id: str, limit: int = 40) -> str:
    """``adapter_id`` quoted for an error message: at most ``limit`` characters of it."""
    return short(adapter_id, limit)


def check_adapter_id(adapter_id: str) -> str:
    """``adapter_id`` if it follows the naming rule of ids and names (``svda.runtime.names``),
    else :class:`InvalidRequest` quoting at most a short prefix of it."""
    if not is_valid_name(adapter_id):
        raise InvalidRequest(f"invalid adapter id {short_id(adapter_id)}: use {NAME_RULE}")
    return adapter_id


# ----- requests ---------------------------------------------------------------------------------
class MergeMode(str, enum.Enum):
    AUTO = "auto"  # the server decides (see the merge policy in the README)
    UNMERGED = "unmerged"  # always the batched, unmerged path
    MERGED = "merged"  # merge this request's adapter into the weights while it runs


# Sampling ranges (outside them the logits overflow to inf/nan or the request is nonsense).
MIN_TEMPERATURE, MAX_TEMPERATURE = 0.01, 100.0  # or exactly 0: greedy
MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY = 0.01, 10.0  # 1: no penalty
MAX_TOP_K = 1 << 20  # 0: no top-k filtering


@dataclass(frozen=True)
class SamplingParams:
    """Decoding settings. ``temperature == 0`` is greedy decoding (top_p/top_k then unused)."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k filtering
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None

    def validate(self, max_new_tokens_limit: int) -> None:
        checks = [
            (1 <= self.max_new_tokens <= max_new_tokens_limit,
             f"max_new_tokens must be between 1 and {max_new_tokens_limit}, got {self.max_new_tokens}"),
            (math.isfinite(self.temperature)
             and (self.temperature == 0 or MIN_TEMPERATURE <= self.temperature <= MAX_TEMPERATURE),
             f"temperature must be 0 (greedy) or in [{MIN_TEMPERATURE}, {MAX_TEMPERATURE}], "
             f"got {self.temperature}"),
            (math.isfinite(self.top_p) and 0 < self.top_p <= 1,
             f"top_p must be in (0, 1], got {self.top_p}"),
            (0 <= self.top_k <= MAX_TOP_K, f"top_k must be in [0, {MAX_TOP_K}], got {self.top_k}"),
            (math.isfinite(self.repetition_penalty)
             and MIN_REPETITION_PENALTY <= self.repetition_penalty <= MAX_REPETITION_PENALTY,
             f"repetition_penalty must be in [{MIN_REPETITION_PENALTY}, "
             f"{MAX_REPETITION_PENALTY}] (1: off), got {self.repetition_penalty}"),
            (len(self.stop) <= 16 and all(0 < len(s) <= 256 for s in self.stop),
             "stop: at most 16 non-empty strings of at most 256 characters"),
        ]  # fmt: skip
        for ok, message in checks:
            if not ok:
                raise InvalidRequest(message)


@dataclass(frozen=True)
class ChatMessage:
    role: str  # "system" | "user" | "assistant"
    content: str


@dataclass(frozen=True)
class GenerationRequest:
    """One generation. Exactly one of ``prompt`` and ``messages`` is given; ``messages`` go
    through the base tokenizer's chat template on the server."""

    adapter_id: str | None  # None or "": the base model
    prompt: str | None = None
    messages: tuple[ChatMessage, ...] | None = None
    params: SamplingParams = field(default_factory=SamplingParams)
    mode: MergeMode = MergeMode.AUTO
    tenant: str | None = None  # None: admin / no auth
    deadline: float | None = None  # time.monotonic() value after which the request is dropped
    request_id: str = ""

    def expired(self, now: float | None = None) -> bool:
        return self.deadline is not None and (now or time.monotonic()) >= self.deadline


# ----- results -------------------------------------------------------------------------------
class FinishReason(str, enum.Enum):
    LENGTH = "length"  # max_new_tokens reached
    STOP = "stop"  # a stop string was produced (it is not part of the text)
    EOS = "eos"  # the model produced its end-of-sequence token
    CANCELLED = "cancelled"  # the client cancelled or its deadline passed


@dataclass(frozen=True)
class TokenChunk:
    """New text since the previous chunk (token ids included)."""

    text: str
    token_ids: tuple[int, ...]


@dataclass(frozen=True)
class Completion:
    """The last event of every request."""

    text: str  # the whole generated text (stop string removed)
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    adapter_id: str | None
    merged: bool  # served on the merged path
    latency_s: float
    time_to_first_token_s: float


@dataclass(frozen=True)
class ResidentAdapter:
    adapter_id: str
    version: int
    method: str
    bytes: int  # memory the adapter's tensors take in the engine
    pinned: bool
    last_used: float  # time.time()
    uses: int
    tenant: str | None = None  # its namespace; None: the shared one


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
