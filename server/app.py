"""Build and run the gRPC server: the servicer, the health service (``grpc.health.v1``), server
reflection (so ``grpcurl`` works without the .proto), the Prometheus ``/metrics`` endpoint, and a
graceful shutdown on SIGTERM/SIGINT (health turns NOT_SERVING, running RPCs get ``grace_s``).

``SvdaServer`` runs in an asyncio loop; ``BackgroundServer`` runs one in a thread (tests,
benchmarks); ``serve(settings)`` is what ``svda serve`` calls.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from typing import TYPE_CHECKING, Any

import grpc
from grpc import aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from svda.adapters_store import AdapterStore
from svda.proto.svda.v1 import serving_pb2, serving_pb2_grpc

from .auth import Authenticator
from .interceptor import StatusInterceptor
from .metrics import Metrics
from .servicer import ServingServicer
from .settings import ServerSettings

if TYPE_CHECKING:  # torch-heavy: imported when a server is built
    from svda.runtime import BaseModel

    from .engine import ServingEngine

log = logging.getLogger("svda.server")
SERVICE_NAME = serving_pb2.DESCRIPTOR.services_by_name["Serving"].full_name  # "svda.v1.Serving"
_LOOPBACK = ("127.0.0.1", "localhost", "::1", "[::1]")


def server_credentials(settings: ServerSettings) -> grpc.ServerCredentials | None:
    """TLS credentials from the settings' PEM files (mutual TLS with a client CA), or None."""
    if not settings.tls:
        return None
    key, cert = _read(settings.tls_key), _read(settings.tls_cert)
    client_ca = _read(settings.tls_client_ca) if settings.tls_client_ca else None
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


def _read(path) -> bytes:
    try:
        return path.expanduser().read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read TLS file {path}: {exc.strerror or exc}") from exc


def build_engine(
    settings: ServerSettings, base: BaseModel, store: AdapterStore, metrics: Metrics
) -> ServingEngine:
    """The serving engine for ``base`` (a ``svda.runtime.BaseModel``) with the settings' limits."""
    from .engine import Engine, EngineSettings  # torch-heavy: imported when a server is built

    engine_settings = EngineSettings(**settings.engine_kwargs())
    engine_settings.validate()
    if settings.engine == "vllm":
        from .engine_vllm.engine import VllmEngine, VllmOptions

        options = VllmOptions(
            dtype=settings.dtype,
            max_loras=settings.vllm_max_loras,
            max_compiled=settings.vllm_max_compiled,
        )
        return VllmEngine(base, store, engine_settings, metrics, options=options)
    return Engine(base, store, engine_settings, metrics)


