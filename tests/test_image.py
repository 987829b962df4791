"""The container image, built from the Dockerfile and run as docker-compose.yml runs it, with podman (as
root). No container registry is reachable from CI, so the base image is a stand-in built from Debian
packages (``mmdebstrap --variant=minbase`` with python3, python3-venv, python-is-python3 and
ca-certificates, ``podman import``ed under the Dockerfile's FROM name); docs/install.md says what differs
from the real ``python:3.11-slim-bookworm``. Outside CI an image already under that name is reused (the
real one, or the stand-in of an earlier run); under CI=true the stand-in is built afresh.

What the machines need of podman (nothing under /etc is changed; a containers.conf of our own is named by
CONTAINERS_CONF): ``default_ulimits`` within this process's hard limits (root here lacks CAP_SYS_RESOURCE,
and podman's defaults for root are above them); the runc runtime (Debian's crun refuses the hybrid cgroup
hierarchy of these machines); the build's RUN steps get the CA bundle pip uses here mounted read-only
(PyPI is reached through a TLS-intercepting proxy; a build mount is not kept in the image); ``--format
docker`` keeps the HEALTHCHECK (the OCI format has none).
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml
from harness import REPO, free_port, in_ci, missing, parse_samples, require, value, wait_until

pytestmark = pytest.mark.slow

DOCKERFILE = REPO / "Dockerfile"
COMPOSE = yaml.safe_load((REPO / "docker-compose.yml").read_text(encoding="utf-8"))
EXPORTER_CONFIG = REPO / "compose" / "exporter.yml"
STATE_DIR = "/var/lib/wolkvox-exporter"
STAND_IN_LABEL = "org.wolkvox-exporter.stand-in-base"
PROJECT_LAYERS_GOAL = 25e6  # bytes above the base: the venv (the package and its dependencies)
STOP_SECONDS = 5.0


def base_image_name() -> str:
    """The final stage's FROM, fully qualified as podman stores it."""
    froms = [
        line.split()[1]
        for line in DOCKERFILE.read_text(encoding="utf-8").splitlines()
        if line.startswith("FROM ")
    ]
    name = froms[-1]
    return name if "/" in name else f"docker.io/library/{name}"


