"""The one store, on the ingress's node, read by the replicas through Ray: no shared filesystem.

The index (SQLite) and the object files stay where the ingress runs. :class:`StoreService`, a Ray
actor pinned to that node, answers the two questions a replica's engine asks of a store: which
entry a tenant may read for an id (``get``: the same lookup, with the same tenant rules, as one
server's), and the bytes of an entry (``read``: checked against its sha256 where they are
stored). A replica's engine gets a :class:`RemoteStore` instead of an ``AdapterStore``: its
``get`` and ``read_bytes`` ask the service, and it checks the bytes it received against the
entry's size and sha256 again, before the engine's own load checks (format, base fingerprint,
regeneration probe).

Modelled on ``AdapterStore.get`` / ``read_bytes`` (the only store calls an engine makes) and on
svda's other named actor, the registry (:mod:`.replica`). Errors travel as values and are raised
on the replica, so they keep their class (``AdapterNotFound`` stays ``NOT_FOUND``).
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

from svda.adapters_store import AdapterStore
from svda.adapters_store.store import check_object
from svda.adapters_store.store_types import StoreEntry

from ..domain import Unavailable
from .settings import NAMESPACE, model_id_of


class StoreService:
    """Reads one store root for the replicas (a Ray actor on the ingress's node)."""

    def __init__(self, root: str) -> None:
        self.store = AdapterStore(root)
        self.reads: Counter = Counter()  # model id -> byte reads served

    def root(self) -> str:
        return str(self.store.root)

    def get(self, adapter_id: str, version: int | None, tenant: str | None) -> Any:
        try:
            return self.store.get(adapter_id, version=version, tenant=tenant)
        except Exception as exc:  # raised on the replica
            return exc

    def read(self, entry: StoreEntry) -> Any:
        try:
            data = self.store.read_bytes(entry)
        except Exception as exc:
            return exc
        self.reads[model_id_of(entry.tenant, entry.id, entry.version)] += 1
        return data

    def stats(self) -> dict[str, int]:
        """Byte reads served per model id (what the replicas loaded from here)."""
        return dict(self.reads)


def service_name(app_name: str) -> str:
    return f"{app_name}-store"


def start_store_service(app_name: str, root: str) -> Any:
    """The store service of ``app_name`` on this node (the ingress's), serving ``root``. A
    detached actor (replicas, in Serve's job, look it up by name), so one left by an earlier
    ingress of the application is replaced first."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    stop_store_service(app_name)
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    actor = ray.remote(num_cpus=0, max_concurrency=8)(StoreService).options(
        name=service_name(app_name), namespace=NAMESPACE, lifetime="detached",
        scheduling_strategy=here,
    )  # fmt: skip
    handle = actor.remote(str(root))
    ray.get(handle.root.remote())  # started and named before any replica looks it up
    return handle


def stop_store_service(app_name: str, timeout_s: float = 30.0) -> None:
    """Kill the store service of ``app_name``, if any, and wait until its name is free."""
    import ray

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            actor = ray.get_actor(service_name(app_name), namespace=NAMESPACE)
        except ValueError:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"the store service of application {app_name!r} did not stop within "
                f"{timeout_s:.0f} s; stop it with ray.kill, or use another --app-name"
            )
        ray.kill(actor, no_restart=True)
        time.sleep(0.1)


class RemoteStore:
    """What a replica's engine reads of the store (``get``, ``read_bytes``), answered by the
    application's :class:`StoreService` on the ingress's node."""

    def __init__(self, app_name: str, timeout_s: float = 120.0) -> None:
        self.app_name, self.timeout_s = app_name, timeout_s
        self.root = f"ray actor {NAMESPACE}/{service_name(app_name)}"  # for messages
        self._service: Any = None

    def get(self, id: str, version: int | None = None, tenant: str | None = None) -> StoreEntry:
        return self._call("get", id, version, tenant)

    def read_bytes(self, entry: StoreEntry) -> bytes:
        """The bytes of ``entry``, checked here again against its size and sha256."""
        return check_object(entry, self._call("read", entry), f"{self.root} (as received)")

    def _call(self, method: str, *args: Any) -> Any:
        import ray.exceptions

        try:
            if self._service is None:
                self._service = ray.get_actor(service_name(self.app_name), namespace=NAMESPACE)
            reply = getattr(self._service, method).remote(*args)
            result = ray.get(reply, timeout=self.timeout_s)
        except (ValueError, ray.exceptions.RayError) as exc:
            self._service = None  # look it up again next time
            raise Unavailable(
                f"the store service ({self.root}) on the ingress's node did not answer: {exc}; "
                "retry, and check that the ingress is running"
            ) from None
        if isinstance(result, BaseException):
            raise result
        return result
