"""The vLLM engine backend: svda's requests, store, tenants and checks; vLLM's ``AsyncLLM``
schedules, pages the KV cache, runs attention and samples.

    >>> engine = VllmEngine(load_base_model(folder), AdapterStore(root), EngineSettings(),
    ...                     options=VllmOptions(dtype="float32"))
    >>> engine.start()          # builds AsyncLLM (its EngineCore is a spawned process)
    >>> engine.submit(GenerationRequest("acme", prompt="Hi"), on_event=print)
    >>> engine.stop()

The native :class:`~svda.server.engine.Engine` is kept (never started) for what stays svda's:
prompt checks and encoding, adapter resolution per tenant, the load checks (file, shapes,
base, probe), adapter memory and residency. A loaded adapter is compiled to its serving form
and handed to vLLM as a LoRA request (:mod:`.forms`); the svda plugin (:mod:`.plugin`) applies
it per token. svda's own text stream decides EOS, stop strings and length, as on the native
engine. Greedy rows equal the native engine's; sampled rows use vLLM's sampler (seeded).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import shutil
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from svda.adapters_store import AdapterFile, AdapterStore

from ..domain import (
    FinishReason,
    GenerationRequest,
    InvalidRequest,
    Overloaded,
    ResidentAdapter,
    ServerInfo,
)
from ..engine import Engine, EngineSettings
from ..engine.adapters import key_of
from ..engine.detok import TextStream
from ..engine.sequence import EventCallback, RequestHandle, Sequence
from ..metrics import Metrics
from .forms import write_vllm_adapter

DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class VllmOptions:
    """vLLM-side settings: dtype, LoRA slots, KV cache memory, CPU thread binding."""

    dtype: str = "float32"
    max_loras: int = 8  # adapters in one batch (vLLM's LoRA slots)
    max_cpu_loras: int = 64  # adapters vLLM keeps loaded beside the slots
    kv_cache_gib: int = 1  # VLLM_CPU_KVCACHE_SPACE on CPU (whole GiB)
    threads_bind: str = "auto"  # VLLM_CPU_OMP_THREADS_BIND ("auto", "0-1", "nobind")
    seed: int = 0

    def validate(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"vllm engine: dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.max_loras < 1 or self.max_cpu_loras < self.max_loras:
            raise ValueError("vllm engine: need 1 <= max_loras <= max_cpu_loras")


class VllmEngine:
    """Serves generation requests through vLLM; the same seam as the native engine."""

    def __init__(
        self,
        base: Any,
        store: AdapterStore,
        settings: EngineSettings,
        metrics: Metrics | None = None,
        options: VllmOptions | None = None,
    ) -> None:
        self.options = options or VllmOptions()
        self.options.validate()
        self.native = Engine(base, store, settings, metrics)
        self.settings, self.metrics, self.base = settings, metrics, base
        self._folder = Path(tempfile.mkdtemp(prefix="svda-vllm-"))
        self._loras: dict[Any, Any] = {}  # adapter key -> vllm LoRARequest
        self._exported: dict[Any, tuple[int, Path]] = {}  # key -> (lora id, folder), unused yet
        self.native.adapters.on_attached = self._export_attached
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._tasks: dict[str, asyncio.Task] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._llm: Any = None
        self._stopping = False

    # ----- lifecycle ----------------------------------------------------------------------------
    def start(self) -> None:
        """Build vLLM's AsyncLLM on the engine's event-loop thread (idempotent)."""
        if self._llm is not None:
            return
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="svda-vllm", daemon=True
        )
        self._thread.start()
        future = asyncio.run_coroutine_threadsafe(self._build(), self._loop)
        self._llm = future.result()

    async def _build(self) -> Any:
        from .vllm_setup import build_async_llm, linear_layer_names

        targets = linear_layer_names(self.base.model)
        return build_async_llm(
            self.base.source, self.native.max_context, self.settings, self.options, targets
        )

    def stop(self) -> None:
        """Cancel every request (``CANCELLED``), shut vLLM down and stop. Final."""
        self._stopping = True
        if self._loop is not None:
            asyncio.run_coroutine_threadsafe(self._cancel_all(), self._loop).result(60)
            if self._llm is not None:
                self._llm.shutdown()
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(60)
        self._llm = None
        self.native.stop()
        shutil.rmtree(self._folder, ignore_errors=True)

    async def _cancel_all(self) -> None:
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        handler = getattr(self._llm, "output_handler", None)
        if handler is not None:  # before vLLM stops its core: no "output_handler failed" log
            handler.cancel()
            await asyncio.gather(handler, return_exceptions=True)

    # ----- requests ------------------------------------------------------------------------------
    def submit(self, request: GenerationRequest, on_event: EventCallback) -> RequestHandle:
        """Check ``request`` as the native engine does and hand it to vLLM."""
        if self._llm is None or self._stopping:
            raise Overloaded("the vLLM engine is not running; retry on another server")
        if len(self._tasks) >= self.settings.max_waiting + self.settings.max_batch_size:
            raise Overloaded(
                f"more than {self.settings.max_waiting} requests are waiting; retry later"
            )
        seq, entry = self._sequence(request, on_event)
        if entry is not None:
            seq.future = self.native.adapters.acquire(entry)
        task_future = asyncio.run_coroutine_threadsafe(self._start_task(seq), self._loop)
        task_future.result()
        return RequestHandle(seq.request_id, seq.cancelled, lambda: self._wake(seq.request_id))

    def _sequence(
        self, request: GenerationRequest, on_event: EventCallback
    ) -> tuple[Sequence, Any]:
        params = request.params
        params.validate(self.settings.max_new_tokens_limit)
        prompt_ids = self.native.encode_prompt(request)
        total = len(prompt_ids) + params.max_new_tokens
        if total > self.native.max_context:
            raise InvalidRequest(
                f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({params.max_new_tokens}) "
                f"= {total} exceeds the context length {self.native.max_context}; shorten the "
                "prompt or lower max_new_tokens"
            )
        entry = (
            self.native.adapters.resolve(request.adapter_id, request.tenant)
            if request.adapter_id
            else None
        )
        seq = Sequence(
            request=request,
            request_id=request.request_id or uuid.uuid4().hex,
            prompt_ids=prompt_ids,
            on_event=on_event,
            sampler=None,
            stream=TextStream(self.native.tokenizer, prompt_ids, params.stop),
        )
        seq.key = key_of(entry) if entry is not None else None
        return seq, entry

    async def _start_task(self, seq: Sequence) -> None:
        """Run ``seq`` as a task; a deadline cancels it when it passes (``CANCELLED``, as the
        native engine drops it), also while it waits for its adapter or for vLLM's next step."""
        loop = asyncio.get_running_loop()
        task = self._tasks[seq.request_id] = loop.create_task(self._run(seq))
        deadline = seq.request.deadline  # a time.monotonic() value
        if deadline is not None:
            timer = loop.call_later(max(0.0, deadline - time.monotonic()), task.cancel)
            task.add_done_callback(lambda _: timer.cancel())

    def _wake(self, request_id: str) -> None:
        """Cancel a request's task (from any thread); the row leaves vLLM's batch."""
        task = self._tasks.get(request_id)
        if task is not None and self._loop is not None:
            self._loop.call_soon_threadsafe(task.cancel)

    async def _run(self, seq: Sequence) -> None:
        from .vllm_setup import sampling_params

        try:
            lora = await self._lora_for(seq) if seq.key is not None else None
            reason = await self._generate(seq, sampling_params(seq.request.params), lora)
            self._finish(seq, reason)
        except asyncio.CancelledError:
            self._finish(seq, FinishReason.CANCELLED)
        except Exception as exc:
            seq.fail(exc)
        finally:
            self._tasks.pop(seq.request_id, None)
            if seq.key is not None:
                self.native.adapters.release(seq.key)

    async def _generate(self, seq: Sequence, params: Any, lora: Any) -> FinishReason:
        eos = self.native.scheduler.eos_ids
        stream = self._llm.generate(
            {"prompt_token_ids": seq.prompt_ids}, params, seq.request_id, lora_request=lora
        )
        try:
            async for output in stream:
                for token in output.outputs[0].token_ids:
                    reason = seq.accept(token, eos, merged=False)
                    if reason is not None:
                        return reason
                if seq.should_drop(time.monotonic()):
                    return FinishReason.CANCELLED
        finally:
            await stream.aclose()  # vLLM aborts the request if it is still running
        return FinishReason.LENGTH

    def _finish(self, seq: Sequence, reason: FinishReason) -> None:
        completion = seq.complete(reason)
        if self.metrics is not None:
            self.metrics.tokens_generated.labels(path="vllm").inc(completion.completion_tokens)
            self.metrics.prompt_tokens.inc(completion.prompt_tokens)
            if reason != FinishReason.CANCELLED:
                self.metrics.time_to_first_token.observe(completion.time_to_first_token_s)

    async def _lora_for(self, seq: Sequence) -> Any:
        """vLLM's LoRA request for the sequence's adapter: loaded and checked by svda, then
        compiled to its serving form once per adapter version."""
        from vllm.lora.request import LoRARequest

        name = await asyncio.wrap_future(seq.future)
        seq.adapter_name = name
        with self._lock:
            lora = self._loras.get(seq.key)
            again = self._exported.pop(seq.key, None) if lora is not None else None
        if again is not None:  # attached again before vLLM forgot it: the known folder serves
            await asyncio.to_thread(shutil.rmtree, again[1], True)
        if lora is not None:
            return lora
        await self._forget_unloaded()
        with self._lock:
            exported = self._exported.pop(seq.key, None)
        if exported is None:  # attached before this engine exported on attach
            lora_id = next(self._ids)
            folder = self._folder / f"adapter-{lora_id}"
            await asyncio.to_thread(self._export, name, folder)
        else:
            lora_id, folder = exported
        lora = LoRARequest(lora_name=name, lora_int_id=lora_id, lora_path=str(folder))
        with self._lock:
            return self._loras.setdefault(seq.key, lora)

    def _export_attached(self, key: Any, name: str) -> None:
        """On the loader thread, as soon as the native side attached an adapter: its vLLM
        folder (no second hop to a thread when its first request asks for it)."""
        lora_id = next(self._ids)
        folder = self._folder / f"adapter-{lora_id}"
        self._export(name, folder)
        with self._lock:
            self._exported[key] = (lora_id, folder)

    async def _forget_unloaded(self) -> None:
        """Remove from vLLM the adapters the native side no longer holds (unloaded or evicted:
        no request runs them) and delete their folders; a later request exports them again."""
        resident = self.native.adapters.resident_keys()
        with self._lock:
            gone = [self._loras.pop(k) for k in list(self._loras) if k not in resident]
            unused = [self._exported.pop(k)[1] for k in list(self._exported) if k not in resident]
        for lora in gone:
            await self._llm.remove_lora(lora.lora_int_id)
            await asyncio.to_thread(shutil.rmtree, lora.lora_path, True)
        for folder in unused:
            await asyncio.to_thread(shutil.rmtree, folder, True)

    def _export(self, name: str, folder: Path) -> None:
        with self.native._model_lock:
            write_vllm_adapter(self.native.model, name, folder, self.base.model.config)

    # ----- adapters and info: the native engine's (store, tenants, checks, residency) ----------
    def verify_adapter(self, source: str | os.PathLike) -> AdapterFile:
        return self.native.verify_adapter(source)

    def load_adapter(self, adapter_id: str, tenant: str | None = None) -> ResidentAdapter:
        return self.native.load_adapter(adapter_id, tenant)

    def unload_adapter(self, adapter_id: str, tenant: str | None = None) -> bool:
        unloaded = self.native.unload_adapter(adapter_id, tenant)
        if unloaded and self._loop is not None and not self._stopping:
            asyncio.run_coroutine_threadsafe(self._forget_unloaded(), self._loop).result(60)
        return unloaded

    def pin_adapter(
        self, adapter_id: str, tenant: str | None = None, pinned: bool = True
    ) -> ResidentAdapter:
        return self.native.pin_adapter(adapter_id, tenant, pinned)

    def resident_adapters(self, tenant: str | None = None) -> list[ResidentAdapter]:
        return self.native.resident_adapters(tenant)

    def info(self) -> ServerInfo:
        return self.native.info()
