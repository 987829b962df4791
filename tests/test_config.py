"""exporter.config: loading, defaults, ${VAR} expansion, durations, warnings and one-line errors."""

from __future__ import annotations

import dataclasses
import math
import os
import re
import textwrap
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from exporter.config import (
    DEFAULT_APIS,
    MAX_DURATION,
    MAX_TOKEN_FILE_BYTES,
    OPERATION_KEYS,
    TOP_LEVEL_KEYS,
    Config,
    ConfigError,
    OperationConfig,
    _expand,
    format_duration,
    load_config,
    parse_duration,
)
from exporter.secret import Secret

REPO = Path(__file__).resolve().parent.parent
# Distinctive values that must never show up in a message.
TOKEN = "tok-Zq9SECRETvalue-8812"
PASSWORD = "hunter2-proxy-pass"

Write = Callable[..., Path]


@pytest.fixture
def write(tmp_path: Path) -> Write:
    """``write(yaml_text, name="config.yaml")`` writes a (dedented) file next to the others."""

    def write(text: str | bytes, name: str = "config.yaml") -> Path:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(text, bytes):
            path.write_bytes(text)
        else:
            path.write_text(textwrap.dedent(text), encoding="utf-8")
        return path

    return write


def minimal(extra_top: str = "", extra_op: str = "") -> str:
    """A valid config with one operation; ``extra_*`` are YAML lines added at the top / to the operation."""
    top = textwrap.dedent(extra_top).strip()
    op = "".join(f"    {line}\n" for line in textwrap.dedent(extra_op).strip().splitlines())
    return f"{top}\noperations:\n  - server: wv9901\n    token: {TOKEN}\n{op}"


def load_error(path: Path, environ: dict[str, str] | None = None) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_config(path, {} if environ is None else environ)
    return info.value


def check_message(error: ConfigError, path: Path, key: str | None) -> str:
    """The shape every error shares: ``<file>: <key>: <problem>`` on one line, no token, no traceback."""
    message = str(error)
    assert error.file == str(path)
    assert error.key == key
    prefix = f"{path}: {key}: " if key else f"{path}: "
    assert message.startswith(prefix), message
    assert len(message[len(prefix) :]) > 3, "the problem itself is missing"
    assert message.splitlines() == [message]
    assert not any(ch in message for ch in "\r\n\x1b\x00\u2028")
    assert TOKEN not in message and PASSWORD not in message
    assert "Traceback" not in message
    # No chained exception that a logger could print along with it.
    assert error.__cause__ is None
    assert error.__context__ is None or error.__suppress_context__
    return message


# ----- errors naming a key --------------------------------------------------------------------------


@dataclass
class Case:
    id: str
    text: str
    key: str
    fragment: str
    env: dict[str, str] = field(default_factory=dict)
    files: dict[str, bytes | None] = field(default_factory=dict)  # None: a directory

    def param(self) -> object:
        return pytest.param(self, id=self.id)


