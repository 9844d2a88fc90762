"""Load test of the gRPC server: a fixed number of requests over many adapters, then a table.

    python bench/load_test.py                              # own server on SmolLM2, 500 x 50
    python bench/load_test.py --model ./tiny --requests 20 --adapters 4
    python bench/load_test.py --target 127.0.0.1:50051     # a running server (localhost only)

Without ``--target`` it starts a server in this process on the base model (default: the
embedded SmolLM2-135M-Instruct), with a temporary store holding ``--adapters`` adapters of
``--method`` made on that base (trainable tensors moved by small seeded noise, as training would).
With ``--target`` it uses the compatible adapters the server lists. Request ``i`` goes to adapter
``i mod adapters``; at most ``--concurrency`` are in flight; every request is sent exactly once
and the script stops when all have finished (bounded, no retries). Reports latency and time to
first token percentiles, errors by status code, and generated tokens per second.
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import statistics
import sys
import tempfile
import time
from collections import Counter
from datetime import date
from pathlib import Path

from svda.client import AsyncClient, Completion, SvdaClientError, TokenChunk

LOOPBACK = ("127.0.0.1", "localhost", "[::1]")
PROMPTS = ("Tell me about the sea.", "Write a short poem about rain.", "What is an adapter?",
           "List three colours.", "Explain gravity in one sentence.")  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--target", help="host:port of a running server on this machine")
    p.add_argument("--token", help="bearer token for --target")
    p.add_argument("--model", help="base model folder for the own server (default: SmolLM2)")
    p.add_argument("--method", choices=("svda", "lora", "vera"), default="svda")
    p.add_argument("--requests", type=int, default=500)
    p.add_argument("--adapters", type=int, default=50)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--timeout", type=float, default=600.0, help="deadline of each request (s)")
    args = p.parse_args(argv)
    if args.target and args.target.rsplit(":", 1)[0] not in LOOPBACK:
        p.error("--target must be a localhost address: this load test never leaves the machine")
    if min(args.requests, args.adapters, args.concurrency, args.max_new_tokens) < 1:
        p.error("--requests, --adapters, --concurrency and --max-new-tokens must be >= 1")
    return args


# ----- an own server with generated adapters ---------------------------------------------------
def make_store(base, method: str, count: int, root: Path):
    """A store at ``root`` with ``count`` adapters of ``method`` on ``base``: ids ``load-<i>``."""
    import torch

    from svda.adapters_store import AdapterStore, export_adapter, publish_adapter
    from svda.runtime import AdapterModel, LoraConfig, SvdaConfig, VeraConfig

    configs = {"svda": lambda: SvdaConfig(targets="all-linear"),
               "lora": lambda: LoraConfig(targets="q_proj,v_proj", r=8),
               "vera": lambda: VeraConfig(targets="q_proj,v_proj", r=64)}  # fmt: skip
    store, model = AdapterStore(root), AdapterModel(base.model)
    for i in range(count):
        model.add_adapter("a", configs[method]())
        generator = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for _, p in sorted(model.adapter_parameters("a").items()):
                p.add_(torch.randn(p.shape, generator=generator, dtype=p.dtype) * 0.01)
        publish_adapter(store, export_adapter(model, "a", name=f"load-{i}"), f"load-{i}")
        model.delete_adapter("a")
        if (i + 1) % 10 == 0:
            print(f"  {i + 1}/{count} adapters in the store", file=sys.stderr, flush=True)
    return store


def start_own_server(args: argparse.Namespace, root: Path):
    from svda.runtime import load_base_model
    from svda.server.app import BackgroundServer
    from svda.server.settings import ServerSettings

    base = load_base_model(args.model)
    start = time.perf_counter()
    store = make_store(base, args.method, args.adapters, root / "store")
    print(f"made {args.adapters} {args.method} adapters in {time.perf_counter() - start:.1f} s",
          file=sys.stderr)  # fmt: skip
    settings = ServerSettings(host="127.0.0.1", port=0, metrics_port=None, store=store.root,
                              max_batch_size=max(args.concurrency, 1))  # fmt: skip
    return BackgroundServer(settings, base=base, store=store).start(timeout=600)


# ----- the load --------------------------------------------------------------------------------
async def one_request(client: AsyncClient, i: int, adapter: str, args) -> dict:
    start, first, tokens = time.perf_counter(), None, 0
    try:
        async for event in client.stream(PROMPTS[i % len(PROMPTS)], adapter=adapter,
                                         max_new_tokens=args.max_new_tokens, timeout=args.timeout):  # fmt: skip
            if isinstance(event, TokenChunk) and first is None:
                first = time.perf_counter() - start
            elif isinstance(event, Completion):
                tokens = event.completion_tokens
        status = "OK"
    except SvdaClientError as exc:
        status = exc.code.name
    return {
        "latency": time.perf_counter() - start,
        "ttft": first,
        "tokens": tokens,
        "status": status,
        "index": i,
    }


async def run_load(address: str, adapters: list[str], args) -> tuple[list[dict], float]:
    gate = asyncio.Semaphore(args.concurrency)
    async with AsyncClient(address, token=args.token) as client:

        async def gated(i: int) -> dict:
            async with gate:
                return await one_request(client, i, adapters[i % len(adapters)], args)

        start = time.perf_counter()
        results = await asyncio.gather(*(gated(i) for i in range(args.requests)))
        return results, time.perf_counter() - start


async def listed_adapters(address: str, args) -> list[str]:
    async with AsyncClient(address, token=args.token) as client:
        entries = await client.list_adapters()
    ids = [e.adapter_id for e in entries if e.compatible][: args.adapters]
    if not ids:
        raise SystemExit(f"the server at {address} lists no adapters for its base; upload some")
    return ids


# ----- the report ------------------------------------------------------------------------------
def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def ttft_breakdown(ok: list[dict], adapters: int, concurrency: int) -> list[tuple[str, str]]:
    """Time to first token of the requests that arrive together at the start (their prefills
    queue), of each adapter's first request (it loads the adapter), and of all the others."""
    groups = {
        f"the first {concurrency} requests (sent at once)": lambda i: i < concurrency,
        "first request of its adapter (loads it), after those": (
            lambda i: concurrency <= i < adapters
        ),
        "all later requests": lambda i: i >= max(adapters, concurrency),
    }
    rows = []
    for label, chosen in groups.items():
        ttft = [r["ttft"] * 1e3 for r in ok if r["ttft"] is not None and chosen(r["index"])]
        if ttft:
            value = f"{percentile(ttft, 50):.0f} / {percentile(ttft, 99):.0f} ({len(ttft)})"
            rows.append((f"· time to first token p50 / p99 (ms), {label}", value))
    return rows


