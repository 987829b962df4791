"""Security and robustness of the exporter, over loopback only: in-process (``run_exporter``) wherever a
process proves nothing more, a real process (``start_exporter``) for what only a process shows: the
canary tokens in the real log stream at every level and format, SIGHUP, SIGINT and SIGTERM, flags, and
a bad web config's exit status and one line.

- ``--web.config.file``: TLS (with and without client certificates), basic auth, extra headers, and
  start-up errors for bad files;
- the token never goes anywhere but the configured host (redirects are not followed) and upstream TLS is
  always verified;
- canary tokens: nothing printed or served, at any log level and in any log format, contains a token;
- slow, stuck and flooding clients cannot stall scrapes; open sockets stay bounded;
- graceful shutdown on SIGINT, and on SIGTERM with many slow clients connected.

TLS material is made per session by tests/fixtures/web/make_certs.sh (openssl CLI) in a tmp dir.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import json
import logging
import os
import signal
import socket
import ssl
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import bcrypt
import pytest
import requests
import yaml
from harness import (
    Exporter,
    Process,
    Simulator,
    exporter_exit,
    free_port,
    labelled,
    run_cli,
    start_simulator,
    value,
    wait_until,
    write_yaml,
)

from exporter.answers import parse_body
from exporter.model import REASONS, FetchError
from exporter.secret import Secret
from exporter.simulator import FAULT_MODES

ALICE_PASSWORD = "alice-Pa55word-for-tests"
BOB_PASSWORD = "bob-htpasswd-style-2y"


def exporter_config(sim_url: str, **extra: Any) -> dict[str, Any]:
    """One operation against the simulator; no refresh during the test (1m)."""
    return {
        "refresh_interval": "1m",
        "connect_timeout": "1s",
        "read_timeout": "2s",
        "operations": [{"name": "a", "server": "wv0001", "token": "tok-security-a", "base_url": sim_url}],
        **extra,
    }


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def proc_status(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"{field} not in /proc/{pid}/status")


def basic(user: str, password: str) -> dict[str, str]:
    raw = f"{user}:{password}".encode()
    return {"Authorization": "Basic " + base64.b64encode(raw).decode()}


# ----- a tiny recording HTTP(S) upstream ---------------------------------------------------------------

Answer = Callable[[str, str], tuple[int, dict[str, str], bytes]]


class Upstream:
    """A threaded HTTP/1.0 server on 127.0.0.1 answering ``answer(path, token)``.

    Counts every accepted TCP connection (even one that never sends a byte), TLS handshakes that failed,
    and records each request's path and headers. ``context`` makes it an HTTPS server.
    """

    def __init__(self, answer: Answer, context: ssl.SSLContext | None = None) -> None:
        self.answer = answer
        self.context = context
        self.lock = threading.Lock()
        self.connections = 0
        self.handshake_failures = 0
        self.requests: list[tuple[str, dict[str, str]]] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"
            timeout = 5

            def do_GET(self) -> None:
                token = self.headers.get("wolkvox-token", "")
                with owner.lock:
                    owner.requests.append((self.path, dict(self.headers.items())))
                status, headers, body = owner.answer(self.path, token)
                self.send_response(status)
                for name, header_value in headers.items():
                    self.send_header(name, header_value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def get_request(self) -> tuple[socket.socket, Any]:
                sock, address = super().get_request()
                with owner.lock:
                    owner.connections += 1
                return sock, address

            def finish_request(self, request: Any, client_address: Any) -> None:
                if owner.context is None:
                    super().finish_request(request, client_address)
                    return
                request.settimeout(5)
                try:
                    tls = owner.context.wrap_socket(request, server_side=True)
                except OSError:
                    with owner.lock:
                        owner.handshake_failures += 1
                    return
                try:
                    super().finish_request(tls, client_address)
                finally:
                    tls.close()

            def handle_error(self, request: Any, client_address: Any) -> None:
                pass  # a client that hangs up early is not a test failure

        self.server = Server(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        scheme = "https" if context is not None else "http"
        self.url = f"{scheme}://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05})

    def __enter__(self) -> Upstream:
        self.thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)

    def tokens_seen(self) -> set[str]:
        with self.lock:
            return {headers.get("wolkvox-token", "") for _, headers in self.requests}


def wolkvox_document(items: str = "1234") -> bytes:
    return json.dumps(
        {
            "code": "200",
            "error": None,
            "msg": "Information found for the current month",
            "data": [
                {
                    "operation": "wv0001",
                    "description": "Stereo recording minutes",
                    "items": items,
                    "date": "2025-01-01 00:00:00",
                }
            ],
        }
    ).encode()


def recorder() -> Upstream:
    return Upstream(lambda path, token: (200, {"Content-Type": "text/plain"}, b"recorded\n"))


# ===== 1. --web.config.file ============================================================================


def server_tls(pki: Path, **settings: str) -> dict[str, str]:
    """A tls_server_config with the test PKI's server certificate, and ``settings``."""
    return {"cert_file": str(pki / "server.crt"), "key_file": str(pki / "server.key"), **settings}


@pytest.fixture
def web_exporter(
    run_exporter: Callable[..., Exporter], tmp_path: Path
) -> Callable[[dict[str, Any]], Exporter]:
    """Factory: an exporter in this process serving with the web configuration given. Its upstream
    refuses connections: these tests are about what it serves, not what it fetches."""

    def start(web: dict[str, Any]) -> Exporter:
        path = write_yaml(tmp_path / "web-config.yml", web)
        return run_exporter(exporter_config(f"http://127.0.0.1:{free_port()}"), web_config_file=str(path))

    return start


