"""svda.server.engine: the serving engine (scheduler, KV caches, adapter memory, merge policy).

No gRPC here: the servicer calls :class:`Engine` with the domain objects of
:mod:`svda.server.domain`.
"""

from .engine import Engine
from .sequence import RequestHandle
from .settings import EngineSettings

__all__ = ["Engine", "EngineSettings", "RequestHandle"]
