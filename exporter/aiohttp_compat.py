"""Every use of aiohttp beyond its documented API, in one place.

The web face takes over two things aiohttp does not offer: accepting connections itself (to bound them
and to start TLS per connection with the context in force, see ``web.LimitedSite``), and turning
aiohttp's reports of malformed requests (a traceback at error level) into one debug line. Both reach into
aiohttp's private attributes or undocumented behaviour; each such touch is one function here.

pyproject.toml pins aiohttp to the range tested (below 4), and tests/test_aiohttp_compat.py has a
canary per function, so a release that moves one of these fails there, by name.
"""

from __future__ import annotations

import asyncio
import logging
import re
import ssl
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError


def runner_server(site: web.BaseSite) -> web.Server:
    """The low-level server of the runner a site belongs to (``BaseSite._runner``)."""
    server = site._runner.server
    assert server is not None, "runner.setup() makes the server before any site exists"
    return server


def site_backlog(site: web.BaseSite) -> int:
    """The ``backlog`` a site was made with (``BaseSite._backlog``)."""
    return site._backlog


def site_ssl_context(site: web.BaseSite) -> ssl.SSLContext | None:
    """The ``ssl_context`` a site was made with (``BaseSite._ssl_context``)."""
    return site._ssl_context


def adopt_listener(site: web.BaseSite, listener: asyncio.AbstractServer) -> None:
    """Make ``listener`` (from ``loop.create_server``) the site's, so ``BaseSite.stop()`` closes it
    (``BaseSite._server``)."""
    site._server = listener


def open_connections(server: web.Server) -> int:
    """Connections the server's request handlers hold (``Server.connections``, undocumented)."""
    return len(server.connections)


def request_handler(server: web.Server, errors: logging.LoggerAdapter[logging.Logger]) -> asyncio.Protocol:
    """aiohttp's protocol for one connection (``Server.__call__``, its protocol factory), reporting
    through ``errors`` (``RequestHandler.logger``; see ``bad_request_logger``)."""
    handler = server()
    handler.logger = errors  # type: ignore[assignment]
    return handler


def request_key(name: str, kind: type) -> Any:
    """A key for per-request storage: ``web.RequestKey`` where aiohttp has it (3.13, which warns about
    plain strings), else the name."""
    request_key_class = getattr(web, "RequestKey", None)
    return request_key_class(name, kind) if request_key_class is not None else name


class _BadRequestLogger(logging.LoggerAdapter):  # type: ignore[type-arg]
    """aiohttp's request handler logs a malformed request (a 400 it answers by itself) with
    ``logger.debug`` or ``logger.exception(..., exc_info=error)``; some versions pass the client's
    address, some do not, so the client is taken from the connection. This turns such a report into one
    debug line on ``to`` naming the client and the problem; anything else (a bug in a handler) is passed
    on unchanged."""

    def __init__(self, logger: logging.Logger, to: logging.Logger, client: str) -> None:
        super().__init__(logger, {})
        self._to = to
        self._client = client

    def debug(self, msg: object, *args: Any, **kwargs: Any) -> None:
        if not self._client_error(args, kwargs):
            self.logger.debug(msg, *args, **kwargs)

    def exception(self, msg: object, *args: Any, exc_info: Any = True, **kwargs: Any) -> None:
        if not self._client_error(args, {**kwargs, "exc_info": exc_info}):
            self.logger.exception(msg, *args, exc_info=exc_info, **kwargs)

    def _client_error(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
        error = kwargs.get("exc_info")
        if not isinstance(error, HttpProcessingError):
            return False
        self._to.debug("bad request from %s: %s", self._client, parser_complaint(error))
        return True


_AIOHTTP_SERVER_LOG = logging.getLogger("aiohttp.server")


def bad_request_logger(to: logging.Logger, client: str) -> logging.LoggerAdapter[logging.Logger]:
    """A logger for the ``request_handler`` of one connection, from ``client``: malformed requests
    become one debug line on ``to``."""
    return _BadRequestLogger(_AIOHTTP_SERVER_LOG, to, client)


# Where aiohttp's parser starts quoting the request: ` 'GET...'`, `: b'...'`, `: bytearray(b'...')`.
_QUOTED = re.compile(r"""(?:^|[\s:(])(?:bytearray\()?b?['"]""")


def parser_complaint(error: HttpProcessingError) -> str:
    """The parser's complaint, without the bytes it quotes (they could hold a password); the text of
    aiohttp's error messages is not an API."""
    text = str(error.message).splitlines()[0] if error.message else ""
    quoted = _QUOTED.search(text)
    text = (text[: quoted.start()] if quoted else text).strip(" :")
    return f"{type(error).__name__}: {text[:100]}" if text else type(error).__name__
