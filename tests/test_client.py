"""Tests of exporter/client.py, the transport: real HTTP(S) on 127.0.0.1, no mocks.

An ``Upstream`` is a raw asyncio server in the test's own event loop (``asyncio.run`` per test), so it
can misbehave byte by byte: hang, drip, cut the body short, reset, send an endless or a gzip body. The
first path segment of the request picks its behaviour (``base_url=f"{upstream.url}/hang"``). The
answer classification itself is tested on bytes in test_answers.py.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
import socket
import ssl
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from harness import free_port, wait_until_async

from exporter import __version__
from exporter.client import WolkvoxClient, default_max_connections
from exporter.fdlimit import raise_fd_limit
from exporter.model import MAX_DETAIL_CHARS, REASONS, FetchError, Reading, TokenInfo
from exporter.secret import Secret

CANARY = "CANARY-tok-123"
TOKEN = Secret(CANARY)
SERVER = "wv9901"
CAP = 4096
TEST_TIMEOUT = 30.0  # no test may run longer, whatever the client does
ENDLESS_BYTES = 256 * 1024 * 1024  # far beyond what loopback socket buffers hold

PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy")


@pytest.fixture(autouse=True)
def no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    """The client honours proxy variables: the machine's own must not send loopback tests elsewhere."""
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    return asyncio.run(asyncio.wait_for(coro, TEST_TIMEOUT))


def body_of(items: str = "12,5", date: str = "2024-05-14 10:00:00") -> bytes:
    row = {"operation": "demo", "description": "Stereo Rec", "items": items, "date": date}
    return json.dumps({"code": "200", "error": None, "msg": "ok", "data": [row]}).encode()


