"""What the gRPC layer needs from an engine: :class:`ServingEngine`, a structural Protocol.

:class:`~svda.server.engine.Engine` implements it; the servicer and the server
(``svda.server.servicer``, ``svda.server.app``) are typed against it, so another engine (or a
test double) only has to provide these methods with these signatures.
"""

from __future__ import annotations

import os
from typing import Protocol, runtime_checkable

from svda.adapters_store import AdapterFile

from ..domain import GenerationRequest, ResidentAdapter, ServerInfo
from .sequence import EventCallback, RequestHandle


@runtime_checkable
class ServingEngine(Protocol):
    """Generation and adapter residency on one base model (see docs/engine.md)."""

    def start(self) -> None:
        """Start serving (idempotent)."""

    def stop(self) -> None:
        """Cancel every request and stop (final)."""

    def submit(self, request: GenerationRequest, on_event: EventCallback) -> RequestHandle:
        """Check and queue ``request``; ``on_event`` then gets chunks and one completion (or
        one exception) from the engine's thread."""
        ...

    def verify_adapter(self, source: str | os.PathLike) -> AdapterFile:
        """Every load check of a ``.svda`` file against the served model; nothing stays."""
        ...

    def load_adapter(self, adapter_id: str, tenant: str | None = None) -> ResidentAdapter: ...

    def unload_adapter(self, adapter_id: str, tenant: str | None = None) -> bool: ...

    def pin_adapter(
        self, adapter_id: str, tenant: str | None = None, pinned: bool = True
    ) -> ResidentAdapter: ...

    def resident_adapters(self, tenant: str | None = None) -> list[ResidentAdapter]: ...

    def info(self) -> ServerInfo: ...
