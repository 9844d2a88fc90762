"""The Ray Serve deployment of svda: each replica holds one engine on the base model.

Modelled on Ray Serve's model multiplexing example (``@serve.multiplexed`` loader plus
``serve.get_multiplexed_model_id()`` in the request method, ``__del__`` called on LRU eviction):
the multiplexed "model" of a replica is one adapter made resident in its engine, keyed by
``<namespace>/<id>@<version>``; Ray Serve routes requests for an id to the replica that holds it.
Every replica reports its loads, evictions and residents to one named registry actor (the
ingress reads it for ``resident_adapters``; tests and the benchmark count loads per replica).
Replicas open no store: their engines read entries and adapter bytes from the ingress's store
service (:mod:`.store_service`). Admin calls that concern every copy of an adapter (pin, unload)
reach every replica through ``DeploymentHandle.broadcast``.

``ray`` is imported inside the functions: the package stays importable without it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import tempfile
import time
from collections import Counter
from typing import Any

from .settings import NAMESPACE, ClusterSettings, model_id_of, parse_model_id

DEPLOYMENT = "SvdaReplica"
ROUTER = "svda.server.cluster.router.AdapterRouter"  # imported where handles route (needs Ray)


class Registry:
    """Per replica: loads and unloads per model id, residents; one actor per application."""

    def __init__(self) -> None:
        # reports carry svda's ResidentAdapter rows: import their module now, at deploy, not
        # while the first replica waits for its first report (the import takes seconds)
        import svda.server.domain  # noqa: F401

        self.replicas: dict[str, dict[str, Any]] = {}

    def started(self, replica: str, actor_name: str) -> None:
        self.replicas[replica] = {"actor": actor_name, "started": time.time(),
                                  "loads": Counter(), "unloads": Counter(), "resident": []}  # fmt: skip

    def record(self, replica: str, kind: str, model_ids: list[str], resident: list) -> None:
        row = self.replicas[replica]
        row.setdefault(kind, Counter()).update(model_ids)  # loads, unloads, pins, unpins
        row["resident"] = resident

    def snapshot(self) -> dict[str, dict[str, Any]]:
        return self.replicas


def registry(app_name: str, create: bool = False):
    """The registry actor of ``app_name`` (created by the ingress, looked up by replicas)."""
    import ray

    name = f"{app_name}-registry"
    if not create:
        return ray.get_actor(name, namespace=NAMESPACE)
    actor = ray.remote(num_cpus=0)(Registry).options(
        name=name, namespace=NAMESPACE, get_if_exists=True, lifetime="detached"
    )  # detached: it outlives the handle of the ingress that created it
    handle = actor.remote()
    ray.get(handle.snapshot.remote())  # created and named before any replica looks it up
    return handle


class _Held:
    """One adapter held by a replica's multiplexed LRU; evicting it detaches it from the engine
    (unless pinned). ``__del__`` may run twice (Ray Serve, then the garbage collector)."""

    def __init__(self, replica: Any, model_id: str, version: int) -> None:
        self.replica, self.model_id, self.version, self.dropped = replica, model_id, version, False

    def __del__(self) -> None:
        if not self.dropped:
            self.dropped = True
            with contextlib.suppress(Exception):  # the replica may be shutting down
                self.replica.drop(self.model_id, self.version)


class ReplicaBody:
    """What a replica does, without Ray Serve's decorators (:func:`deployment` adds them)."""

    def __init__(self, model: str | None, settings: ClusterSettings) -> None:
        import torch
        from ray import serve

        from svda.runtime import load_base_model
        from svda.server.engine import Engine, EngineSettings

        from .store_service import RemoteStore

        dtype = getattr(torch, settings.dtype) if settings.dtype else torch.float32
        base = load_base_model(model, dtype=dtype)
        store = RemoteStore(settings.app_name)  # no store folder on replicas: see the module
        self.engine = Engine(base, store, EngineSettings(**settings.engine_kwargs))
        self.engine.start()
        context = serve.get_replica_context()
        self.replica = context.replica_id.unique_id
        self.registry = registry(settings.app_name)
        self.registry.started.remote(self.replica, context.replica_id.to_full_id_str())

    def _record(self, kind: str, model_ids: list[str]) -> Any:
        resident = self.engine.resident_adapters()
        return self.registry.record.remote(self.replica, kind, model_ids, resident)

    async def report(self, kind: str, model_ids: list[str]) -> None:
        """Record loads or unloads in the registry and wait until it has them (a caller that
        reads the registry after this replica answered sees them)."""
        await self._record(kind, model_ids)

    def _held(self) -> set[str]:
        """Model ids of the adapters resident in this replica's engine."""
        keys = self.engine.adapters.resident_keys()
        return {model_id_of(k.namespace, k.id, k.version) for k in keys}

    async def hold(self, model_id: str) -> _Held:
        """The multiplexed loader: make ``model_id``'s adapter resident in the engine."""
        namespace, adapter_id, _ = parse_model_id(model_id)
        resident = await asyncio.to_thread(self.engine.load_adapter, adapter_id, namespace)
        await self.report("loads", [model_id])
        return _Held(self, model_id, resident.version)

    def drop(self, model_id: str, version: int) -> None:
        """Detach exactly this version of this namespace's adapter (not a namesake elsewhere).
        Runs in a worker thread (Ray Serve's LRU eviction calls ``_Held.__del__`` there)."""
        import ray

        from svda.server.engine.adapters import Key

        namespace, adapter_id, _ = parse_model_id(model_id)
        if self.engine.adapters.drop(Key(namespace or "", adapter_id, version)):
            ray.get(self._record("unloads", [model_id]), timeout=60)

    # ----- what the ingress calls (errors come back as values: raised there, unwrapped) -----
    async def generate(self, request: Any, remaining_s: float | None):
        """Stream the engine's events for ``request`` in lists: chunks, then one Completion or
        one exception. The deadline travels as seconds left (monotonic clocks differ per node)."""
        from ray import serve

        deadline = None if remaining_s is None else time.monotonic() + remaining_s
        request = dataclasses.replace(request, deadline=deadline)
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()

        def on_event(event: Any) -> None:
            with contextlib.suppress(RuntimeError):  # loop closed: the replica is stopping
                loop.call_soon_threadsafe(queue.put_nowait, event)

        try:
            model_id = serve.get_multiplexed_model_id()
            if model_id:
                await self.adapter(model_id)
            handle = await asyncio.to_thread(self.engine.submit, request, on_event)
        except Exception as exc:  # the ingress raises it for the caller
            yield [exc]
            return
        async for batch in _until_done(queue, handle):
            yield batch

    async def load(self, adapter_id: str, tenant: str | None, pinned: bool | None = None):
        """Load (``pinned`` None) or pin/unpin the adapter routed here, as the native engine."""
        from ray import serve

        try:
            await self.adapter(serve.get_multiplexed_model_id())
            if pinned is None:
                return await asyncio.to_thread(self.engine.load_adapter, adapter_id, tenant)
            return await asyncio.to_thread(self.engine.pin_adapter, adapter_id, tenant, pinned)
        except Exception as exc:
            return exc

    async def unload(self, adapter_id: str, tenant: str | None):
        """Unload ``adapter_id`` from this replica's engine, as one server (broadcast to every
        replica: each answers for its own copy)."""
        before = self._held()
        try:
            unloaded = await asyncio.to_thread(self.engine.unload_adapter, adapter_id, tenant)
        except Exception as exc:
            return exc
        await self.report("unloads", sorted(before - self._held()))
        return unloaded

    async def pin(self, model_id: str, adapter_id: str, tenant: str | None, pinned: bool):
        """Broadcast to every replica. Pin: load ``model_id`` through the multiplexed LRU (so
        Ray routes its requests here too) and pin it in the engine. Unpin: only where it is
        resident (None elsewhere: nothing is loaded to be unpinned)."""
        try:
            if pinned:
                await self.adapter(model_id)
            elif model_id not in self._held():
                return None
            row = await asyncio.to_thread(self.engine.pin_adapter, adapter_id, tenant, pinned)
        except Exception as exc:
            return exc
        await self.report("pins" if pinned else "unpins", [model_id])
        return row

    async def verify(self, data: bytes):
        """Every load check of an uploaded file against this replica's model."""
        fd, path = tempfile.mkstemp(suffix=".svda")
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(data)
            return await asyncio.to_thread(self.engine.verify_adapter, path)
        except Exception as exc:
            return exc
        finally:
            os.unlink(path)

    async def info(self):
        return self.engine.info()


