"""The HTTP face: /metrics from the latest rendered page, a landing page, /-/healthy, /-/ready, /-/reload.

Served by aiohttp on one event loop (no thread per connection): a slow or stuck client costs a socket,
not a worker, and a scrape is a dictionary lookup plus a write of pre-rendered bytes. Never touches
upstream.

The web config (TLS, basic auth, headers, rate limit) is looked up per connection and per request in a
``LiveWebConfig``, so a renewed certificate or a changed user list applies without a restart. TLS is
started by ``_Gate`` on each accepted socket with the context in force at that moment. Malformed
requests and failed handshakes cost one debug line each, never a traceback.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from aiohttp import web

from exporter import aiohttp_compat, statuspage
from exporter.exposition import CONTENT_TYPE
from exporter.logs import redact
from exporter.monthclose import utc_month
from exporter.page import Pages
from exporter.store import Store
from exporter.webauth import BasicAuth, TokenBucket
from exporter.weblive import LiveWebConfig, WebConfig
from exporter.webtls import sans_allowed

if TYPE_CHECKING:
    from exporter import statement

log = logging.getLogger(__name__)

ReloadHook = Callable[[], Awaitable[tuple[bool, str]]]
# The statement of a month (YYYY-MM), grouped by a label or not; raises statement.StatementError.
StatementHook = Callable[[str, str | None], "statement.Statement"]
# Paths that reveal nothing and must answer for container health checks even with basic auth on.
UNAUTHENTICATED_PATHS = frozenset({"/-/healthy", "/-/ready"})
# Below this a page goes out with its headers in one send (aiohttp joins them: a copy of a small page
# costs less than a second send); above it, headers then the page as it is, never copied (the
# 10,000-operation page, or plain text). benchmarks/README.md has the measurements.
STREAM_ABOVE_BYTES = 256 * 1024
TLS_HANDSHAKE_SECONDS = 10.0
# The live web config, for the site that starts TLS on each connection (set by WebApp.build()).
LIVE_WEB_CONFIG = web.AppKey("live_web_config", LiveWebConfig)
# The web config a request is served under (aiohttp >= 3.13 wants a typed key for request storage).
_REQUEST_CONFIG = aiohttp_compat.request_key("wolkvox_web_config", WebConfig)


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
        pages: Pages | None = None,
        *,
        telemetry_path: str = "/metrics",
        reload: ReloadHook | None = None,
        web_config: WebConfig | LiveWebConfig | None = None,
        operations_count: Callable[[], int] = lambda: 0,
        statement: StatementHook | None = None,
        clock: Callable[[], float] = time.time,
        runbook_url: str = statuspage.DEFAULT_RUNBOOK_URL,
    ) -> None:
        self._statement = statement
        self._clock = clock
        self._store = store
        self._pages = pages or Pages(store)
        self._telemetry_path = telemetry_path
        self._reload = reload
        self._reload_task: asyncio.Task[tuple[bool, str]] | None = None
        if not isinstance(web_config, LiveWebConfig):
            web_config = LiveWebConfig(web_config or WebConfig())
        self._live = web_config
        self._operations_count = operations_count
        self._runbook_url = runbook_url
        self._generation = -1
        self._auth: BasicAuth | None = None
        self._bucket: TokenBucket | None = None
        # bcrypt checks run here, two at a time at most, so a password flood cannot eat every core.
        self._auth_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="auth")
        self._current()
        for warning in self._live.config.warnings:
            log.warning("%s", warning)

    def build(self) -> web.Application:
        # The default web config (no file, nothing given in code) enforces nothing, now or after a
        # reload: no middleware on the request path then (two coroutine layers less per scrape).
        enforces = self._live.config != WebConfig()
        app = web.Application(
            middlewares=[self._web_config_middleware] if enforces else [],
            client_max_size=64 * 1024,
        )
        app[LIVE_WEB_CONFIG] = self._live
        app.router.add_get(self._telemetry_path, self.metrics)
        app.router.add_get("/", self.landing)
        app.router.add_get("/statement", self.statement)
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
        page = self._pages.page
        compressed = accepts_gzip(request.headers.get("Accept-Encoding"))
        body = page.gzipped if compressed else page.plain
        extra = request[_REQUEST_CONFIG].headers if _REQUEST_CONFIG in request else {}
        # The web config's headers can never include Content-Type (see webconfig._HEADERS).
        headers = {"Content-Type": CONTENT_TYPE, "Vary": "Accept-Encoding", **extra}
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
            reload=self._store.reload_status() if self._reload is not None else None,
            runbook_url=self._runbook_url,
        )
        return web.Response(text=body, content_type="text/html")

    async def statement(self, request: web.Request) -> web.Response:
        """The monthly statement (docs/statement.md): ?month=YYYY-MM (default: this UTC month),
        format=csv|json|html (default: HTML for a browser), group=<label>. 400 for a bad parameter,
        404 when the month has no data; each with one line."""
        if self._statement is None:
            return web.Response(text="the statement is not available\n", status=501)
        from exporter import statement  # on first use: its decimal and csv modules are ~1 MB resident

        query = request.query
        try:
            month = statement.parse_month(query.get("month") or utc_month(self._clock()))
            fmt = statement.pick_format(query.get("format"), request.headers.get("Accept"))
            group = query.get("group") or None
            # Off the serving loop: thousands of operations take a while to sum and render.
            loop = asyncio.get_running_loop()
            built = await loop.run_in_executor(None, self._statement, month, group)
        except statement.StatementError as error:
            return web.Response(text=f"{redact(str(error))}\n", status=400)
        if not built.lines:
            return web.Response(text=f"no data for month {month}\n", status=404)
        body = await loop.run_in_executor(None, statement.render, built, fmt)
        headers = {"Content-Type": statement.CONTENT_TYPES[fmt], "Vary": "Accept"}
        if fmt != "html":
            headers["Content-Disposition"] = f'inline; filename="wolkvox-statement-{month}.{fmt}"'
        return web.Response(body=body.encode("utf-8"), headers=headers)

    async def healthy(self, _request: web.Request) -> web.Response:
        return web.Response(text="OK\n")

    async def ready(self, _request: web.Request) -> web.Response:
        if self._store.ready:
            return web.Response(text="Ready\n")
        return web.Response(text="Not ready: not every operation has been tried yet\n", status=503)

    async def reload(self, _request: web.Request) -> web.Response:
        if self._reload is None:
            return web.Response(text="reload is not available\n", status=501)
        ok, message = await self.run_reload()
        return web.Response(text=message + "\n", status=200 if ok else 500)

    async def run_reload(self) -> tuple[bool, str]:
        """Runs the reload hook, or joins the one already running: a burst of reload requests starts
        one reload (each in a child interpreter), and every request gets that reload's answer."""
        assert self._reload is not None
        if self._reload_task is None or self._reload_task.done():
            self._reload_task = asyncio.ensure_future(self._reload())
        # shield: a client that hangs up does not cancel the reload the others are waiting for.
        return await asyncio.shield(self._reload_task)

    # ----- middlewares --------------------------------------------------------------------------

    def _current(self) -> WebConfig:
        """The web config in force; rebuilds the password checker and rate limiter when it changed."""
        config = self._live.current()
        if self._generation != self._live.generation:
            self._generation = self._live.generation
            self._auth = BasicAuth(config.users) if config.users else None
            if config.rate_limit is None:
                self._bucket = None
            elif self._bucket is None or self._bucket.limit != config.rate_limit:
                self._bucket = TokenBucket(config.rate_limit)
        return config

    @web.middleware
    async def _web_config_middleware(self, request: web.Request, handler: Callable) -> web.StreamResponse:
        """The web config's rules for one request: rate limit, then basic auth, then extra headers."""
        config = request[_REQUEST_CONFIG] = self._current()
        # As in the toolkit: one bucket for the whole server, before authentication, for every path.
        if self._bucket is not None and not self._bucket.allow():
            return web.Response(status=429, text="Too Many Requests\n")
        try:
            response = await self._authenticated(request, handler)
        except web.HTTPException as error:  # 404, 405...: the headers go on those too
            error.headers.update(config.headers)
            raise
        if not response.prepared:  # else already sent, with the extra headers (see metrics())
            response.headers.update(config.headers)
        return response

    async def _authenticated(self, request: web.Request, handler: Callable) -> web.StreamResponse:
        auth = self._auth
        if auth is None or request.path in UNAUTHENTICATED_PATHS:
            return await handler(request)
        credentials = _basic_credentials(request.headers.get("Authorization"))
        if credentials is not None:
            user, password = credentials
            ok = auth.cached(user, password)
            if ok is None:
                loop = asyncio.get_running_loop()
                ok = await loop.run_in_executor(self._auth_pool, auth.check, user, password)
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