def test_tls_serves_https_only_to_clients_that_trust_it(
    pki: Path, web_exporter: Callable[[dict[str, Any]], Exporter]
) -> None:
    exporter = web_exporter(
        {"tls_server_config": server_tls(pki, min_version="TLS13")},
    )
    assert exporter.url.startswith("https://127.0.0.1:")
    ca = str(pki / "ca.crt")
    response = exporter.get("/metrics", verify=ca)
    assert response.status_code == 200 and "wolkvox_exporter_build_info" in response.text

    # The system trust store does not know the test CA: verification fails.
    with pytest.raises(requests.exceptions.SSLError):
        exporter.get("/metrics")
    # Plain HTTP to the TLS port gets no HTTP answer at all.
    with pytest.raises(requests.exceptions.ConnectionError):
        requests.get(exporter.url.replace("https://", "http://") + "/metrics", timeout=5)
    # min_version TLS13: a client that stops at TLS 1.2 cannot connect; one that allows 1.3 does.
    old = ssl.create_default_context(cafile=ca)
    old.maximum_version = ssl.TLSVersion.TLSv1_2
    with socket.create_connection(("127.0.0.1", exporter.port), timeout=5) as raw:
        with pytest.raises(ssl.SSLError):
            old.wrap_socket(raw, server_hostname="127.0.0.1")
    current = ssl.create_default_context(cafile=ca)
    with socket.create_connection(("127.0.0.1", exporter.port), timeout=5) as raw:
        with current.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            assert tls.version() == "TLSv1.3"
    # None of that broke the server.
    assert exporter.get("/-/healthy", verify=ca).status_code == 200


def test_client_certificates_are_required_and_verified(
    pki: Path, web_exporter: Callable[[dict[str, Any]], Exporter]
) -> None:
    exporter = web_exporter(
        {
            "tls_server_config": server_tls(
                pki, client_auth_type="RequireAndVerifyClientCert", client_ca_file=str(pki / "ca.crt")
            )
        },
    )
    ca = str(pki / "ca.crt")
    with pytest.raises(requests.exceptions.ConnectionError):  # SSLError is a ConnectionError
        exporter.get("/metrics", verify=ca)
    with pytest.raises(requests.exceptions.ConnectionError):
        exporter.get(
            "/metrics", verify=ca, cert=(str(pki / "rogue-client.crt"), str(pki / "rogue-client.key"))
        )
    # Health endpoints are no exception at the TLS layer: no certificate, no connection.
    with pytest.raises(requests.exceptions.ConnectionError):
        exporter.get("/-/healthy", verify=ca)
    good = exporter.get("/metrics", verify=ca, cert=(str(pki / "client.crt"), str(pki / "client.key")))
    assert good.status_code == 200 and "wolkvox_up" in good.text


@pytest.fixture
def auth_exporter(pki: Path, web_exporter: Callable[[dict[str, Any]], Exporter]) -> Exporter:
    """TLS + basic auth + an extra header: alice has a python-bcrypt ($2b$) hash, bob an htpasswd ($2y$)."""
    alice = bcrypt.hashpw(ALICE_PASSWORD.encode(), bcrypt.gensalt(rounds=4)).decode()
    bob = bcrypt.hashpw(BOB_PASSWORD.encode(), bcrypt.gensalt(rounds=4)).decode()
    assert alice.startswith("$2b$") and bob.startswith("$2b$")
    return web_exporter(
        {
            "tls_server_config": server_tls(pki),
            "basic_auth_users": {"alice": alice, "bob": "$2y$" + bob[4:]},
            "http_server_config": {"headers": {"X-Frame-Options": "deny"}},
        },
    )


def test_basic_auth_protects_metrics_landing_page_and_reload(pki: Path, auth_exporter: Exporter) -> None:
    ca = str(pki / "ca.crt")

    def get(path: str, headers: dict[str, str] | None = None, method: str = "GET") -> requests.Response:
        return requests.request(method, auth_exporter.url + path, headers=headers, verify=ca, timeout=10)

    ok = get("/metrics", basic("alice", ALICE_PASSWORD))
    assert ok.status_code == 200 and "wolkvox_up" in ok.text
    assert ok.headers["X-Frame-Options"] == "deny"
    assert get("/metrics", basic("bob", BOB_PASSWORD)).status_code == 200  # the $2y$ hash
    assert get("/", basic("alice", ALICE_PASSWORD)).status_code == 200
    assert get("/-/reload", basic("alice", ALICE_PASSWORD), method="POST").status_code == 200

    refused = {
        "no credentials": None,
        "wrong password": basic("alice", ALICE_PASSWORD + "x"),
        "another user's password": basic("alice", BOB_PASSWORD),
        "unknown user": basic("mallory", ALICE_PASSWORD),
        "empty user": basic("", ALICE_PASSWORD),
        "not base64": {"Authorization": "Basic !!!not-base64!!!"},
        "no colon": {"Authorization": "Basic " + base64.b64encode(b"alice").decode()},
        "not utf-8": {"Authorization": "Basic " + base64.b64encode(b"alice:\xff\xfe").decode()},
        "another scheme": {"Authorization": "Bearer " + ALICE_PASSWORD},
    }
    for what, headers in refused.items():
        for method, path in (("GET", "/metrics"), ("GET", "/"), ("POST", "/-/reload"), ("HEAD", "/metrics")):
            response = get(path, headers, method=method)
            assert response.status_code == 401, (what, method, path, response.status_code)
            assert response.headers["WWW-Authenticate"].startswith("Basic realm="), (what, path)
            assert response.headers["X-Frame-Options"] == "deny", (what, path)
            assert "wolkvox_" not in response.text, (what, path)
    # A wrong answer is not cached as a right one, nor the other way round.
    assert get("/metrics", basic("alice", ALICE_PASSWORD)).status_code == 200
    assert get("/metrics", basic("alice", "nope")).status_code == 401
    assert get("/metrics", basic("alice", "nope")).status_code == 401


