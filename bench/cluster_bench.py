"""The load test through a Ray Serve cluster of svda replicas vs one server, on the same store.

    python bench/cluster_bench.py                                # SmolLM2, 2 replicas of 1 CPU
    python bench/cluster_bench.py --model ./tiny --requests 48 --adapters 4

Reuses ``bench/load_test.py``'s store builder and load generator (request ``i`` -> adapter
``i mod adapters``, at most ``--concurrency`` in flight, each sent once). Runs one server, then
the cluster (``svda.server.cluster``: gRPC ingress + ``--replicas`` replicas of
``--replica-cpus`` CPUs, each keeping ``--adapters // --replicas`` adapters, 1 more for slack),
and prints one table: errors, latency and time to first token p50/p99, tokens/s, adapter loads
(total and the most for one adapter) and the affinity hit rate (requests whose adapter was
already resident where they ran = 1 - loads / requests with an adapter).
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import sys
import tempfile
import time
from collections import Counter
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from load_test import make_store, percentile, run_load


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--model", help="base model folder (default: the embedded SmolLM2)")
    p.add_argument("--method", choices=("svda", "lora", "vera"), default="lora")
    p.add_argument("--requests", type=int, default=96)
    p.add_argument("--adapters", type=int, default=8)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--replica-cpus", type=float, default=1.0)
    p.add_argument("--timeout", type=float, default=600.0)
    args = p.parse_args(argv)
    args.token, args.target = None, None  # what load_test's run_load reads
    return args


def summary(results: list[dict], wall: float, loads: Counter, adapters: int) -> dict[str, str]:
    """The table's column of one run; ``loads`` by model id (one key "all" when unknown)."""
    ok = [r for r in results if r["status"] == "OK"]
    errors = Counter(r["status"] for r in results if r["status"] != "OK")
    lat = [r["latency"] * 1e3 for r in ok]
    ttft = [r["ttft"] * 1e3 for r in ok if r["ttft"] is not None]
    total = sum(loads.values())
    return {
        "requests (errors)": f"{len(results)} ({sum(errors.values()) or 0}"
        + (f": {dict(errors)})" if errors else ")"),
        "latency p50 / p99 (ms)": f"{percentile(lat, 50):.0f} / {percentile(lat, 99):.0f}",
        "time to first token p50 / p99 (ms)": f"{percentile(ttft, 50):.0f} / {percentile(ttft, 99):.0f}",
        "generated tokens / s": f"{sum(r['tokens'] for r in ok) / wall:.1f}",
        "adapter loads: total, per adapter (mean / most)": f"{total}, {total / adapters:.2f} / "
        + ("n/a" if "all" in loads else f"{max(loads.values(), default=0)}"),
        "affinity hit rate": f"{1 - total / len(results):.3f}",
        "wall time (s)": f"{wall:.1f}",
    }


def one_server(args, base, store) -> dict[str, str]:
    from svda.server.app import BackgroundServer
    from svda.server.settings import ServerSettings

    settings = ServerSettings(host="127.0.0.1", port=0, metrics_port=None, store=store.root,
                              max_batch_size=args.concurrency)  # fmt: skip
    with BackgroundServer(settings, base=base, store=store) as server:
        results, wall = asyncio.run(run_load(f"127.0.0.1:{server.port}", ids(args), args))
        value = server.server.metrics.registry.get_sample_value(
            "svda_adapter_loads_total", {"result": "ok"}
        )
    return summary(results, wall, Counter({"all": int(value or 0)}), args.adapters)


def cluster(args, store) -> tuple[dict[str, str], dict[str, int]]:
    import ray
    from ray import serve

    from svda.server.app import BackgroundServer
    from svda.server.cluster import ClusterSettings
    from svda.server.cluster.engine import ClusterEngine
    from svda.server.cluster.replica import deploy
    from svda.server.settings import ServerSettings

    per_replica = -(-args.adapters // args.replicas) + 1
    settings = ClusterSettings(replicas=args.replicas, replica_cpus=args.replica_cpus,
                               max_adapters=per_replica,
                               engine_kwargs={"max_batch_size": args.concurrency})  # fmt: skip
    ray.init(num_cpus=max(2, int(args.replicas * args.replica_cpus + 0.999)),
             include_dashboard=False, log_to_driver=False)  # fmt: skip
    try:
        handle = deploy(settings, args.model, str(store.root))
        engine = ClusterEngine(handle, store, settings.app_name)
        values = dict(host="127.0.0.1", port=0, metrics_port=None, store=store.root)
        with BackgroundServer(ServerSettings(**values), store=store, engine=engine) as server:
            results, wall = asyncio.run(run_load(f"127.0.0.1:{server.port}", ids(args), args))
            stats = engine.replica_stats()
    finally:
        serve.shutdown()
        ray.shutdown()
    loads = sum((Counter(row["loads"]) for row in stats.values()), Counter())
    per = {rid: sum(row["loads"].values()) for rid, row in stats.items()}
    return summary(results, wall, loads, args.adapters), per


def ids(args) -> list[str]:
    return [f"load-{i}" for i in range(args.adapters)]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from svda.runtime import load_base_model

    base = load_base_model(args.model)
    with tempfile.TemporaryDirectory(prefix="svda-cluster-bench-") as tmp:
        store = make_store(base, args.method, args.adapters, Path(tmp) / "store")
        start = time.perf_counter()
        single = one_server(args, base, store)
        del base  # the replicas load their own copies
        many, per_replica = cluster(args, store)
        print(f"(both runs: {time.perf_counter() - start:.0f} s)", file=sys.stderr)
    head = (f"*svda cluster bench — {args.model or 'SmolLM2-135M-Instruct'}, {args.adapters} "
            f"{args.method} adapters, {args.requests} requests, concurrency {args.concurrency}, "
            f"{args.max_new_tokens} new tokens; {args.replicas} replicas × {args.replica_cpus:g} "
            f"CPU; measured {date.today()} · {platform.machine()}.*")  # fmt: skip
    rows = [f"| {k} | {single[k]} | {many[k]} |" for k in single]
    print("\n".join([head, "", "| metric | one server | cluster |", "|---|---:|---:|", *rows]))
    print(f"\nloads per replica: {sorted(per_replica.values())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
