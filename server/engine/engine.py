"""The serving engine: one resident base model, per-request adapters, continuous batching.

    >>> engine = Engine(load_base_model(folder), AdapterStore(root), EngineSettings())
    >>> engine.start()
    >>> handle = engine.submit(GenerationRequest("acme", prompt="Hi"), on_event=print)
    >>> engine.stop()

``submit`` checks a request synchronously (sampling parameters, prompt length, adapter
visibility and base) and queues it; the scheduler thread (:mod:`.scheduler`) then calls
``on_event`` with zero or more :class:`TokenChunk`, then one :class:`Completion` (or one
exception, e.g. when the adapter file turns out to be corrupt). No gRPC in here: the servicer
converts protobuf to the domain objects of :mod:`svda.server.domain`.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import threading
import uuid

from svda.adapters_store import AdapterFile, AdapterStore, read_adapter
from svda.runtime import AdapterModel, BaseModel, available_methods

from ..domain import (
    GenerationRequest,
    InvalidRequest,
    ResidentAdapter,
    ServerInfo,
)
from ..metrics import Metrics
from .adapters import AdapterManager, key_of
from .detok import TextStream
from .sampling import RowSampler
from .scheduler import Scheduler
from .sequence import EventCallback, RequestHandle, Sequence
from .settings import EngineSettings, context_limit

ROLES = ("system", "user", "assistant")
MAX_CHARS_PER_TOKEN = 16  # prompts over max_context × this many characters are refused untokenized
log = logging.getLogger(__name__)


class Engine:
    """Serves generation requests for the base model and any adapter in ``store``."""

    def __init__(
        self,
        base: BaseModel,
        store: AdapterStore,
        settings: EngineSettings,
        metrics: Metrics | None = None,
    ):
        settings.validate()
        if base.tokenizer is None:
            raise ValueError(
                f"base model {base.name!r} has no tokenizer; serve a folder with tokenizer files"
            )
        self.base, self.tokenizer, self.settings, self.metrics = (
            base,
            base.tokenizer,
            settings,
            metrics,
        )
        self.store = store
        if str(next(base.model.parameters()).device) != str(settings.device):
            base.model.to(settings.device)
        self.model = AdapterModel(base.model)
        self.max_context = context_limit(settings, base.model.config)
        self._model_lock = threading.RLock()
        self.adapters = AdapterManager(
            self.model, store, settings.adapter_memory_bytes, self._model_lock, metrics,
            threads=settings.loader_threads, prune_tolerance=settings.svda_prune_tolerance,
        )  # fmt: skip
        self.scheduler = Scheduler(
            self.model, self.adapters, settings, self._model_lock, self._eos_ids(), metrics
        )

    def _eos_ids(self) -> frozenset[int]:
        ids: set[int] = set()
        for value in (
            getattr(self.tokenizer, "eos_token_id", None),
            getattr(getattr(self.base.model, "generation_config", None), "eos_token_id", None),
        ):
            if isinstance(value, int):
                ids.add(value)
            elif isinstance(value, (list, tuple)):
                ids.update(int(v) for v in value)
        return frozenset(ids)

    # ----- lifecycle ----------------------------------------------------------------------------
    def start(self) -> None:
        """Start the scheduler thread (idempotent)."""
        scheduler = self.scheduler
        if scheduler.thread is not None and scheduler.thread.is_alive():
            return
        scheduler.stopping = False
        scheduler.thread = threading.Thread(target=scheduler.run, name="svda-engine", daemon=True)
        scheduler.thread.start()

    def stop(self) -> None:
        """Cancel running and waiting requests (``FinishReason.CANCELLED``) and join the thread.
        Final: the adapter loader threads are shut down too."""
        scheduler = self.scheduler
        with scheduler.cond:
            scheduler.stopping = True
            scheduler.cond.notify_all()
        if scheduler.thread is not None:
            scheduler.thread.join()
            scheduler.thread = None
        else:
            scheduler._drain()
        self.adapters.shutdown()

    # ----- requests ------------------------------------------------------------------------------
    def submit(
        self,
        request: GenerationRequest,
        on_event: EventCallback,
    ) -> RequestHandle:
        """Check ``request`` and queue it; raises InvalidRequest, AdapterNotFound,
        BaseMismatch or Overloaded before queuing (see the module docstring)."""
        params = request.params
        params.validate(self.settings.max_new_tokens_limit)
        prompt_ids = self.encode_prompt(request)
        total = len(prompt_ids) + params.max_new_tokens
        if total > self.max_context:
            raise InvalidRequest(
                f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({params.max_new_tokens}) "
                f"= {total} exceeds the context length {self.max_context}; shorten the prompt "
                "or lower max_new_tokens"
            )
        entry = (
            self.adapters.resolve(request.adapter_id, request.tenant)
            if request.adapter_id
            else None
        )
        request_id = request.request_id or uuid.uuid4().hex
        seq = Sequence(
            request=request,
            request_id=request_id,
            prompt_ids=prompt_ids,
            on_event=on_event,
            sampler=RowSampler(params, prompt_ids, device=str(self.scheduler.device)),
            stream=TextStream(self.tokenizer, prompt_ids, params.stop),
        )
        if entry is not None:
            seq.key = key_of(entry)
            seq.future = self.adapters.acquire(entry)
        try:
            self.scheduler.enqueue(seq)
        except BaseException:
            if seq.key is not None:
                self.adapters.release(seq.key)
            raise
        return RequestHandle(request_id, seq.cancelled, self.scheduler.wake)

    def encode_prompt(self, request: GenerationRequest) -> list[int]:
        """Token ids of the prompt text, or of the chat messages through the chat template.
        Text longer than ``max_context × MAX_CHARS_PER_TOKEN`` characters is refused before
        tokenizing (it could not fit the context anyway, and tokenizing it costs time and
        memory)."""
        if (request.prompt is None) == (request.messages is None):
            raise InvalidRequest("give exactly one of prompt and messages")
        self._check_text_length(request)
        if request.prompt is not None:
            if not request.prompt:
                raise InvalidRequest("the prompt is empty")
            ids = self.tokenizer(request.prompt).input_ids
        else:
            ids = self._encode_chat(request)
        if not ids:
            raise InvalidRequest("the prompt encodes to no tokens")
        return list(ids)

    def _check_text_length(self, request: GenerationRequest) -> None:
        texts = (
            [request.prompt]
            if request.prompt is not None
            else [m.content for m in request.messages or ()]
        )
        chars = sum(len(t) for t in texts)
        limit = self.max_context * MAX_CHARS_PER_TOKEN
        if chars > limit:
            raise InvalidRequest(
                f"the prompt has {chars} characters, more than fit the context of "
                f"{self.max_context} tokens (at most {limit} characters are accepted); "
                "shorten the prompt"
            )

    def verify_adapter(self, source: str | os.PathLike) -> AdapterFile:
        """Every load check of the adapter file at ``source`` against the served model, as a
        load would run them (file, shapes, config, base, regeneration probe); nothing stays
        attached. Returns the parsed file."""
        adapter_file = read_adapter(source)
        self.adapters.verify(adapter_file)
        return adapter_file

    def _encode_chat(self, request: GenerationRequest) -> list[int]:
        if not request.messages:
            raise InvalidRequest("messages is empty; give at least one message")
        for m in request.messages:
            if m.role not in ROLES:
                raise InvalidRequest(f"message role must be one of {ROLES}, got {m.role!r}")
        if not getattr(self.tokenizer, "chat_template", None):
            raise InvalidRequest(
                f"base model {self.base.name!r} has no chat template; send a plain prompt"
            )
        text = self.tokenizer.apply_chat_template(
            [{"role": m.role, "content": m.content} for m in request.messages],
            tokenize=False,
            add_generation_prompt=True,
        )
        return self.tokenizer(text, add_special_tokens=False).input_ids

    # ----- adapters -------------------------------------------------------------------------------
    def load_adapter(self, adapter_id: str, tenant: str | None = None) -> ResidentAdapter:
        """Make the latest version of ``adapter_id`` resident now (preload)."""
        return self.adapters.load(adapter_id, tenant)

    def unload_adapter(self, adapter_id: str, tenant: str | None = None) -> bool:
        """Detach ``adapter_id`` (now, or when its running requests end); False if not resident."""
        return self.adapters.unload(adapter_id, tenant)

    def pin_adapter(
        self, adapter_id: str, tenant: str | None = None, pinned: bool = True
    ) -> ResidentAdapter:
        """Load and pin (or unpin) ``adapter_id``: pinned adapters are never evicted."""
        return self.adapters.pin(adapter_id, tenant, pinned)

    def resident_adapters(self, tenant: str | None = None) -> list[ResidentAdapter]:
        return self.adapters.resident(tenant)

    def info(self) -> ServerInfo:
        try:
            version = importlib.metadata.version("svda")
        except importlib.metadata.PackageNotFoundError:
            version = "unknown"
        return ServerInfo(
            base_model=self.base.name,
            base_fingerprint=self.model.fingerprint.whole,
            methods=tuple(available_methods()),
            max_context_tokens=self.max_context,
            max_new_tokens=self.settings.max_new_tokens_limit,
            max_batch_size=self.settings.max_batch_size,
            adapter_memory_bytes=self.settings.adapter_memory_bytes,
            max_upload_bytes=0,
            version=version,
        )
