"""Loading the config in a child process gives exactly what load_config gives."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from exporter import configproc
from exporter.config import ConfigError, load_config
from exporter.configproc import load_config_isolated


def test_same_result_as_in_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOKEN_FOR_CHILD", "tok-from-env")
    path = tmp_path / "c.yml"
    path.write_text(
        "refresh_interval: 7m\noperations:\n"
        "  - {server: wv1, token: '${TOKEN_FOR_CHILD}', apis: [stereo_rec, ivr_calls]}\n"
    )
    isolated = load_config_isolated(path)
    assert isolated == load_config(path)
    assert isolated.operations[0].token.reveal() == "tok-from-env"  # the child saw the environment


def test_equal_values_of_the_operations_stay_one_object(tmp_path: Path) -> None:
    """At 10,000 operations a copy of each base URL and api list is ~1.5 MB for the process's life."""
    path = tmp_path / "c.yml"
    path.write_text(
        "operations:\n"
        + "".join(
            f"  - {{server: wv{i}, token: t{i}, base_url: 'http://127.0.0.1:9', "
            "apis: [stereo_rec, ivr_calls]}\n"
            for i in range(3)
        )
        + "  - {server: other, token: t9, base_url: 'http://127.0.0.1:8', apis: [ivr_calls]}\n"
    )
    for config in (load_config(path), load_config_isolated(path)):
        first, second, third, other = config.operations
        assert first.base_url is second.base_url is third.base_url
        assert first.apis is second.apis is third.apis
        assert other.base_url == "http://127.0.0.1:8" and other.apis == ("ivr_calls",)


def test_same_one_line_error(tmp_path: Path) -> None:
    path = tmp_path / "bad.yml"
    path.write_text("operations: [{server: wv1, token: abc, colour: blue}]\n")
    with pytest.raises(ConfigError) as in_process:
        load_config(path)
    with pytest.raises(ConfigError) as isolated:
        load_config_isolated(path)
    assert str(isolated.value) == str(in_process.value)
    assert "operations[0].colour" in str(isolated.value)


def test_falls_back_to_parsing_here_when_no_child_can_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "c.yml"
    path.write_text("operations: [{server: wv1, token: abc}]\n")
    monkeypatch.setattr(sys, "executable", str(tmp_path / "no-such-python"))
    assert load_config_isolated(path).operations[0].server == "wv1"


def test_child_entry_point_exit_codes(tmp_path: Path, capsysbinary: pytest.CaptureFixture[bytes]) -> None:
    good = tmp_path / "good.yml"
    good.write_text("operations: [{server: wv1, token: abc}]\n")
    assert configproc.main([str(good)]) == 0
    assert configproc.main([str(tmp_path / "missing.yml")]) == configproc.CONFIG_ERROR_EXIT


TYPOS = "prices: {stereo: 0.004}\noperations: [{server: wv1, token: abc, apis: [stereo_rec, ivr_minute]}]\n"
SEVERAL_ERRORS = "refresh_interval: soon\noperations: [{server: wv1, token: abc, colour: blue}, {token: x}]\n"


def test_warnings_and_every_error_come_back_from_the_child(tmp_path: Path) -> None:
    typos = tmp_path / "typos.yml"
    typos.write_text(TYPOS)
    assert load_config_isolated(typos).warnings == load_config(typos).warnings
    assert len(load_config(typos).warnings) == 2
    bad = tmp_path / "bad.yml"
    bad.write_text(SEVERAL_ERRORS)
    with pytest.raises(ConfigError) as in_process:
        load_config(bad)
    with pytest.raises(ConfigError) as isolated:
        load_config_isolated(bad)
    assert isolated.value.lines() == in_process.value.lines() and len(isolated.value.lines()) == 3


def test_config_check_warns_with_exit_0_and_lists_every_error_with_exit_1(tmp_path: Path) -> None:
    from harness import run_cli

    typos = tmp_path / "typos.yml"
    typos.write_text(TYPOS)
    done = run_cli("--config.file", str(typos), "--config.check")
    assert done.returncode == 0, done.stderr
    warnings = [line for line in done.stderr.splitlines() if "level=warn" in line]
    assert len(warnings) == 2, done.stderr
    assert "did you mean ivr_minutes?" in warnings[0] and "did you mean stereo_rec?" in warnings[1]
    assert "OK, 1 operation(s), 2 warning(s)" in done.stdout

    bad = tmp_path / "bad.yml"
    bad.write_text(SEVERAL_ERRORS)
    done = run_cli("--config.file", str(bad), "--config.check")
    assert done.returncode == 1 and "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if "level=error" in line]
    keys = ("refresh_interval", "operations[0].colour", "operations[1].server")
    assert len(errors) == len(keys), done.stderr
    assert all(key in line for key, line in zip(keys, errors, strict=True)), errors
