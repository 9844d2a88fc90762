"""svda.server.engine: the serving engine (scheduler, KV caches, adapter memory, merge policy).

No gRPC here: the servicer calls :class:`Engine` with the domain objects of
:mod:`svda.server.domain`, typed against the :class:`ServingEngine` Protocol (``protocol.py``).
"""

from .engine import Engine
from .protocol import ServingEngine
from .sequence import EngineEvent, RequestHandle
from .settings import EngineSettings

__all__ = ["Engine", "EngineEvent", "EngineSettings", "RequestHandle", "ServingEngine"]
