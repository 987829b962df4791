"""deploy/systemd/: the unit passes `systemd-analyze verify`, `systemd-analyze security --offline=yes`
rates it 2.0 or better ("OK"), and its command line, with the flags of the example environment file, is
one the exporter accepts. No systemd runs the unit here (CI has no init system to start it with)."""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import requests
from harness import REPO, exporter_args, free_port, require, spawn, wait_until, which

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
        "state_store: /var/lib/wolkvox-exporter/state.db\noperations:\n"
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


# --------------------------------------------------------------------------- the system call filter


def syscall_groups(analyze: str) -> dict[str, list[str]]:
    """systemd's system call groups as this systemd knows them: name -> members (calls and @groups)."""
    listing = subprocess.run(
        [analyze, "syscall-filter", "--no-pager"], capture_output=True, text=True, timeout=60
    ).stdout
    groups: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in listing.splitlines():
        if line.startswith("@"):
            current = groups.setdefault(line.strip(), [])
        elif line.startswith("    ") and current is not None and not line.strip().startswith("#"):
            current.append(line.strip())
        elif not line.startswith("    "):
            current = None
    return groups


def expand(groups: dict[str, list[str]], name: str) -> set[str]:
    calls: set[str] = set()
    for member in groups[name]:
        calls |= expand(groups, member) if member.startswith("@") else {member}
    return calls


def allowed_system_calls(analyze: str) -> set[str]:
    """What the unit's SystemCallFilter= lines allow: the first an allow list, the rest (~) deny lists."""
    groups = syscall_groups(analyze)
    allowed: set[str] = set()
    for line in service()["SystemCallFilter"]:
        deny = line.startswith("~")
        names = set()
        for item in line.lstrip("~").split():
            names |= expand(groups, item) if item.startswith("@") else {item}
        allowed = allowed - names if deny else allowed | names
    return allowed


def test_exporter_system_calls_stay_inside_the_units_filter(tmp_path: Path) -> None:
    """The exporter under strace (its config child too) through start, a scrape, a SIGHUP reload and
    SIGTERM: every system call it makes is one SystemCallFilter= allows (a refused one would get EPERM),
    and none is refused by MemoryDenyWriteExecute=."""
    analyze = require("systemd-analyze", "systemd")
    strace = require("strace", "strace")
    allowed = allowed_system_calls(analyze)
    assert {"read", "setrlimit", "prlimit64", "madvise"} <= allowed and "reboot" not in allowed
    config = tmp_path / "config.yml"
    config.write_text(
        "operations:\n  - {name: sc, server: wv1, token: sc-token, base_url: 'http://127.0.0.1:9'}\n",
        encoding="utf-8",
    )
    trace = tmp_path / "strace.out"
    port = free_port()
    exporter = [sys.executable, *exporter_args(config, listen=f"127.0.0.1:{port}")]
    traced = spawn(
        [strace, "-f", "-qq", "-o", str(trace), *exporter], tmp_path / "exporter.log", name="strace"
    )
    try:
        traced.wait_listening(timeout=30)
        children = Path(f"/proc/{traced.proc.pid}/task/{traced.proc.pid}/children").read_text().split()
        (pid,) = (int(child) for child in children)
        assert requests.get(f"{traced.url}/metrics", timeout=5).status_code == 200
        os.kill(pid, signal.SIGHUP)
        wait_until(lambda: "configuration reloaded" in traced.log(), timeout=20, what="the reload")
        os.kill(pid, signal.SIGTERM)
        assert traced.proc.wait(timeout=20) == 0, traced.log(3000)
    finally:
        traced.stop()
    lines = trace.read_text(encoding="utf-8", errors="replace").splitlines()
    used = {match.group(1) for line in lines if (match := re.match(r"\d+\s+([a-z0-9_]+)\(", line))}
    assert len(used) > 20, sorted(used)
    assert not used - allowed, f"system calls outside the unit's filter: {sorted(used - allowed)}"
    # MemoryDenyWriteExecute=yes refuses writable and executable mappings, and mprotect to executable.
    assert service()["MemoryDenyWriteExecute"] == ["yes"]
    write_exec = [
        line
        for line in lines
        if re.search(r"\b(mprotect|pkey_mprotect)\(.*PROT_EXEC", line)
        or (re.search(r"\bmmap\(", line) and "PROT_EXEC" in line and "PROT_WRITE" in line)
    ]
    assert not write_exec, write_exec[:5]
