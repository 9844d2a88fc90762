"""Cluster settings and the `svda cluster` flags, without Ray: adapters per replica from the
memory budget, the multiplexed model ids, validation messages, flags -> settings."""

from __future__ import annotations

import pytest

from svda.server.cluster import ClusterSettings, model_id_of, parse_model_id
from svda.server.cluster.cli import build_parser, main, settings_from_args


def test_adapters_per_replica_follow_the_memory_budget():
    budget = {"adapter_memory_bytes": 64 << 20}
    assert ClusterSettings(engine_kwargs=budget).max_adapters_per_replica == 32  # 64 / 2 MiB
    settings = ClusterSettings(typical_adapter_bytes=1 << 20, engine_kwargs=budget)
    assert settings.max_adapters_per_replica == 64
    assert ClusterSettings(max_adapters=3, engine_kwargs=budget).max_adapters_per_replica == 3
    tiny = ClusterSettings(typical_adapter_bytes=1 << 30, engine_kwargs=budget)
    assert tiny.max_adapters_per_replica == 1  # never 0: Ray Serve refuses it


def test_model_ids_round_trip_per_namespace():
    assert model_id_of(None, "acme", 3) == "/acme@3"
    assert model_id_of("globex", "acme", 1) == "globex/acme@1"
    assert parse_model_id("/acme@3") == (None, "acme", 3)
    assert parse_model_id("globex/a.b-c@12") == ("globex", "a.b-c", 12)
    with pytest.raises(ValueError, match="namespace/id@version"):
        parse_model_id("globex/acme")


@pytest.mark.parametrize(
    ("values", "message"),
    [({"replicas": 0}, "replicas must be >= 1"), ({"replica_cpus": 0}, "replica_cpus"),
     ({"engine": "tgi"}, "engine must be one of")],
)  # fmt: skip
def test_invalid_settings_say_which(values, message):
    with pytest.raises(ValueError, match=message):
        ClusterSettings(**values).validate()


def test_flags_reach_the_cluster_and_engine_settings():
    args = build_parser().parse_args(
        ["--replicas", "3", "--replica-cpus", "0.5", "--adapter-memory-bytes", "1048576",
         "--typical-adapter-bytes", "262144", "--max-batch-size", "4", "--port", "0"]
    )  # fmt: skip
    settings, cluster = settings_from_args(args)
    assert (settings.port, settings.max_batch_size) == (0, 4)  # the ingress's own settings
    assert (cluster.replicas, cluster.replica_cpus) == (3, 0.5)
    assert cluster.max_adapters_per_replica == 4
    assert cluster.engine_kwargs["max_batch_size"] == 4
    assert (cluster.engine, cluster.dtype) == ("native", "float32")  # svda serve's own flags
    args = build_parser().parse_args(["--engine", "vllm", "--dtype", "bfloat16"])
    with pytest.raises(ValueError, match="engine must be one of"):
        settings_from_args(args)  # replicas run the native engine only, for now


def test_bad_flags_exit_2_with_the_reason(capsys):
    assert main(["--replicas", "0", "--metrics-port", "none"]) == 2
    assert "replicas must be >= 1" in capsys.readouterr().err
