"""``python -m exporter.health``: is the exporter running here alive? The container image's HEALTHCHECK.

It asks ``/-/healthy`` where the exporter really listens, with the scheme it really serves: it reads the
running exporter's own ``--web.listen-address`` and ``--web.config.file`` from its command line
(``/proc/<pid>/cmdline``: PID 1 in a container, else the first process that is the exporter), so a port
or TLS set through the image's CMD, compose or Kubernetes needs no second setting. Flags given to this
command win over what it finds (for a host with several exporters: ``--pid`` or the flags themselves).

- A listen address on every interface (``:19726``, ``0.0.0.0:...``, ``[::]:...``) is asked on loopback.
- TLS: the connection is encrypted but the certificate is not checked (the exporter's own, on its own
  address; the check is of liveness, not identity). When the web config requires a client certificate,
  which this command does not have, a completed TLS handshake is the sign of life (the exporter's event
  loop answered it); /-/healthy cannot be asked then.
- ``/-/healthy`` needs no basic auth; proxies from the environment are ignored (it is a local call).

Exit status 0 healthy, 1 not (one line on stderr says why), 2 bad flags. Only the standard library and
the exporter's parsers of the listen address and the web config: no web server or client is imported.
"""

from __future__ import annotations

import argparse
import os
import socket
import ssl
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from exporter.config import parse_listen_address
from exporter.webconfig import WebConfigError
from exporter.weblive import load_web_config

DEFAULT_LISTEN_ADDRESS = ":19726"  # the exporter's own default (a test compares it with cli.py's)
TIMEOUT_SECONDS = 4.0  # under the image HEALTHCHECK's --timeout=5s
_LOOPBACK = {None: "127.0.0.1", "": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}


class Unhealthy(Exception):
    """Why the exporter is not healthy, in one line."""


def exporter_flags_parser() -> argparse.ArgumentParser:
    """The exporter's flags this command needs (same names, destinations and defaults as cli.py)."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--web.listen-address", dest="listen_address", default=None)
    parser.add_argument("--web.config.file", dest="web_config_file", default=None)
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m exporter.health",
        description="Exit 0 if the wolkvox-exporter running here answers /-/healthy, else 1. Without "
        "flags, the running exporter's own --web.listen-address and --web.config.file are used.",
        parents=[exporter_flags_parser()],
    )
    parser.add_argument("--pid", type=int, default=None, help="the exporter's process (default: found)")
    parser.add_argument("--timeout", type=float, default=TIMEOUT_SECONDS, help="seconds (default 4)")
    return parser


def is_exporter(argv: Sequence[str]) -> int | None:
    """Where the exporter's own arguments start in ``argv`` (a command line), or None if it is not the
    exporter: ``wolkvox-exporter ...``, ``python .../wolkvox-exporter ...``, ``python -m exporter.cli``."""
    if not argv:
        return None
    if os.path.basename(argv[0]) == "wolkvox-exporter":
        return 1
    if not os.path.basename(argv[0]).startswith("python"):
        return None
    if len(argv) > 1 and os.path.basename(argv[1]) == "wolkvox-exporter":
        return 2
    if list(argv[1:3]) == ["-m", "exporter.cli"]:
        return 3
    return None


def _cmdline(pid: int | str) -> list[str]:
    raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    return [part.decode("utf-8", "surrogateescape") for part in raw.split(b"\0")[:-1]]


def find_exporter(pid: int | None) -> tuple[list[str], Path | None]:
    """The running exporter's flags and working directory: of ``pid``, else PID 1 or the first exporter
    process; no exporter found: no flags (the defaults apply)."""
    candidates: list[int | str] = [pid] if pid is not None else [1]
    if pid is None:
        try:
            candidates += sorted((p for p in os.listdir("/proc") if p.isdigit()), key=int)
        except OSError:
            pass
    for candidate in candidates:
        if str(candidate) == str(os.getpid()):
            continue
        try:
            argv = _cmdline(candidate)
        except OSError:
            if candidate == pid:
                raise Unhealthy(f"no process {pid}") from None
            continue
        start = is_exporter(argv)
        if start is None:
            if candidate == pid:
                raise Unhealthy(f"process {pid} is not wolkvox-exporter")
            continue
        try:
            cwd: Path | None = Path(os.readlink(f"/proc/{candidate}/cwd"))
        except OSError:
            cwd = None
        return argv[start:], cwd
    return [], None


def health_url(listen_address: str, tls: bool) -> str:
    host, port = parse_listen_address(listen_address)
    host = _LOOPBACK.get(host, host)
    assert host is not None
    shown = f"[{host}]" if ":" in host else host
    return f"{'https' if tls else 'http'}://{shown}:{port}/-/healthy"


def check(listen_address: str, web_config_file: str | None, timeout: float) -> str:
    """Ask /-/healthy; returns the URL asked, or raises Unhealthy."""
    try:
        web_config = load_web_config(web_config_file)
        url = health_url(listen_address, web_config.ssl_context is not None)
    except (WebConfigError, ValueError) as error:
        raise Unhealthy(str(error)) from None
    handlers: list[urllib.request.BaseHandler] = [urllib.request.ProxyHandler({})]  # a local call
    if web_config.ssl_context is not None:
        if web_config.ssl_context.verify_mode == ssl.CERT_REQUIRED:
            return _handshake(url, timeout)
        handlers.append(urllib.request.HTTPSHandler(context=_unverified_client_context()))
    opener = urllib.request.build_opener(*handlers)
    try:
        with opener.open(url, timeout=timeout) as response:
            status = response.status
    except urllib.error.HTTPError as error:
        raise Unhealthy(f"{url}: HTTP {error.code}") from None
    except (urllib.error.URLError, OSError) as error:
        raise Unhealthy(f"{url}: {getattr(error, 'reason', error)}") from None
    if status != 200:
        raise Unhealthy(f"{url}: HTTP {status}")
    return url


def _unverified_client_context() -> ssl.SSLContext:
    """Encrypted, certificate not checked: the exporter's own certificate on its own address (this is a
    check of liveness, not of identity)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def _handshake(url: str, timeout: float) -> str:
    """A TLS handshake with the exporter, without a client certificate (it refuses the request after)."""
    parts = urllib.parse.urlsplit(url)
    assert parts.hostname is not None and parts.port is not None
    context = _unverified_client_context()
    try:
        with socket.create_connection((parts.hostname, parts.port), timeout=timeout) as raw:
            with context.wrap_socket(raw) as tls:
                tls.do_handshake()
    except OSError as error:
        raise Unhealthy(f"{url}: TLS handshake: {error.strerror or error}") from None
    return f"{url} (TLS handshake only: the web config requires a client certificate)"


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        found, cwd = find_exporter(args.pid)
        running, _ = exporter_flags_parser().parse_known_args(found)
        listen = args.listen_address or running.listen_address or DEFAULT_LISTEN_ADDRESS
        web_config = args.web_config_file if args.web_config_file is not None else running.web_config_file
        if web_config and cwd is not None and args.web_config_file is None:
            web_config = str(cwd / web_config)  # relative to where the exporter runs, not to us
        url = check(listen, web_config, args.timeout)
    except Unhealthy as error:
        print(f"unhealthy: {error}", file=sys.stderr)
        return 1
    print(f"healthy: {url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