def report(results: list[dict], wall: float, adapters: int, args, base_name: str) -> str:
    ok = [r for r in results if r["status"] == "OK"]
    errors = Counter(r["status"] for r in results if r["status"] != "OK")
    lat = [r["latency"] * 1e3 for r in ok]
    ttft = [r["ttft"] * 1e3 for r in ok if r["ttft"] is not None]
    tokens = sum(r["tokens"] for r in ok)
    head = (f"*svda load test — {base_name}, {args.method if not args.target else 'listed'} "
            f"adapters; measured {date.today()} · {platform.machine()} · "
            f"concurrency {args.concurrency} · {args.max_new_tokens} new tokens per request.*")  # fmt: skip
    rows = [
        ("requests", f"{len(results)}"), ("adapters", f"{adapters}"),
        ("succeeded", f"{len(ok)}"),
        ("errors", ", ".join(f"{k} {v}" for k, v in sorted(errors.items())) or "0"),
        ("latency p50 / p99 (ms)", f"{percentile(lat, 50):.0f} / {percentile(lat, 99):.0f}"),
        ("time to first token p50 / p99 (ms)",
         f"{percentile(ttft, 50):.0f} / {percentile(ttft, 99):.0f}"),
        *ttft_breakdown(ok, adapters, args.concurrency),
        ("mean latency (ms)", f"{statistics.fmean(lat):.0f}" if lat else "nan"),
        ("generated tokens / s", f"{tokens / wall:.1f}"), ("wall time (s)", f"{wall:.1f}"),
    ]  # fmt: skip
    table = ["| metric | value |", "|---|---:|", *(f"| {k} | {v} |" for k, v in rows)]
    return "\n".join([head, "", *table])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="svda-load-") as tmp:
        server = None if args.target else start_own_server(args, Path(tmp))
        try:
            address = args.target or f"127.0.0.1:{server.port}"
            adapters = asyncio.run(listed_adapters(address, args))
            results, wall = asyncio.run(run_load(address, adapters, args))
            name = server.server.engine.info().base_model if server else address
        finally:
            if server is not None:
                server.stop()
    print(report(results, wall, len(adapters), args, name))
    return 0 if all(r["status"] == "OK" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
