"""Adapter memory: which store adapters are attached to the resident model, loading and eviction.

* **Ids and versions.** A request names a store id; every request looks up the id's latest
  version in the store (one SQLite read), so a newly published version is served from the next
  request on. Ids are per tenant namespace, so resident adapters are keyed by
  ``(namespace, id, version)`` and attached under an internal name (unique across namespaces).
  An older version stays attached while requests still use it, then is dropped; a pin moves to
  the newer version.
* **Tenants.** The store decides what a tenant may read (its own ids, then shared ones); the lookup
  runs for every request, so a resident adapter is never served to a tenant that may not read it.
* **Memory.** The budget counts the adapter's own tensors (``adapter_parameters``), not the frozen
  tensors adapters share (SVD bases, VeRA projections: they belong to the base). Beyond the
  budget, the least recently used adapter that is neither pinned, nor merged, nor held by a
  waiting or running request is detached. Adapters held by requests may exceed the budget for as
  long as they are held; pinned adapters may not (``Overloaded``).
* **Loading once.** Loads run on a small thread pool, one future per key:
  concurrent first requests for an adapter wait on the same load. Reading and checking the file
  happens outside the model lock; only attaching it takes the lock (between two decode steps).
"""

from __future__ import annotations

import hashlib
import re
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import NamedTuple

import torch

from svda.adapters_store import AdapterStore, BaseMismatch, load_adapter, read_stored_adapter
from svda.adapters_store.format import AdapterFile
from svda.adapters_store.store_types import (
    AdapterNotFound,
    InvalidAdapterId,
    InvalidMetadata,
    StoreEntry,
    StorePermissionError,
)
from svda.runtime import AdapterModel

from ..domain import (
    InvalidRequest,
    Overloaded,
    PermissionDenied,
    ResidentAdapter,
    short_id,
)
from ..metrics import Metrics

GATE_WAIT_S = 1.0  # longest a gated load waits for its caller (acquire's ``gate``)


class Key(NamedTuple):
    """A resident adapter: one version of one id in one namespace ('' = shared)."""

    namespace: str
    id: str
    version: int


def key_of(entry: StoreEntry) -> Key:
    return Key(entry.tenant or "", entry.id, entry.version)


@dataclass
class Resident:
    key: Key
    name: str  # internal adapter name on the AdapterModel
    entry: StoreEntry
    nbytes: int
    pinned: bool = False
    last_used: float = 0.0  # time.time()
    uses: int = 0
    doomed: bool = False  # detach as soon as no request holds it

    def public(self) -> ResidentAdapter:
        return ResidentAdapter(
            adapter_id=self.key.id,
            version=self.key.version,
            method=self.entry.method,
            bytes=self.nbytes,
            pinned=self.pinned,
            last_used=self.last_used,
            uses=self.uses,
            tenant=self.entry.tenant,
        )


def internal_name(entry: StoreEntry) -> str:
    """A valid, unique adapter name for ``entry`` (ids may hold characters names may not)."""
    safe = re.sub(r"[^A-Za-z0-9_-]", "_", entry.id)[:90]
    digest = hashlib.sha1(f"{entry.tenant or ''}/{entry.id}".encode()).hexdigest()[:8]
    return f"{safe}-v{entry.version}-{digest}"


def _one_torch_thread() -> None:
    """Loader threads run torch ops on one core: their tensors are small, and a second OpenMP
    team would compete for the cores with the scheduler's forward (the thread count is set per
    calling thread; the scheduler keeps its own)."""
    torch.set_num_threads(1)


def unknown_adapter(adapter_id: str, tenant: str | None) -> AdapterNotFound:
    """The one answer for an id the caller may not see: absent, or another tenant's."""
    who = f" for tenant {tenant!r}" if tenant is not None else ""
    return AdapterNotFound(
        f"adapter {short_id(adapter_id)} is not in the store{who}; list the adapters you may "
        "use, or upload it first"
    )


def visible(entry: StoreEntry, tenant: str | None) -> bool:
    return tenant is None or entry.tenant is None or entry.tenant == tenant


def addressed(found: list[Resident], tenant: str | None) -> list[Resident]:
    """Of the residents of one id, those a call by ``tenant`` addresses: the tenant's own if
    any, else the shared ones (never another tenant's); every one for an admin."""
    if tenant is None:
        return found
    own = [r for r in found if r.key.namespace == tenant]
    return own or [r for r in found if r.key.namespace == ""]


