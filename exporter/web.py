"""The HTTP face: /metrics from the latest rendered page, a landing page, /-/healthy, /-/ready, /-/reload.

Served by aiohttp on one event loop (no thread per connection): a slow or stuck client costs a socket,
not a worker, and a scrape is a dictionary lookup plus a write of pre-rendered bytes. Never touches
upstream.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import socket
import ssl
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor

from aiohttp import web

from exporter import statuspage
from exporter.exposition import CONTENT_TYPE
from exporter.logs import redact
from exporter.store import Store
from exporter.webconfig import BasicAuth, WebConfig

log = logging.getLogger(__name__)

ReloadHook = Callable[[], Awaitable[tuple[bool, str]]]
# Paths that reveal nothing and must answer for container health checks even with basic auth on.
UNAUTHENTICATED_PATHS = frozenset({"/-/healthy", "/-/ready"})
STREAM_ABOVE_BYTES = 64 * 1024


def accepts_gzip(header: str | None) -> bool:
    """True if an Accept-Encoding header allows gzip (q=0 forbids it)."""
    if not header:
        return False
    for part in header.split(","):
        coding, _, params = part.strip().partition(";")
        if coding.strip().lower() not in ("gzip", "*"):
            continue
        q = params.strip().lower()
        if q.startswith("q="):
            try:
                return float(q[2:]) > 0
            except ValueError:
                return False
        return True
    return False


class WebApp:
    def __init__(
        self,
        store: Store,
        *,
        telemetry_path: str = "/metrics",
        reload: ReloadHook | None = None,
        web_config: WebConfig | None = None,
        operations_count: Callable[[], int] = lambda: 0,
    ) -> None:
        self._store = store
        self._telemetry_path = telemetry_path
        self._reload = reload
        self._web_config = web_config or WebConfig()
        self._operations_count = operations_count
        self._auth = BasicAuth(self._web_config.users) if self._web_config.users else None
        # bcrypt checks run here, two at a time at most, so a password flood cannot eat every core.
        self._auth_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="auth")
        self._extra_headers = self._web_config.headers

    def build(self) -> web.Application:
        middlewares = [self._headers_middleware]
        if self._auth is not None:
            middlewares.append(self._auth_middleware)
        app = web.Application(middlewares=middlewares, client_max_size=64 * 1024)
        app.router.add_get(self._telemetry_path, self.metrics)
        app.router.add_get("/", self.landing)
        app.router.add_get("/-/healthy", self.healthy)
        app.router.add_get("/-/ready", self.ready)
        app.router.add_post("/-/reload", self.reload)
        app.router.add_put("/-/reload", self.reload)
        app.on_cleanup.append(self._close_pool)
        return app

    async def _close_pool(self, _app: web.Application) -> None:
        self._auth_pool.shutdown(wait=False, cancel_futures=True)

    # ----- handlers -----------------------------------------------------------------------------

    async def metrics(self, request: web.Request) -> web.StreamResponse:
        page = self._store.page
        compressed = accepts_gzip(request.headers.get("Accept-Encoding"))
        body = page.gzipped if compressed else page.plain
        headers = {"Content-Type": CONTENT_TYPE, "Vary": "Accept-Encoding", **self._extra_headers}
        if compressed:
            headers["Content-Encoding"] = "gzip"
        if len(body) < STREAM_ABOVE_BYTES:
            return web.Response(body=body, headers=headers)
        # A large page goes out as headers, then the body as it is: web.Response would join both into
        # a new buffer (aiohttp does on Python < 3.12.9), a full copy of the page per scrape.
        response = web.StreamResponse(headers=headers)
        response.content_length = len(body)
        await response.prepare(request)
        await response.write(memoryview(body))
        await response.write_eof()
        return response

    async def landing(self, _request: web.Request) -> web.Response:
        body = statuspage.render(
            self._store.report_rows(),
            telemetry_path=self._telemetry_path,
            ready=self._store.ready,
            scrub=redact,
        )
        return web.Response(text=body, content_type="text/html")

    async def healthy(self, _request: web.Request) -> web.Response:
        return web.Response(text="OK\n")

    async def ready(self, _request: web.Request) -> web.Response:
        if self._store.ready:
            return web.Response(text="Ready\n")
        return web.Response(text="Not ready: not every operation has been tried yet\n", status=503)

    async def reload(self, _request: web.Request) -> web.Response:
        if self._reload is None:
            return web.Response(text="reload is not available\n", status=501)
        ok, message = await self._reload()
        return web.Response(text=message + "\n", status=200 if ok else 500)

    # ----- middlewares --------------------------------------------------------------------------

    @web.middleware
    async def _headers_middleware(self, request: web.Request, handler: Callable) -> web.StreamResponse:
        response = await handler(request)
        if response.prepared:
            return response  # already sent, with the extra headers (see metrics())
        for name, value in self._extra_headers.items():
            response.headers[name] = value
        return response

    @web.middleware
    async def _auth_middleware(self, request: web.Request, handler: Callable) -> web.StreamResponse:
        assert self._auth is not None
        if request.path in UNAUTHENTICATED_PATHS:
            return await handler(request)
        credentials = _basic_credentials(request.headers.get("Authorization"))
        if credentials is not None:
            user, password = credentials
            ok = self._auth.cached(user, password)
            if ok is None:
                loop = asyncio.get_running_loop()
                ok = await loop.run_in_executor(self._auth_pool, self._auth.check, user, password)
            if ok:
                return await handler(request)
        return web.Response(
            status=401,
            text="Unauthorized\n",
            headers={"WWW-Authenticate": 'Basic realm="wolkvox-exporter"'},
        )


def _basic_credentials(header: str | None) -> tuple[str, str] | None:
    if not header or not header[:6].lower() == "basic ":
        return None
    try:
        decoded = base64.b64decode(header[6:].strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    user, sep, password = decoded.partition(":")
    return (user, password) if sep else None


def parse_listen_address(address: str) -> tuple[str | None, int]:
    """``host:port``, ``:port`` (all interfaces) or ``[v6]:port`` -> (host or None, port)."""
    host, sep, port_text = address.rpartition(":")
    if not sep or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"--web.listen-address: expected host:port, got {address!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return (host or None), int(port_text)


class LimitedSite(web.BaseSite):
    """A TCP site that closes new connections beyond ``max_connections`` instead of queueing them.

    A flood of connections therefore costs at most ``max_connections`` sockets; the rest are closed
    at once and can be counted by the caller.
    """

    def __init__(
        self,
        runner: web.BaseRunner,
        host: str | None,
        port: int,
        *,
        ssl_context: ssl.SSLContext | None,
        max_connections: int,
        backlog: int = 1024,
    ) -> None:
        super().__init__(runner, ssl_context=ssl_context, backlog=backlog)
        self._host = host
        self._port = port
        self._max_connections = max_connections
        self.rejected = 0
        self.bound: list[tuple[str, int]] = []

    @property
    def name(self) -> str:
        scheme = "https" if self._ssl_context else "http"
        host, port = self.bound[0] if self.bound else (self._host or "0.0.0.0", self._port)
        host = f"[{host}]" if ":" in host else host
        return f"{scheme}://{host}:{port}"

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None
        limit = self._max_connections

        def protocol_factory() -> asyncio.BaseProtocol:
            return _Gate(self, server, limit)

        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            protocol_factory,
            self._host,
            self._port,
            ssl=self._ssl_context,
            backlog=self._backlog,
            reuse_address=True,
            family=socket.AF_UNSPEC,
        )
        self.bound = [sock.getsockname()[:2] for sock in self._server.sockets]


class _Gate(asyncio.Protocol):
    """Admits a connection only if fewer than ``limit`` are open when it is made, else closes it.

    The count must be taken in ``connection_made``, not in the protocol factory: asyncio calls the
    factory for a whole burst of accepted sockets before the first ``connection_made`` runs (that is
    when aiohttp counts a connection), so a check in the factory lets a burst through unbounded.
    With TLS this runs after the handshake. Once admitted, everything is passed to aiohttp's handler.
    """

    def __init__(self, site: LimitedSite, server: web.Server, limit: int) -> None:
        self._site = site
        self._server = server
        self._limit = limit
        self._handler: asyncio.Protocol | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if len(self._server.connections) >= self._limit:
            self._site.rejected += 1
            transport.close()
            return
        self._handler = self._server()
        self._handler.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self._handler is not None:
            self._handler.data_received(data)

    def eof_received(self) -> bool | None:
        return self._handler.eof_received() if self._handler is not None else None

    def pause_writing(self) -> None:
        if self._handler is not None:
            self._handler.pause_writing()

    def resume_writing(self) -> None:
        if self._handler is not None:
            self._handler.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._handler is not None:
            self._handler.connection_lost(exc)
