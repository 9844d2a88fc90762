"""Prometheus metrics of one server (its own registry, so several servers can live in one process).

Served as Prometheus text on ``/metrics`` of the metrics port (``svda serve --metrics-port``).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import start_http_server

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
BATCH_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "svda_requests",
            "RPCs finished, by method and gRPC status",
            ["rpc", "status"],
            registry=r,
        )
        self.request_latency = Histogram(
            "svda_request_latency_seconds",
            "RPC latency, by method and gRPC status",
            ["rpc", "status"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.time_to_first_token = Histogram(
            "svda_time_to_first_token_seconds",
            "Time from a generation's arrival to its first token",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.tokens_generated = Counter(
            "svda_tokens_generated",
            "Generated tokens, by path (unmerged/merged)",
            ["path"],
            registry=r,
        )
        self.prompt_tokens = Counter("svda_prompt_tokens", "Prompt tokens prefilled", registry=r)
        self.batch_size = Histogram(
            "svda_batch_size", "Rows in each decode step", buckets=BATCH_BUCKETS, registry=r
        )
        self.running = Gauge("svda_running_requests", "Requests in the running batch", registry=r)
        self.waiting = Gauge("svda_waiting_requests", "Requests waiting to join", registry=r)
        self.resident_adapters = Gauge(
            "svda_resident_adapters", "Adapters in adapter memory", registry=r
        )
        self.adapter_memory_bytes = Gauge(
            "svda_adapter_memory_bytes", "Bytes of adapter memory in use", registry=r
        )
        self.adapter_loads = Counter(
            "svda_adapter_loads", "Adapters loaded from the store", ["result"], registry=r
        )
        self.adapter_load_latency = Histogram(
            "svda_adapter_load_seconds",
            "Time to read, verify and attach an adapter",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.adapter_evictions = Counter(
            "svda_adapter_evictions", "Adapters evicted (LRU) from adapter memory", registry=r
        )
        self.merges = Counter(
            "svda_merges",
            "Times an adapter was merged into the weights, by reason",
            ["reason"],
            registry=r,
        )
        self.merged_steps = Counter(
            "svda_merged_steps", "Decode steps run on the merged path", registry=r
        )

    def render(self) -> bytes:
        """Prometheus text exposition of every metric."""
        return generate_latest(self.registry)

    def serve_http(self, port: int, addr: str = "127.0.0.1"):
        """Serve ``/metrics`` on ``addr:port`` in a background thread; returns (server, thread)."""
        return start_http_server(port, addr=addr, registry=self.registry)