OP0 = "operations[0]"
KEY_CASES = [
    # unknown keys
    Case(
        "unknown top-level key",
        minimal("refresh_intervall: 5m"),
        "refresh_intervall",
        "did you mean refresh_interval",
    ),
    Case("unknown top-level non-string key", minimal("1: x"), "1", "unknown key"),
    Case(
        "unknown operation key",
        minimal(extra_op="tokn_file: x"),
        f"{OP0}.tokn_file",
        "did you mean token_file",
    ),
    # tokens
    Case("missing token", "operations:\n  - server: wv9901\n", f"{OP0}.token", "set token or token_file"),
    Case("null token", "operations:\n  - server: wv9901\n    token:\n", f"{OP0}.token", "missing"),
    Case(
        "token and token_file",
        minimal(extra_op="token_file: tok"),
        f"{OP0}.token_file",
        "not both",
        files={"tok": TOKEN.encode()},
    ),
    Case(
        "token_file missing",
        "operations:\n  - server: wv9901\n    token_file: nowhere/tok\n",
        f"{OP0}.token_file",
        "No such file or directory",
    ),
    Case(
        "token_file is a directory",
        "operations:\n  - server: wv9901\n    token_file: secrets\n",
        f"{OP0}.token_file",
        "not a regular file",
        files={"secrets": None},
    ),
    Case(
        "token_file empty",
        "operations:\n  - server: wv9901\n    token_file: tok\n",
        f"{OP0}.token_file",
        "is empty",
        files={"tok": b""},
    ),
    Case(
        "token_file only whitespace",
        "operations:\n  - server: wv9901\n    token_file: tok\n",
        f"{OP0}.token_file",
        "is empty",
        files={"tok": b" \n\t\r\n"},
    ),
    Case(
        "token_file with a space inside",
        "operations:\n  - server: wv9901\n    token_file: tok\n",
        f"{OP0}.token_file",
        "whitespace",
        files={"tok": f"{TOKEN} {TOKEN}\n".encode()},
    ),
    Case(
        "token_file with a NUL inside",
        "operations:\n  - server: wv9901\n    token_file: tok\n",
        f"{OP0}.token_file",
        "control",
        files={"tok": f"{TOKEN}\x00{TOKEN}".encode()},
    ),
    Case(
        "token_file not UTF-8",
        "operations:\n  - server: wv9901\n    token_file: tok\n",
        f"{OP0}.token_file",
        "not valid UTF-8",
        files={"tok": TOKEN.encode() + b"\xff\xfe"},
    ),
    Case(
        "token_file too large",
        "operations:\n  - server: wv9901\n    token_file: tok\n",
        f"{OP0}.token_file",
        "larger than",
        files={"tok": TOKEN.encode() * (MAX_TOKEN_FILE_BYTES // len(TOKEN) + 1)},
    ),
    Case(
        "token_file empty string",
        "operations:\n  - server: wv9901\n    token_file: ''\n",
        f"{OP0}.token_file",
        "empty",
    ),
    Case(
        "token empty after expansion",
        "operations:\n  - server: wv9901\n    token: ${T}\n",
        f"{OP0}.token",
        "is empty",
        env={"T": ""},
    ),
    Case(
        "token with a space",
        f"operations:\n  - server: wv9901\n    token: '{TOKEN} {TOKEN}'\n",
        f"{OP0}.token",
        "whitespace",
    ),
    Case(
        "token with a control character from the environment",
        "operations:\n  - server: wv9901\n    token: ${T}\n",
        f"{OP0}.token",
        "control",
        env={"T": f"{TOKEN}\x07{TOKEN}"},
    ),
    Case(
        "token with a newline from the environment",
        "operations:\n  - server: wv9901\n    token: ${T}\n",
        f"{OP0}.token",
        "whitespace",
        env={"T": f"{TOKEN}\n{TOKEN}"},
    ),
    Case(
        "token not ASCII",
        f"operations:\n  - server: wv9901\n    token: {TOKEN}é\n",
        f"{OP0}.token",
        "non-ASCII",
    ),
    Case(
        "token is a number",
        "operations:\n  - server: wv9901\n    token: 8812345678\n",
        f"{OP0}.token",
        "expected a string, got an integer",
    ),
    Case(
        "token with a malformed reference",
        f"operations:\n  - server: wv9901\n    token: '{TOKEN}${{oops'\n",
        f"{OP0}.token",
        "malformed",
    ),
    # environment
    Case(
        "unset variable in token",
        "operations:\n  - server: wv9901\n    token: ${WOLKVOX_TOKEN_X}\n",
        f"{OP0}.token",
        "environment variable WOLKVOX_TOKEN_X is not set",
    ),
    Case(
        "unset variable at top level",
        minimal("refresh_interval: ${RI}"),
        "refresh_interval",
        "environment variable RI is not set",
    ),
    Case(
        "unset variable in an api",
        minimal(extra_op="apis: [stereo_rec, '${API}']"),
        f"{OP0}.apis[1]",
        "environment variable API is not set",
    ),
    Case(
        "integer from the environment not a number",
        minimal("daily_request_limit: ${W}"),
        "daily_request_limit",
        "expected an integer",
        env={"W": "four"},
    ),
    # names
    Case(
        "duplicate name",
        f"operations:\n  - {{name: a, server: wv1, token: {TOKEN}}}\n"
        f"  - {{name: a, server: wv2, token: {TOKEN}}}\n",
        "operations[1].name",
        "duplicate operation name 'a', already used by operations[0]",
    ),
    Case(
        "duplicate name from server",
        "operations:\n  - {server: wv1, token: x1}\n  - {server: wv2, token: x2}\n"
        f"  - {{server: wv1, token: {TOKEN}}}\n",
        "operations[2].name",
        "defaults to server",
    ),
    Case("empty name", minimal(extra_op="name: ''"), f"{OP0}.name", "non-empty"),
    Case("name with a newline", minimal(extra_op='name: "a\\nb"'), f"{OP0}.name", "control"),
    Case("name is a number", minimal(extra_op="name: 42"), f"{OP0}.name", "expected a string"),
    # server
    Case("missing server", f"operations:\n  - token: {TOKEN}\n", f"{OP0}.server", "missing"),
    Case(
        "server with a space",
        "operations:\n  - {server: 'wv 9901', token: x}\n",
        f"{OP0}.server",
        "invalid server",
    ),
    Case(
        "server leading dash",
        "operations:\n  - {server: -wv1, token: x}\n",
        f"{OP0}.server",
        "invalid server",
    ),
    Case(
        "server underscore", "operations:\n  - {server: wv_1, token: x}\n", f"{OP0}.server", "invalid server"
    ),
    Case(
        "server not ASCII", "operations:\n  - {server: wvé1, token: x}\n", f"{OP0}.server", "invalid server"
    ),
    Case(
        "server trailing newline",
        'operations:\n  - {server: "wv1\\n", token: x}\n',
        f"{OP0}.server",
        "invalid",
    ),
    Case(
        "server a hostname",
        "operations:\n  - {server: wv1.wolkvox.com, token: x}\n",
        f"{OP0}.server",
        "invalid",
    ),
    Case(
        "server is a number",
        "operations:\n  - {server: 9901, token: x}\n",
        f"{OP0}.server",
        "expected a string",
    ),
    # base_url
    Case(
        "base_url ftp",
        minimal(extra_op="base_url: ftp://wv1.example"),
        f"{OP0}.base_url",
        "http:// or https://",
    ),
    Case("base_url no scheme", minimal(extra_op="base_url: wv1.wolkvox.com"), f"{OP0}.base_url", "http://"),
    Case("base_url no host", minimal(extra_op="base_url: 'https:///x'"), f"{OP0}.base_url", "no host"),
    Case(
        "base_url with credentials",
        minimal(extra_op=f"base_url: https://me:{PASSWORD}@proxy.example"),
        f"{OP0}.base_url",
        "credentials",
    ),
    Case(
        "base_url with a query",
        minimal(extra_op="base_url: https://h.example/?a=1"),
        f"{OP0}.base_url",
        "query",
    ),
    Case(
        "base_url bad port",
        minimal(extra_op="base_url: 'https://h.example:99999'"),
        f"{OP0}.base_url",
        "invalid URL",
    ),
    Case(
        "base_url with a space",
        minimal(extra_op="base_url: 'https://h.example/a b'"),
        f"{OP0}.base_url",
        "whitespace",
    ),
    Case(
        "base_url is a list",
        minimal(extra_op="base_url: [https://h]"),
        f"{OP0}.base_url",
        "expected a string",
    ),
    # other types and ranges
    Case(
        "refresh_interval list",
        minimal("refresh_interval: [5m]"),
        "refresh_interval",
        "expected a duration, got a list",
    ),
    Case("refresh_interval zero", minimal("refresh_interval: 0"), "refresh_interval", "greater than 0"),
    Case(
        "refresh_interval words",
        minimal("refresh_interval: 5 minutes"),
        "refresh_interval",
        "invalid duration",
    ),
    Case("max_age too long", minimal("max_age: 400d"), "max_age", "too long"),
    Case("connect_timeout negative", minimal("connect_timeout: -1s"), "connect_timeout", "greater than 0"),
    Case("read_timeout boolean", minimal("read_timeout: yes"), "read_timeout", "got a boolean"),
    Case(
        "daily_request_limit string",
        minimal("daily_request_limit: '16'"),
        "daily_request_limit",
        "expected an integer, got a string",
    ),
    Case(
        "daily_request_limit boolean",
        minimal("daily_request_limit: true"),
        "daily_request_limit",
        "expected an integer",
    ),
    Case("daily_request_limit zero", minimal("daily_request_limit: 0"), "daily_request_limit", "at least 1"),
    Case(
        "max_body_bytes float",
        minimal("max_body_bytes: 1.5"),
        "max_body_bytes",
        "expected an integer, got a number",
    ),
    Case("max_body_bytes zero", minimal("max_body_bytes: 0"), "max_body_bytes", "at least 1"),
    Case("state_file number", minimal("state_file: 5"), "state_file", "expected a string"),
    Case("state_file empty", minimal("state_file: ''"), "state_file", "empty"),
    Case("state_store number", minimal("state_store: 5"), "state_store", "expected a string"),
    Case("state_store empty", minimal("state_store: ''"), "state_store", "empty"),
    Case(
        "budget string",
        minimal(extra_op="budget_minutes: lots"),
        f"{OP0}.budget_minutes",
        "expected a number",
    ),
    Case("budget negative", minimal(extra_op="budget_minutes: -1"), f"{OP0}.budget_minutes", ">= 0"),
    Case("budget NaN", minimal(extra_op="budget_minutes: .nan"), f"{OP0}.budget_minutes", "finite"),
    Case("budget infinite", minimal(extra_op="budget_minutes: .inf"), f"{OP0}.budget_minutes", "finite"),
    Case("budget overflows", minimal(extra_op="budget_minutes: 1.0e+999"), f"{OP0}.budget_minutes", "finite"),
    Case(
        "budget huge integer",
        minimal(extra_op="budget_minutes: 1" + "0" * 400),
        f"{OP0}.budget_minutes",
        "finite",
    ),
    Case(
        "budget boolean",
        minimal(extra_op="budget_minutes: false"),
        f"{OP0}.budget_minutes",
        "expected a number",
    ),
    Case("apis a string", minimal(extra_op="apis: stereo_rec"), f"{OP0}.apis", "expected a list"),
    Case("apis empty", minimal(extra_op="apis: []"), f"{OP0}.apis", "is empty"),
    Case("api upper case", minimal(extra_op="apis: [Stereo_rec]"), f"{OP0}.apis[0]", "invalid api name"),
    Case("api a number", minimal(extra_op="apis: [stereo_rec, 5]"), f"{OP0}.apis[1]", "got an integer"),
    Case("api duplicate", minimal(extra_op="apis: [stereo_rec, stereo_rec]"), f"{OP0}.apis[1]", "duplicate"),
    Case(
        "ca_file missing", minimal(extra_op="ca_file: ca.pem"), f"{OP0}.ca_file", "No such file or directory"
    ),
    Case(
        "ca_file directory",
        minimal(extra_op="ca_file: certs"),
        f"{OP0}.ca_file",
        "not a regular file",
        files={"certs": None},
    ),
    # operations
    Case("missing operations", "refresh_interval: 5m\n", "operations", "missing"),
    Case("empty operations", "operations: []\n", "operations", "is empty"),
    Case("null operations", "operations:\n", "operations", "got null"),
    Case("operations a mapping", "operations: {server: wv1}\n", "operations", "expected a list"),
    Case("operation a string", "operations:\n  - wv9901\n", OP0, "expected a mapping, got a string"),
    Case(
        "error in a later operation",
        f"operations:\n  - {{server: wv1, token: {TOKEN}}}\n  - {{server: wv2, tokn: {TOKEN}}}\n",
        "operations[1].tokn",
        "unknown key",
    ),
]


@pytest.mark.parametrize("case", [case.param() for case in KEY_CASES])
def test_key_errors(case: Case, write: Write, tmp_path: Path) -> None:
    for name, content in case.files.items():
        if content is None:
            (tmp_path / name).mkdir()
        else:
            write(content, name)
    path = write(case.text)
    error = load_error(path, case.env)
    message = check_message(error, path, case.key)
    assert case.fragment in message
    for value in case.env.values():
        if len(value) > 8:
            assert value not in message


def test_token_file_error_names_the_resolved_path(write: Write, tmp_path: Path) -> None:
    path = write("operations:\n  - server: wv9901\n    token_file: nowhere/tok\n")
    message = check_message(load_error(path), path, f"{OP0}.token_file")
    assert f"cannot read {tmp_path / 'nowhere' / 'tok'}: " in message


def test_unknown_key_with_control_characters_stays_on_one_line(write: Write) -> None:
    path = write(minimal('"evil\\nkey\\u2028": 1'))
    error = load_error(path)
    assert error.key == "evil\nkey\u2028"
    message = str(error)
    assert message.startswith(f"{path}: evil\\nkey\\u2028: unknown key")
    assert message.splitlines() == [message]


# ----- errors about the file as a whole -------------------------------------------------------------


def position(text: str, needle: str) -> str:
    """``line L, column C`` (1-based) of the first ``needle`` in ``text``."""
    index = text.index(needle)
    line = text.count("\n", 0, index) + 1
    return f"line {line}, column {index - (text.rfind(chr(10), 0, index) + 1) + 1}"


SYNTAX_WITH_TOKEN = f"operations:\n  - server: wv1\n    token: {TOKEN}: x\n"
TAB_INDENT = "operations:\n\t- server: wv1\n"
DUPLICATE_KEY = f"refresh_interval: 5m\noperations:\n  - server: wv1\n    token: {TOKEN}\n    token: other\n"
CONTROL_CHARACTER = "refresh_interval: 5m\x1b\noperations: []\n"
BAD_INT = "daily_request_limit: !!int many\n"


@pytest.mark.parametrize(
    ("content", "location", "fragment"),
    [
        pytest.param(SYNTAX_WITH_TOKEN, position(SYNTAX_WITH_TOKEN, ": x"), "mapping values", id="syntax"),
        pytest.param(TAB_INDENT, position(TAB_INDENT, "\t"), "'\\t'", id="tab"),
        pytest.param(
            DUPLICATE_KEY, position(DUPLICATE_KEY, "token: other"), "duplicate key 'token'", id="dupkey"
        ),
        pytest.param(CONTROL_CHARACTER, position(CONTROL_CHARACTER, "\x1b"), "#x001b", id="control"),
        pytest.param(BAD_INT, position(BAD_INT, "!!int"), "invalid value", id="bad-int"),
        pytest.param("operations: [\n", "line 2, column 1", "expected the node content", id="unclosed"),
    ],
)
def test_yaml_errors_give_line_and_column(write: Write, content: str, location: str, fragment: str) -> None:
    path = write(content.encode())
    message = check_message(load_error(path), path, location)
    assert "YAML" in message and fragment in message


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        pytest.param(b"", "the file is empty", id="empty"),
        pytest.param(b"# nothing but a comment\n", "the file is empty", id="only-comment"),
        pytest.param(b"- server: wv1\n", "expected a mapping at the top level, got a list", id="list"),
        pytest.param(b"wv9901\n", "expected a mapping at the top level, got a string", id="scalar"),
        pytest.param(b"refresh_interval: \xe9\n", "not valid UTF-8 (byte 18)", id="latin1"),
        pytest.param(b"a: 1\n---\nb: 2\n", "expected a single document", id="two-documents"),
        pytest.param(
            b"x: !!python/object/apply:os.system [id]\n", "could not determine a constructor", id="unsafe-tag"
        ),
    ],
)
def test_file_level_errors(write: Write, content: bytes, fragment: str) -> None:
    path = write(content)
    error = load_error(path)
    assert fragment in check_message(error, path, error.key)
    assert error.key is None or error.key.startswith("line ")


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.yaml"
    message = check_message(load_error(path), path, None)
    assert "No such file or directory" in message