def ca_bundle() -> str:
    """The CA bundle pip uses on this machine (its proxy's CA is in it)."""
    for variable in ("PIP_CERT", "REQUESTS_CA_BUNDLE", "SSL_CERT_FILE"):
        if os.environ.get(variable) and os.path.isfile(os.environ[variable]):
            return os.environ[variable]
    done = subprocess.run(
        [sys.executable, "-m", "pip", "config", "get", "global.cert"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if done.returncode == 0 and os.path.isfile(done.stdout.strip()):
        return done.stdout.strip()
    return "/etc/ssl/certs/ca-certificates.crt"


def containers_conf(directory: Path) -> Path:
    """podman's settings for this machine; see the module's docstring."""
    _, nofile = resource.getrlimit(resource.RLIMIT_NOFILE)
    _, nproc = resource.getrlimit(resource.RLIMIT_NPROC)
    # Measured here: runc cannot set RLIMIT_NPROC above pid_max (32768) though the hard limit is higher.
    pid_max = int(Path("/proc/sys/kernel/pid_max").read_text().strip())
    nproc = min(nproc if nproc != resource.RLIM_INFINITY else pid_max, pid_max)
    nofile = nofile if nofile != resource.RLIM_INFINITY else 1048576
    path = directory / "containers.conf"
    path.write_text(
        "[containers]\n"
        f'default_ulimits = ["nofile={nofile}:{nofile}", "nproc={nproc}:{nproc}"]\n'
        'log_driver = "k8s-file"\n'
        "[engine]\n"
        'runtime = "runc"\n'
        'cgroup_manager = "cgroupfs"\n'
        'events_logger = "file"\n',
        encoding="utf-8",
    )
    return path


@dataclass
class Podman:
    binary: str
    env: dict[str, str]
    created: list[tuple[str, str]] = field(default_factory=list)  # (kind, name) to remove at the end

    def run(self, *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [self.binary, *args], capture_output=True, text=True, timeout=timeout, env=self.env, cwd=REPO
        )
        if check and done.returncode != 0:
            pytest.fail(f"podman {' '.join(args)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
        return done

    def exists(self, image: str) -> bool:
        return self.run("image", "exists", image, check=False).returncode == 0

    def inspect(self, *args: str) -> Any:
        return json.loads(self.run(*args).stdout)

    def cleanup(self) -> None:
        for kind, name in reversed(self.created):
            if kind == "container":
                self.run("rm", "--force", "--time", "0", name, check=False)
            elif kind == "image":
                self.run("rmi", "--force", name, check=False)
            else:
                self.run(kind, "rm", "--force", name, check=False)


@dataclass
class Built:
    podman: Podman
    image: str
    base: str
    stand_in: bool
    seconds: dict[str, float]


@pytest.fixture(scope="module")
def podman(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Podman]:
    binary = require("podman", "podman")
    require("runc", "runc")
    if os.geteuid() != 0:
        missing("the image test runs podman as root (as CI does)")
    directory = tmp_path_factory.mktemp("podman")
    env = {**os.environ, "CONTAINERS_CONF": str(containers_conf(directory))}
    tool = Podman(binary, env)
    yield tool
    tool.cleanup()


def build_stand_in_base(podman: Podman, name: str, directory: Path) -> None:
    mmdebstrap = require("mmdebstrap", "mmdebstrap")
    suite = name.rsplit("-", 1)[-1]  # python:3.11-slim-bookworm -> bookworm
    tarball = directory / "base.tar"
    packages = "python3,python3-venv,python-is-python3,ca-certificates"
    done = subprocess.run(
        [mmdebstrap, "--quiet", "--variant=minbase", f"--include={packages}", suite, str(tarball)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, f"mmdebstrap failed:\n{done.stderr[-3000:]}"
    if podman.exists(name):  # CI: replaced, not left behind untagged
        podman.run("rmi", name, check=False)
    podman.run(
        "import",
        "--change",
        "ENV=PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "--change",
        "ENV=LANG=C.UTF-8",
        "--change",
        'CMD=["python3"]',
        "--change",
        f"LABEL={STAND_IN_LABEL}=mmdebstrap-{suite}-minbase",
        str(tarball),
        name,
        timeout=300,
    )
    tarball.unlink()


@pytest.fixture(scope="module")
def built(podman: Podman, tmp_path_factory: pytest.TempPathFactory) -> Built:
    seconds: dict[str, float] = {}
    base = base_image_name()
    if in_ci() or not podman.exists(base):
        started = time.monotonic()
        build_stand_in_base(podman, base, tmp_path_factory.mktemp("base"))
        seconds["base"] = time.monotonic() - started
    labels = podman.inspect("image", "inspect", base)[0].get("Labels") or {}
    image = f"localhost/wolkvox-exporter:test-{uuid.uuid4().hex[:8]}"
    bundle = ca_bundle()
    started = time.monotonic()
    podman.created.append(("image", image))
    podman.run(
        "build",
        "--pull=never",
        "--format",
        "docker",
        "--layers=false",
        "--volume",
        f"{bundle}:/etc/ssl/certs/ca-certificates.crt:ro",
        "--tag",
        image,
        str(REPO),
        timeout=600,
    )
    seconds["build"] = time.monotonic() - started
    return Built(podman, image, base, STAND_IN_LABEL in labels, seconds)


# --------------------------------------------------------------------------- the image itself


def test_image_layers_runtime_and_state_directory(built: Built, record_property: Any) -> None:
    podman = built.podman
    (config,) = podman.inspect("image", "inspect", built.image)
    health = config.get("Healthcheck") or config["Config"].get("Healthcheck")
    assert health and health["Test"] == ["CMD", "python", "-m", "exporter.health"], health
    assert config["Config"]["User"] == "10001:0"
    # Sizes: the whole image, and the layers the Dockerfile adds above the base.
    (base,) = podman.inspect("image", "inspect", built.base)
    ours = config["Size"] - base["Size"]
    record_property("image_bytes", config["Size"])
    record_property("project_layer_bytes", ours)
    record_property("seconds", built.seconds)
    print(
        f"image {config['Size'] / 1e6:.1f} MB, project layers {ours / 1e6:.1f} MB, seconds {built.seconds}, "
        f"base {'stand-in' if built.stand_in else built.base}"
    )
    assert 0 < ours < PROJECT_LAYERS_GOAL, f"{ours / 1e6:.1f} MB above the base"
    # No pip or setuptools at run time; the state directory group 0 with the owner's rights; the CA
    # bundle mounted for the build is not in the image.
    probe = (
        "import importlib.util as u, json, os, hashlib; s = os.stat('/var/lib/wolkvox-exporter'); "
        "print(json.dumps({'pip': bool(u.find_spec('pip')), 'setuptools': bool(u.find_spec('setuptools')), "
        "'bin': sorted(os.listdir('/opt/venv/bin')), 'gid': s.st_gid, 'mode': s.st_mode & 0o777, "
        "'bundle': hashlib.sha256(open('/etc/ssl/certs/ca-certificates.crt', 'rb').read()).hexdigest()}))"
    )
    seen = json.loads(
        podman.run(
            "run", "--rm", "--network", "none", "--entrypoint", "python", built.image, "-c", probe
        ).stdout
    )
    assert not seen["pip"] and not seen["setuptools"], seen
    assert not [name for name in seen["bin"] if name.startswith(("pip", "easy_install"))], seen["bin"]
    assert seen["gid"] == 0 and seen["mode"] >> 3 & 0o7 == seen["mode"] >> 6 & 0o7 == 0o7, seen
    if built.stand_in:
        base_bundle = podman.run(
            "run", "--rm", "--network", "none", built.base, "sha256sum", "/etc/ssl/certs/ca-certificates.crt"
        ).stdout.split()[0]
        assert seen["bundle"] == base_bundle, "the build's CA bundle mount was kept in the image"


# --------------------------------------------------------------------------- run as compose runs it


@pytest.fixture
def network(built: Built) -> str:
    name = f"wvx-{uuid.uuid4().hex[:8]}"
    built.podman.run("network", "create", name)
    built.podman.created.append(("network", name))
    return name


def start_simulator(built: Built, network: str) -> str:
    """The compose `simulator` service: its entrypoint and command, reachable as `simulator`."""
    service = COMPOSE["services"]["simulator"]
    name = f"wvx-sim-{uuid.uuid4().hex[:8]}"
    built.podman.created.append(("container", name))
    built.podman.run(
        "run",
        "--detach",
        "--name",
        name,
        "--network",
        network,
        "--network-alias",
        "simulator",
        "--read-only",
        "--health-interval",
        "disable",
        "--entrypoint",
        service["entrypoint"][0],
        built.image,
        *service["entrypoint"][1:],
        *service["command"],
    )
    return name


def start_exporter(built: Built, network: str, *args: str, command: tuple[str, ...] = ()) -> tuple[str, str]:
    """The compose `exporter` service (its config mount, the image's entrypoint), read-only root
    filesystem; published on a free loopback port. Returns (container name, base URL)."""
    port = free_port()
    name = f"wvx-exp-{uuid.uuid4().hex[:8]}"
    built.podman.created.append(("container", name))
    listen = next(
        (c for c in command if c.startswith("--web.listen-address=")), "--web.listen-address=:19726"
    )
    container_port = listen.rsplit(":", 1)[1]
    built.podman.run(
        "run",
        "--detach",
        "--name",
        name,
        "--network",
        network,
        "--read-only",
        # podman schedules health checks through systemd timers; here `podman healthcheck run` runs it.
        "--health-interval",
        "disable",
        "--publish",
        f"127.0.0.1:{port}:{container_port}",
        *args,
        built.image,
        *command,
    )
    return name, f"http://127.0.0.1:{port}"


def wait_for_gauge(built: Built, name: str, url: str) -> None:
    def gauge() -> float | None:
        state = built.podman.inspect("inspect", "--type", "container", name)[0]["State"]
        if not state["Running"]:
            pytest.fail(f"{name} exited: {built.podman.run('logs', name, check=False).stderr[-3000:]}")
        samples = parse_samples(requests.get(f"{url}/metrics", timeout=5).text)
        return value(samples, "wolkvox_stereo_rec_minutes", operation="bogota")

    wait_until(lambda: gauge() is not None, timeout=30, interval=0.2, what=f"the gauge on {url}/metrics")


def stop_with_sigterm(built: Built, name: str) -> None:
    started = time.monotonic()
    built.podman.run("kill", "--signal", "TERM", name)
    status = built.podman.run("wait", name, timeout=30).stdout.strip()
    took = time.monotonic() - started
    logs = built.podman.run("logs", name, check=False)
    assert status == "0", f"exit status {status} after SIGTERM:\n{logs.stdout[-2000:]}{logs.stderr[-2000:]}"
    assert took <= STOP_SECONDS, f"SIGTERM took {took:.1f}s"


def healthcheck(built: Built, name: str) -> int:
    return built.podman.run("healthcheck", "run", name, check=False).returncode


def test_compose_services_from_the_image(built: Built, network: str) -> None:
    exporter_service = COMPOSE["services"]["exporter"]
    (mount,) = [v for v in exporter_service["volumes"] if v.startswith("./compose/exporter.yml:")]
    _, target, mode = mount.split(":")
    start_simulator(built, network)
    name, url = start_exporter(built, network, "--volume", f"{EXPORTER_CONFIG}:{target}:{mode}")
    wait_for_gauge(built, name, url)
    assert healthcheck(built, name) == 0, "the image's HEALTHCHECK fails on a running exporter"
    # The same command, asked of a port nothing listens on, fails: the check can fail.
    probe = built.podman.run(
        "exec", name, "python", "-m", "exporter.health", "--web.listen-address=:9", check=False
    )
    assert probe.returncode == 1 and "unhealthy" in probe.stderr, probe
    stop_with_sigterm(built, name)


def test_arbitrary_uid_in_group_0_with_state_on_the_image_state_directory(
    built: Built, network: str, tmp_path: Path
) -> None:
    """As OpenShift runs it: a uid the image does not know, group 0; the state directory a fresh named
    volume (podman copies the image directory's owner and mode into it); another port, which the
    HEALTHCHECK must find by itself."""
    config = yaml.safe_load(EXPORTER_CONFIG.read_text(encoding="utf-8"))
    config["state_store"] = f"{STATE_DIR}/state.db"
    config_path = tmp_path / "config.yml"
    config_path.write_text(yaml.safe_dump(config), encoding="utf-8")
    config_path.chmod(0o644)
    volume = f"wvx-state-{uuid.uuid4().hex[:8]}"
    built.podman.run("volume", "create", volume)
    built.podman.created.append(("volume", volume))
    start_simulator(built, network)
    uid = 1000_170_000 + int(uuid.uuid4().int % 9999)
    name, url = start_exporter(
        built,
        network,
        "--user",
        f"{uid}:0",
        "--volume",
        f"{config_path}:/etc/wolkvox-exporter/config.yml:ro",
        "--volume",
        f"{volume}:{STATE_DIR}",
        command=("--web.listen-address=:19800", "--log.level=info"),
    )
    wait_for_gauge(built, name, url)
    assert healthcheck(built, name) == 0, "the HEALTHCHECK does not follow --web.listen-address"
    stop_with_sigterm(built, name)
    mountpoint = Path(built.podman.inspect("volume", "inspect", volume)[0]["Mountpoint"])
    state = mountpoint / "state.db"
    assert state.is_file(), f"no state file in the volume: {sorted(p.name for p in mountpoint.iterdir())}"
    assert state.stat().st_uid == uid
    # The operations' state is in it (JSON or any other store: the name is stored as UTF-8 either way).
    assert any(b"bogota" in path.read_bytes() for path in mountpoint.iterdir() if path.is_file())