def check_owner(entry: StoreEntry, tenant: str | None, what: str) -> None:
    """:class:`PermissionDenied` unless ``tenant`` owns ``entry`` (an admin, None, owns all)."""
    if tenant is not None and entry.tenant != tenant:
        raise PermissionDenied(
            f"tenant {tenant!r} may not {what} adapter {entry.id!r}: it is shared or "
            "another tenant's; only its owner or an admin may"
        )


class AdapterManager:
    """Resident adapters of one :class:`AdapterModel`, loaded from one store."""

    def __init__(
        self,
        model: AdapterModel,
        store: AdapterStore,
        budget_bytes: int,
        model_lock: threading.RLock,
        metrics: Metrics | None = None,
        threads: int = 2,
        is_merged: Callable[[str], bool] | None = None,
        prune_tolerance: float = 0.0,
    ):
        self.model, self.store, self.budget = model, store, budget_bytes
        self.prune_tolerance = prune_tolerance  # SvdA δ pruning bound ε (docs/methods.md)
        self.model_lock = model_lock
        self.metrics = metrics
        self._is_merged = is_merged or (lambda name: model.state.merged == name)
        self._lock = threading.Lock()  # innermost: never take model_lock while holding it
        self._resident: dict[Key, Resident] = {}
        self._loading: dict[Key, Future] = {}
        self._refs: dict[Key, int] = {}
        self._pool = ThreadPoolExecutor(
            threads, thread_name_prefix="svda-adapter-load", initializer=_one_torch_thread
        )
        # called on the loader thread, model lock held, right after an adapter is attached:
        # (store entry, internal name); an exception fails the load (another engine's compile step)
        self.on_attached: Callable[[StoreEntry, str], None] | None = None

    # ----- lookups ----------------------------------------------------------------------------
    def resolve(self, adapter_id: str, tenant: str | None = None) -> StoreEntry:
        """The latest version of ``adapter_id`` that ``tenant`` may read, for this base."""
        try:
            entry = self.store.get(adapter_id, tenant=tenant)
        except (AdapterNotFound, StorePermissionError):
            raise unknown_adapter(adapter_id, tenant) from None
        except InvalidAdapterId:
            raise InvalidRequest(
                f"invalid adapter id {short_id(adapter_id)}: use 1-128 characters from "
                "[A-Za-z0-9._-], starting with a letter or digit, without '..'"
            ) from None
        if entry.base_fingerprint != self.model.fingerprint.whole:
            raise BaseMismatch(
                f"adapter {adapter_id!r} (version {entry.version}) was made for base model "
                f"{entry.base_fingerprint[:16]}…, this server serves "
                f"{self.model.fingerprint.whole[:16]}…; retrain or re-export it for this base"
            )
        return entry

    def name_of(self, key: Key) -> str:
        with self._lock:
            return self._resident[key].name

    # ----- holding adapters for requests --------------------------------------------------------
    def acquire(self, entry: StoreEntry, gate: threading.Event | None = None) -> Future:
        """Hold ``entry`` for a request and start loading it if needed; the future's result is
        the internal adapter name (or the load's exception). Pair with :meth:`release`.
        ``gate``: a load this call begins waits until it is set (:data:`GATE_WAIT_S` at most):
        the caller has work of its own to do first (the loader would hold the GIL)."""
        key = key_of(entry)
        with self._lock:
            self._refs[key] = self._refs.get(key, 0) + 1
            resident = self._resident.get(key)
            if resident is not None:
                resident.last_used, resident.uses = time.time(), resident.uses + 1
                done: Future = Future()
                done.set_result(resident.name)
                return done
            future = self._loading.get(key)
            if future is None:
                future = self._loading[key] = Future()
                self._pool.submit(self._load, entry, future, gate)
        return future

    def release(self, key: Key) -> None:
        with self._lock:
            count = self._refs.get(key, 0) - 1
            if count > 0:
                self._refs[key] = count
                return
            self._refs.pop(key, None)
            resident = self._resident.get(key)
            if resident is not None:
                resident.last_used = time.time()
        self.evict()

    # ----- loading ------------------------------------------------------------------------------
    def _load(self, entry: StoreEntry, future: Future, gate: threading.Event | None) -> None:
        if gate is not None:
            gate.wait(GATE_WAIT_S)
        key, start = key_of(entry), time.perf_counter()
        try:
            resident = self._attach(entry)
        except BaseException as exc:
            with self._lock:
                self._loading.pop(key, None)
            self._count_load("error", start)
            future.set_exception(self._translate(entry, exc))
            return
        with self._lock:
            self._loading.pop(key, None)
            self._resident[key] = resident
            self._supersede(resident)
        self._count_load("ok", start)
        try:
            self.evict(protect=key)
        except Overloaded as exc:
            future.set_exception(exc)
            return
        future.set_result(resident.name)

    def _attach(self, entry: StoreEntry) -> Resident:
        adapter_file = read_stored_adapter(self.store, entry)  # checks outside the lock
        name = internal_name(entry)
        with self.model_lock:
            if self.model.state.merged is not None:
                # frozen tensors (SVD bases) must come from the original weights: unmerge first;
                # the scheduler sees the new state at its next step and may merge again
                self.model.unmerge()
                self.model.set_adapter(None)
            load_adapter(adapter_file, self.model, name, prune_tolerance=self.prune_tolerance)
            try:
                if self.on_attached is not None:
                    self.on_attached(entry, name)
            except BaseException:
                self.model.delete_adapter(name)
                raise
            nbytes = self.model.adapter_nbytes(name)
        return Resident(key_of(entry), name, entry, nbytes, last_used=time.time(), uses=1)

    def verify(self, adapter_file: AdapterFile) -> None:
        """Every load check of ``adapter_file`` against the served model (shapes, config,
        base, regeneration probe), by attaching it under a throwaway name and deleting it."""
        name = f"svda-upload-check-{uuid.uuid4().hex[:12]}"
        with self.model_lock:
            if self.model.state.merged is not None:
                self.model.unmerge()
                self.model.set_adapter(None)
            load_adapter(adapter_file, self.model, name, probe="always")
            self.model.delete_adapter(name)

    @staticmethod
    def _translate(entry: StoreEntry, exc: BaseException) -> BaseException:
        if isinstance(exc, BaseMismatch):
            error = BaseMismatch(f"adapter {entry.id!r} (version {entry.version}): {exc}")
            error.__cause__ = exc
            return error
        return exc

    def _supersede(self, new: Resident) -> None:
        """Older versions of ``new``'s id go when unused; their pin moves to ``new``."""
        for key, old in self._resident.items():
            if key[:2] == new.key[:2] and key.version < new.key.version:
                new.pinned = new.pinned or old.pinned
                old.pinned, old.doomed = False, True

    def _count_load(self, result: str, start: float) -> None:
        if self.metrics is not None:
            self.metrics.adapter_loads.labels(result=result).inc()
            self.metrics.adapter_load_latency.observe(time.perf_counter() - start)

    # ----- eviction -----------------------------------------------------------------------------
    def evict(self, protect: Key | None = None) -> None:
        """Detach doomed adapters no request holds, then LRU adapters while over budget.
        Raises :class:`Overloaded` (after detaching it) if ``protect`` cannot fit beside the
        pinned adapters."""
        with self.model_lock:
            with self._lock:
                victims = self._pick_victims(protect)
                for victim in victims:
                    del self._resident[victim.key]
                overfull = protect is not None and self._pinned_overflow(protect)
                if overfull:
                    victims.append(self._resident.pop(protect))
            for victim in victims:
                self.model.delete_adapter(victim.name)
        if self.metrics is not None:
            self.metrics.adapter_evictions.inc(sum(1 for v in victims if not v.doomed))
        self._update_gauges()
        if overfull:
            raise Overloaded(
                f"adapter {protect.id!r} does not fit in adapter memory ({self.budget} bytes) "
                "beside the pinned adapters; unpin some or raise adapter_memory_bytes"
            )

    def _free(self, resident: Resident) -> bool:
        return not self._refs.get(resident.key) and not self._is_merged(resident.name)

    def _pick_victims(self, protect: Key | None) -> list[Resident]:
        victims = [r for r in self._resident.values() if r.doomed and self._free(r)]
        total = sum(r.nbytes for r in self._resident.values() if r not in victims)
        candidates = sorted(
            (r for r in self._resident.values() if r not in victims),
            key=lambda r: r.last_used,
        )
        for r in candidates:
            if total <= self.budget:
                break
            if r.key != protect and not r.pinned and self._free(r):
                victims.append(r)
                total -= r.nbytes
        return victims

    def _pinned_overflow(self, key: Key) -> bool:
        resident = self._resident[key]
        pinned = sum(r.nbytes for r in self._resident.values() if r.pinned and r.key != key)
        return pinned + resident.nbytes > self.budget

    def _update_gauges(self) -> None:
        if self.metrics is None:
            return
        with self._lock:
            count, total = len(self._resident), sum(r.nbytes for r in self._resident.values())
        self.metrics.resident_adapters.set(count)
        self.metrics.adapter_memory_bytes.set(total)

    # ----- admin operations -----------------------------------------------------------------
    def load(self, adapter_id: str, tenant: str | None = None, timeout: float | None = None):
        """Make the latest version of ``adapter_id`` resident (waits for the load)."""
        entry = self.resolve(adapter_id, tenant)
        future = self.acquire(entry)
        try:
            future.result(timeout)
        finally:
            self.release(key_of(entry))
        return self._public(key_of(entry), adapter_id)

    def pin(self, adapter_id: str, tenant: str | None = None, pinned: bool = True):
        entry = self.resolve(adapter_id, tenant)
        check_owner(entry, tenant, "pin")
        key = key_of(entry)
        future = self.acquire(entry)
        try:
            future.result()
            with self._lock:
                self._resident[key].pinned = pinned
            if pinned:
                self._check_pinned_fit(key)
        finally:
            self.release(key)
        return self._public(key, adapter_id)

    def _check_pinned_fit(self, key: Key) -> None:
        with self._lock:
            if not self._pinned_overflow(key):
                return
            self._resident[key].pinned = False
        raise Overloaded(
            f"pinning {key.id!r} would put more than adapter_memory_bytes ({self.budget}) into "
            "pinned adapters; unpin some first"
        )

    def unload(self, adapter_id: str, tenant: str | None = None) -> bool:
        """Detach every version of ``adapter_id`` now, or when its requests finish; False if
        none is resident. An id ``tenant`` may not read (absent, malformed, another tenant's)
        raises :class:`AdapterNotFound` with the same message in every case."""
        with self._lock:
            found = [r for r in self._resident.values() if r.key.id == adapter_id]
        visible_found = addressed(found, tenant)
        if not visible_found:
            try:
                self.store.get(adapter_id, tenant=tenant)
            except (AdapterNotFound, StorePermissionError, InvalidMetadata):
                raise unknown_adapter(adapter_id, tenant) from None
            return False
        for r in visible_found:
            check_owner(r.entry, tenant, "unload")
        with self._lock:
            for r in visible_found:
                r.pinned, r.doomed = False, True
        self.evict()
        return True

    def drop(self, key: Key) -> bool:
        """Detach exactly ``key`` (one version of one namespace's id; a namesake in another
        namespace stays) now, or when the requests holding it finish. A pinned adapter stays
        (unpin it first). False if ``key`` is not resident or is pinned."""
        with self._lock:
            resident = self._resident.get(key)
            if resident is None or resident.pinned:
                return False
            resident.doomed = True
        self.evict()
        return True

    def held_keys(self) -> set[Key]:
        """The keys of every resident adapter and of every adapter a request holds (from
        :meth:`acquire` to :meth:`release`: also while it loads)."""
        with self._lock:
            return set(self._resident) | set(self._refs)

    def resident_keys(self) -> set[Key]:
        """The keys of every resident adapter (all namespaces)."""
        with self._lock:
            return set(self._resident)

    def resident(self, tenant: str | None = None) -> list[ResidentAdapter]:
        with self._lock:
            rows = [r for r in self._resident.values() if visible(r.entry, tenant)]
            return [r.public() for r in sorted(rows, key=lambda r: r.key)]

    def _public(self, key: Key, adapter_id: str) -> ResidentAdapter:
        with self._lock:
            resident = self._resident.get(key)
            if resident is None:
                raise Overloaded(f"adapter {adapter_id!r} was evicted right after loading")
            return resident.public()

    def bytes_in_use(self) -> int:
        with self._lock:
            return sum(r.nbytes for r in self._resident.values())

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