def test_directory_instead_of_a_file(tmp_path: Path) -> None:
    message = check_message(load_error(tmp_path), tmp_path, None)
    assert "Is a directory" in message


def test_deeply_nested_yaml_is_an_error_not_a_crash(write: Write) -> None:
    path = write("x: " + "[" * 5000 + "]" * 5000 + "\n")
    assert "nested too deeply" in check_message(load_error(path), path, None)


# ----- defaults and values --------------------------------------------------------------------------


def test_defaults(write: Write) -> None:
    path = write(minimal())
    config = load_config(path, {})
    assert config == Config(
        path=str(path),
        refresh_interval=300.0,
        max_age=3600.0,
        connect_timeout=10.0,
        read_timeout=60.0,
        max_body_bytes=1_048_576,
        state_file=None,
        operations=(
            OperationConfig(
                name="wv9901",
                server="wv9901",
                token=Secret(TOKEN),
                base_url="https://wv9901.wolkvox.com",
                budget_minutes=None,
                apis=("stereo_rec",),
                ca_file=None,
            ),
        ),
        warnings=(),
    )


@pytest.mark.parametrize(
    ("keys", "store", "legacy"),
    [
        ("state_store: s/x.db", "s/x.db", None),
        ("state_file: s/x.json", "s/x.db", "s/x.json"),
        ("state_file: s/state", "s/state", "s/state"),  # not .json: the store itself (JSON there migrated)
        ("state_store: y.db\nstate_file: s/x.json", "y.db", "s/x.json"),
    ],
)
def test_the_state_store_and_the_json_state_file_it_migrates(
    write: Write, tmp_path: Path, keys: str, store: str, legacy: str | None
) -> None:
    config = load_config(write(minimal(keys)), {})
    assert config.state_store == str(tmp_path / store)
    assert config.state_file == (str(tmp_path / legacy) if legacy else None)


