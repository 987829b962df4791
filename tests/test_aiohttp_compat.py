"""Canaries for exporter/aiohttp_compat.py: one test per use of aiohttp beyond its documented API, so an
aiohttp release that moves one fails here, by name, rather than as a subtler failure elsewhere (or none:
a renamed private attribute would be set on the site and silently ignored).

Each runs aiohttp for real on loopback, in an event loop of the test's own.
"""

from __future__ import annotations

import asyncio
import logging
import re
import ssl
import tomllib
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from harness import wait_until_async

from exporter import aiohttp_compat
from exporter.store import Store
from exporter.web import LimitedSite, WebApp
from exporter.webconfig import WebConfigFile
from exporter.weblive import WebConfig

SECRET = "Sekret-Pa55-in-a-bad-request"


def run(test: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(test(), timeout=30))


@asynccontextmanager
async def served(web_config: WebConfig | None = None) -> AsyncIterator[tuple[LimitedSite, int]]:
    """The exporter's web app behind its LimitedSite on 127.0.0.1, in this loop."""
    app = WebApp(Store([], max_age=60.0), web_config=web_config).build()
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
    await runner.setup()
    site = LimitedSite(runner, "127.0.0.1", 0, ssl_context=None, max_connections=8)
    await site.start()
    try:
        yield site, site.bound[0][1]
    finally:
        await runner.cleanup()


def test_a_site_keeps_its_runner_backlog_and_ssl_context() -> None:
    """BaseSite._runner, ._backlog and ._ssl_context, read by runner_server, site_backlog and
    site_ssl_context."""

    async def test() -> None:
        runner = web.AppRunner(web.Application(), handle_signals=False)
        await runner.setup()
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        site = web.TCPSite(runner, "127.0.0.1", 0, backlog=77, ssl_context=context)
        try:
            assert aiohttp_compat.runner_server(site) is runner.server
            assert aiohttp_compat.site_backlog(site) == 77
            assert aiohttp_compat.site_ssl_context(site) is context
        finally:
            await runner.cleanup()

    run(test)


def test_a_site_closes_the_listener_it_was_handed() -> None:
    """BaseSite._server, set by adopt_listener: BaseSite.stop() must close it (else the port would stay
    open after the exporter stopped serving)."""

    async def test() -> None:
        async with served() as (site, port):
            _reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            await site.stop()
            with pytest.raises(OSError):
                await asyncio.open_connection("127.0.0.1", port)

    run(test)


def test_the_server_counts_open_connections() -> None:
    """Server.connections, read by open_connections: --web.max-connections is enforced with it."""

    async def test() -> None:
        async with served() as (site, port):
            server = aiohttp_compat.runner_server(site)
            assert aiohttp_compat.open_connections(server) == 0
            _reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /-/healthy HTTP/1.1\r\nHost: x\r\n")  # half a request: held open
            await wait_until_async(lambda: aiohttp_compat.open_connections(server) == 1, what="1 connection")
            writer.close()
            await wait_until_async(lambda: aiohttp_compat.open_connections(server) == 0, what="0 connections")

    run(test)


def test_a_request_handler_from_the_server_serves_a_connection() -> None:
    """Server.__call__ (aiohttp's protocol factory), used by request_handler: it must return a protocol
    that serves the connection it is handed."""

    async def test() -> None:
        async with served() as (site, _port):
            errors = aiohttp_compat.bad_request_logger(logging.getLogger("t"), "client")
            handler = aiohttp_compat.request_handler(aiohttp_compat.runner_server(site), errors)
            assert isinstance(handler, asyncio.Protocol)
            assert isinstance(handler.logger, logging.LoggerAdapter)  # type: ignore[attr-defined]
        async with served() as (_site, port):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /-/healthy HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            answer = await reader.read()
            writer.close()
            assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"OK\n")

    run(test)


BAD_REQUESTS = {
    "a header over 8 KB": b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Long: "
    + SECRET.encode() * 400
    + b"\r\n\r\n",
    "a NUL in the path": b"GET /met\x00rics?" + SECRET.encode() + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    "not a method": SECRET.encode() + b"\x01 / HTTP/1.1\r\nHost: x\r\n\r\n",
}


@pytest.mark.parametrize("kind", list(BAD_REQUESTS))
def test_a_malformed_request_is_reported_through_the_handlers_logger(
    kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    """RequestHandler.logger (set by request_handler) and the way aiohttp calls it for a request it
    answers 400 itself, with the parser's error as exc_info; and the text of that error
    (parser_complaint keeps its words, drops the bytes it quotes)."""
    caplog.set_level(logging.DEBUG)

    async def test() -> None:
        async with served() as (_site, port):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(BAD_REQUESTS[kind])
            answer = await reader.read()
            writer.close()
            assert answer.split(b"\r\n", 1)[0].split()[1] == b"400", answer[:80]
            await wait_until_async(
                lambda: any("bad request from" in r.getMessage() for r in caplog.records),
                what="the debug line",
            )

    run(test)
    lines = [r for r in caplog.records if "bad request from" in r.getMessage()]
    assert len(lines) == 1 and lines[0].name == "exporter.web" and lines[0].levelno == logging.DEBUG
    message = lines[0].getMessage()
    # The error's class and the parser's words, e.g. "LineTooLong: Got more than 8190 bytes ...".
    assert re.fullmatch(r"bad request from 127\.0\.0\.1:\d+: [A-Z]\w+: \w.{3,}", message), message
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.WARNING], caplog.text
    assert SECRET.lower() not in caplog.text.lower() and "sekret" not in caplog.text.lower()


def test_request_storage_keys_are_typed_where_aiohttp_wants_them() -> None:
    """request_key: aiohttp >= 3.13 warns about plain string keys in request storage; the web config's
    per-request key must not make it warn (the extra headers are set through it)."""
    config = WebConfig(WebConfigFile(path="web.yml", headers={"X-Frame-Options": "deny"}))

    async def test() -> None:
        async with served(config) as (_site, port), aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{port}/metrics") as response:
                assert response.status == 200 and response.headers["X-Frame-Options"] == "deny"

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run(test)
    assert not [w for w in caught if "aiohttp" in str(w.filename)], [str(w.message) for w in caught]
    key: Any = aiohttp_compat.request_key("k", int)
    assert isinstance(key, web.RequestKey) if hasattr(web, "RequestKey") else key == "k"


def test_the_aiohttp_running_is_in_the_pinned_range() -> None:
    """pyproject.toml names a range with an upper bound, and these canaries run on a version in it."""
    pyproject = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())
    (pin,) = [r for r in pyproject["project"]["dependencies"] if r.startswith("aiohttp")]
    bounds = re.fullmatch(r"aiohttp>=([0-9.]+),<([0-9.]+)", pin)
    assert bounds, f"expected aiohttp>=LOW,<HIGH, got {pin}"

    def version(text: str) -> tuple[int, ...]:
        return tuple(int(part) for part in re.findall(r"\d+", text)[:3])

    low, high = (version(bound) for bound in bounds.groups())
    assert low <= version(aiohttp.__version__) < high, (pin, aiohttp.__version__)
