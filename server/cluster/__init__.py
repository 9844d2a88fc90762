"""svda on Ray Serve: many engine replicas behind one gRPC ingress, with adapter affinity.

Modelled on Ray Serve's model multiplexing (``@serve.multiplexed``, ``multiplexed_model_id``
routing): the ingress is svda's own gRPC server (servicer, interceptor, tenants, TLS, store)
whose engine is a :class:`~svda.server.cluster.engine.ClusterEngine`; each replica holds one
native engine (:mod:`svda.server.cluster.replica`). See docs/cluster.md.

Importable without Ray: ``ray`` is imported only when a cluster is built.
"""

from .settings import ClusterSettings, model_id_of, parse_model_id

__all__ = ["ClusterSettings", "model_id_of", "parse_model_id"]
