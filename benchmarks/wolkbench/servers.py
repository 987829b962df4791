"""Starting the servers the benchmark measures or talks to, and reading their pages.

The simulator and the exporter run from the checkout the children are started in (``--exporter-root``);
the references are prometheus_client (benchmarks/reference_server.py) and nginx serving saved bytes.
"""

from __future__ import annotations

import gzip
import math
import os
import re
import resource
import shutil
import sys
from pathlib import Path
from typing import Any

import requests
import yaml
from harness import Process, exporter_args, free_port, simulator_args

from exporter.client import default_max_connections
from exporter.config import DEFAULT_DAILY_REQUEST_LIMIT
from exporter.planner import DAY, plan_pace

from .processes import Children

NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None)
REFERENCE_SERVER = Path(__file__).resolve().parent.parent / "reference_server.py"
_UP_LINE = re.compile(rb'^wolkvox_up\{operation="([^"]*)"\} (\S+)$', re.M)


# ----------------------------------------------------------------------------------- simulator


def start_simulator(children: Children, name: str, *extra: str) -> Process:
    return children.start(name, [sys.executable, *simulator_args("--log.level", "warning", *extra)])


def sim_stats(sim: Process) -> dict[str, Any]:
    """The simulator's ``/-/stats``: requests, in-flight and violations per token and per report."""
    response = requests.get(f"{sim.url}/-/stats", timeout=30)
    response.raise_for_status()
    stats: dict[str, Any] = response.json()
    return stats


def sim_requests(sim: Process) -> int:
    return int(sim_stats(sim)["total_requests"])


def hang_everything(sim: Process) -> None:
    """Fault ``hang`` for every token: each upstream request hangs until the exporter's timeout."""
    requests.post(f"{sim.url}/-/faults", json={"mode": "hang", "token": "*"}, timeout=5).raise_for_status()


# ----------------------------------------------------------------------------------- exporter


def token_of(prefix: str, i: int) -> str:
    return f"{prefix}-token-{i:05d}"


def operation_of(i: int) -> str:
    return f"op-{i:05d}"


def write_exporter_config(
    path: Path, sim_url: str, n: int, prefix: str, apis: list[str] | None = None, **top: Any
) -> None:
    """One operation per token; ``top`` keys with the value None are left out (the exporter's default)."""
    operation: dict[str, Any] = {"apis": apis} if apis else {}
    config = {
        **{key: value for key, value in top.items() if value is not None},
        "operations": [
            {"server": operation_of(i), "token": token_of(prefix, i), "base_url": sim_url, **operation}
            for i in range(n)
        ],
    }
    dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
    path.write_text(yaml.dump(config, Dumper=dumper, sort_keys=False), encoding="utf-8")


def daily_limit_for(reports_per_token: int, interval: float) -> int | None:
    """The ``daily_request_limit`` a token with these reports needs to keep ``interval`` unstretched;
    None when the exporter's default budget already does (then the benchmark leaves it out)."""
    intervals = [interval] * reports_per_token
    if plan_pace(intervals, DEFAULT_DAILY_REQUEST_LIMIT).stretch <= 1.0:
        return None
    limit = math.ceil(1.2 * reports_per_token * DAY / interval) + reports_per_token
    assert plan_pace(intervals, limit).stretch <= 1.0
    return limit


def exporter_max_connections() -> int:
    """The exporter's default cap on upstream sockets: it raises its soft fd limit to the hard one."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    return default_max_connections(-1 if hard == resource.RLIM_INFINITY else hard)


def start_exporter(children: Children, name: str, config_path: Path) -> Process:
    argv = [sys.executable, *exporter_args(config_path, "--log.level", "info")]
    return children.start(name, argv, timeout=120.0)


# ----------------------------------------------------------------------------------- /metrics


def fetch_page(url: str, gzip_wanted: bool = True) -> tuple[bytes, bytes, dict[str, str]]:
    """GET /metrics as Prometheus does; returns (bytes on the wire, decoded page, headers)."""
    headers = {"Accept-Encoding": "gzip" if gzip_wanted else "identity"}
    with requests.get(f"{url}/metrics", headers=headers, stream=True, timeout=120) as response:
        response.raise_for_status()
        wire = response.raw.read(decode_content=False)
        got = dict(response.headers)
    plain = gzip.decompress(wire) if got.get("Content-Encoding") == "gzip" else wire
    return wire, plain, got


def up_values(page: bytes) -> dict[str, float]:
    """``wolkvox_up`` per operation on a page."""
    return {op.decode(): float(v) for op, v in _UP_LINE.findall(page)}


# ----------------------------------------------------------------------------------- references


def start_reference(children: Children, name: str, page_path: Path) -> Process:
    """Reference 1: the page's series as plain prometheus_client Gauges behind start_http_server."""
    argv = [
        sys.executable,
        str(REFERENCE_SERVER),
        "--page",
        str(page_path),
        "--port",
        "0",
        "--max-seconds",
        "600",
    ]
    return children.start(name, argv, timeout=120.0)


NGINX_CONF = """\
daemon off;
master_process off;
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    sendfile on;  # as in Debian's default nginx.conf
    tcp_nopush on;
    client_body_temp_path {prefix}/tmp/body;
    proxy_temp_path {prefix}/tmp/proxy;
    fastcgi_temp_path {prefix}/tmp/fastcgi;
    uwsgi_temp_path {prefix}/tmp/uwsgi;
    scgi_temp_path {prefix}/tmp/scgi;
    types {{ }}
    default_type "text/plain; version=0.0.4; charset=utf-8";
    keepalive_requests 1000000;
    server {{
        listen 127.0.0.1:{port};
        root {prefix}/www;
        location = /metrics {{
            gzip_static on;
            gzip_vary on;
        }}
    }}
}}
"""


def start_nginx(children: Children, plain: bytes) -> Process:
    """Reference 2: Debian's nginx (one worker) serving ``plain`` and its gzip from files."""
    prefix = children.workdir / "nginx"
    for sub in ("www", "tmp"):
        (prefix / sub).mkdir(parents=True, exist_ok=True)
    (prefix / "www" / "metrics").write_bytes(plain)
    # The exporter's own settings: level 6, mtime 0.
    (prefix / "www" / "metrics.gz").write_bytes(gzip.compress(plain, compresslevel=6, mtime=0))
    port = free_port()
    conf = prefix / "nginx.conf"
    conf.write_text(NGINX_CONF.format(prefix=prefix, port=port), encoding="utf-8")
    return children.start(
        "nginx",
        [NGINX or "nginx", "-e", str(prefix / "error.log"), "-p", str(prefix), "-c", str(conf)],
        ready=f"http://127.0.0.1:{port}/metrics",
        timeout=20.0,
    )
