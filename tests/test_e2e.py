"""The exporter against the real simulator, over HTTP on loopback: in-process where the test is about what
it serves, as a real process where it is about the command line, signals or the log."""

from __future__ import annotations

import gzip
import signal
import threading
import time

import pytest
import requests
from harness import Exporter, Simulator, free_port, labelled, parse_samples, run_cli, value, wait_until

from exporter import __version__
from exporter.model import REASONS


def operations(sim: Simulator, names: list[str], token_of=lambda name: f"tok-{name}", **extra) -> list[dict]:
    return [
        {"name": n, "server": f"wv{i:04d}", "token": token_of(n), "base_url": sim.url, **extra}
        for i, n in enumerate(names)
    ]


def base_config(ops: list[dict], **extra) -> dict:
    return {
        "refresh_interval": "1s",
        "read_timeout": "1s",
        "connect_timeout": "1s",
        # Every report each second is 86,400 requests a day: far above the default budget of 1,000.
        "daily_request_limit": 10_000_000,
        "operations": ops,
        **extra,
    }


def test_minutes_appear_on_metrics_with_health_pages(simulator: Simulator, run_exporter) -> None:
    ops = operations(simulator, ["bogota", "lima"])
    ops[0]["budget_minutes"] = 40000
    exporter: Exporter = run_exporter(base_config(ops))
    assert exporter.get("/-/healthy").status_code == 200
    samples = exporter.wait_for(
        lambda s: all(value(s, "wolkvox_stereo_rec_minutes", operation=o) for o in ("bogota", "lima")),
        what="minutes for both operations",
    )
    for op in ("bogota", "lima"):
        assert value(samples, "wolkvox_up", operation=op) == 1
        assert value(samples, "wolkvox_scrape_requests_total", operation=op) >= 1
        assert abs(value(samples, "wolkvox_last_success_timestamp_seconds", operation=op) - time.time()) < 60
        assert value(samples, "wolkvox_scrape_duration_seconds", operation=op) >= 0
        for reason in REASONS:
            assert value(samples, "wolkvox_scrape_errors_total", operation=op, reason=reason) == 0
    assert value(samples, "wolkvox_stereo_rec_budget_minutes", operation="bogota") == 40000
    assert value(samples, "wolkvox_stereo_rec_budget_minutes", operation="lima") is None
    wait_until(lambda: exporter.get("/-/ready").status_code == 200, what="ready")
    landing = exporter.get("/")
    assert landing.status_code == 200 and "/metrics" in landing.text
    assert exporter.get("/nope").status_code == 404
    # The page says what it is, and has no sample timestamps (three fields would mean a timestamp).
    text = exporter.get("/metrics").text
    assert "# HELP wolkvox_stereo_rec_minutes Month-to-date" in text
    assert all(len(line.split(" ")) == 2 for line in text.splitlines() if line.startswith("wolkvox_"))


def test_values_grow_and_gzip_is_honoured(simulator: Simulator, run_exporter) -> None:
    exporter = run_exporter(base_config(operations(simulator, ["bogota"])))
    first = exporter.wait_for(lambda s: value(s, "wolkvox_stereo_rec_minutes", operation="bogota"))
    first_value = value(first, "wolkvox_stereo_rec_minutes", operation="bogota")
    exporter.wait_for(
        lambda s: value(s, "wolkvox_stereo_rec_minutes", operation="bogota") > first_value,
        what="the month-to-date value to grow",
    )
    raw = requests.get(f"{exporter.url}/metrics", headers={"Accept-Encoding": "gzip"}, stream=True, timeout=5)
    assert raw.headers["Content-Encoding"] == "gzip"
    assert b"wolkvox_stereo_rec_minutes" in gzip.decompress(raw.raw.read())
    plain = requests.get(f"{exporter.url}/metrics", headers={"Accept-Encoding": "identity"}, timeout=5)
    assert "Content-Encoding" not in plain.headers
    assert plain.headers["Content-Type"].startswith("text/plain; version=0.0.4")


