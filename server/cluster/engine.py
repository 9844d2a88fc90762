"""``ClusterEngine``: the :class:`~svda.server.engine.ServingEngine` of the cluster's ingress.

Modelled on Ray Serve's multiplexed routing (``handle.options(multiplexed_model_id=...)``,
``stream=True`` for generators): the gRPC server's servicer calls this engine as it calls the
native one; each request's adapter is resolved here, once, against the shared store with the
caller's tenant (so a replica is never asked for an adapter the caller may not read), and the
request goes to the Ray Serve deployment with ``multiplexed_model_id=<namespace>/<id>@<version>``,
which routes it to the replica that already holds that adapter. Streams are consumed on one
event loop thread; a request whose replica dies before its first event is sent again (twice at
most), one whose replica dies after it ends ``UNAVAILABLE``. Pin and unload reach every replica
(``DeploymentHandle.broadcast``): every copy of an adapter is pinned or unloaded.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from svda.adapters_store import AdapterStore, BaseMismatch
from svda.adapters_store.store_types import AdapterNotFound, StorePermissionError

from ..domain import (
    Completion,
    FinishReason,
    GenerationRequest,
    Overloaded,
    ResidentAdapter,
    ServerInfo,
    Unavailable,
)
from ..engine.adapters import check_owner, unknown_adapter
from ..engine.sequence import EventCallback, RequestHandle
from .replica import registry
from .settings import NAMESPACE, model_id_of

RETRIES = 2  # a request whose replica died before answering is sent again this many times


class ClusterEngine:
    """Generation and adapter residency on a Ray Serve deployment of svda replicas."""

    def __init__(self, handle: Any, store: AdapterStore, app_name: str = "svda",
                 timeout_s: float = 300.0) -> None:  # fmt: skip
        self.handle, self.store, self.app_name, self.timeout_s = handle, store, app_name, timeout_s
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="svda-cluster",
                                        daemon=True)  # fmt: skip
        self._futures: set = set()
        self._info: ServerInfo | None = None

    # ----- lifecycle -----------------------------------------------------------------------
    def start(self) -> None:
        if not self._thread.is_alive():
            self._thread.start()
        self.info()

    def stop(self) -> None:
        """Cancel every running request (each ends CANCELLED) and stop the loop thread."""
        for future in list(self._futures):
            future.cancel()
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)

    def info(self) -> ServerInfo:
        if self._info is None:
            self._info = self._call("info", "")
        return self._info

    # ----- requests -------------------------------------------------------------------------
    def submit(self, request: GenerationRequest, on_event: EventCallback) -> RequestHandle:
        """Check the sampling parameters and the adapter here, then stream from a replica."""
        request.params.validate(self.info().max_new_tokens)
        model_id = ""
        if request.adapter_id:
            entry = self._resolve(request.adapter_id, request.tenant)
            model_id = model_id_of(entry.tenant, entry.id, entry.version)
        remaining = None if request.deadline is None else request.deadline - time.monotonic()
        request_id = request.request_id or uuid.uuid4().hex
        wire = dataclasses.replace(request, deadline=None, request_id=request_id)
        pump = self._pump(wire, model_id, remaining, on_event)
        future = asyncio.run_coroutine_threadsafe(pump, self._loop)
        self._futures.add(future)
        future.add_done_callback(self._futures.discard)
        return RequestHandle(request_id, threading.Event(), future.cancel)

    async def _pump(self, request, model_id: str, remaining_s, on_event: EventCallback) -> None:
        import ray.exceptions
        from ray.serve.exceptions import BackPressureError

        tally = _Tally(request.adapter_id)
        for attempt in range(RETRIES + 1):
            call = self.handle.options(stream=True, multiplexed_model_id=model_id)
            stream = call.generate.remote(request, remaining_s)
            try:
                async for batch in stream:
                    for event in batch:
                        tally.add(event)
                        on_event(event)
                return
            except asyncio.CancelledError:
                stream.cancel()
                on_event(tally.cancelled())
                raise
            except BackPressureError as exc:
                return on_event(Overloaded(f"every replica's queue is full ({exc}); retry later"))
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as exc:
                if tally.events or attempt == RETRIES:
                    return on_event(_replica_died(tally, attempt, exc))
                await asyncio.sleep(0.5 * (attempt + 1))
            except Exception as exc:  # reported to the caller, not lost
                return on_event(exc)

    def _resolve(self, adapter_id: str, tenant: str | None):
        """The store entry ``tenant`` may read for ``adapter_id`` (as the native engine)."""
        try:
            entry = self.store.get(adapter_id, tenant=tenant)
        except (AdapterNotFound, StorePermissionError):
            raise unknown_adapter(adapter_id, tenant) from None
        fingerprint = self.info().base_fingerprint
        if entry.base_fingerprint != fingerprint:
            raise BaseMismatch(
                f"adapter {adapter_id!r} (version {entry.version}) was made for base model "
                f"{entry.base_fingerprint[:16]}…, this cluster serves {fingerprint[:16]}…; "
                "retrain or re-export it for this base"
            )
        return entry

    # ----- adapters -------------------------------------------------------------------------
    def _call(self, method: str, model_id: str, *args: Any) -> Any:
        """One call of a replica method, from any thread (it runs on this engine's loop); a
        returned exception is raised."""
        coroutine = self._acall(method, model_id, *args)
        result = asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(self.timeout_s)
        if isinstance(result, BaseException):
            raise result
        return result

    async def _acall(self, method: str, model_id: str, *args: Any) -> Any:
        import ray.exceptions

        for attempt in range(RETRIES + 1):
            call = getattr(self.handle.options(multiplexed_model_id=model_id), method)
            try:
                return await call.remote(*args)
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as exc:
                if attempt == RETRIES:
                    return Unavailable(f"the replica for {method!r} died, {attempt + 1} times "
                                       f"({exc}); retry")  # fmt: skip
                await asyncio.sleep(0.5 * (attempt + 1))

    def _routed(self, adapter_id: str, tenant: str | None) -> str:
        entry = self._resolve(adapter_id, tenant)
        return model_id_of(entry.tenant, entry.id, entry.version)

    def load_adapter(self, adapter_id: str, tenant: str | None = None):
        return self._call("load", self._routed(adapter_id, tenant), adapter_id, tenant)

    def pin_adapter(self, adapter_id: str, tenant: str | None = None,
                    pinned: bool = True) -> ResidentAdapter:  # fmt: skip
        """Pin on every replica (each loads it), or unpin every copy; the owner check runs
        here first, so a refused pin loads nothing anywhere."""
        entry = self._resolve(adapter_id, tenant)
        check_owner(entry, tenant, "pin")
        model_id = model_id_of(entry.tenant, entry.id, entry.version)
        rows = [r for r in self._broadcast("pin", model_id, adapter_id, tenant, pinned) if r]
        if rows:
            return rows[0]
        return self._call("load", model_id, adapter_id, tenant, pinned)  # no copy to unpin

    def unload_adapter(self, adapter_id: str, tenant: str | None = None) -> bool:
        """Unload every copy (each replica answers as one server would for its own engine:
        NOT_FOUND for an id the caller may not see, PERMISSION_DENIED for a shared one)."""
        return any(self._broadcast("unload", adapter_id, tenant))

    def _broadcast(self, method: str, *args: Any) -> list:
        """``method`` on every live replica; replicas that died meanwhile are left out, the
        first error a replica returned is raised."""
        import ray.exceptions

        async def fan_out() -> list:
            response = self.handle.broadcast(method, *args)
            return await response.results_async(timeout_s=self.timeout_s, return_exceptions=True)

        try:
            future = asyncio.run_coroutine_threadsafe(fan_out(), self._loop)
            results = future.result(self.timeout_s + 10)
        except Exception as exc:  # no replica at all, or the broadcast timed out
            raise Unavailable(f"no replica answered {method!r}: {exc}; retry") from None
        gone = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError)
        answers = [r for r in results if not isinstance(r, gone)]
        if not answers:
            raise Unavailable(f"every replica died during {method!r}; retry")
        for answer in answers:
            if isinstance(answer, BaseException):
                raise answer
        return answers

    def verify_adapter(self, source: str | os.PathLike):
        return self._call("verify", "", Path(source).read_bytes())

    def resident_adapters(self, tenant: str | None = None) -> list:
        """Residents of every live replica, one row per (namespace, id, version)."""
        rows = {}
        for replica in self.replica_stats().values():
            for r in replica["resident"]:
                if tenant is None or r.tenant is None or r.tenant == tenant:
                    rows.setdefault((r.tenant, r.adapter_id, r.version), r)
        return [rows[k] for k in sorted(rows, key=lambda k: (k[0] or "", k[1], k[2]))]

    def replica_stats(self) -> dict[str, dict[str, Any]]:
        """Per live replica: ``loads`` and ``unloads`` (Counters by model id), ``resident``."""

        async def snapshot() -> dict:
            return await registry(self.app_name).snapshot.remote()

        future = asyncio.run_coroutine_threadsafe(snapshot(), self._loop)
        stats = future.result(self.timeout_s)
        return {rid: row for rid, row in stats.items() if _alive(row["actor"])}


def _replica_died(tally: _Tally, attempt: int, exc: BaseException) -> Unavailable:
    if tally.events:
        return Unavailable(
            f"the replica serving this request died after sending {tally.tokens} tokens ({exc}); "
            "the stream is incomplete: send the request again"
        )
    return Unavailable(f"the replica serving this request died, {attempt + 1} times ({exc}); retry")


def _alive(actor_name: str) -> bool:
    import ray

    try:
        ray.get_actor(actor_name, namespace="serve")
    except ValueError:
        return False
    return True


class _Tally:
    """What a stream delivered so far, for the CANCELLED completion of a cancelled request."""

    def __init__(self, adapter_id: str | None) -> None:
        self.adapter_id, self.start = adapter_id or None, time.monotonic()
        self.events, self.text, self.tokens, self.first = 0, [], 0, None

    def add(self, event: Any) -> None:
        self.events += 1
        if hasattr(event, "token_ids"):
            self.first = self.first or time.monotonic()
            self.text.append(event.text)
            self.tokens += len(event.token_ids)

    def cancelled(self) -> Completion:
        now = time.monotonic()
        return Completion("".join(self.text), FinishReason.CANCELLED, 0, self.tokens,
                          self.adapter_id, False, now - self.start, (self.first or now) - self.start)  # fmt: skip


__all__ = ["NAMESPACE", "ClusterEngine"]