def test_null_means_default(write: Write) -> None:
    text = minimal(
        "refresh_interval:\nmax_age:\nfetch_workers:\nstate_file:", "name:\nbudget_minutes:\napis:\nbase_url:"
    )
    config = load_config(write(text), {})
    plain = load_config(write(minimal(), "plain.yaml"), {})
    assert dataclasses.replace(config, path=plain.path) == plain


def test_every_key_set(write: Write, tmp_path: Path) -> None:
    write(f"  {TOKEN}\r\n\n", "secrets/lima")
    write("-----BEGIN CERTIFICATE-----\n", "ca.pem")
    path = write(
        f"""
        refresh_interval: 10m
        max_age: 2h
        connect_timeout: 500ms
        read_timeout: 45s
        max_body_bytes: 65536
        state_file: state/wolkvox.json
        operations:
          - name: bogota
            server: wv9901
            token: {TOKEN}
          - name: lima
            server: wv0042
            token_file: secrets/lima
            budget_minutes: 40000
            base_url: http://127.0.0.1:8080/proxy/
            apis: [stereo_rec, ivr_calls]
            ca_file: ca.pem
        """
    )
    config = load_config(path, {})
    assert (config.refresh_interval, config.max_age, config.connect_timeout, config.read_timeout) == (
        600.0,
        7200.0,
        0.5,
        45.0,
    )
    assert config.max_body_bytes == 65536
    assert config.state_file == str(tmp_path / "state" / "wolkvox.json")
    # state_file alone names the state store (its JSON is migrated into it), with a warning.
    assert config.state_store == str(tmp_path / "state" / "wolkvox.db")
    assert any("state_file" in w and "state_store" in w for w in config.warnings)
    bogota, lima = config.operations
    assert bogota.name == "bogota" and bogota.budget_minutes is None and bogota.apis == DEFAULT_APIS
    assert lima.token.reveal() == TOKEN  # surrounding whitespace stripped
    assert lima.base_url == "http://127.0.0.1:8080/proxy"  # trailing slash stripped
    assert lima.budget_minutes == 40000.0 and isinstance(lima.budget_minutes, float)
    assert lima.apis == ("stereo_rec", "ivr_calls")
    assert lima.ca_file == str(tmp_path / "ca.pem")
    assert len(config.warnings) == 1  # state_file: rename the key to state_store


