"""The request router of svda's deployment: Ray Serve's own, told at once where it sent an adapter.

Ray Serve's ``PowerOfTwoChoicesRequestRouter`` routes a request for a multiplexed model id to a
replica that holds it, else to one holding the fewest; it learns what a replica holds from the
replica's own report (pushed every 0.1 s, then broadcast by the controller). Until that report
arrives, the router does not know that it just sent a cold model ``M`` to replica ``R``: the next
request for ``M`` may go elsewhere and load it a second time, and cold adapters do not spread by
count. :class:`AdapterRouter` records a cold model id (one no replica is known to hold) on the
replica it routes it to, as the request leaves, until ``R``'s own report lists it (reports that
predate the route do not erase it), or :data:`GRACE_S` seconds at most. A model id some replica
already holds is left to the reports: they are the truth (evictions included), and a record that
outlived them would send requests to a replica that evicted the model.

Ray's router also gives up on the holders of a model id after one failed try (their queues full,
or a queue-length probe slower than 0.1 s, common on a busy node) and sends the request to the
replicas with the fewest models, which load it a second time. :class:`AdapterRouter` keeps
trying the holders for the matching timeout first (1 s by default, Ray's
``RAY_SERVE_MULTIPLEXED_MODEL_ID_MATCHING_TIMEOUT_S``), as Ray's documentation describes
multiplexed routing; then Ray's own order follows (the fewest models, then any replica).

Modelled on Ray Serve's public request-router extension (``ray.serve.request_router``,
``RequestRouterConfig(request_router_class=...)``, ``on_request_routed``). Imports Ray: import
it only where Ray is installed (:func:`svda.server.cluster.replica.deployment` names it by path).
"""

from __future__ import annotations

import time

from ray.serve._private.constants import RAY_SERVE_MULTIPLEXED_MODEL_ID_MATCHING_TIMEOUT_S
from ray.serve._private.request_router.pow_2_router import PowerOfTwoChoicesRequestRouter
from ray.serve.request_router import PendingRequest, ReplicaID, RunningReplica

MATCHING_TIMEOUT_S = RAY_SERVE_MULTIPLEXED_MODEL_ID_MATCHING_TIMEOUT_S  # 1 s by default
GRACE_S = 2.0  # a cold model id's record waits this long at most for its replica's report


class AdapterRouter(PowerOfTwoChoicesRequestRouter):
    """Ray Serve's multiplexed power-of-two-choices router that remembers where it just sent a
    cold model id (see the module docstring)."""

    def initialize_state(self, **kwargs) -> None:
        super().initialize_state(**kwargs)
        self._routed: dict[tuple[str, ReplicaID], float] = {}  # (model id, replica): when

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID,
                          result: object) -> None:  # fmt: skip
        super().on_request_routed(pending_request, replica_id, result)
        model_id = pending_request.metadata.multiplexed_model_id
        if model_id and not self._multiplexed_model_id_to_replica_ids.get(model_id):
            self._routed[(model_id, replica_id)] = time.monotonic()
            self._remember(model_id, replica_id)

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        """Ray's update from the replicas' reports, then the records of cold model ids that
        their replica has not reported yet (a report sent before the route must not erase
        them)."""
        super().update_replicas(replicas)
        oldest = time.monotonic() - GRACE_S
        for (model_id, replica_id), when in list(self._routed.items()):
            replica = self._replicas.get(replica_id)
            if when < oldest or replica is None or model_id in replica.multiplexed_model_ids:
                del self._routed[(model_id, replica_id)]  # expired, gone, or reported
            else:
                self._remember(model_id, replica_id)

    def apply_multiplex_routing(self, pending_request: PendingRequest | None = None) -> set:
        """The known holders of the request's model id for the whole matching timeout (Ray
        moves on after one failed try), then Ray's own choice."""
        if pending_request is not None:
            context = pending_request.routing_context
            start = context.multiplexed_start_matching_time
            model_id = pending_request.metadata.multiplexed_model_id
            holders = self._multiplexed_model_id_to_replica_ids.get(model_id)
            if holders and start and time.time() - start < MATCHING_TIMEOUT_S:
                context.should_backoff = True  # Ray's backoff between tries
                return set(holders)
        return super().apply_multiplex_routing(pending_request)

    def _remember(self, model_id: str, replica_id: ReplicaID) -> None:
        replica = self._replicas.get(replica_id)
        if replica is not None:
            replica.multiplexed_model_ids.add(model_id)  # counts for "the fewest models"
            self._multiplexed_model_id_to_replica_ids[model_id].add(replica_id)
