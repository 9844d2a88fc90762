"""The adapter store under crashes (a worker killed at each step, SIGKILL at random moments)
and concurrent writers from several processes."""

from __future__ import annotations

import multiprocessing
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from svda.adapters_store.store import AdapterStore

from . import store_workers
from .store_helpers import assert_clean
from .store_workers import KILLED_EXIT, META

WORKERS = Path(store_workers.__file__)


# -- crashes ------------------------------------------------------------------------------------


def run_worker(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(WORKERS), *args], capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize(
    ("action", "sql_prefix", "nth", "b_survives", "leftover"),
    [
        ("publish", "BEGIN IMMEDIATE", 1, True, "temp"),  # staged, lock not yet taken
        ("publish", "INSERT INTO ADAPTERS", 1, True, "object"),  # object renamed in, no row
        ("publish", "COMMIT", 1, True, "object"),  # row inserted, never committed
        ("delete", "COMMIT", 1, True, None),  # rows deleted, never committed
        ("delete", "BEGIN IMMEDIATE", 2, False, "object"),  # rows gone, object not yet removed
    ],
)
def test_a_crash_at_each_step_leaves_the_store_intact(
    tmp_path, action, sql_prefix, nth, b_survives, leftover
):
    store = AdapterStore(tmp_path / "store")
    a1 = store.publish(b"a bytes", "a", **META)
    store.publish(b"b bytes", "b", **META)
    done = run_worker("crash", str(store.root), action, sql_prefix, str(nth))
    assert done.returncode == KILLED_EXIT, done.stderr

    reopened = AdapterStore(store.root)
    assert reopened.verify() == []
    assert reopened.get("a") == a1
    assert [e.ref for e in reopened.list(id="b")] == (["b@1"] if b_survives else [])
    if b_survives:
        assert reopened.read_bytes(reopened.get("b")) == b"b bytes"
    report = reopened.gc(temp_max_age_s=0)
    found = ("temp",) * len(report.removed_temp) + ("object",) * len(report.removed_objects)
    assert found == ((leftover,) if leftover else ())
    assert_clean(reopened)
    assert reopened.publish(b"new bytes", "a", **META).version == 2


def test_sigkill_at_random_moments_never_loses_a_published_adapter(tmp_path):
    root = tmp_path / "store"
    rng = random.Random(1234)
    acknowledged: dict[tuple[str, int], str] = {}
    for round_ in range(6):
        lines = kill_publish_loop(root, seed=round_, lines_before_kill=rng.randint(0, 6), rng=rng)
        for line in lines:
            if line.startswith("pub "):
                _, adapter_id, version, digest = line.split()
                acknowledged[(adapter_id, int(version))] = digest
        store = AdapterStore(root)
        assert store.verify() == []
        rows = {(e.id, e.version): e.sha256 for e in store.list()}
        assert acknowledged.items() <= rows.items()
        for adapter_id in {"keep-0", "keep-1", "keep-2"}:
            versions = [e.version for e in store.list(id=adapter_id)]
            assert versions == list(range(1, len(versions) + 1))
    assert acknowledged, "the publisher never got to publish"
    store.gc(temp_max_age_s=0)
    assert_clean(store)


def kill_publish_loop(root: Path, seed: int, lines_before_kill: int, rng: random.Random) -> list:
    """Start the publishing loop, let it print some lines, SIGKILL it; return all full lines."""
    proc = subprocess.Popen(
        [sys.executable, str(WORKERS), "loop", str(root), str(seed)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        lines = [proc.stdout.readline() for _ in range(lines_before_kill)]
        time.sleep(rng.uniform(0, 0.05))  # only to vary where the kill lands
        proc.send_signal(signal.SIGKILL)
        rest, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == -signal.SIGKILL, err
    output = "".join(lines) + rest
    return [line for line in output.splitlines(keepends=True) if line.endswith("\n")]


# -- concurrent writers -------------------------------------------------------------------------


def test_concurrent_writers_from_several_processes(tmp_path):
    root, processes, count = str(tmp_path / "store"), 4, 10
    ctx = multiprocessing.get_context("spawn")
    barrier, queue = ctx.Barrier(processes), ctx.Queue()
    workers = [
        ctx.Process(target=store_workers.concurrent_worker, args=(root, i, count, barrier, queue))
        for i in range(processes)
    ]
    for worker in workers:
        worker.start()
    published = [row for _ in workers for row in queue.get(timeout=120)]
    for worker in workers:
        worker.join(timeout=120)
        assert worker.exitcode == 0

    store = AdapterStore(root)
    rows = {(e.id, e.version, e.sha256) for e in store.list()}
    assert rows == set(published) and len(rows) == processes * count
    assert [e.version for e in store.list(id="common")] == list(
        range(1, processes * count // 2 + 1)
    )
    for i in range(processes):
        assert [e.version for e in store.list(id=f"own-{i}")] == list(range(1, count // 2 + 1))
        assert len(store.list(tag=f"worker-{i}")) == count
    assert_clean(store)