def test_relative_paths_follow_the_config_file_not_the_cwd(
    write: Write, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(TOKEN, "conf/tok")
    path = write("operations:\n  - server: wv1\n    token_file: tok\n", "conf/config.yaml")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert load_config(os.path.relpath(path), {}).operations[0].token.reveal() == TOKEN


def test_token_file_with_bom_and_crlf(write: Write) -> None:
    write(b"\xef\xbb\xbf" + TOKEN.encode() + b"\r\n", "tok")
    path = write("operations:\n  - server: wv1\n    token_file: tok\n")
    assert load_config(path, {}).operations[0].token.reveal() == TOKEN


def test_path_like_and_path_recorded(write: Write) -> None:
    path = write(minimal())
    assert load_config(path, {}).path == str(path)
    assert load_config(str(path), {}).path == str(path)


def test_token_is_a_secret_and_reprs_hide_it(write: Write) -> None:
    config = load_config(write(minimal()), {})
    operation = config.operations[0]
    assert isinstance(operation.token, Secret) and operation.token.reveal() == TOKEN
    for text in (repr(operation), str(operation), repr(config), str(config)):
        assert TOKEN not in text
    assert "Secret('<redacted>')" in repr(operation)


def test_dataclasses_are_frozen(write: Write) -> None:
    config = load_config(write(minimal()), {})
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.refresh_interval = 1.0  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.operations[0].token = Secret("x")  # type: ignore[misc]


# ----- ${VAR} expansion ------------------------------------------------------------------------------


def test_env_expansion_in_every_string(write: Write) -> None:
    env = {
        "TOK": TOKEN,
        "SRV": "wv0042",
        "OP": "lima",
        "URL": "https://proxy.example",
        "RI": "10m",
        "STATE": "/var/lib/x/state.json",
        "API": "mono_rec",
    }
    path = write(
        """
        refresh_interval: ${RI}
        state_file: ${STATE}
        operations:
          - name: ${OP}-main
            server: ${SRV}
            token: ${TOK}
            base_url: ${URL}/${SRV}/
            apis: [stereo_rec, "${API}"]
        """
    )
    config = load_config(path, env)
    operation = config.operations[0]
    assert config.refresh_interval == 600.0
    assert config.state_file == env["STATE"]
    assert (operation.name, operation.server, operation.token.reveal()) == ("lima-main", "wv0042", TOKEN)
    assert operation.base_url == "https://proxy.example/wv0042"
    assert operation.apis == ("stereo_rec", "mono_rec")


def test_token_from_the_environment_is_stripped(write: Write) -> None:
    # e.g. a Kubernetes secret mounted as a variable keeps the file's trailing newline
    path = write("operations:\n  - server: wv1\n    token: ${T}\n")
    assert load_config(path, {"T": f" {TOKEN}\n"}).operations[0].token.reveal() == TOKEN


def test_numbers_from_the_environment(write: Write) -> None:
    path = write(minimal("daily_request_limit: ${W}\nmax_body_bytes: ${B}", "budget_minutes: ${M}"))
    config = load_config(path, {"W": "4", "B": " 2048 ", "M": "1500.5"})
    assert (config.daily_request_limit, config.max_body_bytes) == (4, 2048)
    assert config.operations[0].budget_minutes == 1500.5


def test_environ_defaults_to_os_environ(write: Write, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WOLKVOX_TEST_CONFIG_TOKEN", TOKEN)
    path = write("operations:\n  - server: wv1\n    token: ${WOLKVOX_TEST_CONFIG_TOKEN}\n")
    assert load_config(path).operations[0].token.reveal() == TOKEN
    monkeypatch.delenv("WOLKVOX_TEST_CONFIG_TOKEN")
    with pytest.raises(ConfigError, match="WOLKVOX_TEST_CONFIG_TOKEN is not set"):
        load_config(path)


@pytest.mark.parametrize(
    ("raw", "env", "expected"),
    [
        pytest.param("cost$$center", {}, "cost$center", id="double-dollar"),
        pytest.param("$${NOT_EXPANDED}", {}, "${NOT_EXPANDED}", id="escaped-reference"),
        pytest.param("$$$${X}", {"X": "no"}, "$${X}", id="two-escapes"),
        pytest.param("$$${X}", {"X": "yes"}, "$yes", id="escape-then-reference"),
        pytest.param("a$b $ c$", {}, "a$b $ c$", id="lone-dollars-kept"),
        pytest.param("${A}${B}", {"A": "x", "B": "y"}, "xy", id="adjacent"),
        pytest.param("${A}", {"A": "${B}"}, "${B}", id="not-recursive"),
        pytest.param("${A}", {"A": "p$$q"}, "p$$q", id="value-kept-verbatim"),
    ],
)
def test_dollar_handling(write: Write, raw: str, env: dict[str, str], expected: str) -> None:
    path = write(yaml.safe_dump({"operations": [{"name": raw, "server": "wv1", "token": TOKEN}]}))
    assert load_config(path, env).operations[0].name == expected


@given(st.text())
def test_escaping_every_dollar_gives_the_text_back(text: str) -> None:
    assert _expand(text.replace("$", "$$"), "k", {}) == (text, False)


@given(st.text(), st.text(alphabet=st.characters(blacklist_characters="$")))
def test_a_reference_is_replaced_verbatim(value: str, around: str) -> None:
    assert _expand(f"{around}${{V_1}}{around}", "k", {"V_1": value}) == (f"{around}{value}{around}", True)


# ----- durations -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (300, 300.0),
        (2.5, 2.5),
        ("300", 300.0),
        ("2.5", 2.5),
        ("30s", 30.0),
        ("5m", 300.0),
        ("1h", 3600.0),
        ("500ms", 0.5),
        ("1h30m", 5400.0),
        ("1.5h", 5400.0),
        ("1m30s500ms", 90.5),
        ("1d", 86400.0),
        ("2d12h", 216000.0),
        (" 5m ", 300.0),
        ("365d", MAX_DURATION),
    ],
)
def test_parse_duration(value: object, seconds: float) -> None:
    result = parse_duration(value, "x")
    assert math.isclose(result, seconds) and isinstance(result, float)


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        (0, "greater than 0"),
        (-5, "greater than 0"),
        (0.0, "greater than 0"),
        ("0s", "greater than 0"),
        ("-5m", "greater than 0"),
        ("", "invalid duration"),
        ("5 m", "invalid duration"),
        ("5M", "invalid duration"),
        ("5min", "invalid duration"),
        ("1h1h", "invalid duration"),
        ("30m1h", "invalid duration"),
        ("1h30", "invalid duration"),
        (".5s", "invalid duration"),
        ("1e3", "invalid duration"),
        ("nan", "invalid duration"),
        (math.nan, "invalid duration"),
        (math.inf, "too long"),
        (10**400, "too long"),
        ("366d", "too long"),
        (True, "got a boolean"),
        (None, "got null"),
        ([5], "got a list"),
        ({"m": 5}, "got a mapping"),
    ],
)
def test_parse_duration_rejects(value: object, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_duration(value, "operations[3].something")
    error = info.value
    assert (error.key, error.file) == ("operations[3].something", None)
    assert str(error).startswith("operations[3].something: ") and fragment in str(error)
    assert str(error.with_file("c.yaml")).startswith("c.yaml: operations[3].something: ")


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (300, "5m"),
        (90, "1m30s"),
        (3600, "1h"),
        (5400, "1h30m"),
        (0.5, "500ms"),
        (1.5, "1s500ms"),
        (86400, "1d"),
        (90061.001, "1d1h1m1s1ms"),
        (0, "0s"),
        (-90, "-1m30s"),
    ],
)
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


