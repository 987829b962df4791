"""The newcomer's first steps, as the README gives them.

- the README's quick-start block (read from README.md, not copied here) runs as written with Debian's
  own, externally managed /usr/bin/python3 in a copy of the repository, and /metrics then shows
  wolkvox_stereo_rec_minutes; Ctrl-C (SIGINT) stops it;
- .ci/run runs the README's test command, line for line;
- ``python -m exporter.demo`` starts clean: its first lines say where to look, and no line is a warning;
- config.example.yaml passes ``--config.check`` as shipped with only the variables the README names.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
from pathlib import Path

import pytest
import requests
from harness import REPO, free_port, missing, repo_copy, run_cli, spawn, start_python, wait_until

README = REPO / "README.md"
SYSTEM_PYTHON = Path("/usr/bin/python3")
DEMO_PORTS = (19726, 19727)  # the quick start runs with the demo's default ports
QUICK_START_TIMEOUT = 300.0  # seconds: venv + pip install from the configured index + first fetch
WARNING_LINE = re.compile(r"level=(warn|error)|\b(WARNING|ERROR)\b")


def quick_start_block(marker: str) -> str:
    """The fenced block right after ``<!-- quick-start:MARKER ... -->`` in the README's Quick start."""
    text = README.read_text(encoding="utf-8")
    section = re.search(r"^## Quick start\n(.*?)(?=^## )", text, re.MULTILINE | re.DOTALL)
    assert section, "README.md has no '## Quick start' section"
    fence = rf"^<!-- quick-start:{marker}\b[^\n]*-->\n```sh\n(.*?)^```"
    block = re.search(fence, section.group(1), re.MULTILINE | re.DOTALL)
    assert block, f"no ```sh block marked <!-- quick-start:{marker} --> in the README's Quick start"
    return block.group(1).strip()


def test_ci_runs_the_readme_test_command() -> None:
    command = quick_start_block("test")
    assert "\n" not in command and "venv" in command
    ci_lines = (REPO / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    assert command in ci_lines, f".ci/run does not run the README's test command: {command}"


def test_quick_start_uses_a_virtual_environment() -> None:
    # A bare `pip install` is refused by an externally managed Python (PEP 668).
    for marker in ("run", "test"):
        command = quick_start_block(marker)
        assert command.startswith("python3 -m venv .venv && .venv/bin/pip install "), command
        assert "python3 -m pip" not in command, command


def _port_taken(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


@pytest.mark.slow
def test_readme_quick_start_runs_on_the_system_python(tmp_path: Path) -> None:
    command = quick_start_block("run")
    if not SYSTEM_PYTHON.exists():
        missing(f"{SYSTEM_PYTHON} not found: the quick start is tested with the distribution's Python")
    probe = subprocess.run([SYSTEM_PYTHON, "-c", "import ensurepip, venv"], capture_output=True, timeout=30)
    if probe.returncode != 0:
        missing(f"{SYSTEM_PYTHON} has no venv/ensurepip module: apt-get install python3-venv")
    taken = [port for port in DEMO_PORTS if _port_taken(port)]
    if taken:
        missing(f"port(s) {taken} on 127.0.0.1 in use: the README's quick start needs them")
    path = "/usr/bin:/bin:/usr/sbin:/sbin"
    assert shutil.which("python3", path=path) == str(SYSTEM_PYTHON)
    # The user's shell: the system interpreter first on PATH, no virtualenv or pyenv of ours leaking in.
    drop = {"VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME", "PYENV_VERSION", "PIP_USER", "PIP_PREFIX"}
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env["PATH"] = path
    checkout = tmp_path / "wolkvox-exporter"
    repo_copy(checkout)
    log_path = tmp_path / "quick-start.log"
    # Its own session, so Ctrl-C (SIGINT to the group) reaches the shell, the demo and the simulator.
    quick_start = spawn(
        ["bash", "-c", command], log_path, name="the quick start", cwd=checkout, env=env, group=True
    )
    try:

        def metrics() -> str | None:
            quick_start.check_alive()
            page = requests.get(f"http://127.0.0.1:{DEMO_PORTS[0]}/metrics", timeout=5).text
            return page if re.search(r"^wolkvox_stereo_rec_minutes\{", page, re.MULTILINE) else None

        page = wait_until(
            metrics, timeout=QUICK_START_TIMEOUT, interval=0.5, what="wolkvox_stereo_rec_minutes on /metrics"
        )
        assert 'wolkvox_stereo_rec_minutes{operation="bogota"}' in page
    finally:
        quick_start.stop(timeout=15, sig=signal.SIGINT)
    output = quick_start.log()
    proc = quick_start.proc
    assert proc.returncode in (0, -signal.SIGINT, 130), output[-4000:]
    assert (checkout / ".venv" / "bin" / "python").exists()
    demo_lines = output[output.index("wolkvox-exporter demo:") :].splitlines()
    assert not [line for line in demo_lines if WARNING_LINE.search(line)], output[-4000:]


def test_demo_starts_clean(tmp_path: Path) -> None:
    listen, simulator = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    demo = start_python(
        ["-m", "exporter.demo", "--web.listen-address", listen, "--simulator.listen-address", simulator],
        tmp_path / "demo.log",
    )
    try:
        lima = 'wolkvox_stereo_rec_minutes{operation="lima"}'
        wait_until(
            lambda: lima in requests.get(f"{demo.url}/metrics", timeout=5).text,
            timeout=20,
            what="the demo's first values",
        )
    finally:
        status = demo.stop()
    output = demo.log()
    assert status == 0, output
    head = "\n".join(output.splitlines()[:5])
    for where in (f"http://{listen}/metrics", f"http://{listen}/", f"http://{simulator}/"):
        assert where in head, f"{where} not in the demo's first lines:\n{head}"
    warnings = [line for line in output.splitlines() if WARNING_LINE.search(line)]
    assert not warnings, warnings


def test_example_config_checks_with_only_the_readme_variables() -> None:
    example = REPO / "config.example.yaml"
    variables = set(re.findall(r"\$\{(\w+)\}", example.read_text(encoding="utf-8")))
    readme = README.read_text(encoding="utf-8")
    assert variables, "the example shows no ${VAR}"
    assert all(name in readme for name in variables), variables
    # Nothing else of this test run's environment: only what a newcomer would set.
    env = {"PATH": os.environ["PATH"], **{name: "any-token-value" for name in variables}}
    if "PYTHONPATH" in os.environ:
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    done = run_cli("--config.file", str(example), "--config.check", env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "OK" in done.stdout + done.stderr
    assert not WARNING_LINE.search(done.stdout + done.stderr), done.stderr
