"""One Ray instance and one svda cluster per test module: 2 replicas of 0.5 CPU on the tiny base,
each keeping at most 2 adapters, behind a gRPC ingress with TLS and bearer tokens.

Skipped, with the command to install it, when Ray Serve is not importable.
"""

from __future__ import annotations

import pytest

from svda.adapters_store import AdapterStore, publish_adapter
from tests.server.grpc_fixtures import make_certificates

NO_RAY = "Ray Serve is not installed: run server/cluster/install.sh"
ADMIN, ACME, GLOBEX = "admin-token-0123456789", "acme-token-0123456789", "globex-token-0123456789"
SHARED = [f"a{i}" for i in range(6)]  # a0..a3: the affinity test; a4, a5: eviction


@pytest.fixture(scope="module")
def cluster(tiny_folder, adapter_bytes, tmp_path_factory):
    """``(address, tls options, store, engine)`` of a running cluster; torn down at the end."""
    pytest.importorskip("ray.serve", reason=NO_RAY)
    import ray as ray_core
    from ray import serve

    from svda.server.app import BackgroundServer
    from svda.server.cluster import ClusterSettings
    from svda.server.cluster.engine import ClusterEngine
    from svda.server.cluster.replica import deploy
    from svda.server.settings import ServerSettings

    root = tmp_path_factory.mktemp("cluster")
    store = AdapterStore(root / "store")
    datas = list(adapter_bytes.values())
    for i, adapter_id in enumerate(SHARED):
        publish_adapter(store, datas[i % len(datas)], adapter_id)
    publish_adapter(store, datas[0], "acme-private", tenant="acme")
    tokens = root / "tokens.txt"
    tokens.write_text(f"{ADMIN} admin\n{ACME} acme\n{GLOBEX} globex\n")
    certs = make_certificates(root / "certs")
    ray_core.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    settings = ClusterSettings(replicas=2, replica_cpus=0.5, max_adapters=2, dtype="float64",
                               engine_kwargs={"svda_prune_tolerance": 0.0})  # fmt: skip
    server = None
    try:
        handle = deploy(settings, str(tiny_folder), str(store.root))
        engine = ClusterEngine(handle, store, settings.app_name)
        values = dict(host="127.0.0.1", port=0, metrics_port=None, store=store.root,
                      tokens_file=tokens, tls_cert=certs["server_cert"],
                      tls_key=certs["server_key"])  # fmt: skip
        server = BackgroundServer(ServerSettings(**values), store=store, engine=engine).start()
        yield f"localhost:{server.port}", {"ca_cert": certs["ca"]}, store, engine
    finally:
        if server is not None:
            server.stop()
        serve.shutdown()
        ray_core.shutdown()