@given(st.integers(min_value=1, max_value=int(MAX_DURATION * 1000)))
def test_format_then_parse_round_trips(milliseconds: int) -> None:
    seconds = milliseconds / 1000
    assert math.isclose(parse_duration(format_duration(seconds), "x"), seconds, rel_tol=1e-12)


# ----- warnings --------------------------------------------------------------------------------------


def warning_keys(config: Config) -> list[str]:
    prefix = f"{config.path}: "
    for warning in config.warnings:
        assert warning.startswith(prefix) and warning.splitlines() == [warning]
        assert TOKEN not in warning
    return [warning[len(prefix) :].split(":", 1)[0] for warning in config.warnings]


@pytest.mark.parametrize(
    ("top", "op", "expected"),
    [
        pytest.param("", "", [], id="defaults"),
        pytest.param("refresh_interval: 5m\nmax_age: 5m1ms", "", [], id="edges-just-fine"),
        pytest.param("refresh_interval: 30s", "", ["refresh_interval"], id="short-interval"),
        pytest.param(
            "refresh_interval: 30s", "base_url: http://127.0.0.1:19727", [], id="short-interval-not-wolkvox"
        ),
        pytest.param("refresh_interval: 299", "", ["refresh_interval"], id="just-below"),
        pytest.param("read_timeout: 60s", "", [], id="read-timeout-60s"),
        pytest.param("read_timeout: 61s", "", ["read_timeout"], id="read-timeout-above"),
        pytest.param("max_age: 5m", "", ["max_age"], id="max-age-equals-interval"),
        # Each report is refreshed every interval, whatever the number of apis of its token.
        pytest.param("max_age: 10m", "apis: [stereo_rec, ivr_calls]", [], id="two-apis-one-token"),
        pytest.param(
            "refresh_interval: 1m\nmax_age: 1m\nread_timeout: 2m",
            "",
            ["refresh_interval", "read_timeout", "max_age"],
            id="all",
        ),
    ],
)
def test_warnings(write: Write, top: str, op: str, expected: list[str]) -> None:
    assert warning_keys(load_config(write(minimal(top, op)), {})) == expected


