"""Canaries: the pinned Ray and the Ray Serve internals svda's AdapterRouter uses.

``server/cluster/router.py`` subclasses Ray Serve's power-of-two-choices router and reads some of
its state. When Ray is upgraded these fail first and name what moved (skipped without Ray)."""

from __future__ import annotations

import inspect

import pytest

pytest.importorskip("ray.serve", reason="Ray Serve is not installed (make install-cluster)")


def test_ray_version_is_the_pinned_one():
    import ray

    assert ray.__version__ == "2.60.0", (
        f"Ray {ray.__version__}: svda's router was checked against 2.60.0 only; check every "
        "canary here, then the cluster extra's pin in pyproject.toml"
    )


def test_router_internals_exist():
    from ray.serve._private.constants import RAY_SERVE_MULTIPLEXED_MODEL_ID_MATCHING_TIMEOUT_S
    from ray.serve._private.request_router.pow_2_router import PowerOfTwoChoicesRequestRouter
    from ray.serve.request_router import PendingRequest, RunningReplica

    assert RAY_SERVE_MULTIPLEXED_MODEL_ID_MATCHING_TIMEOUT_S > 0
    for name in ("initialize_state", "on_request_routed", "update_replicas",
                 "apply_multiplex_routing"):  # fmt: skip
        assert hasattr(PowerOfTwoChoicesRequestRouter, name), f"router lost {name}"
    source = inspect.getsource(inspect.getmodule(PowerOfTwoChoicesRequestRouter.__mro__[1]))
    for name in ("_multiplexed_model_id_to_replica_ids", "_replicas",
                 "multiplexed_start_matching_time", "should_backoff"):  # fmt: skip
        assert name in source, f"Ray's request router no longer uses {name}"
    assert "multiplexed_model_ids" in inspect.getsource(RunningReplica)
    assert "routing_context" in inspect.getsource(PendingRequest)