def test_health_endpoints_answer_without_credentials(pki: Path, auth_exporter: Exporter) -> None:
    ca = str(pki / "ca.crt")
    healthy = requests.get(auth_exporter.url + "/-/healthy", verify=ca, timeout=5)
    assert healthy.status_code == 200 and healthy.text == "OK\n"
    # Wrong credentials on a health endpoint are ignored, not refused.
    assert (
        requests.get(
            auth_exporter.url + "/-/healthy", headers=basic("alice", "wrong"), verify=ca, timeout=5
        ).status_code
        == 200
    )
    ready = requests.get(auth_exporter.url + "/-/ready", verify=ca, timeout=5)
    assert ready.status_code in (200, 503) and "wolkvox_" not in ready.text


def test_a_password_longer_than_72_bytes_is_a_401_not_a_server_error(
    pki: Path, auth_exporter: Exporter, caplog: pytest.LogCaptureFixture
) -> None:
    """bcrypt >= 5 raises ValueError for passwords over 72 bytes; that must stay a plain 401."""
    ca = str(pki / "ca.crt")
    for user in ("alice", "mallory"):
        response = requests.get(
            auth_exporter.url + "/metrics", headers=basic(user, "x" * 100), verify=ca, timeout=10
        )
        assert response.status_code == 401, (user, response.status_code)
    assert not [r for r in caplog.records if r.exc_info], "a handler raised"


