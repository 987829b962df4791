"""deploy/systemd/: the unit passes `systemd-analyze verify`, `systemd-analyze security --offline=yes`
rates it 2.0 or better ("OK"), and its command line, with the flags of the example environment file, is
one the exporter accepts. No systemd runs the unit here (CI has no init system to start it with)."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from harness import REPO, require, which

UNIT = REPO / "deploy" / "systemd" / "wolkvox-exporter.service"
ENV_FILE = REPO / "deploy" / "systemd" / "wolkvox-exporter.env"
INSTALLED = "/opt/wolkvox-exporter/bin/wolkvox-exporter"  # where docs/install.md puts the venv
MAX_EXPOSURE = 2.0


def directives(section: str) -> list[tuple[str, str]]:
    """(key, value) of a unit section in file order, repeated keys kept."""
    out: list[tuple[str, str]] = []
    current = ""
    for line in UNIT.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = line.strip("[]")
        elif current == section:
            key, _, value = line.partition("=")
            out.append((key, value))
    return out


def service() -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for key, value in directives("Service"):
        found.setdefault(key, []).append(value)
    return found


def env_file() -> dict[str, str]:
    values = {}
    for line in ENV_FILE.read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip()
    return values


def analyzable_unit(tmp_path: Path) -> Path:
    """The unit with the venv's location replaced by this test run's installed exporter (verify checks
    that ExecStart is executable); every other line as shipped."""
    installed = which("wolkvox-exporter")
    assert installed, "wolkvox-exporter is not installed in this environment (pip install -e '.[test]')"
    text = UNIT.read_text(encoding="utf-8")
    assert text.count(INSTALLED) == 1
    path = tmp_path / UNIT.name
    path.write_text(text.replace(INSTALLED, installed), encoding="utf-8")
    return path


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = require("systemd-analyze", "systemd")
    done = subprocess.run(
        [analyze, "verify", "--man=no", str(analyzable_unit(tmp_path))],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0 and not done.stderr.strip(), done.stdout + done.stderr


def test_systemd_analyze_security_is_ok(tmp_path: Path) -> None:
    analyze = require("systemd-analyze", "systemd")
    unit = analyzable_unit(tmp_path)
    done = subprocess.run(
        [analyze, "security", "--offline=yes", "--no-pager", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+) (\w+)", done.stdout)
    assert match, done.stdout[-3000:] + done.stderr
    exposure = float(match.group(1))
    print(f"exposure {exposure} {match.group(2)}")
    failed = [line for line in done.stdout.splitlines() if line.startswith("✗")]
    assert exposure <= MAX_EXPOSURE, f"exposure {exposure} above {MAX_EXPOSURE}:\n" + "\n".join(failed)


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("DynamicUser", "yes"),
        ("StateDirectory", "wolkvox-exporter"),
        ("WorkingDirectory", "/var/lib/wolkvox-exporter"),
        ("ExecReload", "/bin/kill -HUP $MAINPID"),
        ("Restart", "on-failure"),
        ("ProtectSystem", "strict"),
        ("PrivateTmp", "yes"),
        ("NoNewPrivileges", "yes"),
        ("RestrictAddressFamilies", "AF_INET AF_INET6 AF_UNIX"),
        ("CapabilityBoundingSet", ""),
    ],
)
def test_unit_settings(key: str, expected: str) -> None:
    assert service().get(key) == [expected]


def test_system_call_filter_keeps_what_the_exporter_calls() -> None:
    # setrlimit (the open-files limit) is in @resources: it must not be filtered out.
    filters = service()["SystemCallFilter"]
    assert filters[0] == "@system-service"
    assert not any("@resources" in f or "setrlimit" in f for f in filters[1:]), filters


def test_exec_start_with_the_example_flags_is_accepted(tmp_path: Path) -> None:
    """ExecStart as systemd would run it ($WOLKVOX_EXPORTER_FLAGS split on spaces), with --config.check
    and a config whose tokens come from the example environment file."""
    (exec_start,) = service()["ExecStart"]
    (env_file_setting,) = service()["EnvironmentFile"]
    assert env_file_setting == "/etc/wolkvox-exporter/wolkvox-exporter.env"
    environment = env_file()
    argv = shlex.split(exec_start)
    assert argv[0] == INSTALLED and argv[-1] == "$WOLKVOX_EXPORTER_FLAGS"
    flags = environment["WOLKVOX_EXPORTER_FLAGS"].split()
    tokens = sorted(k for k in environment if k.startswith("WOLKVOX_TOKEN_"))
    assert tokens
    config = tmp_path / "config.yml"
    config.write_text(
        "state_file: /var/lib/wolkvox-exporter/state.json\noperations:\n"
        + "".join(
            f"  - {{name: op{i}, server: wv{i}, token: '${{{token}}}'}}\n" for i, token in enumerate(tokens)
        ),
        encoding="utf-8",
    )
    args = [a.replace("/etc/wolkvox-exporter/config.yml", str(config)) for a in argv[1:-1]]
    done = subprocess.run(
        [sys.executable, "-m", "exporter.cli", *args, *flags, "--config.check"],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", **environment},
    )
    assert done.returncode == 0, done.stderr
    assert f"OK, {len(tokens)} operation(s)" in done.stdout
    for token in tokens:
        assert environment[token] not in done.stdout + done.stderr