def test_short_interval_warning_names_the_values(write: Write) -> None:
    config = load_config(write(minimal("refresh_interval: 90")), {})
    assert "1m30s" in config.warnings[0] and "5m" in config.warnings[0]


# ----- config.example.yaml ---------------------------------------------------------------------------

EXAMPLE = REPO / "config.example.yaml"
EXAMPLE_TOKEN_FILE = REPO / "examples" / "wolkvox_lima.token"


@pytest.fixture
def example() -> Path:
    """The example as shipped: its token_file is relative to it and exists in the repository."""
    assert EXAMPLE_TOKEN_FILE.is_file()
    return EXAMPLE


def test_example_loads(example: Path) -> None:
    config = load_config(example, {"WOLKVOX_TOKEN_BOGOTA": TOKEN})
    assert config.warnings == ()
    assert [op.name for op in config.operations] == ["bogota", "lima"]
    bogota, lima = config.operations
    lima_token = EXAMPLE_TOKEN_FILE.read_text(encoding="utf-8").strip()
    assert bogota.token.reveal() == TOKEN and lima.token.reveal() == lima_token
    assert lima.budget_minutes == 40000.0


def test_example_shows_the_defaults(example: Path, write: Write) -> None:
    config = load_config(example, {"WOLKVOX_TOKEN_BOGOTA": TOKEN})
    defaults = load_config(write(minimal()), {})
    for key in TOP_LEVEL_KEYS - {"operations", "prices", "labels"}:  # these end up per operation
        assert getattr(config, key) == getattr(defaults, key), key
    lima = config.operations[1]
    assert lima.base_url == f"https://{lima.server}.wolkvox.com" and lima.apis == DEFAULT_APIS