def raw_http(port: int, request: bytes, context: ssl.SSLContext | None = None) -> bytes:
    """Send ``request`` as is (no client-side path normalisation) and read the whole answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        sock = context.wrap_socket(raw, server_hostname="127.0.0.1") if context else raw
        sock.sendall(request)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
        return b"".join(chunks)


@pytest.mark.parametrize(
    "target",
    [
        "/-/healthy/../metrics",
        "/-/healthy/%2E%2E/metrics",
        "/-/healthy%2F..%2Fmetrics",
        "/-/./healthy/../../metrics",
        "//metrics",
        "/metrics?/-/healthy",
        "/-/ready/../",
        "/METRICS",
        "/metrics/",
        "/metrics%00",
        "http://127.0.0.1/metrics",
    ],
)
def test_no_path_trick_reaches_a_protected_page_without_credentials(
    pki: Path, auth_exporter: Exporter, target: str
) -> None:
    context = ssl.create_default_context(cafile=str(pki / "ca.crt"))
    answer = raw_http(
        auth_exporter.port,
        f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode(),
        context,
    )
    status_line = answer.split(b"\r\n", 1)[0]
    assert b"wolkvox_" not in answer and b"Operations configured" not in answer, status_line
    assert status_line.split()[1] in (b"400", b"401", b"404"), status_line


BAD_PASSWORD = "Plain-Passw0rd-CANARY-5d1e"


BAD_WEB_CONFIGS = {
    "unknown key": "basic_auth_user",
    "missing key_file": "key_file",
    "unreadable cert": "cert_file",
    "cert is a directory": "cert_file",
    "plain password": "basic_auth_users.alice",
    "truncated hash": "basic_auth_users.alice",
    "client CA without a client auth type": "tls_server_config.client_ca_file",
    "a client CA file that is not there": "tls_server_config.client_ca_file: cannot load",
    "a header the toolkit refuses": "http_server_config.headers.Content-Type",
    "a header value the toolkit refuses": "http_server_config.headers.X-Frame-Options",
    "SANs but no client certificate asked": "tls_server_config.client_allowed_sans",
    "an unknown curve": "tls_server_config.curve_preferences",
    "an unverified client certificate required": "tls_server_config.client_auth_type",
}


def bad_web_config(problem: str, pki: Path, tmp_path: Path) -> Path:
    tls = server_tls(pki)
    garbage = tmp_path / "garbage.crt"
    garbage.write_text("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    web: dict[str, Any] = {
        "unknown key": {"basic_auth_user": {"alice": "$2y$04$" + "a" * 53}},
        "missing key_file": {"tls_server_config": {"cert_file": tls["cert_file"]}},
        "unreadable cert": {"tls_server_config": {**tls, "cert_file": str(garbage)}},
        "cert is a directory": {"tls_server_config": {**tls, "cert_file": str(tmp_path)}},
        "plain password": {"basic_auth_users": {"alice": BAD_PASSWORD}},
        "truncated hash": {"basic_auth_users": {"alice": "$2y$10$" + BAD_PASSWORD}},
        "client CA without a client auth type": {
            "tls_server_config": {**tls, "client_ca_file": str(pki / "ca.crt")}
        },
        "a client CA file that is not there": {
            "tls_server_config": {**tls, "client_ca_file": str(tmp_path / "absent.crt")}
        },
        "a header the toolkit refuses": {"http_server_config": {"headers": {"Content-Type": "text/html"}}},
        "a header value the toolkit refuses": {
            "http_server_config": {"headers": {"X-Frame-Options": "allow"}}
        },
        "SANs but no client certificate asked": {"tls_server_config": {**tls, "client_allowed_sans": ["a"]}},
        "an unknown curve": {"tls_server_config": {**tls, "curve_preferences": ["X25519", "CurveP255"]}},
        "an unverified client certificate required": {
            "tls_server_config": {**tls, "client_auth_type": "RequireAnyClientCert"}
        },
    }[problem]
    return write_yaml(tmp_path / "bad-web.yml", web)


@pytest.mark.parametrize(("problem", "key"), list(BAD_WEB_CONFIGS.items()))
def test_a_bad_web_config_stops_the_start_with_one_line(
    pki: Path, tmp_path: Path, problem: str, key: str, caplog: pytest.LogCaptureFixture
) -> None:
    """In-process: App.start refuses, before listening, with one line naming the file and the key (the
    real process prints that line and exits 1: the test below)."""
    from exporter.app import App, StartError, WebSettings
    from exporter.config import load_config

    web_path = bad_web_config(problem, pki, tmp_path)
    config_path = write_yaml(
        tmp_path / "config.yml",
        {"operations": [{"server": "wv1", "token": "tok-x", "base_url": f"http://127.0.0.1:{free_port()}"}]},
    )
    app = App(load_config(config_path), WebSettings("127.0.0.1:0", web_config_file=str(web_path)))
    with pytest.raises(StartError) as refused:
        asyncio.run(app.start())
    message = str(refused.value)
    assert "\n" not in message and message.startswith(str(web_path)) and key in message, message
    assert BAD_PASSWORD not in message and BAD_PASSWORD not in caplog.text
    assert app.url == "", "it listened"


def test_a_bad_web_config_is_one_error_line_and_exit_status_1(pki: Path, tmp_path: Path) -> None:
    """The real process: the one line is all it prints, at error level, and it exits 1 without serving;
    the password pasted in place of a hash is nowhere in its output."""
    web_path = bad_web_config("plain password", pki, tmp_path)
    # A valid config with nothing to warn about, so the error is the only line.
    config = write_yaml(
        tmp_path / "config.yml",
        {"operations": [{"server": "wv1", "token": "tok-x", "base_url": f"http://127.0.0.1:{free_port()}"}]},
    )
    returncode, output = exporter_exit(
        tmp_path / "exporter.log", "--config.file", str(config), "--web.config.file", str(web_path)
    )
    lines = [line for line in output.splitlines() if line.strip()]
    assert returncode == 1, output
    assert len(lines) == 1, output
    assert "Traceback" not in output
    assert str(web_path) in lines[0] and "basic_auth_users.alice" in lines[0], lines[0]
    assert "level=error" in lines[0]
    assert BAD_PASSWORD not in output


def test_config_check_validates_the_web_config_too(pki: Path, tmp_path: Path) -> None:
    config = write_yaml(
        tmp_path / "config.yml",
        {"operations": [{"server": "wv1", "token": "tok-x", "base_url": f"http://127.0.0.1:{free_port()}"}]},
    )
    good = write_yaml(
        tmp_path / "web-good.yml",
        {"tls_server_config": server_tls(pki)},
    )
    bad = write_yaml(tmp_path / "web-bad.yml", {"http_server_config": {"headers": {"Set-Cookie": "a=b"}}})

    def check(*flags: str) -> subprocess.CompletedProcess[str]:
        return run_cli("--config.file", str(config), "--config.check", *flags)

    ok = check("--web.config.file", str(good))
    assert ok.returncode == 0 and f"{good}: OK" in ok.stdout, ok.stdout + ok.stderr
    refused = check("--web.config.file", str(bad))
    assert refused.returncode == 1, refused.stdout + refused.stderr
    lines = [line for line in refused.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "http_server_config.headers.Set-Cookie" in lines[0], refused.stderr
    empty = check("--web.config.file=")  # the toolkit's "no web config"
    assert empty.returncode == 0 and "web" not in empty.stdout, empty.stdout + empty.stderr


def test_an_empty_web_config_flag_means_plain_http(start_exporter: Callable[..., Exporter]) -> None:
    exporter = start_exporter(exporter_config(f"http://127.0.0.1:{free_port()}"), "--web.config.file=")
    assert exporter.url.startswith("http://")
    assert exporter.get("/-/healthy").status_code == 200


def test_a_burst_of_reload_requests_shares_one_reload(run_exporter: Callable[..., Exporter]) -> None:
    """Ten unauthenticated POST /-/reload at once: they join the reload already running (in the real
    process each reload parses the config in a child interpreter) instead of starting ten. The reload is
    held until all ten are in, so the test does not depend on how fast one runs."""
    exporter = run_exporter(exporter_config(f"http://127.0.0.1:{free_port()}"))
    app = exporter.app
    server = app._runner.server
    loads = 0
    release = threading.Event()
    load_config = app._load_config

    def held_load() -> Any:
        nonlocal loads
        loads += 1
        release.wait(20)
        return load_config()

    app._load_config = held_load
    before = server.requests_count
    results: list[tuple[int, str]] = []

    def post() -> None:
        answer = requests.post(exporter.url + "/-/reload", timeout=30)
        results.append((answer.status_code, answer.text))

    threads = [threading.Thread(target=post) for _ in range(10)]
    for thread in threads:
        thread.start()
    wait_until(lambda: server.requests_count >= before + 10, what="the ten requests to arrive")
    release.set()
    for thread in threads:
        thread.join(timeout=30)
    assert results == [(200, "OK\n")] * 10
    assert loads == 1
    assert requests.post(exporter.url + "/-/reload", timeout=30).text == "OK\n" and loads == 2


MALFORMED = {
    "a header over 8 KB": b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Long: " + b"a" * 9000 + b"\r\n\r\n",
    "a URL over 8 KB": b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    "a NUL in the path": b"GET /met\x00rics HTTP/1.1\r\nHost: x\r\n\r\n",
    "Content-Length with Transfer-Encoding": b"POST /-/reload HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "a TLS hello": None,  # sent by an ssl client
}


def send_malformed(port: int, request: bytes | None) -> bytes:
    """Send ``request`` (or a TLS hello) and read what comes back until the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        if request is None:
            with pytest.raises((ssl.SSLError, ConnectionError)):
                ssl.create_default_context().wrap_socket(raw, server_hostname="127.0.0.1")
            return b""
        raw.sendall(request)
        chunks = []
        try:
            while chunk := raw.recv(65536):
                chunks.append(chunk)
        except ConnectionResetError:
            pass
        return b"".join(chunks)


