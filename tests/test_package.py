"""The package as users get it: the wheel and the sdist built as a release would build them (`python -m
build`), their metadata through `twine check`, the wheel installed into a fresh virtual environment
outside the checkout, and the exporter, the simulator and the demo run from another directory (where the
checkout is not on the module path, so a package missing from the wheel shows). And one version
everywhere: the package, `--version`, `wolkvox_exporter_build_info`, CHANGELOG.md and the image tag the
Kubernetes kustomization names.
"""

from __future__ import annotations

import importlib.metadata
import re
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import requests
import yaml
from harness import (
    REPO,
    Exporter,
    free_port,
    parse_samples,
    repo_copy,
    run_cli,
    start_program,
    value,
    wait_until,
)

from exporter import __version__

BUILD_TIMEOUT = 300.0  # seconds: an isolated build environment (setuptools from the index) per artifact


def changelog_version() -> str:
    text = (REPO / "CHANGELOG.md").read_text(encoding="utf-8")
    match = re.search(r"^## (\S+)", text, re.MULTILINE)
    assert match, "CHANGELOG.md has no '## <version>' heading"
    return match.group(1)


def test_version_agrees_everywhere(run_exporter: Callable[..., Exporter], tmp_path: Path) -> None:
    assert re.fullmatch(r"\d+\.\d+\.\d+", __version__), __version__
    assert changelog_version() == __version__, "CHANGELOG.md's newest heading names another version"
    assert importlib.metadata.version("wolkvox-exporter") == __version__, (
        "the installed metadata is stale: pip install -e '.[test]' again"
    )
    assert run_cli("--version").stdout.strip() == f"wolkvox-exporter {__version__}"
    # The version in install commands and image tags of the documentation.
    mentions = 0
    for path in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        named = re.findall(r"wolkvox[_-]exporter[-:](\d+\.\d+\.\d+)", path.read_text(encoding="utf-8"))
        assert set(named) <= {__version__}, f"{path.name} names version(s) {sorted(set(named))}"
        mentions += len(named)
    assert mentions, "no versioned install command or image tag found in the documentation"
    kustomization = yaml.safe_load((REPO / "deploy/kubernetes/kustomization.yaml").read_text("utf-8"))
    assert [image["newTag"] for image in kustomization["images"]] == [__version__]
    exporter = run_exporter(
        {
            "operations": [
                {"name": "v", "server": "wv1", "token": "t", "base_url": f"http://127.0.0.1:{free_port()}"}
            ]
        }
    )
    assert value(exporter.samples(), "wolkvox_exporter_build_info", version=__version__) == 1


# --------------------------------------------------------------------------- the built artifacts


def run(args: list[str], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(args, capture_output=True, text=True, timeout=timeout, cwd=cwd)
    assert done.returncode == 0, f"{' '.join(args)} failed:\n{done.stdout[-3000:]}{done.stderr[-3000:]}"
    return done


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sdist and, built from it (as `python -m build` does), the wheel; from the tracked files only,
    as a fresh clone or the image's build context has them (the checkout's *.egg-info from the editable
    install would otherwise tell setuptools of files its configuration leaves out)."""
    checkout = tmp_path_factory.mktemp("checkout")
    repo_copy(checkout)
    out = tmp_path_factory.mktemp("dist")
    run([sys.executable, "-m", "build", "--outdir", str(out), str(checkout)], cwd=out, timeout=BUILD_TIMEOUT)
    return out


def artifact(dist: Path, pattern: str) -> Path:
    (found,) = dist.glob(pattern)
    return found


def test_artifacts_pass_twine_check(dist: Path) -> None:
    files = [str(artifact(dist, "*.whl")), str(artifact(dist, "*.tar.gz"))]
    done = run([sys.executable, "-m", "twine", "check", "--strict", *files], cwd=dist)
    assert done.stdout.count("PASSED") == 2, done.stdout


def test_wheel_holds_every_package_and_nothing_else(dist: Path) -> None:
    wheel = artifact(dist, f"wolkvox_exporter-{__version__}-py3-none-any.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    sources = {
        path.relative_to(REPO).as_posix()
        for path in (REPO / "exporter").rglob("*")
        if path.suffix in {".py", ".typed"} and "__pycache__" not in path.parts
    }
    assert "exporter/simulator/__main__.py" in sources
    assert sources <= names, f"left out of the wheel: {sorted(sources - names)}"
    top = {name.split("/")[0] for name in names}
    assert top == {"exporter", f"wolkvox_exporter-{__version__}.dist-info"}, top


def test_installed_wheel_runs_outside_the_checkout(dist: Path, tmp_path: Path) -> None:
    """A fresh virtual environment in a temporary directory, the wheel installed (its dependencies from
    the configured index), everything run from a directory that is not the checkout."""
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", str(venv)], cwd=tmp_path)
    python, exporter = venv / "bin" / "python", venv / "bin" / "wolkvox-exporter"
    wheel = artifact(dist, "*.whl")
    run([str(python), "-m", "pip", "install", "--quiet", str(wheel)], cwd=tmp_path, timeout=BUILD_TIMEOUT)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    where = run(
        [str(python), "-c", "import exporter.simulator; print(exporter.simulator.__file__)"], elsewhere
    )
    assert Path(where.stdout.strip()).is_relative_to(venv), where.stdout
    assert run([str(exporter), "--version"], elsewhere).stdout.strip() == f"wolkvox-exporter {__version__}"

    simulator = start_program(
        [str(python), "-m", "exporter.simulator", "--web.listen-address", "127.0.0.1:0"],
        tmp_path / "simulator.log",
        name="simulator",
        cwd=elsewhere,
    )
    try:
        config = {
            "operations": [
                {"name": "wheel", "server": "wv1", "token": "wheel-token", "base_url": simulator.url}
            ]
        }
        (elsewhere / "config.yml").write_text(yaml.safe_dump(config), encoding="utf-8")
        checked = run([str(exporter), "--config.check", "--config.file", "config.yml"], elsewhere)
        assert "config.yml: OK, 1 operation(s)" in checked.stdout
        assert requests.get(f"{simulator.url}/-/healthy", timeout=5).status_code == 200
    finally:
        assert simulator.stop() == 0

    listen, simulator_listen = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    flags = ["--web.listen-address", listen, "--simulator.listen-address", simulator_listen]
    demo = start_program(
        [str(python), "-m", "exporter.demo", *flags],
        tmp_path / "demo.log",
        name="demo",
        cwd=elsewhere,
        ready=f"http://{listen}/-/healthy",  # its simulator logs a 'listening on' line too
    )
    try:

        def lima_minutes() -> bool:
            demo.check_alive()
            page = requests.get(f"http://{listen}/metrics", timeout=5).text
            return any(
                name == "wolkvox_stereo_rec_minutes" and dict(labels).get("operation") == "lima"
                for name, labels in parse_samples(page)
            )

        wait_until(lima_minutes, timeout=30, what="the demo's first stereo_rec value")
    finally:
        assert demo.stop() == 0