FAULTS = {
    "hang": "timeout",
    "reset": "connection",
    "http_500": "http_status",
    "html": "http_status",
    "maintenance": "http_status",
    "badjson": "invalid_response",
    "wrongshape": "invalid_response",
    "oversize": "invalid_response",
    "garbage_items": "parse",
    "token_limit": "token_limit",
    "invalid_token": "auth",
    "no_token": "auth",
    "busy": "api_error",
    "unknown_api": "unknown_api",
}


def test_every_fault_is_counted_by_reason_keeps_the_value_and_recovers(
    simulator: Simulator, run_exporter
) -> None:
    names = [f"op-{mode}" for mode in FAULTS]
    ops = operations(simulator, names)
    # One more operation whose upstream refuses connections: nothing listens on that port.
    ops.append(
        {
            "name": "op-refused",
            "server": "wv9999",
            "token": "tok-refused",
            "base_url": f"http://127.0.0.1:{free_port()}",
        }
    )
    # Half-second refreshes: the token_limit back-off (12 intervals) is 6 s.
    exporter = run_exporter(
        base_config(ops, max_body_bytes=65536, refresh_interval="0.5s", read_timeout="0.5s")
    )
    exporter.wait_for(
        lambda s: all(value(s, "wolkvox_up", operation=n) == 1 for n in names),
        timeout=20,
        what="every operation up",
    )
    good = {n: value(exporter.samples(), "wolkvox_stereo_rec_minutes", operation=n) for n in names}
    for mode in FAULTS:
        simulator.fault(mode, token=f"tok-op-{mode}")

    def all_counted(samples) -> bool:
        return (
            all(
                value(samples, "wolkvox_scrape_errors_total", operation=f"op-{mode}", reason=reason) >= 1
                for mode, reason in FAULTS.items()
            )
            and value(samples, "wolkvox_scrape_errors_total", operation="op-refused", reason="connection")
            >= 1
        )

    samples = exporter.wait_for(all_counted, timeout=30, what="every reason counted")
    for mode, reason in FAULTS.items():
        op = f"op-{mode}"
        assert value(samples, "wolkvox_up", operation=op) == 0, op
        assert labelled(samples, "wolkvox_last_error_info", operation=op, reason=reason), op
        # The last good value stays (it is younger than max_age), at least what it was.
        assert value(samples, "wolkvox_stereo_rec_minutes", operation=op) >= good[op], op
        others = [r for r in REASONS if r != reason]
        assert all(
            value(samples, "wolkvox_scrape_errors_total", operation=op, reason=r) == 0 for r in others
        ), op
    assert value(samples, "wolkvox_up", operation="op-refused") == 0

    simulator.clear_faults()
    # token_limit backs off 12 intervals (6 s here); everything else retries within a few seconds.
    exporter.wait_for(
        lambda s: all(value(s, "wolkvox_up", operation=n) == 1 for n in names),
        timeout=30,
        what="recovery of every operation",
    )


def test_a_refused_token_fails_every_operation_that_shares_it_and_they_recover_together(
    simulator: Simulator, run_exporter
) -> None:
    ops = operations(simulator, ["a", "b"], token_of=lambda _: "shared") + operations(simulator, ["c"])
    exporter = run_exporter(base_config(ops, refresh_interval="0.5s", token_info_interval="1h"))
    exporter.wait_for(
        lambda s: all(value(s, "wolkvox_up", operation=n) == 1 for n in "abc"), what="every operation up"
    )
    simulator.fault("invalid_token", token="shared")
    # Whichever request of the shared token is refused first, both of its operations are down with auth.
    samples = exporter.wait_for(
        lambda s: all(labelled(s, "wolkvox_last_error_info", operation=n, reason="auth") for n in "ab"),
        what="both operations of the refused token down with auth",
    )
    assert value(samples, "wolkvox_up", operation="a") == value(samples, "wolkvox_up", operation="b") == 0
    assert value(samples, "wolkvox_up", operation="c") == 1
    simulator.clear_faults()
    exporter.wait_for(
        lambda s: all(value(s, "wolkvox_up", operation=n) == 1 for n in "ab"), what="both recovered"
    )
    assert simulator.stats()["tokens"]["shared"]["max_in_flight"] == 1