def head(status: str = "200 OK", length: int | None = None, *extra: str) -> bytes:
    lines = [f"HTTP/1.1 {status}", "Content-Type: application/json", *extra]
    if length is not None:
        lines.append(f"Content-Length: {length}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


@dataclass
class Seen:
    """One request as the upstream received it."""

    target: str
    headers: dict[str, str]


@dataclass
class Upstream:
    """A raw HTTP/1.1 server on 127.0.0.1; ``seen`` lists the requests, ``written`` the body bytes sent
    by the ``endless`` behaviour, ``hung_up`` whether the client closed a connection while it wrote."""

    url: str = ""
    seen: list[Seen] = field(default_factory=list)
    written: int = 0
    connections: int = 0
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    writers: set[asyncio.StreamWriter] = field(default_factory=set)
    hung_up: bool = False

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.add(writer)
        try:
            while not self.stop.is_set():
                try:
                    raw = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                lines = raw.decode("latin-1").split("\r\n")
                target = lines[0].split(" ")[1]
                headers = {}
                for line in lines[1:]:
                    if ":" in line:
                        name, _, value = line.partition(":")
                        headers[name.strip().lower()] = value.strip()
                seen = Seen(target, headers)
                self.seen.append(seen)
                kind = "proxied" if "://" in target else target.split("/")[1]  # a proxy gets a full URL
                behaviour = getattr(self, f"do_{kind}", self.do_ok)
                if await behaviour(seen, writer):
                    continue  # keep the connection for the next request
                return
        except (ConnectionError, asyncio.CancelledError):
            return
        finally:
            self.writers.discard(writer)
            writer.close()

    async def do_ok(self, seen: Seen, writer: asyncio.StreamWriter) -> bool:
        token = seen.headers.get("wolkvox-token", "")  # tok-N is answered N, to tell tokens apart
        body = body_of(token.removeprefix("tok-") if token.startswith("tok-") else "12,5")
        writer.write(head("200 OK", len(body), "Set-Cookie: PHPSESSID=abc; Path=/") + body)
        await writer.drain()
        return True

    do_proxied = do_ok

    async def do_info(self, seen: Seen, writer: asyncio.StreamWriter) -> bool:
        data = [{"token_limit": "1000", "token_use_today": "17", "all_token_today": "250"}]
        body = json.dumps({"code": "200", "error": None, "msg": "ok", "data": data}).encode()
        writer.write(head("200 OK", len(body)) + body)
        await writer.drain()
        return True

    async def do_hang(self, seen: Seen, writer: asyncio.StreamWriter) -> bool:
        await self.stop.wait()
        return False

    async def do_drip(self, seen: Seen, writer: asyncio.StreamWriter) -> bool:
        body = body_of()
        writer.write(head("200 OK", len(body)))
        for index in range(len(body)):
            await writer.drain()
            try:
                await asyncio.wait_for(self.stop.wait(), 0.2)
                return False
            except TimeoutError:
                writer.write(body[index : index + 1])
        return False

    async def _cut(self, writer: asyncio.StreamWriter, *, reset: bool) -> bool:
        writer.write(head("200 OK", 1000) + b'{"code": "200", "data": [')
        await writer.drain()
        if reset:
            writer.transport.abort()
        return False

    async def do_short(self, seen: Seen, writer: asyncio.StreamWriter) -> bool:
        return await self._cut(writer, reset=False)

    async def do_reset(self, seen: Seen, writer: asyncio.StreamWriter) -> bool:
        return await self._cut(writer, reset=True)

    async def do_echo(self, seen: Seen, writer: asyncio.StreamWriter) -> bool:
        """A broken status line and header holding the token it got: aiohttp's errors quote them."""
        token = seen.headers.get("wolkvox-token", "").encode()
        writer.write(b"HTTP/1.1 2OO " + token + b"\r\nX-Token: " + token + b"\x00\r\n\r\n")
        await writer.drain()
        return False

    async def do_redirect(self, seen: Seen, writer: asyncio.StreamWriter) -> bool:
        status = seen.target.split("/")[2]  # /redirect/302/...
        location = f"{self.url}/trap/?t={CANARY}" if "echo" in seen.target else f"{self.url}/trap/"
        body = body_of()
        writer.write(head(f"{status} Moved", len(body), f"Location: {location}") + body)
        await writer.drain()
        return True

    async def do_endless(self, seen: Seen, writer: asyncio.StreamWriter) -> bool:
        writer.write(head("200 OK", None, "Connection: close"))
        chunk = b" " * 65536
        try:
            while self.written < ENDLESS_BYTES:  # a client without a cap fails instead of hanging
                writer.write(chunk)
                self.written += len(chunk)
                await writer.drain()
        except ConnectionError:
            self.hung_up = True
        return False

    async def do_declared(self, seen: Seen, writer: asyncio.StreamWriter) -> bool:
        writer.write(head("200 OK", CAP + 1))
        await writer.drain()
        await self.stop.wait()  # nothing follows: the client must decide on the header alone
        return False

    async def do_exact(self, seen: Seen, writer: asyncio.StreamWriter) -> bool:
        extra = int(seen.target.split("/")[2])  # /exact/N/: a body of CAP + N bytes
        body = body_of("77")
        body += b" " * (CAP + extra - len(body))
        writer.write(head("200 OK", len(body)) + body)
        await writer.drain()
        return True

    async def do_gzip(self, seen: Seen, writer: asyncio.StreamWriter) -> bool:
        variant = seen.target.split("/")[2]
        body = {
            "good": gzip.compress(body_of("8,25")),
            "corrupt": b"\x1f\x8b\x08 this is not gzip",
            "bomb": gzip.compress(b" " * (CAP * 50)),
        }[variant]
        writer.write(head("200 OK", len(body), "Content-Encoding: gzip") + body)
        await writer.drain()
        return True


async def start_upstream(ssl_context: ssl.SSLContext | None = None) -> tuple[Upstream, asyncio.Server]:
    upstream = Upstream()
    server = await asyncio.start_server(upstream.handle, "127.0.0.1", 0, ssl=ssl_context, backlog=1024)
    port = server.sockets[0].getsockname()[1]
    upstream.url = f"{'https' if ssl_context else 'http'}://127.0.0.1:{port}"
    return upstream, server


async def stop_upstream(upstream: Upstream, server: asyncio.Server) -> None:
    upstream.stop.set()
    server.close()
    for writer in list(upstream.writers):  # idle keep-alive connections too
        writer.close()
    await server.wait_closed()


async def with_upstream(
    scenario: Callable[[Upstream, WolkvoxClient], Awaitable[Any]],
    ssl_context: ssl.SSLContext | None = None,
    **client_args: Any,
) -> Any:
    """Run ``scenario(upstream, client)`` with both cleaned up afterwards."""
    args: dict[str, Any] = {"connect_timeout": 2, "read_timeout": 5, "max_body_bytes": CAP, **client_args}
    client = WolkvoxClient(**args)
    upstream, server = await start_upstream(ssl_context)
    try:
        return await scenario(upstream, client)
    finally:
        await client.close()
        await stop_upstream(upstream, server)


async def fetch(client: WolkvoxClient, base_url: str, token: Secret = TOKEN, **kwargs: Any) -> Reading:
    return await client.fetch(base_url=base_url, server=SERVER, token=token, api="stereo_rec", **kwargs)


async def fetch_error(client: WolkvoxClient, base_url: str, **kwargs: Any) -> FetchError:
    with pytest.raises(FetchError) as info:
        await fetch(client, base_url, **kwargs)
    assert_safe(info.value)
    return info.value


def assert_safe(err: FetchError) -> None:
    """The token never shows, not even a cut-off head, and nothing the transport raised is kept."""
    assert err.reason in REASONS
    for text in (err.detail, str(err), repr(err)):
        assert CANARY.casefold() not in text.casefold()
        assert "canary" not in text.casefold()
    assert "\n" not in err.detail and len(err.detail) <= MAX_DETAIL_CHARS
    assert err.__cause__ is None and err.__context__ is None


# ----------------------------------------------------------------------------------------- requests


def test_request_shape_and_reading(caplog: pytest.LogCaptureFixture) -> None:
    async def scenario(upstream: Upstream, client: WolkvoxClient) -> None:
        reading = await fetch(client, f"{upstream.url}/ok/")  # a trailing slash is fine
        info = await client.fetch_token_info(base_url=f"{upstream.url}/info", server=SERVER, token=TOKEN)
        assert reading == Reading(12.5, 1, "2024-05")
        assert info == TokenInfo(limit=1000.0, used_today=17.0, all_today=250.0)
        first, second = upstream.seen
        assert first.target == "/ok/api/v2/billing.php?api=stereo_rec"
        assert second.target == "/info/api/v2/information.php?api=token_info"
        for seen in upstream.seen:
            assert seen.headers["wolkvox-token"] == CANARY
            assert seen.headers["wolkvox_server"] == SERVER
            assert seen.headers["user-agent"] == f"wolkvox-exporter/{__version__}"
            assert seen.headers["accept"] == "application/json"
            assert seen.headers["accept-encoding"] == "identity"
            assert "cookie" not in seen.headers  # the first answer set one: never stored, never sent
        assert upstream.connections == 1  # kept alive between a token's back-to-back requests

    with caplog.at_level(logging.DEBUG, logger="exporter.client"):
        run(with_upstream(scenario))
    lines = [r.getMessage() for r in caplog.records if r.name == "exporter.client"]
    assert len(lines) == 2 and "HTTP 200" in lines[0]
    assert CANARY not in caplog.text


def test_custom_user_agent() -> None:
    async def scenario(upstream: Upstream, client: WolkvoxClient) -> None:
        await fetch(client, f"{upstream.url}/ok")
        assert upstream.seen[0].headers["user-agent"] == "probe/9"

    run(with_upstream(scenario, user_agent="probe/9"))


def test_https_proxy_from_the_environment_is_used(monkeypatch: pytest.MonkeyPatch) -> None:
    async def scenario(upstream: Upstream, client: WolkvoxClient) -> None:
        monkeypatch.setenv("HTTP_PROXY", upstream.url)
        monkeypatch.setenv("NO_PROXY", "")
        reading = await fetch(client, "http://wv9901.wolkvox.invalid")
        assert reading.value == 12.5
        assert upstream.seen[0].target == "http://wv9901.wolkvox.invalid/api/v2/billing.php?api=stereo_rec"

    run(with_upstream(scenario))


def test_no_proxy_sends_the_request_straight_to_the_host(monkeypatch: pytest.MonkeyPatch) -> None:
    async def scenario(upstream: Upstream, client: WolkvoxClient) -> None:
        monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")  # nothing listens there
        monkeypatch.setenv("NO_PROXY", "127.0.0.1")
        assert (await fetch(client, f"{upstream.url}/ok")).value == 12.5
        assert not upstream.seen[0].target.startswith("http://")  # a path, not a proxy's full URL

    run(with_upstream(scenario))


@pytest.mark.parametrize(
    "bad", ["", f"{CANARY}\n", f" {CANARY}", f"{CANARY} {CANARY}", f"{CANARY}\r\nX-Evil: 1", "tök"]
)
def test_token_that_cannot_be_sent_is_auth_without_a_request(bad: str) -> None:
    async def scenario(upstream: Upstream, client: WolkvoxClient) -> None:
        err = await fetch_error(client, f"{upstream.url}/ok", token=Secret(bad))
        assert err.reason == "auth"
        assert upstream.connections == 0

    run(with_upstream(scenario))


def test_fetch_works_after_close_and_the_client_is_made_outside_a_loop() -> None:
    client = WolkvoxClient(1, 1, CAP)  # no running loop needed: the session is made on first use

    async def scenario() -> None:
        upstream, server = await start_upstream()
        try:
            assert (await fetch(client, f"{upstream.url}/ok")).value == 12.5
            await client.close()
            await client.close()
            assert (await fetch(client, f"{upstream.url}/ok")).value == 12.5
        finally:
            await client.close()
            await stop_upstream(upstream, server)

    run(scenario())
    run(scenario())  # another event loop, the same client


@pytest.mark.parametrize(
    "args",
    [(0, 1, CAP), (1, -1, CAP), (1, 1, 0), (1, 1, CAP, "ua", 0)],
    ids=["connect", "read", "cap", "conns"],
)
def test_constructor_validates(args: tuple[Any, ...]) -> None:
    with pytest.raises(ValueError):
        WolkvoxClient(*args)


# ----------------------------------------------------------------------------------------- failures


@pytest.mark.parametrize(
    ("path", "reason", "expected", "seconds"),
    [
        ("hang", "timeout", "no data within the read timeout 0.5s", (0.4, 3.0)),
        ("drip", "timeout", "answer not complete within 1s (connect_timeout + read_timeout)", (0.9, 3.0)),
        ("short", "connection", "ContentLengthError", (0, 3.0)),
        ("reset", "connection", "ClientPayloadError", (0, 3.0)),
        ("endless", "invalid_response", f"body larger than {CAP} bytes", (0, 3.0)),
        ("declared", "invalid_response", f"body larger than {CAP} bytes", (0, 0.4)),
        ("exact/1", "invalid_response", f"body larger than {CAP} bytes", (0, 3.0)),
        ("gzip/corrupt", "invalid_response", "cannot decode the body (ClientPayloadError", (0, 3.0)),
        ("gzip/bomb", "invalid_response", f"body larger than {CAP} bytes", (0, 3.0)),
        ("echo", "connection", "BadStatusLine", (0, 3.0)),
    ],
)
def test_failures(path: str, reason: str, expected: str, seconds: tuple[float, float]) -> None:
    async def scenario(upstream: Upstream, client: WolkvoxClient) -> None:
        started = time.monotonic()
        err = await fetch_error(client, f"{upstream.url}/{path}")
        elapsed = time.monotonic() - started
        assert (err.reason, expected in err.detail) == (reason, True), err.detail
        assert seconds[0] <= elapsed < seconds[1]
        if path == "endless":  # the client hung up near the cap instead of reading on
            await wait_until_async(lambda: upstream.hung_up)
            assert upstream.written < ENDLESS_BYTES

    run(with_upstream(scenario, connect_timeout=0.5, read_timeout=0.5))


@pytest.mark.parametrize(("path", "expected"), [("exact/0", 77.0), ("gzip/good", 8.25)])
def test_bodies_within_the_cap(path: str, expected: float) -> None:
    async def scenario(upstream: Upstream, client: WolkvoxClient) -> None:
        assert (await fetch(client, f"{upstream.url}/{path}")).value == expected

    run(with_upstream(scenario))


def test_connect_timeout() -> None:
    """A listener whose accept queue is full: Linux drops further SYNs, so the connect never completes."""

    async def scenario() -> tuple[FetchError, float]:
        with socket.socket() as listener:
            listener.bind(("127.0.0.1", 0))
            listener.listen(0)
            port = listener.getsockname()[1]
            fillers = [socket.socket() for _ in range(3)]
            try:
                for filler in fillers:
                    filler.setblocking(False)
                    filler.connect_ex(("127.0.0.1", port))
                async with WolkvoxClient(0.5, 5, CAP) as client:
                    started = time.monotonic()
                    err = await fetch_error(client, f"http://127.0.0.1:{port}")
                    return err, time.monotonic() - started
            finally:
                for filler in fillers:
                    filler.close()

    err, elapsed = run(scenario())
    if err.reason == "connection" and "Reset" in err.detail:
        pytest.skip("this kernel resets connections to a full accept queue (tcp_abort_on_overflow)")
    assert err.reason == "timeout"
    assert "could not connect within 0.5s" in err.detail
    assert 0.4 <= elapsed < 3.0


def test_connection_refused() -> None:
    async def scenario() -> FetchError:
        async with WolkvoxClient(2, 2, CAP) as client:
            return await fetch_error(client, f"http://127.0.0.1:{free_port()}")

    err = run(scenario())
    assert err.reason == "connection"
    assert "ConnectionRefusedError" in err.detail


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
@pytest.mark.parametrize("echo", [False, True], ids=["plain", "token-in-location"])
def test_redirect_is_not_followed(status: int, echo: bool) -> None:
    async def scenario(upstream: Upstream, client: WolkvoxClient) -> None:
        err = await fetch_error(client, f"{upstream.url}/redirect/{status}{'/echo' if echo else ''}")
        assert err.reason == "http_status"
        assert f"HTTP {status} redirect to '{upstream.url}/trap/" in err.detail
        assert ("<redacted>" in err.detail) == echo
        assert [seen.target.split("/")[1] for seen in upstream.seen] == ["redirect"]  # /trap never asked

    run(with_upstream(scenario))


def test_hanging_requests_do_not_block_a_healthy_one() -> None:
    """150 requests hang (more than aiohttp's default pool of 100); a healthy one still answers at once."""

    async def scenario(upstream: Upstream, client: WolkvoxClient) -> None:
        hanging = [
            asyncio.create_task(fetch(client, f"{upstream.url}/hang", token=Secret(f"tok-{n}")))
            for n in range(150)
        ]
        try:
            # every hanging request reached the upstream
            await wait_until_async(lambda: len(upstream.seen) == 150)
            started = time.monotonic()
            reading = await fetch(client, f"{upstream.url}/ok", token=Secret("tok-7"))
            assert reading.value == 7.0
            assert time.monotonic() - started < 1.0
            assert not any(task.done() for task in hanging)
        finally:
            for task in hanging:
                task.cancel()
            await asyncio.gather(*hanging, return_exceptions=True)

    run(with_upstream(scenario, read_timeout=20, max_connections=256))


def test_concurrent_fetches_do_not_mix_tokens() -> None:
    async def scenario(upstream: Upstream, client: WolkvoxClient) -> None:
        async def lane(index: int) -> list[float]:
            token = Secret(f"tok-{index}")
            return [(await fetch(client, f"{upstream.url}/ok", token=token)).value for _ in range(10)]

        results = await asyncio.gather(*(lane(i) for i in range(8)))
        assert results == [[float(i)] * 10 for i in range(8)]

    run(with_upstream(scenario))


def test_a_request_waiting_for_a_connection_slot_is_not_timed_out_by_the_wait() -> None:
    """One slot; the first request holds it for most of the deadline; the second still gets its own."""

    async def scenario(upstream: Upstream, client: WolkvoxClient) -> None:
        first = asyncio.create_task(fetch(client, f"{upstream.url}/drip"))
        await wait_until_async(lambda: bool(upstream.seen))
        second = await fetch(client, f"{upstream.url}/ok")
        assert second.value == 12.5
        with pytest.raises(FetchError):
            await first

    run(with_upstream(scenario, connect_timeout=0.5, read_timeout=0.5, max_connections=1))


# ----------------------------------------------------------------------------------------- TLS


def server_context(pki: Path, name: str = "server") -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pki / f"{name}.crt", pki / f"{name}.key")
    return context


