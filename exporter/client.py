"""One request to the wolkvox billing API in, one parsed answer or one typed failure out (asyncio).

``WolkvoxClient.fetch`` sends ``GET {base_url}/api/v2/billing.php?api={api}`` with the ``wolkvox-token``
and ``wolkvox_server`` headers on an aiohttp client session and returns a :class:`Reading`; every
failure is a :class:`FetchError` whose ``reason`` is one of :data:`REASONS` (see exporter/answers.py
for the table) and whose ``detail`` is one line, safe to log, never holding the token. The client knows
nothing of scheduling or metrics: a hanging upstream costs a socket and a timer, not a thread.

Deadlines, all per request:

- connect: DNS, TCP connect and TLS handshake within ``connect_timeout``;
- read: no gap longer than ``read_timeout`` between two socket reads (headers or body);
- total: the whole answer within ``connect_timeout + read_timeout``, counted from the moment the
  request gets one of the ``max_connections`` slots (a request queued for a slot is not failed for the
  wait: the cap bounds sockets, not the work).

What it never does: follow a redirect (a 3xx is ``http_status`` with its Location in the detail, so the
token header never goes to another host); skip TLS verification (``ca_file`` replaces the CA bundle);
keep or send cookies; retry (the caller owns retries); read more than ``max_body_bytes`` of the
decoded body (a larger Content-Length is refused before reading). ``HTTPS_PROXY``/``HTTP_PROXY``/
``NO_PROXY`` from the environment are honoured, as requests did; so is ``SSL_CERT_FILE`` for the
default CA bundle (``REQUESTS_CA_BUNDLE`` is a requests-only variable and no longer read).

Open sockets are bounded by ``max_connections`` (aiohttp's default of 100 would make a hundred hanging
upstreams starve every healthy one). Its default is derived from the process's open-files limit:
``min(4096, soft_limit - 1024)``, at least 64, leaving 1,024 descriptors for the exporter's own
listening socket, scrapers, files and the state store. Call :func:`raise_fd_limit` first (as Go
exporters do at start; it lives in exporter/fdlimit.py) so that the soft
limit is the hard one.
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
import time
import urllib.parse
import urllib.request

import aiohttp
from aiohttp import http_exceptions

from exporter import __version__
from exporter.answers import parse_body, parse_token_info
from exporter.fdlimit import soft_fd_limit
from exporter.model import BILLING_PATH, INFORMATION_PATH, TOKEN_INFO, FetchError, Reading, TokenInfo
from exporter.secret import Secret, sendable

__all__ = ["DEFAULT_USER_AGENT", "WolkvoxClient", "default_max_connections"]

logger = logging.getLogger(__name__)

DEFAULT_USER_AGENT = f"wolkvox-exporter/{__version__}"
MAX_DEFAULT_CONNECTIONS = 4096
MIN_DEFAULT_CONNECTIONS = 64
RESERVED_FDS = 1024  # descriptors left for everything but upstream sockets
# Long enough for a token's back-to-back reports to share one connection, short enough that thousands of
# operations (one host each) do not keep thousands of idle sockets between their refreshes.
KEEPALIVE_SECONDS = 5.0

_CHUNK_BYTES = 64 * 1024


# --------------------------------------------------------------------------------------- fd limit


def default_max_connections(soft_limit: int | None = None) -> int:
    """``min(4096, soft_limit - 1024)``, at least 64; ``soft_limit`` defaults to the current soft
    open-files limit (unlimited or unknown: 4096)."""
    if soft_limit is None:
        soft_limit = soft_fd_limit()
    if soft_limit < 0:
        return MAX_DEFAULT_CONNECTIONS
    return max(MIN_DEFAULT_CONNECTIONS, min(MAX_DEFAULT_CONNECTIONS, soft_limit - RESERVED_FDS))


# --------------------------------------------------------------------------------------- errors


def _exception_chain(exc: BaseException) -> list[BaseException]:
    """exc and what it wraps (``__cause__``, ``__context__``, aiohttp's ``os_error`` and
    ``certificate_error``), at most 10 deep."""
    chain: list[BaseException] = []
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen and len(chain) < 10:
        seen.add(id(current))
        chain.append(current)
        nxt: BaseException | None = None
        for attr in ("certificate_error", "os_error"):
            inner = getattr(current, attr, None)
            if isinstance(inner, BaseException):
                nxt = inner
                break
        if nxt is None:
            if current.__cause__ is not None:
                nxt = current.__cause__
            elif not current.__suppress_context__:
                nxt = current.__context__
        current = nxt
    return chain


def _os_error_text(exc: BaseException) -> str | None:
    """A short, header-free description from an OS/TLS error (never str() of an aiohttp exception,
    whose request_info holds the request's headers)."""
    verify_message = getattr(exc, "verify_message", None)
    if isinstance(verify_message, str) and verify_message:
        return verify_message
    if isinstance(exc, ssl.SSLError) and isinstance(exc.reason, str) and exc.reason:
        return exc.reason
    if isinstance(exc, OSError) and isinstance(exc.strerror, str) and exc.strerror:
        return exc.strerror
    return None


def _describe(exc: BaseException) -> str:
    """``Type > InnerType: what the OS said``."""
    chain = _exception_chain(exc)
    names: list[str] = []
    for item in chain:
        name = type(item).__name__
        if not names or names[-1] != name:
            names.append(name)
    text = None
    for item in reversed(chain):
        text = _os_error_text(item)
        if text:
            break
    described = " > ".join(names)
    return f"{described}: {text}" if text else described


_DECODING_ERRORS: tuple[type[BaseException], ...] = (
    http_exceptions.ContentEncodingError,
    http_exceptions.DecompressSizeError,
)


def _classify(exc: BaseException, token: Secret, connect_timeout: float, read_timeout: float) -> FetchError:
    """The FetchError for a transport exception (built from names and OS texts only)."""
    description = _describe(exc)
    chain = _exception_chain(exc)
    if any(isinstance(item, aiohttp.ConnectionTimeoutError) for item in chain):
        return FetchError(
            "timeout", f"could not connect within {connect_timeout:g}s ({description})", secret=token
        )
    if any(isinstance(item, TimeoutError) for item in chain):
        return FetchError(
            "timeout", f"no data within the read timeout {read_timeout:g}s ({description})", secret=token
        )
    if any(isinstance(item, _DECODING_ERRORS) for item in chain):
        return FetchError("invalid_response", f"cannot decode the body ({description})", secret=token)
    return FetchError("connection", f"request failed: {description}", secret=token)


# --------------------------------------------------------------------------------------- client


class WolkvoxClient:
    """Fetches billing readings on one aiohttp session, created in the running loop on first use.

    Use it from one event loop at a time; ``await close()`` when done (a later fetch opens a new
    session). ``max_connections`` bounds the requests in flight and so the upstream sockets (see the
    module docstring for its default).
    """

    def __init__(
        self,
        connect_timeout: float,
        read_timeout: float,
        max_body_bytes: int,
        user_agent: str = DEFAULT_USER_AGENT,
        max_connections: int | None = None,
    ) -> None:
        if not connect_timeout > 0 or not read_timeout > 0:
            raise ValueError("connect_timeout and read_timeout must be > 0")
        if max_body_bytes < 1:
            raise ValueError("max_body_bytes must be >= 1")
        if max_connections is None:
            max_connections = default_max_connections()
        if max_connections < 1:
            raise ValueError("max_connections must be >= 1")
        self.connect_timeout = float(connect_timeout)
        self.read_timeout = float(read_timeout)
        self.max_body_bytes = int(max_body_bytes)
        self.user_agent = user_agent
        self.max_connections = int(max_connections)
        self._session: aiohttp.ClientSession | None = None
        self._slots: asyncio.Semaphore | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # ca_file -> ((mtime_ns, size), context): a rotated CA file is loaded again.
        self._contexts: dict[str, tuple[tuple[int, int], ssl.SSLContext]] = {}
        self._proxies: dict[tuple[str, str], str | None] = {}  # (scheme, host) -> proxy URL

    # -- public

    async def fetch(
        self, *, base_url: str, server: str, token: Secret, api: str, ca_file: str | None = None
    ) -> Reading:
        """``GET {base_url}/api/v2/billing.php?api={api}``: a Reading, or FetchError."""
        status, body = await self._get(base_url.rstrip("/") + BILLING_PATH, api, server, token, ca_file)
        return parse_body(body, status, secret=token)

    async def fetch_token_info(
        self, *, base_url: str, server: str, token: Secret, ca_file: str | None = None
    ) -> TokenInfo:
        """``GET {base_url}/api/v2/information.php?api=token_info``: a TokenInfo, or FetchError.

        This call is itself a request on the token and counts against its daily budget.
        """
        url = base_url.rstrip("/") + INFORMATION_PATH
        status, body = await self._get(url, TOKEN_INFO, server, token, ca_file)
        return parse_token_info(body, status, secret=token)

    async def close(self) -> None:
        """Close the session and its connections; a later fetch opens a new one."""
        session, self._session, self._slots, self._loop = self._session, None, None, None
        if session is not None and not session.closed:
            await session.close()

    async def __aenter__(self) -> WolkvoxClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # -- internals

    def _ensure_session(self) -> tuple[aiohttp.ClientSession, asyncio.Semaphore]:
        loop = asyncio.get_running_loop()
        if self._session is None or self._session.closed or self._loop is not loop or self._slots is None:
            if self._session is not None and not self._session.closed:
                # Used from another loop than the one that made it: that session cannot be closed here.
                logger.debug("the event loop changed: opening a new upstream session")
            connector = aiohttp.TCPConnector(
                limit=self.max_connections, limit_per_host=0, keepalive_timeout=KEEPALIVE_SECONDS
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                cookie_jar=aiohttp.DummyCookieJar(),  # a session serves many tokens: no cookies at all
                # Proxies from the environment are looked up here once per host (_proxy_for), not by
                # aiohttp per request in a worker thread (with a ~/.netrc read each time): at thousands of
                # requests those threads take the GIL from the scrapes.
                trust_env=False,
                headers={
                    "User-Agent": self.user_agent,
                    "Accept": "application/json",
                    # The answers are tiny; identity keeps max_body_bytes a limit on what crosses the wire.
                    "Accept-Encoding": "identity",
                },
                timeout=aiohttp.ClientTimeout(
                    total=None,  # the total deadline is ours, counted once a slot is held
                    connect=self.connect_timeout,
                    sock_connect=self.connect_timeout,
                    sock_read=self.read_timeout,
                ),
            )
            self._slots = asyncio.Semaphore(self.max_connections)
            self._loop = loop
        return self._session, self._slots

    def _proxy_for(self, url: str) -> str | None:
        """The proxy of ``url`` from HTTP(S)_PROXY / ALL_PROXY / NO_PROXY, read once per scheme and host."""
        parts = urllib.parse.urlsplit(url)
        key = (parts.scheme, parts.hostname or "")
        if key not in self._proxies:
            proxies = urllib.request.getproxies_environment()
            proxy = proxies.get(parts.scheme) or proxies.get("all")
            # proxy_bypass_environment is public in the standard library, though not in its type stubs.
            if proxy and urllib.request.proxy_bypass_environment(parts.netloc, proxies):  # type: ignore[attr-defined]
                proxy = None
            self._proxies[key] = proxy or None
        return self._proxies[key]

    def _ssl_for(self, ca_file: str | None) -> ssl.SSLContext | bool:
        """True (aiohttp's verified default) or a verified context that trusts only ``ca_file``."""
        if not ca_file:
            return True
        stat = os.stat(ca_file)
        stamp = (stat.st_mtime_ns, stat.st_size)
        cached = self._contexts.get(ca_file)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        context = ssl.create_default_context(cafile=ca_file)
        self._contexts[ca_file] = (stamp, context)
        return context

    async def _get(
        self, url: str, api: str, server: str, token: Secret, ca_file: str | None
    ) -> tuple[int, bytes]:
        """(HTTP status, body) of one GET, or FetchError.

        FetchErrors are raised outside the ``except`` blocks, so they carry no reference to the aiohttp
        exception (whose request_info holds the token header).
        """
        if not token:
            raise FetchError("auth", "the token is empty")
        if not sendable(token.reveal()):
            raise FetchError(
                "auth",
                "the token has whitespace, control or non-ASCII characters and cannot be sent in an HTTP "
                "header "
                "(a trailing newline in the token file?)",
                secret=token,
            )
        failure: FetchError | None = None
        try:
            context = self._ssl_for(ca_file)
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            failure = FetchError(
                "connection", f"cannot load ca_file {ca_file}: {_describe(exc)}", secret=token
            )
        if failure is not None:
            raise failure
        session, slots = self._ensure_session()
        total = self.connect_timeout + self.read_timeout
        status, body = 0, b""
        async with slots:
            started = time.monotonic()
            scope = asyncio.timeout(total)
            try:
                async with scope:
                    status, body = await self._exchange(session, url, api, server, token, context)
            except FetchError as exc:
                failure = exc
            except (aiohttp.ClientError, OSError, ValueError) as exc:  # TimeoutError is an OSError
                if scope.expired():
                    failure = FetchError(
                        "timeout", f"answer not complete within {total:g}s (connect_timeout + read_timeout)"
                    )
                else:
                    failure = _classify(exc, token, self.connect_timeout, self.read_timeout)
            elapsed = time.monotonic() - started
        if failure is not None:
            logger.debug("GET %s?api=%s failed after %.3fs: %s", url, api, elapsed, failure)
            # A fresh exception: no __context__ pointing at what aiohttp raised.
            raise FetchError(failure.reason, failure.detail) from None
        logger.debug("GET %s?api=%s: HTTP %d, %d bytes in %.3fs", url, api, status, len(body), elapsed)
        return status, body

    async def _exchange(
        self,
        session: aiohttp.ClientSession,
        url: str,
        api: str,
        server: str,
        token: Secret,
        context: ssl.SSLContext | bool,
    ) -> tuple[int, bytes]:
        async with session.get(
            url,
            params={"api": api},
            headers={"wolkvox-token": token.reveal(), "wolkvox_server": server},
            allow_redirects=False,
            ssl=context,
            proxy=self._proxy_for(url),
        ) as response:
            status = response.status
            if 300 <= status < 400:
                location = response.headers.get("Location", "")
                response.close()
                raise FetchError(
                    "http_status",
                    f"HTTP {status} redirect to {location!r} not followed (check base_url)",
                    secret=token,
                )
            return status, await self._read_body(response)

    async def _read_body(self, response: aiohttp.ClientResponse) -> bytes:
        limit = self.max_body_bytes
        declared = response.content_length
        if declared is not None and declared > limit:
            response.close()
            raise FetchError("invalid_response", f"body larger than {limit} bytes")
        chunks: list[bytes] = []
        received = 0
        while True:
            chunk = await response.content.read(min(_CHUNK_BYTES, limit + 1 - received))
            if not chunk:
                return b"".join(chunks)
            received += len(chunk)
            if received > limit:
                response.close()
                raise FetchError("invalid_response", f"body larger than {limit} bytes")
            chunks.append(chunk)
