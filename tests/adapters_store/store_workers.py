"""Child processes for the adapter store tests: crash and concurrency workers.

Run as a script (``python store_workers.py MODE ROOT ...``) for the crash tests, or imported by
``multiprocessing`` for the concurrent-writer test. A fresh child imports only the store modules,
not the ``svda.adapters_store`` package ``__init__`` (which loads the format code and torch), so
it starts in a fraction of a second instead of several seconds.
"""

from __future__ import annotations

import importlib.util
import os
import random
import sqlite3
import sys
import types


def _skip_package_init() -> None:
    """Register ``svda.adapters_store`` as a bare package so its ``__init__`` does not run."""
    if "svda.adapters_store" in sys.modules:
        return  # already imported (e.g. in the pytest process): nothing to save
    spec = importlib.util.find_spec("svda.adapters_store")
    package = types.ModuleType("svda.adapters_store")
    package.__path__ = list(spec.submodule_search_locations)
    sys.modules["svda.adapters_store"] = package


_skip_package_init()

from svda.adapters_store.store import AdapterStore  # noqa: E402

META = {"method": "svda", "base_fingerprint": "fp-test"}
KILLED_EXIT = 77  # the exit status of a child that died at its crash point
SHARED_BYTES = b"identical bytes published under several ids"


def publish_loop(root: str, seed: int) -> None:
    """Publish forever, printing ``pub ID VERSION SHA`` after each publish returns.

    Every third round also publishes and deletes a version of ``scratch`` (never checked by
    the parent beyond store integrity, since a kill may land between the two).
    """
    rng = random.Random(seed)
    store = AdapterStore(root)
    print("ready", flush=True)
    for n in range(1, 1_000_000):
        data = SHARED_BYTES if n % 4 == 0 else rng.randbytes(rng.randint(1, 1 << 18))
        entry = store.publish(data, f"keep-{rng.randrange(3)}", tags=["loop"], **META)
        print(f"pub {entry.id} {entry.version} {entry.sha256}", flush=True)
        if n % 3 == 0:
            scratch = store.publish(rng.randbytes(4096), "scratch", **META)
            store.delete("scratch", None if n % 2 else scratch.version)


def die_at(sql_prefix: str, nth: int) -> None:
    """Make this process ``os._exit`` when the nth SQL statement starting with the prefix starts.

    Installed after the store is opened, so it counts only the statements of the action.
    """
    real_connect = sqlite3.connect
    seen = 0

    def trace(sql: str) -> None:
        nonlocal seen
        if sql.lstrip().upper().startswith(sql_prefix):
            seen += 1
            if seen == nth:
                os._exit(KILLED_EXIT)

    def connect(*args, **kwargs):
        conn = real_connect(*args, **kwargs)
        conn.set_trace_callback(trace)
        return conn

    sqlite3.connect = connect


def crash_action(root: str, action: str, sql_prefix: str, nth: int) -> None:
    """Open the store, arm :func:`die_at`, then publish ``b"new"`` to ``a`` or delete ``b``."""
    store = AdapterStore(root)
    die_at(sql_prefix, nth)
    if action == "publish":
        store.publish(b"new bytes", "a", **META)
    else:
        store.delete("b")
    sys.exit(0)  # the crash point was not reached


def concurrent_worker(root: str, index: int, count: int, barrier, queue) -> None:
    """Publish ``count`` times, alternating the shared id ``common`` and ``own-INDEX``."""
    barrier.wait()
    store = AdapterStore(root)
    published = []
    for k in range(count):
        adapter_id = "common" if k % 2 == 0 else f"own-{index}"
        data = SHARED_BYTES if k % 5 == 0 else f"{index}-{k}".encode()
        entry = store.publish(data, adapter_id, tags=[f"worker-{index}"], **META)
        published.append((entry.id, entry.version, entry.sha256))
    queue.put(published)


if __name__ == "__main__":
    mode, root_arg, *rest = sys.argv[1:]
    if mode == "loop":
        publish_loop(root_arg, int(rest[0]))
    elif mode == "crash":
        crash_action(root_arg, rest[0], rest[1], int(rest[2]))
    else:
        sys.exit(f"unknown mode {mode!r}: use 'loop' or 'crash'")
