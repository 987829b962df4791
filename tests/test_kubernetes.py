"""deploy/kubernetes: the kustomization builds, and what it builds runs the exporter by the API's rules.

- ``kubectl kustomize deploy/kubernetes`` builds a ConfigMap, a Service, a Deployment, a ServiceMonitor
  and a PrometheusRule;
- the Deployment: one replica, Recreate (never two pods on one token set), non-root, read-only root
  filesystem, tokens from a Secret mounted as files, config from the generated ConfigMap, liveness on
  /-/healthy and readiness on /-/ready, resources;
- the Service selects the pods, the ServiceMonitor the Service, and the job is named `wolkvox`;
- the ConfigMap's config passes the exporter's --config.check once its token files exist;
- the PrometheusRule holds exactly the groups of prometheus/rules/wolkvox.rules.yml, and the committed
  file is what deploy/kubernetes/prometheusrule.py writes.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from harness import REPO, require
from tools import RULES_FILE

KUSTOMIZATION = REPO / "deploy" / "kubernetes"
TOKEN_DIR = "/run/secrets/wolkvox"


@pytest.fixture(scope="module")
def built() -> dict[str, dict[str, Any]]:
    """The built objects by kind (one of each)."""
    kubectl = require("kubectl", "kubectl")
    done = subprocess.run(
        [kubectl, "kustomize", str(KUSTOMIZATION)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    objects = [doc for doc in yaml.safe_load_all(done.stdout) if doc]
    kinds = [obj["kind"] for obj in objects]
    assert sorted(kinds) == sorted(["ConfigMap", "Service", "Deployment", "ServiceMonitor", "PrometheusRule"])
    return {obj["kind"]: obj for obj in objects}


def test_deployment_runs_one_pod_at_a_time(built: dict[str, dict[str, Any]]) -> None:
    spec = built["Deployment"]["spec"]
    assert spec["replicas"] == 1
    # A rolling update would run the old and the new pod together on the same tokens.
    assert spec["strategy"] == {"type": "Recreate"}


def test_deployment_is_locked_down(built: dict[str, dict[str, Any]]) -> None:
    pod = built["Deployment"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    context = container["securityContext"]
    assert context["readOnlyRootFilesystem"] is True
    assert context["allowPrivilegeEscalation"] is False
    assert context["capabilities"]["drop"] == ["ALL"]
    assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]


def test_deployment_probes_and_port(built: dict[str, dict[str, Any]]) -> None:
    (container,) = built["Deployment"]["spec"]["template"]["spec"]["containers"]
    assert container["livenessProbe"]["httpGet"] == {"path": "/-/healthy", "port": "http"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/-/ready", "port": "http"}
    assert container["ports"] == [{"name": "http", "containerPort": 19726, "protocol": "TCP"}]
    assert "--web.listen-address=:19726" in container["args"]


def test_deployment_mounts_config_and_token_secret(built: dict[str, dict[str, Any]]) -> None:
    pod = built["Deployment"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    # The image's entrypoint reads /etc/wolkvox-exporter/config.yml: the generated (hashed) ConfigMap.
    config = volumes[mounts["/etc/wolkvox-exporter"]["name"]]
    assert config["configMap"]["name"] == built["ConfigMap"]["metadata"]["name"]
    assert "config.yml" in built["ConfigMap"]["data"]
    tokens = volumes[mounts[TOKEN_DIR]["name"]]
    assert tokens["secret"]["secretName"] == "wolkvox-tokens"
    assert mounts["/etc/wolkvox-exporter"]["readOnly"] and mounts[TOKEN_DIR]["readOnly"]
    # The only writable places, with a read-only root: the state file's directory and /tmp.
    writable = {path for path, m in mounts.items() if not m.get("readOnly")}
    assert writable == {"/var/lib/wolkvox-exporter", "/tmp"}
    assert all("emptyDir" in volumes[mounts[path]["name"]] for path in writable)


def test_service_and_servicemonitor_line_up(built: dict[str, dict[str, Any]]) -> None:
    pod_labels = built["Deployment"]["spec"]["template"]["metadata"]["labels"]
    service = built["Service"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    monitor = built["ServiceMonitor"]["spec"]
    assert monitor["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert [e["port"] for e in monitor["endpoints"]] == [p["name"] for p in service["spec"]["ports"]]
    # The exporter-down alerts select up{job="wolkvox"}: the job name comes from the Service's label.
    assert service["metadata"]["labels"][monitor["jobLabel"]] == "wolkvox"


def test_configmap_config_passes_the_check(built: dict[str, dict[str, Any]], tmp_path: Path) -> None:
    text = built["ConfigMap"]["data"]["config.yml"]
    config = yaml.safe_load(text)
    token_files = [op["token_file"] for op in config["operations"]]
    assert token_files and all(path.startswith(f"{TOKEN_DIR}/") for path in token_files)
    assert len(set(token_files)) == len(token_files), "one token per operation in the example"
    # Here the Secret's files and the state directory live in tmp_path.
    for path in token_files:
        (tmp_path / Path(path).name).write_text("a-token\n", encoding="utf-8")
    text = text.replace(f"{TOKEN_DIR}/", f"{tmp_path}/").replace("/var/lib/wolkvox-exporter/", f"{tmp_path}/")
    config_path = tmp_path / "config.yml"
    config_path.write_text(text, encoding="utf-8")
    args = [sys.executable, "-m", "exporter.cli", "--config.file", str(config_path), "--config.check"]
    done = subprocess.run(args, capture_output=True, text=True, timeout=60, cwd=REPO)
    assert done.returncode == 0, done.stdout + done.stderr


def _generator() -> Any:
    spec = importlib.util.spec_from_file_location("prometheusrule", KUSTOMIZATION / "prometheusrule.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_prometheusrule_has_exactly_the_shipped_rules(built: dict[str, dict[str, Any]]) -> None:
    shipped = yaml.safe_load(RULES_FILE.read_text(encoding="utf-8"))["groups"]
    assert built["PrometheusRule"]["spec"]["groups"] == shipped


def test_prometheusrule_file_is_up_to_date() -> None:
    committed = (KUSTOMIZATION / "prometheusrule.yaml").read_text(encoding="utf-8")
    assert committed == _generator().render(), "run: python3 deploy/kubernetes/prometheusrule.py"