class LimitedSite(web.BaseSite):
    """A TCP site that closes new connections beyond ``max_connections`` instead of queueing them.

    A flood of connections therefore costs at most ``max_connections`` sockets (TLS handshakes in
    progress included); the rest are closed at once, each reported to ``on_reject``. With TLS, each
    connection is handshaken with the context of the web config in force when it arrives (see
    ``LIVE_WEB_CONFIG``), so certificates are picked up without a restart.
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
        on_reject: Callable[[], None] = lambda: None,
    ) -> None:
        super().__init__(runner, ssl_context=ssl_context, backlog=backlog)
        self._host = host
        self._port = port
        self._max_connections = max_connections
        self.on_reject = on_reject
        self.bound: list[tuple[str, int]] = []
        self.handshakes = 0  # TLS handshakes in progress
        self.tasks: set[asyncio.Task[None]] = set()
        app = getattr(runner, "app", None)
        self.live: LiveWebConfig | None = app.get(LIVE_WEB_CONFIG) if app is not None else None

    def context(self) -> tuple[ssl.SSLContext | None, WebConfig | None]:
        """The TLS context for a new connection, and the web config it comes from."""
        if self.live is None:
            return aiohttp_compat.site_ssl_context(self), None
        config = self.live.current()
        return config.ssl_context, config

    @property
    def name(self) -> str:
        live = self.live is not None and self.live.config.ssl_context is not None
        tls = live or aiohttp_compat.site_ssl_context(self) is not None
        scheme = "https" if tls else "http"
        host, port = self.bound[0] if self.bound else (self._host or "0.0.0.0", self._port)
        host = f"[{host}]" if ":" in host else host
        return f"{scheme}://{host}:{port}"

    async def start(self) -> None:
        await super().start()
        server = aiohttp_compat.runner_server(self)
        limit = self._max_connections

        def protocol_factory() -> asyncio.BaseProtocol:
            return _Gate(self, server, limit)

        loop = asyncio.get_running_loop()
        # No ssl= here: _Gate starts TLS itself, with the context in force for each connection.
        listener = await loop.create_server(
            protocol_factory,
            self._host,
            self._port,
            backlog=aiohttp_compat.site_backlog(self),
            reuse_address=True,
            family=socket.AF_UNSPEC,
        )
        aiohttp_compat.adopt_listener(self, listener)  # BaseSite.stop() closes it
        self.bound = [sock.getsockname()[:2] for sock in listener.sockets]

    async def stop(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        await super().stop()


class _Gate(asyncio.Protocol):
    """Admits a connection only if fewer than ``limit`` are open when it is made, else closes it; with
    TLS, does the handshake first (and checks ``client_allowed_sans``), then hands the connection over.

    The count must be taken in ``connection_made``, not in the protocol factory: asyncio calls the
    factory for a whole burst of accepted sockets before the first ``connection_made`` runs (that is
    when aiohttp counts a connection), so a check in the factory lets a burst through unbounded.
    Once admitted, everything is passed to aiohttp's handler.
    """

    def __init__(self, site: LimitedSite, server: web.Server, limit: int) -> None:
        self._site = site
        self._server = server
        self._limit = limit
        self._handler: asyncio.Protocol | None = None
        # What arrives between the TLS handshake and the hand-over, replayed to the handler.
        self._early: list[bytes] = []
        self._eof = False
        self._lost: tuple[Exception | None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if aiohttp_compat.open_connections(self._server) + self._site.handshakes >= self._limit:
            transport.close()
            self._site.on_reject()
            return
        context, config = self._site.context()
        if context is None:
            self._admit(transport)
            return
        assert isinstance(transport, asyncio.Transport)
        transport.pause_reading()  # the client hello is for the TLS layer, not for this protocol
        self._site.handshakes += 1
        task = asyncio.get_running_loop().create_task(self._start_tls(transport, context, config))
        self._site.tasks.add(task)
        task.add_done_callback(self._site.tasks.discard)

    async def _start_tls(
        self, transport: asyncio.Transport, context: ssl.SSLContext, config: WebConfig | None
    ) -> None:
        client = _client(transport)
        loop = asyncio.get_running_loop()
        try:
            tls = await loop.start_tls(
                transport, self, context, server_side=True, ssl_handshake_timeout=TLS_HANDSHAKE_SECONDS
            )
        except asyncio.CancelledError:
            transport.abort()
            raise
        except (OSError, TimeoutError, ConnectionError, RuntimeError) as error:
            # A port scanner, plain HTTP on the TLS port, an untrusted client certificate...
            log.debug("TLS handshake with %s failed: %s", client, _tls_problem(error))
            transport.abort()
            return
        finally:
            self._site.handshakes -= 1
        if tls is None:
            return
        if config is not None and config.allowed_sans is not None:
            if not sans_allowed(tls.get_extra_info("peercert"), config.allowed_sans):
                log.debug("client %s refused: no SAN of its certificate is in client_allowed_sans", client)
                tls.abort()
                return
        self._admit(tls)

    def _admit(self, transport: asyncio.BaseTransport) -> None:
        # Malformed requests (aiohttp answers them 400 itself): one debug line each, never a traceback.
        errors = aiohttp_compat.bad_request_logger(log, _client(transport))
        handler = aiohttp_compat.request_handler(self._server, errors)
        self._handler = handler
        handler.connection_made(transport)
        for chunk in self._early:
            handler.data_received(chunk)
        self._early.clear()
        if self._eof:
            handler.eof_received()
        if self._lost is not None:
            handler.connection_lost(self._lost[0])

    def data_received(self, data: bytes) -> None:
        if self._handler is not None:
            self._handler.data_received(data)
        else:
            self._early.append(data)

    def eof_received(self) -> bool | None:
        if self._handler is None:
            self._eof = True
            return None
        return self._handler.eof_received()

    def pause_writing(self) -> None:
        if self._handler is not None:
            self._handler.pause_writing()

    def resume_writing(self) -> None:
        if self._handler is not None:
            self._handler.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._handler is not None:
            self._handler.connection_lost(exc)
        else:
            self._lost = (exc,)


def _client(transport: asyncio.BaseTransport) -> str:
    peer = transport.get_extra_info("peername")
    if isinstance(peer, tuple) and len(peer) >= 2:
        return f"[{peer[0]}]:{peer[1]}" if ":" in str(peer[0]) else f"{peer[0]}:{peer[1]}"
    return "unknown client"


def _tls_problem(error: BaseException) -> str:
    if isinstance(error, ssl.SSLError):
        return str(error.reason or error.library or type(error).__name__).lower().replace("_", " ")
    if isinstance(error, TimeoutError):
        return f"no handshake within {TLS_HANDSHAKE_SECONDS:g}s"
    return type(error).__name__
