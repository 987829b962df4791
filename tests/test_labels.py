"""Operation labels (`labels:`): config checks, the wolkvox_operation_info metric, and a reload that
changes labels (the info metric changes, nothing else does)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from harness import Simulator, parse_samples, value, wait_until, write_config_text

from exporter.config import ConfigError, load_config
from exporter.families import OPERATION_INFO, lines_by_family, render_operation
from exporter.store import OperationInfo, OperationState

TOKEN = "tok-LabelSecret-77"


def test_top_level_labels_are_defaults_the_operation_overrides(tmp_path: Path) -> None:
    config = load_config(
        write_config_text(
            tmp_path,
            "labels: {team: sales, cost_center: CC-1}\noperations:\n"
            "  - {name: bogota, server: wv1, token: a, labels: {client: acme, team: support}}\n"
            "  - {name: lima, server: wv2, token: b, labels: {cost_center: 12}}\n"
            "  - {name: quito, server: wv3, token: c}\n",
        )
    )
    bogota, lima, quito = config.operations
    assert bogota.labels == (("client", "acme"), ("cost_center", "CC-1"), ("team", "support"))
    assert lima.labels == (("cost_center", "12"), ("team", "sales"))  # an integer value is its text
    assert quito.labels == (("cost_center", "CC-1"), ("team", "sales"))


def test_labels_from_the_environment(tmp_path: Path) -> None:
    text = "operations: [{server: wv1, token: a, labels: {client: '${CLIENT}'}}]\n"
    path = write_config_text(tmp_path, text)
    assert load_config(path, {"CLIENT": "acme"}).operations[0].labels == (("client", "acme"),)


@pytest.mark.parametrize(
    ("labels", "key", "problem"),
    [
        ("{operation: x}", "labels.operation", "reserved"),
        ("{server: x}", "labels.server", "reserved"),
        ("{api: x}", "labels.api", "reserved"),
        ("{reason: x}", "labels.reason", "reserved"),
        ("{currency: x}", "labels.currency", "reserved"),
        ("{job: x}", "labels.job", "reserved"),
        ("{instance: x}", "labels.instance", "reserved"),
        ("{month: x}", "labels.month", "reserved"),
        ("{__name__: x}", "labels.__name__", "reserved"),
        ("{__meta_thing: x}", "labels.__meta_thing", "reserved"),
        ("{cost-center: x}", "labels.cost-center", "invalid label name"),
        ("{1client: x}", "labels.1client", "invalid label name"),
        ("{clïent: x}", "labels.clïent", "invalid label name"),
        ("{client: ''}", "labels.client", "is empty"),
        ("{client: '  '}", "labels.client", "is empty"),
        ("{client: null}", "labels.client", "expected a string value, got null"),
        ("{client: [a, b]}", "labels.client", "expected a string value, got a list"),
        ("{client: {a: b}}", "labels.client", "expected a string value, got a mapping"),
        ("{client: true}", "labels.client", "expected a string value, got a boolean"),
        ("{client: 1.5}", "labels.client", "expected a string value, got a number"),
        ('{client: "a\\u0007b"}', "labels.client", "control characters"),
        (f"{{client: {'x' * 201}}}", "labels.client", "longer than 200"),
        ("[client, acme]", "labels", "expected a mapping of label name: value"),
        ("acme", "labels", "expected a mapping of label name: value"),
    ],
)
@pytest.mark.parametrize("where", ["operation", "top"])
def test_bad_labels_are_one_line_errors_naming_the_operation_and_key(
    tmp_path: Path, labels: str, key: str, problem: str, where: str
) -> None:
    if where == "top":
        text = f"labels: {labels}\noperations: [{{name: bogota, server: wv1, token: {TOKEN}}}]\n"
        full_key = key
    else:
        text = (
            "operations:\n  - {name: ok, server: wv2, token: b}\n"
            f"  - {{name: bogota, server: wv1, token: {TOKEN}, labels: {labels}}}\n"
        )
        full_key = f"operations[1].{key}"
    path = write_config_text(tmp_path, text)
    with pytest.raises(ConfigError) as error:
        load_config(path)
    message = str(error.value)
    assert message.startswith(f"{path}: {full_key}: "), message
    assert problem in message and "\n" not in message and TOKEN not in message
    if where == "operation":
        assert "operation 'bogota'" in message


def test_the_info_metric_carries_server_and_labels_once_per_operation() -> None:
    state = OperationState(
        OperationInfo("bogota", server="wv9901", labels=(("client", 'ac"me'), ("team", "sales")))
    )
    lines = b"".join(lines_by_family(render_operation(state))).decode()
    info = [line for line in lines.splitlines() if line.startswith(OPERATION_INFO.name)]
    expected = 'wolkvox_operation_info{operation="bogota",server="wv9901",client="ac\\"me",team="sales"} 1'
    assert info == [expected]


def _config(simulator: Simulator, labels: dict[str, dict[str, str]]) -> dict[str, object]:
    return {
        "refresh_interval": "1h",  # one fetch per report in this test: nothing else moves the values
        "max_age": "2h",
        "operations": [
            {
                "name": name,
                "server": server,
                "token": f"tok-{name}",
                "base_url": simulator.url,
                "apis": ["stereo_rec", "ivr_minutes"],
                **({"labels": labels[name]} if name in labels else {}),
            }
            for name, server in (("bogota", "wv9901"), ("lima", "wv0042"))
        ],
    }


# Lines that move by themselves, or because a reload happened at all.
_MOVING = ("process_", "python_", "wolkvox_config_last_reload_success_timestamp_seconds")


def _lines(text: str) -> list[str]:
    return sorted(line for line in text.splitlines() if not line.startswith(_MOVING) and line.strip())


def test_a_reload_that_changes_labels_changes_the_info_metric_and_nothing_else(
    simulator: Simulator, run_exporter
) -> None:
    exporter = run_exporter(_config(simulator, {"bogota": {"client": "acme", "team": "sales"}}))
    samples = exporter.wait_for(
        lambda s: all(
            value(s, "wolkvox_billing_usage", operation=op, api=api) is not None
            for op in ("bogota", "lima")
            for api in ("stereo_rec", "ivr_minutes")
        ),
        timeout=20,
        what="both operations fetched",
    )
    bogota = {"operation": "bogota", "server": "wv9901", "client": "acme", "team": "sales"}
    assert value(samples, OPERATION_INFO.name, **bogota) == 1
    assert value(samples, OPERATION_INFO.name, operation="lima", server="wv0042") == 1
    before = exporter.get("/metrics").text

    labels = {"bogota": {"client": "globex", "cost_center": "CC-12"}, "lima": {"client": "acme"}}
    exporter.config_path.write_text(yaml.safe_dump(_config(simulator, labels)), encoding="utf-8")
    assert exporter.loop is not None
    ok, message = exporter.loop.run(exporter.app.reload())
    assert ok, message
    wait_until(lambda: 'client="globex"' in exporter.get("/metrics").text, timeout=10, what="the new labels")
    after = exporter.get("/metrics").text

    info = f"{OPERATION_INFO.name}{{"
    changed_before = [line for line in _lines(before) if line not in _lines(after)]
    changed_after = [line for line in _lines(after) if line not in _lines(before)]
    assert changed_before == [
        'wolkvox_operation_info{operation="bogota",server="wv9901",client="acme",team="sales"} 1',
        'wolkvox_operation_info{operation="lima",server="wv0042"} 1',
    ]
    assert sorted(changed_after) == [
        'wolkvox_operation_info{operation="bogota",server="wv9901",client="globex",cost_center="CC-12"} 1',
        'wolkvox_operation_info{operation="lima",server="wv0042",client="acme"} 1',
    ]
    assert all(line.startswith(info) for line in changed_before + changed_after)
    parsed = parse_samples(after)
    assert value(parsed, "wolkvox_config_last_reload_successful") == 1