def test_malformed_requests_cost_one_debug_line_each(
    pki: Path, run_exporter: Callable[..., Exporter], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    upstream = exporter_config(f"http://127.0.0.1:{free_port()}")
    exporter = run_exporter(upstream)
    port = exporter.port
    for what, request in MALFORMED.items():
        answer = send_malformed(port, request)
        if request is not None:
            assert answer.split(b"\r\n", 1)[0].split()[1] == b"400", (what, answer[:80])
        assert b"wolkvox_" not in answer, what

    web_path = write_yaml(tmp_path / "web-config.yml", {"tls_server_config": server_tls(pki)})
    tls = run_exporter(upstream, web_config_file=str(web_path))
    plain_on_tls = send_malformed(tls.port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    assert b"wolkvox_" not in plain_on_tls
    # Both still serve.
    assert exporter.get("/-/healthy").status_code == 200
    assert tls.get("/-/healthy", verify=str(pki / "ca.crt")).status_code == 200

    def lines(needle: str) -> list[logging.LogRecord]:
        return [record for record in caplog.records if needle in record.getMessage()]

    bad = wait_until(
        lambda: (found := lines("bad request from 127.0.0.1")) and len(found) >= len(MALFORMED) and found,
        what="a line per malformed request",
    )
    assert len(bad) == len(MALFORMED), [record.getMessage() for record in bad]
    assert all(record.levelno == logging.DEBUG for record in bad)
    handshake = wait_until(lambda: lines("TLS handshake with 127.0.0.1"), what="the failed handshake's line")
    assert len(handshake) == 1 and handshake[0].levelno == logging.DEBUG
    web_records = [r for r in caplog.records if r.name.startswith(("exporter.web", "aiohttp", "asyncio"))]
    assert not [r for r in web_records if r.exc_info or r.levelno >= logging.WARNING], caplog.text[-3000:]


# ===== 2. the token goes nowhere but the configured host; upstream TLS is verified =====================


def test_redirects_are_never_followed(
    simulator: Simulator, run_exporter: Callable[..., Exporter], caplog: pytest.LogCaptureFixture
) -> None:
    """302 from the simulator and 301/303/307/308 from a hand-made upstream, all pointing at a recording
    server on another loopback port: it must not even see a connection."""
    with recorder() as trap:
        target = f"{trap.url}/api/v2/billing.php?api=stereo_rec"

        def redirecting(path: str, token: str) -> tuple[int, dict[str, str], bytes]:
            status = int(path.split("/")[1].removeprefix("redirect-"))
            return status, {"Location": target}, b""

        with Upstream(redirecting) as custom:
            ops = [
                {
                    "name": "sim-302",
                    "server": "wv0001",
                    "token": "tok-redirect-302",
                    "base_url": simulator.url,
                }
            ]
            for status in (301, 303, 307, 308):
                ops.append(
                    {
                        "name": f"custom-{status}",
                        "server": "wv0001",
                        "token": f"tok-redirect-{status}",
                        "base_url": f"{custom.url}/redirect-{status}",
                    }
                )
            simulator.fault("redirect", token="tok-redirect-302", location=target)
            exporter = run_exporter(
                {
                    "refresh_interval": "1s",
                    "daily_request_limit": 10_000_000,  # every report each second
                    "connect_timeout": "1s",
                    "read_timeout": "1s",
                    "operations": ops,
                }
            )
            names = [op["name"] for op in ops]
            samples = exporter.wait_for(
                lambda s: all(
                    (value(s, "wolkvox_scrape_errors_total", operation=n, reason="http_status") or 0) >= 2
                    for n in names
                ),
                timeout=20,
                what="two refused redirects per operation",
            )
            for name in names:
                assert value(samples, "wolkvox_up", operation=name) == 0
                assert labelled(samples, "wolkvox_last_error_info", operation=name, reason="http_status")
                for reason in REASONS:
                    if reason != "http_status":
                        assert (
                            value(samples, "wolkvox_scrape_errors_total", operation=name, reason=reason) == 0
                        )
            assert simulator.stats()["tokens"]["tok-redirect-302"]["requests"] >= 2
            assert len(custom.requests) >= 8
        assert trap.connections == 0 and trap.requests == []
        # The trap does record what reaches it (so the assertion above could have failed).
        assert requests.get(target, timeout=5).status_code == 200
        assert trap.connections == 1 and trap.requests[0][0].startswith("/api/v2/billing.php")
    assert any("not followed" in str(getattr(r, "detail", "")) for r in caplog.records), caplog.text


def test_upstream_tls_is_always_verified(
    pki: Path, run_exporter: Callable[..., Exporter], caplog: pytest.LogCaptureFixture
) -> None:
    """A private-CA upstream: refused without ca_file (reason connection), accepted with it; a certificate
    for another host name is refused even with the right CA. Failed handshakes never carry the token."""

    def server_context(name: str) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(pki / f"{name}.crt", pki / f"{name}.key")
        return context

    def answer(path: str, token: str) -> tuple[int, dict[str, str], bytes]:
        return 200, {"Content-Type": "application/json"}, wolkvox_document("1234")

    with (
        Upstream(answer, server_context("server")) as good,
        Upstream(answer, server_context("wrong-name")) as other,
    ):
        ca = str(pki / "ca.crt")
        ops = [
            {"name": "untrusted", "server": "wv0001", "token": "tok-tls-untrusted", "base_url": good.url},
            {
                "name": "trusted",
                "server": "wv0001",
                "token": "tok-tls-trusted",
                "base_url": good.url,
                "ca_file": ca,
            },
            {
                "name": "wrong-name",
                "server": "wv0001",
                "token": "tok-tls-wrong",
                "base_url": other.url,
                "ca_file": ca,
            },
        ]
        exporter = run_exporter(
            {
                "refresh_interval": "1s",
                "daily_request_limit": 10_000_000,  # every report each second
                "connect_timeout": "2s",
                "read_timeout": "2s",
                "operations": ops,
            }
        )
        samples = exporter.wait_for(
            lambda s: (
                value(s, "wolkvox_stereo_rec_minutes", operation="trusted") == 1234
                and (value(s, "wolkvox_scrape_errors_total", operation="untrusted", reason="connection") or 0)
                >= 2
                and (
                    value(s, "wolkvox_scrape_errors_total", operation="wrong-name", reason="connection") or 0
                )
                >= 2
            ),
            timeout=20,
            what="the trusted value and two certificate failures each",
        )
        assert value(samples, "wolkvox_up", operation="trusted") == 1
        for name in ("untrusted", "wrong-name"):
            assert value(samples, "wolkvox_up", operation=name) == 0
            assert value(samples, "wolkvox_stereo_rec_minutes", operation=name) is None
            assert labelled(samples, "wolkvox_last_error_info", operation=name, reason="connection")
        assert good.tokens_seen() == {"tok-tls-trusted"}
        assert other.tokens_seen() == set()
        assert good.handshake_failures >= 2 and other.handshake_failures >= 2
    failures = [
        (getattr(r, "operation", ""), getattr(r, "detail", ""))
        for r in caplog.records
        if r.getMessage() == "fetch failed"
    ]
    assert any(
        operation == "untrusted" and "SSLCertVerificationError: unable to get local issuer" in detail
        for operation, detail in failures
    ), failures
    assert any(
        operation == "wrong-name" and "SSLCertVerificationError: IP address mismatch" in detail
        for operation, detail in failures
    ), failures


# ===== 3. canary tokens ================================================================================


def canary() -> str:
    return f"CANARY-{uuid.uuid4()}"


def leaks(text: str, tokens: list[str], window: int = 12) -> list[str]:
    """Tokens of which any ``window``-character piece of the random part appears in ``text`` (any case):
    catches the whole token, a cut-off head or tail, and a re-cased copy."""
    haystack = text.lower()
    found = []
    for token in tokens:
        secret = token.lower().removeprefix("canary-")
        if any(secret[i : i + window] in haystack for i in range(len(secret) - window + 1)):
            found.append(token)
    return found


def echo_answer(refused_port: int) -> Answer:
    """An upstream that puts the token it receives into its answers, each path a different way."""

    def answer(path: str, token: str) -> tuple[int, dict[str, str], bytes]:
        kind = path.split("/")[1]
        as_json = {"Content-Type": "application/json"}
        if kind == "json-msg":
            doc = {"code": "403", "error": "FORBIDDEN", "msg": f"PLEASE VALIDATE TOKEN {token}", "data": None}
            return 403, as_json, json.dumps(doc).encode()
        if kind == "json-upper":
            doc = {
                "code": "400",
                "error": f"TOKEN {token.upper()} UNKNOWN",
                "msg": token.lower(),
                "data": None,
            }
            return 400, as_json, json.dumps(doc).encode()
        if kind == "html":
            page = f"<html><head><title>500</title></head><body><p>token={token}</p></body></html>"
            return 500, {"Content-Type": "text/html"}, page.encode()
        if kind == "status-401":
            return 401, {"Content-Type": "text/plain"}, f"invalid token {token}\n".encode()
        if kind == "badjson":
            return 200, as_json, f'{{"code": "200", "token": "{token}", "data": ['.encode()
        if kind == "items":
            doc = {"code": "200", "error": None, "msg": "ok", "data": [{"items": token}]}
            return 200, as_json, json.dumps(doc).encode()
        if kind == "code":
            return 200, as_json, json.dumps({"code": token, "data": []}).encode()
        if kind == "redirect":
            return 302, {"Location": f"http://127.0.0.1:{refused_port}/steal?token={token}"}, b""
        if kind == "header":
            return 500, {"X-Echo-Token": token, "Set-Cookie": f"t={token}"}, b"error\n"
        return 404, {}, b""

    return answer


ECHO_KINDS = (
    "json-msg",
    "json-upper",
    "html",
    "status-401",
    "badjson",
    "items",
    "code",
    "redirect",
    "header",
)


@pytest.fixture(scope="module")
def canary_upstreams(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Simulator, Upstream, Upstream]]:
    sim = start_simulator(tmp_path_factory.mktemp("canary") / "simulator.log")
    try:
        with recorder() as trap, Upstream(echo_answer(free_port())) as echo:
            yield sim, echo, trap
    finally:
        sim.stop()


def bad_reload_documents(good: dict[str, Any], token: str) -> dict[str, str]:
    """Config files that put a running token where it does not belong, each failing to load."""
    first = dict(good["operations"][0])
    as_token_file = {k: v for k, v in first.items() if k != "token"} | {"token_file": token}
    return {
        "token as an unknown key": yaml.safe_dump({**good, token: 1}),
        "token as token_file": yaml.safe_dump(
            {**good, "operations": [as_token_file, *good["operations"][1:]]}
        ),
        "token as an api name": yaml.safe_dump(
            {**good, "operations": [{**first, "apis": [token]}, *good["operations"][1:]]}
        ),
        "token as a duration": yaml.safe_dump({**good, "refresh_interval": token}),
        "token as a server": yaml.safe_dump(
            {**good, "operations": [{**first, "server": token + "!"}, *good["operations"][1:]]}
        ),
        "token on a line with a YAML error": f'operations:\n  - server: wv1\n    token: "{token}\n',
        "token in a duplicate key": f"{token}: 1\n{token}: 2\n",
    }


# Every line the exporter can print is printed at debug, in each format; the level only drops lines (it
# does not change them), and error (its highest) shows that it does.
@pytest.mark.parametrize(
    ("log_format", "log_level"), [("logfmt", "debug"), ("json", "debug"), ("logfmt", "error")]
)
def test_no_token_is_ever_printed_or_served(
    canary_upstreams: tuple[Simulator, Upstream, Upstream],
    start_exporter: Callable[..., Exporter],
    log_level: str,
    log_format: str,
) -> None:
    sim, echo, trap = canary_upstreams
    tokens: dict[str, str] = {}
    ops: list[dict[str, Any]] = []

    def add(name: str, base_url: str) -> str:
        tokens[name] = canary()
        ops.append({"name": name, "server": f"wv{len(ops):04d}", "token": tokens[name], "base_url": base_url})
        return tokens[name]

    for mode in FAULT_MODES:
        token = add(f"sim-{mode}", sim.url)
        extra: dict[str, Any] = {}
        if mode == "redirect":
            extra["location"] = f"{trap.url}/steal?token={token}"
        elif mode in ("hang", "slow"):
            extra["seconds"] = 5 if mode == "hang" else 0.2
        sim.fault(mode, token=token, **extra)
    add("refused", f"http://127.0.0.1:{free_port()}")
    for kind in ECHO_KINDS:
        add(f"echo-{kind}", f"{echo.url}/{kind}")
    token_list = list(tokens.values())
    good = {
        "refresh_interval": "1s",
        "connect_timeout": "1s",
        "read_timeout": "1s",
        "max_body_bytes": 65536,
        "daily_request_limit": 10_000_000,  # every report each second
        "operations": ops,
    }
    exporter = start_exporter(good, "--log.format", log_format, log_level=log_level)

    # Every operation tried twice (token_limit backs off 12 intervals after its first answer).
    def tried(samples: Any) -> bool:
        return all(
            (value(samples, "wolkvox_scrape_requests_total", operation=op["name"]) or 0)
            >= (1 if op["name"] == "sim-token_limit" else 2)
            for op in ops
        )

    samples = exporter.wait_for(tried, timeout=30, what="every operation tried")
    assert value(samples, "wolkvox_up", operation="sim-none") == 1
    assert value(samples, "wolkvox_scrape_errors_total", operation="echo-json-msg", reason="auth") >= 1

    served: dict[str, str] = {}
    for path in ("/metrics", "/", "/-/ready", "/-/healthy", "/nope"):
        served[path] = exporter.get(path).text
    served["/metrics (gzip)"] = gzip.decompress(
        requests.get(
            f"{exporter.url}/metrics", headers={"Accept-Encoding": "gzip"}, stream=True, timeout=5
        ).raw.read()
    ).decode()
    reload_ok = requests.post(f"{exporter.url}/-/reload", timeout=10)
    assert reload_ok.status_code == 200
    served["/-/reload (ok)"] = reload_ok.text
    for what, document in bad_reload_documents(good, token_list[0]).items():
        exporter.config_path.write_text(document, encoding="utf-8")
        response = requests.post(f"{exporter.url}/-/reload", timeout=10)
        assert response.status_code == 500, what
        served[f"/-/reload ({what})"] = response.text
    # The same bad file through SIGHUP (only the log sees that one).
    exporter.process.proc.send_signal(signal.SIGHUP)
    failed_reloads = len(bad_reload_documents(good, token_list[0])) + 1
    wait_until(
        lambda: exporter.process.log().count("reload failed") >= failed_reloads, what="the SIGHUP reload"
    )
    served["/metrics (after failed reloads)"] = exporter.get("/metrics").text
    assert exporter.process.stop(timeout=15) == 0
    output = exporter.process.log()

    problems = [
        f"{where}: {leaks(text, token_list)}" for where, text in served.items() if leaks(text, token_list)
    ]
    if leaks(output, token_list):
        leaked_lines = [line for line in output.splitlines() if leaks(line, token_list)]
        problems.append(f"output: {leaked_lines[:5]}")
    assert not problems, "\n".join(problems)

    # The run did print what it should have, in the chosen format, and nothing else.
    lines = [line for line in output.splitlines() if line.strip()]
    for line in lines:
        if log_format == "json":
            record = json.loads(line)
            assert {"ts", "level", "logger", "msg"} <= record.keys(), line
        else:
            assert line.startswith("ts=") and " level=" in line, line
    assert "reload failed" in output
    if log_level == "debug":
        assert "fetch failed" in output and "<redacted>" in output
    else:
        assert "fetch failed" not in output


def test_an_echoed_token_is_never_shown_cut_off() -> None:
    """Bodies whose visible text starts with the token, placed so that the part of the body the client
    looks at for its error snippet may end inside the token: no head of it may survive, at any offset."""
    token = "CANARY-" + uuid.uuid4().hex
    secret = Secret(token)
    # _snippet reads 4 * 120 bytes plus 4 bytes per token character before redacting: try around there.
    cut = 4 * 120 + 4 * len(token)
    leaked = []
    for padding in range(cut - 45, cut + 6):
        for status, body in (
            (500, b" " * padding + token.encode() + b" tail"),
            (200, b"\n" * padding + token.encode() + b" not json"),
        ):
            with pytest.raises(FetchError) as info:
                parse_body(body, status, secret=secret)
            if leaks(info.value.detail, [token], window=8):
                leaked.append((status, padding, info.value.detail))
    assert not leaked, f"{len(leaked)} leaks, e.g. {leaked[:3]}"


# ===== 4. slow, stuck and flooding clients =============================================================


def slowloris(port: int, count: int) -> list[socket.socket]:
    """Connections that send half a request line and then nothing."""
    sockets = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        sockets.append(sock)
    return sockets


def non_readers(port: int, count: int, pipelined: int = 2000) -> list[socket.socket]:
    """Connections that ask for many pages at once and never read an answer."""
    sockets = []
    for _ in range(count):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, NON_READER_RCVBUF)
        sock.settimeout(5)
        sock.connect(("127.0.0.1", port))
        sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" * pipelined)
        sockets.append(sock)
    return sockets