def test_a_token_shared_by_operations_is_never_used_twice_at_once(simulator: Simulator, run_exporter) -> None:
    simulator.fault("slow", token="shared", seconds=0.2)
    ops = operations(simulator, ["a", "b", "c"], token_of=lambda _: "shared")
    ops += operations(simulator, ["d"])
    exporter = run_exporter(
        base_config(
            ops,
            refresh_interval="0.2s",
        )
    )
    exporter.wait_for(
        lambda s: all(value(s, "wolkvox_scrape_requests_total", operation=n) >= 2 for n in "abc"),
        timeout=20,
        what="several requests on the shared token",
    )
    stats = simulator.stats()
    assert stats["tokens"]["shared"]["max_in_flight"] == 1
    assert stats["tokens"]["shared"]["violations"] == 0
    assert stats["total_violations"] == 0


def test_scrapes_answer_while_every_upstream_hangs(simulator: Simulator, run_exporter) -> None:
    simulator.fault("hang", seconds=60)
    exporter = run_exporter(base_config(operations(simulator, ["a", "b", "c"]), read_timeout="30s"))
    wait_until(lambda: simulator.stats()["total_requests"] >= 3, what="requests hanging upstream")
    for _ in range(20):
        # Bounded, not a speed test: a scrape that waited for upstream would take 30 s.
        response = requests.get(f"{exporter.url}/metrics", timeout=2)
        assert response.status_code == 200
        assert 'wolkvox_up{operation="a"} 0' in response.text
    assert exporter.get("/-/ready").status_code == 503  # nothing has been tried to the end yet


def test_stale_value_is_dropped_after_max_age(simulator: Simulator, run_exporter) -> None:
    exporter = run_exporter(base_config(operations(simulator, ["a"]), max_age="2s"))
    exporter.wait_for(lambda s: value(s, "wolkvox_stereo_rec_minutes", operation="a"))
    simulator.fault("http_500")
    samples = exporter.wait_for(
        lambda s: value(s, "wolkvox_stereo_rec_minutes", operation="a") is None, what="the stale value to go"
    )
    assert value(samples, "wolkvox_last_success_timestamp_seconds", operation="a") is not None
    assert value(samples, "wolkvox_up", operation="a") == 0


def test_reload_by_http_and_sighup_keeps_running_on_a_bad_file(simulator: Simulator, start_exporter) -> None:
    exporter = start_exporter(base_config(operations(simulator, ["a"])))
    exporter.wait_for(lambda s: value(s, "wolkvox_up", operation="a") == 1)
    exporter.config_path.write_text(
        exporter.config_path.read_text().replace("name: a", "name: renamed"), encoding="utf-8"
    )
    assert requests.post(f"{exporter.url}/-/reload", timeout=5).status_code == 200
    exporter.wait_for(
        lambda s: value(s, "wolkvox_up", operation="renamed") == 1, what="the renamed operation"
    )
    exporter.config_path.write_text("operations: [{server: 'x', unknown_key: 1}]\n", encoding="utf-8")
    response = requests.post(f"{exporter.url}/-/reload", timeout=5)
    assert response.status_code == 500 and "unknown_key" in response.text
    samples = exporter.wait_for(lambda s: value(s, "wolkvox_config_last_reload_successful") == 0)
    assert value(samples, "wolkvox_up", operation="renamed") == 1
    exporter.config_path.write_text(
        __import__("yaml").safe_dump(base_config(operations(simulator, ["viahup"]))), encoding="utf-8"
    )
    exporter.process.proc.send_signal(signal.SIGHUP)
    exporter.wait_for(
        lambda s: (
            value(s, "wolkvox_up", operation="viahup") == 1
            and value(s, "wolkvox_config_last_reload_successful") == 1
        ),
        what="the SIGHUP reload",
    )


