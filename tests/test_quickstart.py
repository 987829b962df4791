"""The newcomer's first steps, as the README gives them.

- the README's quick-start block (read from README.md, not copied here) runs as written with Debian's
  own, externally managed /usr/bin/python3 in a copy of the repository, and /metrics then shows
  wolkvox_stereo_rec_minutes; Ctrl-C (SIGINT) stops it;
- .ci/run runs the README's test command, line for line;
- ``python -m exporter.demo`` starts clean: its first lines say where to look, and no line is a warning;
  it shows the whole bill (every metric the rules and dashboards read, a closed month included), and its
  banner's curl commands make one operation fail and recover;
- config.example.yaml passes ``--config.check`` as shipped with only the variables the README names.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
from pathlib import Path

import pytest
import requests
import yaml
from harness import REPO, Simulator, free_port, missing, repo_copy, run_cli, spawn, start_python, wait_until

from exporter.config import load_config
from exporter.demo import FAULT_OPERATION, demo_config, demo_token, fault_commands
from exporter.model import BILLING_APIS

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
    wanted = read_by_rules_and_dashboards() - ONLY_WHILE_FAILING
    try:

        def missing_names() -> set[str]:
            page = requests.get(f"{demo.url}/metrics", timeout=5).text
            return wanted - set(re.findall(r"^(wolkvox_\w+)[{ ]", page, re.MULTILINE))

        # The month closes with the second round (15 s): until then the previous-month series are missing.
        wait_until(lambda: not missing_names(), timeout=60, what=f"the whole bill on /metrics: {wanted}")
    finally:
        status = demo.stop()
    output = demo.log()
    assert status == 0, output
    head = "\n".join(output.splitlines()[:5])
    for where in (f"http://{listen}/metrics", f"http://{listen}/", f"http://{simulator}/"):
        assert where in head, f"{where} not in the demo's first lines:\n{head}"
    for command in fault_commands(simulator):
        assert f"\n  {command}\n" in output, output
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


# Series that exist only while something fails (the demo starts healthy).
ONLY_WHILE_FAILING = {"wolkvox_last_error_info"}


def read_by_rules_and_dashboards() -> set[str]:
    """The exporter's own metric names that the alert/recording rules and the dashboards read (recorded
    series, named ``level:metric:operation``, excluded)."""
    texts = [(REPO / "prometheus" / "rules").glob("*.yml"), [REPO / "grafana" / "dashboards.py"]]
    names: set[str] = set()
    for group in texts:
        for path in group:
            names |= set(re.findall(r"(?<![:\w])wolkvox_[a-z0-9_]+", path.read_text(encoding="utf-8")))
    return names - {"wolkvox_runbook_url"}  # an external label of Prometheus' (the alerts' runbook link)


def test_demo_config_is_the_whole_bill(tmp_path: Path) -> None:
    path = tmp_path / "demo.yml"
    path.write_text(yaml.safe_dump(demo_config("http://127.0.0.1:9")), encoding="utf-8")
    config = load_config(path, {})
    assert config.warnings == ()  # no unknown api, no unused price or budget
    assert config.token_info_interval is not None
    for op in config.operations:
        assert dict(op.prices).keys() >= set(op.apis), op.name  # every report has a cost
    budgets = [(op.budget_minutes is not None, op.cost_budget is not None) for op in config.operations]
    assert (True, True) in budgets and (False, False) in budgets  # budgeted, and the "not configured" info
    assert len({api for op in config.operations for api in op.apis}) >= 6
    assert any(BILLING_APIS[api].kind == "level" for op in config.operations for api in op.apis)


def _curl(command: str) -> requests.Response:
    """Run one of the banner's curl commands (-s, -X, -H, -d and a URL) with requests."""
    words = shlex.split(command)
    assert words[0] == "curl"
    method, headers, data, url = "GET", {}, None, None
    rest = iter(words[1:])
    for word in rest:
        if word == "-X":
            method = next(rest)
        elif word == "-H":
            name, _, value = next(rest).partition(": ")
            headers[name] = value
        elif word == "-d":
            data = next(rest)
        elif word != "-s":
            url = word
    assert url is not None, command
    return requests.request(method, url, headers=headers, data=data, timeout=5)


def test_the_banners_curl_commands_make_one_operation_fail_and_recover(simulator: Simulator) -> None:
    address = simulator.url.removeprefix("http://")
    fail, recover = fault_commands(address)
    token = demo_token(FAULT_OPERATION)
    lima = next(op for op in demo_config(simulator.url)["operations"] if op["name"] == FAULT_OPERATION)
    assert lima["token"] == token and token in fail and token in recover  # the demo's own, fake token
    billing = f"{simulator.url}/api/v2/billing.php?api=stereo_rec"

    def answer() -> str:
        return requests.get(billing, headers={"wolkvox-token": token}, timeout=5).text

    assert "Information found" in answer()
    assert _curl(fail).status_code == 200
    assert "PLEASE VALIDATE TOKEN" in answer() and "PLEASE VALIDATE TOKEN" in answer()  # until repaired
    other = requests.get(billing, headers={"wolkvox-token": demo_token("bogota")}, timeout=5).text
    assert "Information found" in other  # only that operation
    assert _curl(recover).status_code == 200
    assert "Information found" in answer()