NON_READER_RCVBUF = 4096


def max_socket_buffer() -> int:
    """The most the exporter's socket may buffer for sending, plus what a non-reader's socket holds
    (setting SO_RCVBUF turns autotuning off; the kernel doubles the value for bookkeeping)."""
    wmem = int(Path("/proc/sys/net/ipv4/tcp_wmem").read_text().split()[2])
    return wmem + 2 * NON_READER_RCVBUF


def close_all(sockets: list[socket.socket]) -> None:
    for sock in sockets:
        sock.close()


def timed_scrape(url: str, timeout: float = 2.0) -> float:
    started = time.monotonic()
    response = requests.get(f"{url}/metrics", timeout=timeout, headers={"Connection": "close"})
    elapsed = time.monotonic() - started
    assert response.status_code == 200 and "wolkvox_up" in response.text
    return elapsed


def test_slow_and_stuck_clients_cannot_stall_scrapes(
    simulator: Simulator, run_exporter: Callable[..., Exporter]
) -> None:
    exporter = run_exporter(exporter_config(simulator.url), max_connections=200)
    exporter.wait_for(lambda s: value(s, "wolkvox_up", operation="a") == 1)
    page = len(exporter.get("/metrics").content)
    port = exporter.port
    slow = slowloris(port, 50)
    stuck = non_readers(port, 5)
    try:
        # The stuck ones really are stuck: 2000 pages each cannot fit in the socket buffers.
        assert 2000 * page > max_socket_buffer()
        durations = [timed_scrape(exporter.url) for _ in range(30)]
        assert max(durations) < 2.0, durations
        # The landing page and health answer too, and the half-sent requests never got an answer.
        assert exporter.get("/-/healthy").status_code == 200
        for sock in slow[:5]:
            sock.setblocking(False)
            with pytest.raises(BlockingIOError):
                sock.recv(1)
    finally:
        close_all(slow + stuck)
    assert timed_scrape(exporter.url) < 2.0