class SvdaServer:
    """One gRPC server around one engine. ``await start()``, then ``await stop()``."""

    def __init__(
        self,
        settings: ServerSettings,
        *,
        base: BaseModel | None = None,
        store: AdapterStore | None = None,
        engine: ServingEngine | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.store = store or AdapterStore(settings.store)
        self.auth = (
            Authenticator.from_file(settings.tokens_file, settings.admin_tenant)
            if settings.tokens_file
            else Authenticator.disabled()
        )
        self._base = base
        self.engine = engine
        self.port: int | None = None
        self.metrics_port: int | None = None
        self._grpc: aio.Server | None = None
        self._health: Any = None
        self._metrics_http: Any = None

    async def start(self) -> None:
        if self.engine is None:
            base = self._base if self._base is not None else _load_base(self.settings)
            self.engine = build_engine(self.settings, base, self.store, self.metrics)
        self.engine.start()
        try:
            self._grpc = self._build_grpc()
            self.port = self._bind(self._grpc)
            await self._grpc.start()
        except BaseException:
            await asyncio.to_thread(self.engine.stop)
            raise
        for name in ("", SERVICE_NAME):
            await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self._start_metrics()
        self._warn_if_insecure()
        log.info(
            "serving %s on %s:%d (tls=%s, auth=%s, store=%s, metrics port %s)",
            self.engine.info().base_model, self.settings.host, self.port, self.settings.tls,
            self.auth.enabled, self.store.root, self.metrics_port,
        )  # fmt: skip

    def _build_grpc(self) -> aio.Server:
        limit = self.settings.max_message_bytes
        server = aio.server(
            interceptors=[StatusInterceptor(self.metrics)],
            options=[("grpc.max_receive_message_length", limit),
                     ("grpc.max_send_message_length", limit)],
        )  # fmt: skip
        servicer = ServingServicer(
            self.engine, self.store, self.auth, self.settings.max_upload_bytes,
            upload_stall_timeout_s=self.settings.upload_stall_timeout_s,
            max_concurrent_uploads=self.settings.max_concurrent_uploads,
        )  # fmt: skip
        serving_pb2_grpc.add_ServingServicer_to_server(servicer, server)
        self._health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        names = (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME)
        reflection.enable_server_reflection(names, server)
        return server

    def _bind(self, server: aio.Server) -> int:
        address = f"{self.settings.host}:{self.settings.port}"
        credentials = server_credentials(self.settings)
        try:
            if credentials is None:
                port = server.add_insecure_port(address)
            else:
                port = server.add_secure_port(address, credentials)
        except RuntimeError as exc:
            raise OSError(f"cannot listen on {address}: {exc}; is the port in use?") from exc
        if port == 0:
            raise OSError(f"cannot listen on {address}; is the port in use?")
        return port

    def _start_metrics(self) -> None:
        if self.settings.metrics_port is None:
            return
        httpd, _ = self.metrics.serve_http(self.settings.metrics_port, self.settings.metrics_host)
        self._metrics_http = httpd
        self.metrics_port = httpd.server_port

    def _warn_if_insecure(self) -> None:
        if self.settings.host not in _LOOPBACK and not self.settings.tls:
            log.warning(
                "listening on %s without TLS: traffic (and bearer tokens) travel in clear text",
                self.settings.host,
            )

    async def stop(self, grace: float | None = None) -> None:
        """Stop taking RPCs, give running ones ``grace`` seconds, then stop the engine."""
        grace = self.settings.grace_s if grace is None else grace
        if self._health is not None:
            await self._health.enter_graceful_shutdown()
        if self._grpc is not None:
            await self._grpc.stop(grace)
        if self.engine is not None:
            await asyncio.to_thread(self.engine.stop)
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()
        log.info("server stopped")


def _load_base(settings: ServerSettings):
    import torch

    from svda.runtime import load_base_model

    dtype = getattr(torch, settings.dtype)
    return load_base_model(settings.model, dtype=dtype, device=settings.device)


async def serve_until_signal(server: SvdaServer) -> None:
    """Start ``server`` and run it until SIGTERM or SIGINT; then shut down gracefully."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await server.start()
    try:
        await stop.wait()
        log.info("signal received: shutting down (grace %.1f s)", server.settings.grace_s)
    finally:
        await server.stop()


def serve(settings: ServerSettings) -> None:
    """Load the base model, start everything and serve until a signal (``svda serve``)."""
    asyncio.run(serve_until_signal(SvdaServer(settings)))


class BackgroundServer:
    """A :class:`SvdaServer` on its own event loop in a daemon thread (tests, benchmarks)::

    with BackgroundServer(settings, base=base, store=store) as server:
        Client(f"127.0.0.1:{server.port}")...
    """

    def __init__(self, settings: ServerSettings, **parts: Any) -> None:
        self.server = SvdaServer(settings, **parts)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    def start(self, timeout: float = 120.0) -> BackgroundServer:
        self._thread.start()
        try:
            asyncio.run_coroutine_threadsafe(self.server.start(), self._loop).result(timeout)
        except BaseException:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout)
            raise
        return self

    def stop(self, grace: float = 0.5, timeout: float = 60.0) -> None:
        if not self._thread.is_alive():
            return
        try:
            future = asyncio.run_coroutine_threadsafe(self.server.stop(grace), self._loop)
            future.result(timeout)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout)

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def metrics_port(self) -> int | None:
        return self.server.metrics_port

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
