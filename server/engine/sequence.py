"""One request inside the engine: its tokens, sampler, text stream, timings and events."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

from ..domain import Completion, FinishReason, GenerationRequest, TokenChunk
from .adapters import Key
from .detok import TextStream
from .sampling import RowSampler

request_log = logging.getLogger("svda.server.requests")
log = logging.getLogger(__name__)

EngineEvent = TokenChunk | Completion | BaseException  # what a request's on_event gets
EventCallback = Callable[[EngineEvent], None]


class RequestHandle:
    """What :meth:`Engine.submit` returns: the request id and a thread-safe ``cancel``."""

    def __init__(self, request_id: str, cancelled: threading.Event, wake: Callable[[], None]):
        self.request_id = request_id
        self._cancelled = cancelled
        self._wake = wake

    def cancel(self) -> None:
        """Drop the request; its row leaves the batch within one step (finish CANCELLED)."""
        self._cancelled.set()
        self._wake()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()


@dataclass(eq=False)
class Sequence:
    request: GenerationRequest
    request_id: str
    prompt_ids: list[int]
    on_event: EventCallback
    sampler: RowSampler
    stream: TextStream
    key: Key | None = None  # adapter (namespace, store id, version); None: the base model
    future: Future | None = None  # the adapter's load (result: internal name)
    adapter_name: str | None = None  # set on admission
    generated: list[int] = field(default_factory=list)
    pending_ids: list[int] = field(default_factory=list)  # ids since the last chunk
    arrival: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    merged_tokens: int = 0
    unmerged_tokens: int = 0
    cancelled: threading.Event = field(default_factory=threading.Event)
    done: bool = False

    @property
    def ready(self) -> bool:
        return self.future is None or self.future.done()

    @property
    def remaining(self) -> int:
        return self.request.params.max_new_tokens - len(self.generated)

    def should_drop(self, now: float) -> bool:
        return self.cancelled.is_set() or self.request.expired(now)

    # ----- tokens and events -------------------------------------------------------------
    def accept(self, token: int, eos_ids: frozenset[int], merged: bool) -> FinishReason | None:
        """Record one generated token, emit its text; the finish reason if the request ends."""
        if self.first_token_at is None:
            self.first_token_at = time.monotonic()
        self.generated.append(token)
        self.pending_ids.append(token)
        if merged:
            self.merged_tokens += 1
        else:
            self.unmerged_tokens += 1
        if token in eos_ids:
            return FinishReason.EOS
        self._chunk(self.stream.push(token))
        if self.stream.stopped:
            return FinishReason.STOP
        if self.remaining <= 0:
            return FinishReason.LENGTH
        return None

    def _chunk(self, text: str, force: bool = False) -> None:
        if text or (force and self.pending_ids):
            self.emit(TokenChunk(text=text, token_ids=tuple(self.pending_ids)))
            self.pending_ids = []

    def emit(self, event: object) -> None:
        """Call the request's callback; a callback that raises cancels the request."""
        try:
            self.on_event(event)
        except Exception:
            log.exception("on_event of request %s raised; cancelling it", self.request_id)
            self.cancelled.set()

    def complete(self, reason: FinishReason) -> Completion:
        """Flush held text (and token ids not yet sent, e.g. the EOS token) in a last chunk,
        then send the final :class:`Completion` (once)."""
        self._chunk(self.stream.finish(), force=True)
        if self.stream.stopped and reason in (FinishReason.LENGTH, FinishReason.EOS):
            reason = FinishReason.STOP  # the stop string completed only in the final flush
        now = time.monotonic()
        completion = Completion(
            text=self.stream.final_text,
            finish_reason=reason,
            prompt_tokens=len(self.prompt_ids),
            completion_tokens=len(self.generated),
            adapter_id=self.request.adapter_id or None,
            merged=self.merged_tokens > 0 and self.unmerged_tokens == 0,
            latency_s=now - self.arrival,
            time_to_first_token_s=(self.first_token_at or now) - self.arrival,
        )
        self.done = True
        self.emit(completion)
        self._log(completion)
        return completion

    def fail(self, error: BaseException) -> None:
        self.done = True
        self.emit(error)
        request_log.info(
            json.dumps(
                {
                    "request_id": self.request_id,
                    "adapter_id": self.request.adapter_id or None,
                    "tenant": self.request.tenant,
                    "prompt_tokens": len(self.prompt_ids),
                    "completion_tokens": len(self.generated),
                    "error": f"{type(error).__name__}: {error}",
                }
            )
        )

    def _log(self, completion: Completion) -> None:
        record = {
            "request_id": self.request_id,
            "adapter_id": completion.adapter_id,
            "adapter_version": self.key.version if self.key else None,
            "tenant": self.request.tenant,
            "prompt_tokens": completion.prompt_tokens,
            "completion_tokens": completion.completion_tokens,
            "finish_reason": completion.finish_reason.value,
            "merged": completion.merged,
            "latency_s": round(completion.latency_s, 6),
            "ttft_s": round(completion.time_to_first_token_s, 6),
        }
        request_log.info(json.dumps(record))