def test_a_connection_flood_is_bounded_counted_and_recovers(run_exporter: Callable[..., Exporter]) -> None:
    """In-process: the test's own sockets are in this process too, so the exporter's share of the open
    files is what is open beyond the baseline and the flood's client sockets."""
    limit, flood = 20, 100
    exporter = run_exporter(exporter_config(f"http://127.0.0.1:{free_port()}"), max_connections=limit)
    pid = os.getpid()
    assert value(exporter.samples(), "wolkvox_exporter_connections_rejected_total") == 0
    baseline = fd_count(pid)
    sockets = [socket.create_connection(("127.0.0.1", exporter.port), timeout=5) for _ in range(flood)]
    try:

        def closed_by_server() -> int:
            closed = 0
            for sock in sockets:
                sock.setblocking(False)
                try:
                    if sock.recv(1) == b"":
                        closed += 1
                except BlockingIOError:
                    pass
                except ConnectionError:
                    closed += 1
            return closed

        # Every connection beyond the limit is closed at once by the exporter; the first `limit` are kept.
        wait_until(lambda: closed_by_server() >= flood - limit, timeout=10, what="the excess to be closed")
        assert closed_by_server() <= flood - limit + 2
        held = fd_count(pid) - flood  # the client ends are open in this process until close_all
        assert held <= baseline + limit + 5, (baseline, held)

        # The trade-off: while the limit is saturated by idle connections, a legitimate scrape is refused
        # at once (the connection is accepted and closed) rather than queued; it does not hang. (The
        # check above allows the server to have dropped up to two of the held ones, as a loaded machine
        # sometimes shows; then a slot is free and the scrape must be served at once instead.)
        saturated = flood - closed_by_server() >= limit
        started = time.monotonic()
        if saturated:
            with pytest.raises(requests.exceptions.ConnectionError):
                requests.get(f"{exporter.url}/metrics", timeout=5)
        else:
            assert requests.get(f"{exporter.url}/metrics", timeout=5).status_code == 200
        assert time.monotonic() - started < 2.0
    finally:
        close_all(sockets)

    wait_until(lambda: fd_count(pid) <= baseline + 2, timeout=10, what="sockets to be released")
    assert max(timed_scrape(exporter.url) for _ in range(10)) < 2.0
    # Each connection closed at the limit is counted (the refused scrape too, if there was one).
    refused = flood - limit + (1 if saturated else 0)
    samples = exporter.wait_for(
        lambda s: value(s, "wolkvox_exporter_connections_rejected_total") >= flood - limit,
        what="the refused connections counted",
    )
    assert flood - limit <= value(samples, "wolkvox_exporter_connections_rejected_total") <= refused + 2