def test_example_needs_its_variable(example: Path) -> None:
    message = check_message(load_error(example, {}), example, f"{OP0}.token")
    assert "WOLKVOX_TOKEN_BOGOTA is not set" in message


def test_example_documents_every_key() -> None:
    text = EXAMPLE.read_text(encoding="utf-8")
    for key in TOP_LEVEL_KEYS | OPERATION_KEYS:
        assert re.search(rf"^\s*(# )?(- )?{key}:", text, re.MULTILINE), f"{key} missing from {EXAMPLE.name}"


# ----- likely typos: warnings, not errors -------------------------------------------------------------


def test_an_unknown_api_and_an_unused_price_warn_with_the_closest_name(write: Write) -> None:
    config = load_config(write(minimal("prices: {stereo: 0.004}", "apis: [stereo_rec, ivr_minute]")), {})
    assert warning_keys(config) == [f"{OP0}.apis[1]", "prices.stereo"]
    unknown, price = config.warnings
    assert "unknown api 'ivr_minute' (did you mean ivr_minutes?)" in unknown and "unknown_api" in unknown
    assert "no operation queries 'stereo' (did you mean stereo_rec?)" in price


def test_prices_and_budgets_that_nothing_uses_warn(write: Write) -> None:
    text = minimal(
        "prices: {ivr_calls: 0.02}",
        "apis: [ivr_calls]\nbudget_minutes: 1000\nprices: {ivr_call: 0.03}\ncost_budget: 50",
    )
    config = load_config(write(text), {})
    assert warning_keys(config) == [f"{OP0}.prices.ivr_call", f"{OP0}.budget_minutes"]
    assert "(did you mean ivr_calls?)" in config.warnings[0]
    assert "stereo_rec" in config.warnings[1]
    # Without any priced api, a cost budget is unused too; a far-off name gets no suggestion.
    config = load_config(write(minimal("", "apis: [ivr_calls]\ncost_budget: 50\nprices: {zzz: 1}")), {})
    assert warning_keys(config) == [f"{OP0}.prices.zzz", f"{OP0}.cost_budget"]
    assert "did you mean" not in config.warnings[0]


def test_known_apis_with_prices_all_used_do_not_warn(write: Write) -> None:
    text = minimal("prices: {stereo_rec: 0.004, ivr_calls: 0.02}", "apis: [stereo_rec, ivr_calls]")
    assert load_config(write(text + "    budget_minutes: 10\n    cost_budget: 5\n"), {}).warnings == ()


# ----- every error of a file in one run ---------------------------------------------------------------

SEVERAL_ERRORS = f"""
refresh_interval: 5 minutes
max_agee: 1h
currency: "US$"
operations:
  - server: wv9901
    token: {TOKEN}
    budget_minutes: lots
    colour: blue
  - token: {TOKEN}
  - 42
  - server: wv0042
    token: {TOKEN}
"""
SEVERAL_KEYS = [
    "max_agee",
    "refresh_interval",
    "currency",
    f"{OP0}.colour",
    f"{OP0}.budget_minutes",
    "operations[1].server",
    "operations[2]",
]


def test_every_error_of_a_file_is_reported_in_one_run(write: Write) -> None:
    path = write(SEVERAL_ERRORS)
    error = load_error(path)
    assert [one.key for one in error.errors] == SEVERAL_KEYS
    lines = error.lines()
    assert len(lines) == len(SEVERAL_KEYS)
    for one, line in zip(error.errors, lines, strict=True):
        assert line == check_message(one, path, one.key)
    # str() stays one line: the first problem and how many more.
    assert str(error) == f"{lines[0]} (and {len(SEVERAL_KEYS) - 1} more problems)"
    assert "did you mean max_age" in lines[0]


def test_a_long_list_of_errors_is_cut_with_a_count(write: Write) -> None:
    ops = "".join(f"  - {{server: wv{n}, token: t, colour: {n}}}\n" for n in range(60))
    path = write(f"operations:\n{ops}")
    lines = load_error(path).lines()
    assert len(lines) == 51 and lines[-1] == f"{path}: ... and 10 more problems"


def test_an_error_with_several_problems_survives_pickling(write: Write) -> None:
    import pickle

    error = load_error(write(SEVERAL_ERRORS))
    copy = pickle.loads(pickle.dumps(error))  # noqa: S301 (our own bytes)
    assert copy.lines() == error.lines() and str(copy) == str(error)