def test_sigterm_stops_quickly_while_upstream_hangs(simulator: Simulator, start_exporter) -> None:
    simulator.fault("hang", seconds=60)
    exporter = start_exporter(base_config(operations(simulator, ["a", "b"]), read_timeout="50s"))
    wait_until(lambda: simulator.stats()["total_requests"] >= 2, what="hanging requests")
    started = time.monotonic()
    assert exporter.process.stop(timeout=15) == 0
    assert time.monotonic() - started < 10
    assert "stopped" in exporter.process.log()


def test_config_check_and_one_line_errors(tmp_path) -> None:
    good = tmp_path / "good.yml"
    good.write_text("operations: [{server: wv1, token: abc}]\n")
    result = run_cli("--config.file", str(good), "--config.check")
    assert result.returncode == 0 and "OK" in result.stdout
    bad = tmp_path / "bad.yml"
    bad.write_text("operations: [{server: wv1}]\n")
    result = run_cli("--config.file", str(bad), "--config.check")
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "bad.yml" in lines[0] and "token" in lines[0]
    result = run_cli("--config.file", str(tmp_path / "missing.yml"))
    assert result.returncode != 0 and "Traceback" not in result.stderr and "missing.yml" in result.stderr
    result = run_cli("--config.file", str(good), "--web.listen-address", "nonsense")
    assert result.returncode != 0 and "Traceback" not in result.stderr and "listen-address" in result.stderr
    assert __version__ in run_cli("--version").stdout


def test_port_in_use_is_a_one_line_error(tmp_path) -> None:
    import socket

    config = tmp_path / "c.yml"
    config.write_text("operations: [{server: wv1, token: abc, base_url: 'http://127.0.0.1:9'}]\n")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        result = run_cli("--config.file", str(config), "--web.listen-address", f"127.0.0.1:{port}")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr and "cannot listen" in result.stderr


@pytest.mark.parametrize("path", ["/metrics", "/"])
def test_many_concurrent_scrapes_all_succeed(simulator: Simulator, run_exporter, path: str) -> None:
    exporter = run_exporter(base_config(operations(simulator, ["a"])))
    errors: list[BaseException] = []

    def scrape() -> None:
        try:
            with requests.Session() as session:
                for _ in range(10):
                    assert session.get(f"{exporter.url}{path}", timeout=5).status_code == 200
        except BaseException as error:  # collected and asserted below
            errors.append(error)

    threads = [threading.Thread(target=scrape) for _ in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert not errors


def test_a_large_page_is_streamed_whole_plain_and_gzip(run_exporter) -> None:
    # 3,000 operations whose upstream refuses connections: a page far above the 64 KiB streaming threshold.
    port = free_port()
    ops = [
        {
            "name": f"op{i:04d}",
            "server": f"wv{i:04d}",
            "token": f"tok-{i}",
            "base_url": f"http://127.0.0.1:{port}",
        }
        for i in range(3000)
    ]
    exporter = run_exporter(base_config(ops))
    gzipped = requests.get(
        f"{exporter.url}/metrics", headers={"Accept-Encoding": "gzip"}, stream=True, timeout=10
    )
    assert gzipped.headers["Content-Encoding"] == "gzip"
    body = gzip.decompress(gzipped.raw.read())
    assert int(gzipped.headers["Content-Length"]) > 64 * 1024
    plain = requests.get(f"{exporter.url}/metrics", headers={"Accept-Encoding": "identity"}, timeout=10)
    assert "Content-Encoding" not in plain.headers
    for text in (body.decode(), plain.text):
        samples = parse_samples(text)
        assert all(value(samples, "wolkvox_up", operation=f"op{i:04d}") is not None for i in range(3000))