# ===== 7. graceful shutdown ============================================================================


def test_sigint_stops_gracefully(simulator: Simulator, start_exporter: Callable[..., Exporter]) -> None:
    exporter = start_exporter(exporter_config(simulator.url))
    exporter.wait_for(lambda s: value(s, "wolkvox_up", operation="a") == 1)
    started = time.monotonic()
    exporter.process.proc.send_signal(signal.SIGINT)
    assert exporter.process.proc.wait(timeout=15) == 0
    assert time.monotonic() - started < 10
    log = exporter.process.log()
    assert "shutting down" in log and "stopped" in log
    assert "Traceback" not in log and "KeyboardInterrupt" not in log


def test_sigterm_stops_promptly_with_many_slow_clients_connected(
    simulator: Simulator, start_exporter: Callable[..., Exporter]
) -> None:
    exporter = start_exporter(exporter_config(simulator.url))
    exporter.wait_for(lambda s: value(s, "wolkvox_up", operation="a") == 1)
    process: Process = exporter.process
    port = process.port
    baseline = fd_count(process.proc.pid)
    clients = slowloris(port, 45) + non_readers(port, 5)
    try:
        wait_until(
            # (the baseline may include a scrape's socket that was closing)
            lambda: fd_count(process.proc.pid) >= baseline + 48,
            timeout=10,
            what="the exporter to hold the 50 clients",
        )
        started = time.monotonic()
        process.proc.send_signal(signal.SIGTERM)
        assert process.proc.wait(timeout=20) == 0
        elapsed = time.monotonic() - started
    finally:
        close_all(clients)
    assert elapsed < 10, elapsed
    log = process.log()
    assert "stopped" in log and "Traceback" not in log
