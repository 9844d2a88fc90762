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
(a folder, :mod:`.forms`) and handed to vLLM as a LoRA request; the svda plugin
(:mod:`.plugin`) applies it per token. Compiled folders outlive their adapter's stay in memory
(``max_compiled``, keyed by the stored bytes' sha256): a request for an adapter compiled
before hands it to vLLM at once, while the native side loads and checks it again; its first
token waits for that. svda's own text stream decides EOS, stop strings and length, as on the native
engine. Greedy rows equal the native engine's; sampled rows use vLLM's sampler (seeded).
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import os
import shutil
import tempfile
import threading
import time
import uuid
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from svda.adapters_store import AdapterFile, AdapterStore
from svda.adapters_store.store_types import StoreEntry

from ..domain import (
    FinishReason,
    GenerationRequest,
    InvalidRequest,
    Overloaded,
    ResidentAdapter,
    ServerInfo,
)
from ..engine import Engine, EngineSettings
from ..engine.adapters import Key, key_of
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
    max_compiled: int = 64  # compiled folders kept after their adapter left memory (0: none)

    def validate(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"vllm engine: dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.max_loras < 1 or self.max_cpu_loras < self.max_loras:
            raise ValueError("vllm engine: need 1 <= max_loras <= max_cpu_loras")
        if self.max_compiled < 0:
            raise ValueError(f"vllm engine: max_compiled must be >= 0, got {self.max_compiled}")


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
        self._loras: dict[Key, Any] = {}  # adapter key -> its LoRARequest, known to vLLM
        # (adapter key, sha256 of its stored bytes) -> compiled folder, least recently used first
        self._compiled: collections.OrderedDict[tuple[Key, str], Path] = collections.OrderedDict()
        self.native.adapters.on_attached = self._compile_attached
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
        compiled = gate = None
        if entry is not None:
            compiled = (seq.key, entry.sha256)
            with self._lock:  # compiled, not in vLLM: vLLM gets it before the native load starts
                early = seq.key not in self._loras and compiled in self._compiled
            gate = threading.Event() if early else None
            seq.future = self.native.adapters.acquire(entry, gate)
        start = self._start_task(seq, compiled, gate)
        task_future = asyncio.run_coroutine_threadsafe(start, self._loop)
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

    async def _start_task(
        self, seq: Sequence, compiled: tuple[Key, str] | None, gate: threading.Event | None
    ) -> None:
        """Run ``seq`` as a task; a deadline cancels it when it passes (``CANCELLED``, as the
        native engine drops it), also while it waits for its adapter or for vLLM's next step."""
        loop = asyncio.get_running_loop()
        task = self._tasks[seq.request_id] = loop.create_task(self._run(seq, compiled, gate))
        deadline = seq.request.deadline  # a time.monotonic() value
        if deadline is not None:
            timer = loop.call_later(max(0.0, deadline - time.monotonic()), task.cancel)
            task.add_done_callback(lambda _: timer.cancel())

    def _wake(self, request_id: str) -> None:
        """Cancel a request's task (from any thread); the row leaves vLLM's batch."""
        task = self._tasks.get(request_id)
        if task is not None and self._loop is not None:
            self._loop.call_soon_threadsafe(task.cancel)

    async def _run(
        self, seq: Sequence, compiled: tuple[Key, str] | None, gate: threading.Event | None
    ) -> None:
        from .vllm_setup import sampling_params

        try:
            lora, loading = await self._lora_for(seq, compiled, gate) if compiled else (None, None)
            params = sampling_params(seq.request.params)
            reason = await self._generate(seq, params, lora, loading, gate)
            self._finish(seq, reason)
        except asyncio.CancelledError:
            self._finish(seq, FinishReason.CANCELLED)
        except Exception as exc:
            seq.fail(exc)
        finally:
            if gate is not None:
                gate.set()  # a native load still gated (this request ended first) goes on
            self._tasks.pop(seq.request_id, None)
            if seq.key is not None:
                self.native.adapters.release(seq.key)

    async def _generate(
        self,
        seq: Sequence,
        params: Any,
        lora: Any,
        loading: Future | None,
        gate: threading.Event | None,
    ) -> FinishReason:
        """Stream vLLM's tokens into ``seq``; ``loading``: the native load of an adapter vLLM
        runs from its compiled folder meanwhile, waited for before the first token (its error,
        if any, fails the request with no token delivered), and let start (``gate``) once vLLM
        has the request."""
        eos = self.native.scheduler.eos_ids
        stream = self._llm.generate(
            {"prompt_token_ids": seq.prompt_ids}, params, seq.request_id, lora_request=lora
        )
        if gate is not None:  # runs when this task first waits: for vLLM's first output
            asyncio.get_running_loop().call_soon(gate.set)
        try:
            async for output in stream:
                if loading is not None:
                    seq.adapter_name, loading = await asyncio.wrap_future(loading), None
                for token in output.outputs[0].token_ids:
                    reason = seq.accept(token, eos, merged=False)
                    if reason is not None:
                        return reason
                if seq.should_drop(time.monotonic()):
                    return FinishReason.CANCELLED
            if loading is not None:
                seq.adapter_name = await asyncio.wrap_future(loading)
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

    async def _lora_for(
        self, seq: Sequence, compiled: tuple[Key, str], gate: threading.Event | None
    ) -> tuple[Any, Future | None]:
        """vLLM's LoRA request for the sequence's adapter, and the native load still to wait
        for (None: done). An adapter known to vLLM is used as it is; one compiled before (same
        stored bytes) is handed to vLLM at once, the native side loading and checking it
        meanwhile; else the native load (which compiles it, :meth:`_compile_attached`) comes
        first."""
        from vllm.lora.request import LoRARequest

        with self._lock:
            lora = self._loras.get(seq.key)
            folder = self._compiled.get(compiled)
            if folder is not None:
                self._compiled.move_to_end(compiled)
        if lora is not None:
            if gate is not None:
                gate.set()  # vLLM got it from another request since this one came
            seq.adapter_name = await asyncio.wrap_future(seq.future)
            return lora, None
        await self._forget_unloaded()
        loading = seq.future
        if folder is None:
            if gate is not None:
                gate.set()  # dropped from the cache since the request came: load first
            seq.adapter_name, loading = await asyncio.wrap_future(seq.future), None
            with self._lock:
                folder = self._compiled.get(compiled)
            if folder is None:  # attached while compiling on attach was off (tests)
                folder = await asyncio.to_thread(self._compile, seq.adapter_name, compiled)
        lora_id = next(self._ids)
        lora = LoRARequest(lora_name=f"svda-{lora_id}", lora_int_id=lora_id, lora_path=str(folder))
        with self._lock:
            return self._loras.setdefault(seq.key, lora), loading

    def _compile_attached(self, entry: StoreEntry, name: str) -> None:
        """On the loader thread, as soon as the native side attached an adapter: its compiled
        folder (none when the same bytes were compiled before)."""
        compiled = (key_of(entry), entry.sha256)
        with self._lock:
            if compiled in self._compiled:
                self._compiled.move_to_end(compiled)
                return
        self._compile(name, compiled)

    def _compile(self, name: str, compiled: tuple[Key, str]) -> Path:
        folder = self._folder / f"adapter-{uuid.uuid4().hex[:16]}"
        with self.native._model_lock:
            write_vllm_adapter(self.native.model, name, folder, self.base.model.config)
        with self._lock:
            self._compiled[compiled] = folder
        self._delete(self._idle_compiled(keep=compiled))
        return folder

    def _idle_compiled(self, keep: tuple[Key, str] | None = None) -> list[Path]:
        """Take out of the cache the least recently used compiled folders beyond
        ``max_compiled`` among those of adapters neither in memory nor held by a request nor in
        vLLM (the caller deletes them)."""
        held = self.native.adapters.held_keys()
        with self._lock:
            busy = held | set(self._loras)
            idle = [c for c in self._compiled if c[0] not in busy and c != keep]
            drop = idle[: max(0, len(idle) - self.options.max_compiled)]
            return [self._compiled.pop(c) for c in drop]

    @staticmethod
    def _delete(folders: list[Path]) -> None:
        for folder in folders:
            shutil.rmtree(folder, ignore_errors=True)

    async def _forget_unloaded(self) -> None:
        """Remove from vLLM the adapters the native side neither holds in memory nor for a
        request (unloaded or evicted; one a request runs while the native side still loads it
        stays); their compiled folders stay, up to ``max_compiled`` of them: a later request
        hands them to vLLM again without compiling."""
        held = self.native.adapters.held_keys()
        with self._lock:
            gone = [self._loras.pop(k) for k in list(self._loras) if k not in held]
        for lora in gone:
            await self._llm.remove_lora(lora.lora_int_id)
        idle = self._idle_compiled()
        if idle:
            await asyncio.to_thread(self._delete, idle)

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