async def _until_done(queue: asyncio.Queue, handle: Any):
    """Lists of the events in ``queue`` up to the last one: what has queued up since the last
    list goes as one stream item (one Ray hop for several tokens when the ingress lags).
    Cancels the request if the caller leaves."""
    from svda.server.domain import Completion

    finished = False
    try:
        while not finished:
            batch = [await queue.get()]
            while not queue.empty():
                batch.append(queue.get_nowait())
            finished = isinstance(batch[-1], (BaseException, Completion))
            yield batch
    finally:
        if not finished:
            handle.cancel()


def deployment(settings: ClusterSettings):
    """The Ray Serve deployment (not yet bound): ``settings.replicas`` replicas of
    ``settings.replica_cpus`` CPUs, each keeping ``max_adapters_per_replica`` adapters, routed
    by svda's :class:`~svda.server.cluster.router.AdapterRouter`."""
    from ray import serve
    from ray.serve.config import RequestRouterConfig

    @serve.deployment(
        name=DEPLOYMENT,
        num_replicas=settings.replicas,
        ray_actor_options={"num_cpus": settings.replica_cpus},
        max_ongoing_requests=settings.max_ongoing_requests,
        health_check_period_s=2,
        request_router_config=RequestRouterConfig(request_router_class=ROUTER),
    )
    class SvdaReplica(ReplicaBody):
        @serve.multiplexed(max_num_models_per_replica=settings.max_adapters_per_replica)
        async def adapter(self, model_id: str) -> _Held:
            return await self.hold(model_id)

    return SvdaReplica


def deploy(settings: ClusterSettings, model: str | None, store_root: str):
    """Start (or join) Ray, start Serve without its HTTP proxy (the gRPC ingress is svda's),
    create the registry, serve the store at ``store_root`` from this node (replicas get no
    path) and run the application; returns its deployment handle."""
    import ray
    from ray import serve

    from .store_service import start_store_service

    settings.validate()
    if not ray.is_initialized():
        ray.init(address=settings.ray_address, include_dashboard=False)
    serve.start(proxy_location="Disabled")
    registry(settings.app_name, create=True)
    start_store_service(settings.app_name, str(store_root))
    app = deployment(settings).bind(model, settings)
    return serve.run(app, name=settings.app_name, route_prefix=None)
