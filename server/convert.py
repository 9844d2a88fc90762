"""Conversions between protobuf messages (``svda.v1``) and the server's domain objects."""

from __future__ import annotations

from svda.adapters_store.store import StoreEntry
from svda.proto.svda.v1 import serving_pb2 as pb

from .auth import Caller
from .domain import (
    ChatMessage,
    Completion,
    FinishReason,
    GenerationRequest,
    InvalidRequest,
    MergeMode,
    ResidentAdapter,
    SamplingParams,
    ServerInfo,
)

DEFAULT_MAX_NEW_TOKENS = 64
CHAT_ROLES = ("system", "user", "assistant")
_MODES = {
    pb.MERGE_MODE_AUTO: MergeMode.AUTO,
    pb.MERGE_MODE_UNMERGED: MergeMode.UNMERGED,
    pb.MERGE_MODE_MERGED: MergeMode.MERGED,
}
_FINISH = {
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
    FinishReason.STOP: pb.FINISH_REASON_STOP,
    FinishReason.EOS: pb.FINISH_REASON_EOS,
    FinishReason.CANCELLED: pb.FINISH_REASON_CANCELLED,
}


def generation_request(
    request: pb.GenerateRequest, tenant: str | None, deadline: float | None, request_id: str
) -> GenerationRequest:
    """A :class:`GenerationRequest` from the wire; unset optional fields get their defaults."""
    which = request.WhichOneof("input")
    if which is None:
        raise InvalidRequest("give either `prompt` or `chat` messages")
    messages = _chat(request.chat) if which == "chat" else None
    if request.mode not in _MODES:
        raise InvalidRequest(f"unknown mode {request.mode}; use AUTO, UNMERGED or MERGED")
    return GenerationRequest(
        adapter_id=request.adapter_id or None,
        prompt=request.prompt if which == "prompt" else None,
        messages=messages,
        params=sampling_params(request),
        mode=_MODES[request.mode],
        tenant=tenant,
        deadline=deadline,
        request_id=request_id,
    )


def sampling_params(request: pb.GenerateRequest) -> SamplingParams:
    def optional(name: str, default: float) -> float:
        return getattr(request, name) if request.HasField(name) else default

    return SamplingParams(
        max_new_tokens=request.max_new_tokens or DEFAULT_MAX_NEW_TOKENS,
        temperature=optional("temperature", 0.0),
        top_p=optional("top_p", 1.0),
        top_k=request.top_k,
        repetition_penalty=optional("repetition_penalty", 1.0),
        stop=tuple(request.stop),
        seed=request.seed if request.HasField("seed") else None,
    )


def _chat(chat: pb.ChatMessages) -> tuple[ChatMessage, ...]:
    if not chat.messages:
        raise InvalidRequest("`chat` needs at least one message")
    for m in chat.messages:
        if m.role not in CHAT_ROLES:
            raise InvalidRequest(f"chat role {m.role!r} is not one of {', '.join(CHAT_ROLES)}")
    return tuple(ChatMessage(role=m.role, content=m.content) for m in chat.messages)


def completion_pb(done: Completion, request_id: str) -> pb.GenerateResponse:
    return pb.GenerateResponse(
        text=done.text,
        finish_reason=_FINISH[done.finish_reason],
        prompt_tokens=done.prompt_tokens,
        completion_tokens=done.completion_tokens,
        adapter_id=done.adapter_id or "",
        merged=done.merged,
        latency_s=done.latency_s,
        time_to_first_token_s=done.time_to_first_token_s,
        request_id=request_id,
    )


def resident_pb(r: ResidentAdapter) -> pb.ResidentAdapter:
    return pb.ResidentAdapter(
        adapter_id=r.adapter_id,
        version=r.version,
        method=r.method,
        bytes=r.bytes,
        pinned=r.pinned,
        last_used=r.last_used,
        uses=r.uses,
        tenant=r.tenant or "",
    )


def entry_pb(
    entry: StoreEntry, served_fingerprint: str, resident: ResidentAdapter | None = None
) -> pb.AdapterEntry:
    return pb.AdapterEntry(
        adapter_id=entry.id,
        version=entry.version,
        tenant=entry.tenant or "",
        name=entry.name or "",
        method=entry.method,
        base_fingerprint=entry.base_fingerprint,
        size_bytes=entry.size,
        sha256=entry.sha256,
        created=entry.created,
        tags=list(entry.tags),
        compatible=entry.base_fingerprint == served_fingerprint,
        resident=resident is not None,
        pinned=resident is not None and resident.pinned,
    )


def info_pb(
    info: ServerInfo, max_upload_bytes: int, caller: Caller, auth_enabled: bool
) -> pb.GetServerInfoResponse:
    return pb.GetServerInfoResponse(
        base_model=info.base_model,
        base_fingerprint=info.base_fingerprint,
        methods=list(info.methods),
        max_context_tokens=info.max_context_tokens,
        max_new_tokens=info.max_new_tokens,
        max_batch_size=info.max_batch_size,
        adapter_memory_bytes=info.adapter_memory_bytes,
        max_upload_bytes=max_upload_bytes,
        version=info.version,
        tenant=caller.tenant or "",
        auth_enabled=auth_enabled,
    )
