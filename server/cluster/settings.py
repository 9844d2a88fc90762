"""Settings of a svda Ray Serve cluster, and the multiplexed model ids of adapters.

Modelled on ``ray.serve.multiplexed(max_num_models_per_replica=...)``: the number of adapters a
replica keeps is derived from the adapter memory budget and a typical adapter's size, so the
multiplexed LRU of Ray Serve evicts before the engine's own byte budget has to.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

NAMESPACE = "svda"  # Ray namespace of the application's named actors (registry, store service)
ENGINES = ("native",)  # vLLM joins here once the `engine` server setting selects it


@dataclass
class ClusterSettings:
    """What ``svda cluster`` adds to the server settings (docs/cluster.md)."""

    replicas: int = 2
    replica_cpus: float = 1.0  # Ray CPUs per replica (fractions are fine on one machine)
    typical_adapter_bytes: int = 2 << 20  # for max_adapters_per_replica
    max_adapters: int = 0  # 0: adapter_memory_bytes // typical_adapter_bytes
    max_ongoing_requests: int = 32  # per replica (Ray Serve's limit)
    engine: str = "native"
    dtype: str | None = None  # torch dtype of the base on replicas ("float64" in tests)
    app_name: str = "svda"
    ray_address: str | None = None  # None: start (or join $RAY_ADDRESS) locally
    engine_kwargs: dict[str, Any] = field(default_factory=dict)  # EngineSettings fields

    def validate(self) -> None:
        checks = [
            (self.replicas >= 1, f"replicas must be >= 1, got {self.replicas}"),
            (self.replica_cpus > 0, f"replica_cpus must be > 0, got {self.replica_cpus}"),
            (self.typical_adapter_bytes > 0,
             f"typical_adapter_bytes must be > 0, got {self.typical_adapter_bytes}"),
            (self.max_adapters >= 0, f"max_adapters must be >= 0, got {self.max_adapters}"),
            (self.engine in ENGINES, f"engine must be one of {ENGINES}, got {self.engine!r}"),
        ]  # fmt: skip
        for ok, message in checks:
            if not ok:
                raise ValueError(f"cluster settings: {message}")

    @property
    def adapter_memory_bytes(self) -> int:
        return int(self.engine_kwargs.get("adapter_memory_bytes", 256 << 20))

    @property
    def max_adapters_per_replica(self) -> int:
        """Ray Serve's ``max_num_models_per_replica``: how many adapters fit the budget."""
        if self.max_adapters:
            return self.max_adapters
        return max(1, self.adapter_memory_bytes // self.typical_adapter_bytes)


def model_id_of(namespace: str | None, adapter_id: str, version: int) -> str:
    """The multiplexed model id of one store entry: ``<namespace>/<id>@<version>`` (the
    shared namespace is empty). Ids and tenants never hold ``/`` or ``@``."""
    return f"{namespace or ''}/{adapter_id}@{version}"


def parse_model_id(model_id: str) -> tuple[str | None, str, int]:
    """(namespace or None, id, version) of :func:`model_id_of`'s string."""
    namespace, _, rest = model_id.partition("/")
    adapter_id, at, version = rest.rpartition("@")
    if not at or not adapter_id or not version.isdigit():
        raise ValueError(f"malformed multiplexed model id {model_id!r}: use namespace/id@version")
    return namespace or None, adapter_id, int(version)