@pytest.mark.parametrize(
    ("cert", "ca", "outcome"),
    [
        ("server", "ca.crt", None),
        ("server", None, "SSLCertVerificationError"),  # a private CA is not in the system bundle
        ("server", "rogue-ca.crt", "SSLCertVerificationError"),
        ("wrong-name", "ca.crt", "SSLCertVerificationError: IP address mismatch"),
        ("server", "missing.crt", "cannot load ca_file"),
    ],
    ids=["private-ca", "no-ca-file", "other-ca", "wrong-name", "ca-file-missing"],
)
def test_tls_is_always_verified(pki: Path, cert: str, ca: str | None, outcome: str | None) -> None:
    async def scenario(upstream: Upstream, client: WolkvoxClient) -> None:
        ca_file = str(pki / ca) if ca else None
        if outcome is None:
            assert (await fetch(client, f"{upstream.url}/ok", ca_file=ca_file)).value == 12.5
            return
        err = await fetch_error(client, f"{upstream.url}/ok", ca_file=ca_file)
        assert err.reason == "connection"
        assert outcome in err.detail, err.detail
        assert not upstream.seen  # the token was never sent

    run(with_upstream(scenario, ssl_context=server_context(pki, cert)))


# ----------------------------------------------------------------------------------------- fd limit


def test_raise_fd_limit() -> None:
    resource = pytest.importorskip("resource")
    old, new = raise_fd_limit()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert new == (-1 if soft == resource.RLIM_INFINITY else soft)
    assert new == old or soft == hard
    assert raise_fd_limit() == (new, new)  # already raised


@pytest.mark.parametrize(
    ("soft", "expected"), [(1024, 64), (1100, 76), (2048, 1024), (20000, 4096), (1_048_576, 4096), (-1, 4096)]
)
def test_default_max_connections(soft: int, expected: int) -> None:
    assert default_max_connections(soft) == expected
    assert WolkvoxClient(1, 1, CAP).max_connections == default_max_connections()
