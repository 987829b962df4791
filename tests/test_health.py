"""``python -m exporter.health`` (the image's HEALTHCHECK): the listen address and scheme it asks, TLS with
and without a required client certificate, the flags it reads from the running exporter's command line.
The plain-HTTP case with the Dockerfile's exact command is in test_stack_files.py."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from harness import Exporter, free_port, spawn, wait_until

from exporter import cli, health

CONFIG = {
    "operations": [{"name": "hc", "server": "wv1", "token": "hc-token", "base_url": "http://127.0.0.1:9"}]
}


def test_reads_the_exporters_flags_with_its_defaults() -> None:
    exporter = cli.build_parser()
    ours = health.exporter_flags_parser()
    for action in ours._actions:
        (theirs,) = [a for a in exporter._actions if a.dest == action.dest]
        assert theirs.option_strings == action.option_strings
    assert exporter.get_default("listen_address") == health.DEFAULT_LISTEN_ADDRESS
    assert exporter.get_default("web_config_file") is None


@pytest.mark.parametrize(
    ("argv", "start"),
    [
        (["/opt/venv/bin/python", "/opt/venv/bin/wolkvox-exporter", "--config.file=x"], 2),
        (["wolkvox-exporter", "--web.listen-address=:1"], 1),
        (["/usr/bin/python3", "-m", "exporter.cli", "--config.file", "x"], 3),
        (["/usr/bin/python3", "-m", "exporter.simulator"], None),
        (["/usr/bin/python3", "exporter.cli"], None),
        (["less", "/usr/bin/wolkvox-exporter"], None),
        (["/usr/bin/python3", "-X", "dev", "-m", "exporter.cli"], None),  # interpreter options: --pid
        ([], None),
    ],
)
def test_recognises_the_exporters_command_line(argv: list[str], start: int | None) -> None:
    assert health.is_exporter(argv) == start


@pytest.mark.parametrize(
    ("listen", "tls", "url"),
    [
        (":19726", False, "http://127.0.0.1:19726/-/healthy"),
        ("0.0.0.0:9100", True, "https://127.0.0.1:9100/-/healthy"),
        ("[::]:9100", False, "http://[::1]:9100/-/healthy"),
        ("10.1.2.3:80", False, "http://10.1.2.3:80/-/healthy"),
        ("[fd00::1]:80", True, "https://[fd00::1]:80/-/healthy"),
    ],
)
def test_asks_every_interface_address_on_loopback(listen: str, tls: bool, url: str) -> None:
    assert health.health_url(listen, tls) == url


def write_web_config(path: Path, pki: Path, client_auth: bool) -> Path:
    tls = {"cert_file": str(pki / "server.crt"), "key_file": str(pki / "server.key")}
    if client_auth:
        tls |= {"client_auth_type": "RequireAndVerifyClientCert", "client_ca_file": str(pki / "ca.crt")}
    path.write_text(yaml.safe_dump({"tls_server_config": tls}), encoding="utf-8")
    return path


@pytest.mark.parametrize("client_auth", [False, True], ids=["tls", "client-cert-required"])
def test_tls(
    run_exporter: Callable[..., Exporter],
    pki: Path,
    tmp_path: Path,
    client_auth: bool,
    capsys: pytest.CaptureFixture[str],
) -> None:
    web = write_web_config(tmp_path / "web.yml", pki, client_auth)
    exporter = run_exporter(CONFIG, web_config_file=str(web))
    listen = f"127.0.0.1:{exporter.port}"
    assert health.main(["--web.listen-address", listen, "--web.config.file", str(web)]) == 0
    assert f"healthy: https://{listen}/-/healthy" in capsys.readouterr().out
    # Plain HTTP to a TLS port is not healthy: the scheme comes from the web config.
    assert health.main(["--web.listen-address", listen, "--web.config.file", ""]) == 1
    assert "unhealthy: http://" in capsys.readouterr().err
    exporter.stop()
    assert health.main(["--web.listen-address", listen, "--web.config.file", str(web)]) == 1
    assert "unhealthy: https://" in capsys.readouterr().err


def test_finds_port_and_tls_of_a_running_exporter_relative_to_its_directory(
    pki: Path, tmp_path: Path
) -> None:
    """Only ``--pid``: the port, the web config (a path relative to the exporter's working directory, not
    to the health command's) and so the scheme all come from the exporter's command line."""
    write_web_config(tmp_path / "web.yml", pki, client_auth=False)
    (tmp_path / "config.yml").write_text(yaml.safe_dump(CONFIG), encoding="utf-8")
    port = free_port()
    args = ["-m", "exporter.cli", "--config.file=config.yml", "--web.config.file", "web.yml"]
    child = spawn(
        [sys.executable, *args, f"--web.listen-address=127.0.0.1:{port}"], tmp_path / "exp.log", cwd=tmp_path
    )
    command = [sys.executable, "-m", "exporter.health", "--pid", str(child.proc.pid)]
    try:

        def healthy() -> subprocess.CompletedProcess[str]:
            child.check_alive()
            done = subprocess.run(command, capture_output=True, text=True, timeout=30, cwd="/")
            return done if done.returncode == 0 else None  # type: ignore[return-value]

        done = wait_until(healthy, timeout=30, interval=0.2, what="the health command to succeed")
        assert done.stdout.strip() == f"healthy: https://127.0.0.1:{port}/-/healthy"
    finally:
        child.stop()


def test_a_process_that_is_not_the_exporter_is_a_one_line_error(tmp_path: Path) -> None:
    other = spawn(["sleep", "60"], tmp_path / "sleep.log")
    try:
        done = subprocess.run(
            [sys.executable, "-m", "exporter.health", "--pid", str(other.proc.pid)],
            capture_output=True,
            text=True,
            timeout=30,
        )
    finally:
        other.stop()
    assert done.returncode == 1
    assert done.stderr.strip() == f"unhealthy: process {other.proc.pid} is not wolkvox-exporter"
