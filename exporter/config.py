"""The YAML configuration file: parsing, validation, ``${VAR}`` expansion and defaults.

Every problem is a :class:`ConfigError` whose message is one line, ``<file>: <key path>: <problem>``, and
never contains a token. Problems that do not stop the exporter end up in :attr:`Config.warnings`.
"""

from __future__ import annotations

import difflib
import functools
import math
import os
import re
import stat
import unicodedata
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit

import yaml
from yaml.constructor import ConstructorError

from exporter.model import BILLING_APIS, STEREO_REC
from exporter.secret import Secret, one_line, sendable

T = TypeVar("T")

TOP_LEVEL_KEYS = frozenset(
    {
        "refresh_interval",
        "max_age",
        "connect_timeout",
        "read_timeout",
        "max_body_bytes",
        "state_file",
        "state_store",
        "daily_request_limit",
        "token_info_interval",
        "currency",
        "prices",
        "labels",
        "operations",
    }
)
# Keys of earlier versions: still accepted and checked, with a warning saying what they do now.
RETIRED_KEYS = frozenset({"fetch_workers", "stretch_intervals"})
OPERATION_KEYS = frozenset(
    {
        "name",
        "server",
        "token",
        "token_file",
        "budget_minutes",
        "base_url",
        "apis",
        "ca_file",
        "prices",
        "cost_budget",
        "labels",
    }
)

DEFAULT_REFRESH_INTERVAL = 300.0
DEFAULT_MAX_AGE = 3600.0
DEFAULT_CONNECT_TIMEOUT = 10.0
DEFAULT_READ_TIMEOUT = 60.0
DEFAULT_MAX_BODY_BYTES = 1_048_576
DEFAULT_APIS = ("stereo_rec",)
DEFAULT_DAILY_REQUEST_LIMIT = 1000  # wolkvox: about 1,000 requests per licence per day per token
DEFAULT_CURRENCY = "USD"
MIN_TOKEN_INFO_INTERVAL = 3600.0  # token_info is read at most hourly
DAY = 86_400.0

API_MIN_INTERVAL = 300.0  # the wolkvox API answers each report (operation x api) once per 5 minutes
API_MAX_CALL = 60.0  # ... and spends at most 60 s on a call

# Far above any sensible setting, and below threading.TIMEOUT_MAX, so a typo cannot crash a wait() later.
MAX_DURATION = 365 * 86_400.0
# A token is a few dozen bytes; a bigger file is most likely the wrong file, not worth reading whole.
MAX_TOKEN_FILE_BYTES = 64 * 1024

_SERVER = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*")
_API = re.compile(r"[a-z0-9_]+")
# Operation labels (`labels:`): Prometheus label names, minus the ones the exporter's own series carry
# or Prometheus attaches (a join on the info metric would clash with them); `month` labels the closed
# months' series.
_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
RESERVED_LABELS = frozenset({"operation", "server", "api", "reason", "currency", "job", "instance", "month"})
MAX_LABEL_VALUE_CHARS = 200
_VAR_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_NUMBER = re.compile(r"\d+(?:\.\d+)?")
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|[dhms])")
_UNITS = {"d": 86_400.0, "h": 3_600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
_UNIT_RANK = {unit: rank for rank, unit in enumerate(_UNITS)}  # units must come largest first
MAX_REPORTED_ERRORS = 50  # of one file, in one run (a 10,000-operation file may repeat one mistake)
_DURATION_HELP = "use seconds (300) or ms, s, m, h, d largest first (500ms, 30s, 5m, 1h30m)"


class ConfigError(Exception):
    """An invalid configuration. ``str()`` is one line: ``<file>: <key path>: <problem>``.

    ``file`` is None while the error travels up from a helper (e.g. :func:`parse_duration`) and is filled
    in by :func:`load_config`; ``key`` is None for problems with the file as a whole. A file with several
    problems raises one error carrying all of them (``errors``): ``str()`` is the first with a count of
    the others, ``lines()`` one line per problem.
    """

    def __init__(
        self,
        problem: str,
        key: str | None = None,
        file: str | None = None,
        more: tuple[ConfigError, ...] = (),
    ) -> None:
        self.problem = problem
        self.key = key
        self.file = file
        self.more = more
        super().__init__(str(self))

    def __str__(self) -> str:
        first = _render(self.file, self.key, self.problem)
        others = len(self.more)
        return f"{first} (and {others} more problem{'s' if others > 1 else ''})" if others else first

    def __reduce__(self) -> tuple[type[ConfigError], tuple[object, ...]]:
        # Pickled whole (configproc sends it from the child interpreter), not rebuilt from str().
        return (ConfigError, (self.problem, self.key, self.file, self.more))

    @property
    def errors(self) -> tuple[ConfigError, ...]:
        """Every problem, in the order found: this one first."""
        return (ConfigError(self.problem, self.key, self.file), *self.more)

    def lines(self, limit: int = MAX_REPORTED_ERRORS) -> list[str]:
        """One line per problem (at most ``limit``, then a line saying how many more)."""
        lines = [str(error) for error in self.errors[:limit]]
        if len(self.errors) > limit:
            lines.append(_render(self.file, None, f"... and {len(self.errors) - limit} more problems"))
        return lines

    def with_file(self, file: str) -> ConfigError:
        return ConfigError(self.problem, self.key, file, tuple(error.with_file(file) for error in self.more))

    @staticmethod
    def of(errors: list[ConfigError]) -> ConfigError:
        """One error carrying ``errors`` (flattened), the first in front."""
        flat = [one for error in errors for one in error.errors]
        first = flat[0]
        return ConfigError(first.problem, first.key, first.file, tuple(flat[1:]))


class _Problems:
    """Collects the problems of a file, so one run reports all of them, not only the first."""

    def __init__(self) -> None:
        self.errors: list[ConfigError] = []

    def get(self, read: Callable[[], T], fallback: T) -> T:
        """``read()``, or ``fallback`` (to go on checking) after noting its error."""
        try:
            return read()
        except ConfigError as error:
            self.errors.append(error)
            return fallback

    def raise_any(self) -> None:
        if self.errors:
            raise ConfigError.of(self.errors)


@dataclass(frozen=True, slots=True)
class OperationConfig:
    """One wolkvox operation (one token). ``repr()`` shows the token as ``Secret('<redacted>')``."""

    name: str
    server: str
    token: Secret
    base_url: str
    budget_minutes: float | None
    apis: tuple[str, ...]
    ca_file: str | None
    # Unit price per api (top-level `prices` overlaid with the operation's own), and a monthly cost budget.
    prices: tuple[tuple[str, float], ...] = ()
    cost_budget: float | None = None
    # User labels (top-level `labels` overlaid with the operation's own), sorted by name: exported once,
    # on wolkvox_operation_info, and the statement's columns.
    labels: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Config:
    """A validated configuration file. Durations are seconds; ``state_file``, ``ca_file`` absolute paths."""

    path: str
    refresh_interval: float
    max_age: float
    connect_timeout: float
    read_timeout: float
    max_body_bytes: int
    state_file: str | None  # a JSON state file of an earlier version, migrated into the store once
    operations: tuple[OperationConfig, ...]
    warnings: tuple[str, ...]
    state_store: str | None = None  # the SQLite state store; with only state_file: its name, .db
    daily_request_limit: int = DEFAULT_DAILY_REQUEST_LIMIT
    token_info_interval: float | None = None
    currency: str = DEFAULT_CURRENCY


# ----- command-line values ---------------------------------------------------------------------


def parse_listen_address(address: str) -> tuple[str | None, int]:
    """``host:port``, ``:port`` (all interfaces) or ``[v6]:port`` -> (host or None, port)."""
    host, sep, port_text = address.rpartition(":")
    if not sep or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"--web.listen-address: expected host:port, got {address!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return (host or None), int(port_text)


# ----- durations ------------------------------------------------------------------------------------


def parse_duration(value: object, where: str = "duration") -> float:
    """Seconds from ``300``, ``2.5``, ``"300"``, ``"30s"``, ``"5m"``, ``"1h30m"``, ``"500ms"``, ``"1d"``.

    Raises ConfigError naming ``where`` for anything else, for values <= 0 and above one year.
    """
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ConfigError(f"expected a duration, got {_type_name(value)}; {_DURATION_HELP}", where)
    if isinstance(value, str):
        seconds = _parse_duration_text(value, where)
    elif isinstance(value, int) and value > MAX_DURATION:
        seconds = math.inf  # a huge YAML integer would overflow float()
    else:
        seconds = float(value)
    if math.isnan(seconds):
        raise ConfigError(f"invalid duration {_show(value)}; {_DURATION_HELP}", where)
    if seconds <= 0:
        raise ConfigError(f"must be greater than 0, got {_show(value)}", where)
    if seconds > MAX_DURATION:
        raise ConfigError(f"too long, got {_show(value)} (at most {format_duration(MAX_DURATION)})", where)
    return seconds


def _parse_duration_text(text: str, where: str) -> float:
    body = text.strip()
    if _NUMBER.fullmatch(body):
        return float(body)
    if body.startswith("-"):
        raise ConfigError(f"must be greater than 0, got {_show(text)}", where)
    total, pos, last_rank = 0.0, 0, -1
    while pos < len(body):
        match = _DURATION_PART.match(body, pos)
        if match is None or _UNIT_RANK[match.group(2)] <= last_rank:
            raise ConfigError(f"invalid duration {_show(text)}; {_DURATION_HELP}", where)
        total += float(match.group(1)) * _UNITS[match.group(2)]
        pos, last_rank = match.end(), _UNIT_RANK[match.group(2)]
    if not body:
        raise ConfigError(f"invalid duration {_show(text)}; {_DURATION_HELP}", where)
    return total


def format_duration(seconds: float) -> str:
    """The shortest ``parse_duration`` spelling, to the millisecond: 300 -> "5m", 90 -> "1m30s"."""
    if not math.isfinite(seconds):
        return str(seconds)
    sign = "-" if seconds < 0 else ""
    rest = round(abs(seconds) * 1000)
    parts: list[str] = []
    for unit, size in (("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1000), ("ms", 1)):
        count, rest = divmod(rest, size)
        if count:
            parts.append(f"{count}{unit}")
    return sign + "".join(parts) if parts else "0s"


# ----- loading ----------------------------------------------------------------------------------------


def load_config(
    path: str | os.PathLike[str], environ: Mapping[str, str] | None = None, *, tokens: bool = True
) -> Config:
    """Read and validate ``path``. ``environ`` (default ``os.environ``) supplies ``${VAR}`` values.

    ``tokens=False`` leaves ``token`` and ``token_file`` unread (each operation's token is then empty): for
    what needs no token, such as printing a statement where the tokens' variables or files are absent.
    """
    file = os.fsdecode(path)
    try:
        return _build(file, _read_yaml(file), os.environ if environ is None else environ, tokens)
    except ConfigError as error:
        # `from None`: the chained exception could carry file content (a token) into a logged traceback.
        raise error.with_file(file) from None


def _read_yaml(file: str) -> object:
    try:
        with open(file, "rb") as handle:
            raw = handle.read()
    except OSError as error:
        raise ConfigError(f"cannot read the configuration file: {_os_reason(error)}") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise ConfigError(f"not valid UTF-8 (byte {error.start})") from None
    try:
        loader = StrictLoader(text)
    except yaml.reader.ReaderError as error:
        # e.g. a control character; the position is an index into the text.
        line = text.count("\n", 0, error.position) + 1
        column = error.position - (text.rfind("\n", 0, error.position) + 1) + 1
        problem = f"YAML error: character #x{error.character:04x}: {error.reason}"
        raise ConfigError(problem, f"line {line}, column {column}") from None
    try:
        return loader.get_single_data()
    except yaml.MarkedYAMLError as error:
        # Only the problem and its position: the error's own str() quotes the offending line,
        # which may be the one holding a token.
        mark = error.problem_mark or error.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else None
        problem = ", ".join(text for text in (error.context, error.problem) if text)
        raise ConfigError(f"YAML syntax error: {problem}", where) from None
    except yaml.YAMLError as error:
        raise ConfigError(f"YAML error: {type(error).__name__}") from None
    except RecursionError:
        raise ConfigError("YAML nested too deeply") from None
    finally:
        loader.dispose()


class StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys (PyYAML keeps the last one silently) and reports
    constructor failures (``!!int abc``, ``2024-13-01``) with their position instead of crashing."""

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep)
        except (ValueError, TypeError, OverflowError) as error:
            raise ConstructorError(None, None, f"invalid value ({error})", node.start_mark) from None

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, yaml.MappingNode):
            seen: set[object] = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # `<<:` keys may legitimately be overridden
                key = self.construct_object(key_node, deep=True)
                try:
                    duplicate = key in seen
                except TypeError:
                    continue  # unhashable: the base class reports it
                if duplicate:
                    raise ConstructorError(None, None, f"duplicate key {_show(key)}", key_node.start_mark)
                seen.add(key)
        return super().construct_mapping(node, deep)


def _build(file: str, data: object, environ: Mapping[str, str], tokens: bool = True) -> Config:
    if data is None:
        raise ConfigError("the file is empty; expected a mapping with at least `operations`")
    if not isinstance(data, dict):
        raise ConfigError(f"expected a mapping at the top level, got {_type_name(data)}")
    base_dir = os.path.dirname(os.path.abspath(file))
    problems = _Problems()
    top = _Section(data, "", environ, TOP_LEVEL_KEYS | RETIRED_KEYS, problems)
    get = problems.get
    refresh_interval = get(lambda: top.duration("refresh_interval", DEFAULT_REFRESH_INTERVAL), 300.0)
    max_age = get(lambda: top.duration("max_age", DEFAULT_MAX_AGE), DEFAULT_MAX_AGE)
    retired: list[tuple[str, str]] = get(lambda: _retired_keys(top), [])
    connect_timeout = get(lambda: top.duration("connect_timeout", DEFAULT_CONNECT_TIMEOUT), 1.0)
    read_timeout = get(lambda: top.duration("read_timeout", DEFAULT_READ_TIMEOUT), DEFAULT_READ_TIMEOUT)
    max_body_bytes = get(lambda: top.integer("max_body_bytes", DEFAULT_MAX_BODY_BYTES, minimum=1), 1)
    daily_request_limit = get(
        lambda: top.integer("daily_request_limit", DEFAULT_DAILY_REQUEST_LIMIT, minimum=1), 1
    )
    token_info_interval = get(lambda: _token_info_interval(top), None)
    currency = get(lambda: _currency(top), DEFAULT_CURRENCY)
    prices: dict[str, float] = get(lambda: top.prices("prices"), {})
    default_labels: dict[str, str] = get(lambda: top.labels("labels", None), {})
    state_file = get(lambda: _state_file(top, base_dir), None)
    state_store = get(lambda: _state_store(top, base_dir, state_file), None)

    items = data.get("operations")
    if "operations" not in data:
        problems.errors.append(ConfigError("missing; list at least one operation", "operations"))
    elif not isinstance(items, list):
        problems.errors.append(
            ConfigError(f"expected a list of operations, got {_type_name(items)}", "operations")
        )
    elif not items:
        problems.errors.append(ConfigError("is empty; list at least one operation", "operations"))
    operations: list[OperationConfig] = []
    own_prices: list[dict[str, float]] = []
    first_index: dict[str, int] = {}
    shared: dict[Any, Any] = {}  # equal values of the operations as one object (_Shared)
    for index, item in enumerate(items if isinstance(items, list) else []):
        where = f"operations[{index}]"
        if not isinstance(item, dict):
            problems.errors.append(ConfigError(f"expected a mapping, got {_type_name(item)}", where))
            continue
        section = _Section(item, where, environ, OPERATION_KEYS, problems)
        mine: dict[str, float] = get(functools.partial(section.prices, "prices"), {})
        operation = _operation(section, base_dir, prices, mine, problems, default_labels, tokens, shared)
        if operation is None:
            continue
        if operation.name in first_index:
            origin = "" if "name" in item and item["name"] is not None else " (the name defaults to server)"
            problems.errors.append(
                ConfigError(
                    f"duplicate operation name {_show(operation.name)}, already used by "
                    f"operations[{first_index[operation.name]}]{origin}",
                    f"{where}.name",
                )
            )
            continue
        first_index[operation.name] = index
        operations.append(operation)
        own_prices.append(mine)
    problems.raise_any()

    warnings = (
        retired
        + _warnings(refresh_interval, max_age, read_timeout, operations)
        + _api_warnings(operations, prices, own_prices)
    )
    if state_file is not None and state_store != state_file:
        warnings.append(
            (
                "state_file",
                f"the state now lives in the SQLite state_store {state_store}; a JSON state file here "
                "is migrated into it once (then renamed .migrated); set state_store instead",
            )
        )
    config = Config(
        path=file,
        refresh_interval=refresh_interval,
        max_age=max_age,
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
        max_body_bytes=max_body_bytes,
        state_file=state_file,
        state_store=state_store,
        operations=tuple(operations),
        warnings=tuple(_render(file, key, text) for key, text in warnings),
        daily_request_limit=daily_request_limit,
        token_info_interval=token_info_interval,
        currency=currency,
    )
    return config


def _token_info_interval(top: _Section) -> float | None:
    interval = top.optional_duration("token_info_interval")
    if interval is not None and interval < MIN_TOKEN_INFO_INTERVAL:
        raise ConfigError(
            f"must be at least {format_duration(MIN_TOKEN_INFO_INTERVAL)}; read at most hourly",
            "token_info_interval",
        )
    return interval


def _currency(top: _Section) -> str:
    currency = top.string("currency") or DEFAULT_CURRENCY
    if not re.fullmatch(r"[A-Za-z]{1,8}", currency):
        raise ConfigError(
            f"expected a currency code of letters (e.g. USD, COP), got {_show(currency)}", "currency"
        )
    return currency


def _state_file(top: _Section, base_dir: str) -> str | None:
    state_file = top.string("state_file")
    if state_file is None:
        return None
    _require_nonempty(state_file, "state_file")
    return os.path.join(base_dir, state_file)


def _state_store(top: _Section, base_dir: str, state_file: str | None) -> str | None:
    state_store = top.string("state_store")
    if state_store is None:
        return store_path_for(state_file) if state_file is not None else None
    _require_nonempty(state_store, "state_store")
    return os.path.join(base_dir, state_store)


def store_path_for(state_file: str) -> str:
    """The state store a ``state_file`` alone stands for: ``x.json`` -> ``x.db`` (the JSON file is
    migrated into it once); any other name is the store itself (a JSON file found there is migrated in
    place)."""
    root, extension = os.path.splitext(state_file)
    return root + ".db" if extension == ".json" else state_file


def _retired_keys(top: _Section) -> list[tuple[str, str]]:
    """Keys of earlier versions: still accepted (and checked), with a warning saying what they do now."""
    warnings: list[tuple[str, str]] = []
    if top.get("fetch_workers") is not None:
        top.integer("fetch_workers", 1, minimum=1)
        warnings.append(
            ("fetch_workers", "is no longer used and can be removed: upstream requests are asynchronous")
        )
    if top.get("stretch_intervals") is not None:
        top.boolean("stretch_intervals", False)
        warnings.append(
            (
                "stretch_intervals",
                "is no longer needed and can be removed: intervals always stretch to stay inside "
                "daily_request_limit",
            )
        )
    return warnings


def _operation(
    section: _Section,
    base_dir: str,
    default_prices: dict[str, float],
    own_prices: dict[str, float],
    problems: _Problems,
    default_labels: dict[str, str] | None = None,
    tokens: bool = True,
    shared: dict[Any, Any] | None = None,
) -> OperationConfig | None:
    """The operation, or None when it has a problem (each noted in ``problems``). Its base URL, apis,
    CA file, prices and labels are the objects of an earlier operation (in ``shared``) where equal: at
    10,000 operations a copy of each is ~1.5 MB kept for the life of the process."""
    before = len(problems.errors)
    get = problems.get
    server = get(lambda: _server(section), None)
    name = get(lambda: _name(section, server), None)
    base_url = get(lambda: _base_url(section, server), "")
    budget = get(lambda: section.number("budget_minutes"), None)
    apis: tuple[str, ...] = get(lambda: section.api_list("apis"), DEFAULT_APIS)
    ca_file = get(lambda: _ca_file(section, base_dir), None)
    token = get(lambda: _token(section, base_dir), None) if tokens else Secret("")
    cost_budget = get(lambda: section.number("cost_budget"), None)
    labels: dict[str, str] = get(lambda: section.labels("labels", name), {})
    if len(problems.errors) > before or server is None or name is None or token is None:
        return None
    pool: dict[Any, Any] = {} if shared is None else shared
    return OperationConfig(
        name=name,
        server=server,
        token=token,
        base_url=_one_of(pool, base_url),
        budget_minutes=budget,
        apis=_one_of(pool, apis),
        ca_file=_one_of(pool, ca_file),
        prices=_one_of(pool, tuple(sorted({**default_prices, **own_prices}.items()))),
        cost_budget=cost_budget,
        labels=_one_of(pool, tuple(sorted({**(default_labels or {}), **labels}.items()))),
    )


def _one_of(pool: dict[Any, Any], value: T) -> T:
    """``value``, or the equal object already in ``pool`` (a pickle keeps them one object too)."""
    kept: T = pool.setdefault(value, value)
    return kept


def _server(section: _Section) -> str:
    server = section.string("server")
    if server is None:
        raise ConfigError(
            "missing; the operation's server nomenclature (e.g. wv9901)", section.where("server")
        )
    if not _SERVER.fullmatch(server):
        raise ConfigError(
            f"invalid server {_show(server)}; expected letters, digits and '-' (e.g. wv9901)",
            section.where("server"),
        )
    return server


def _name(section: _Section, server: str | None) -> str | None:
    name = section.string("name")
    if name is None:
        return server
    if not name.strip() or any(_is_unprintable(ch) for ch in name):
        raise ConfigError(
            f"must be a non-empty string without control characters, got {_show(name)}", section.where("name")
        )
    return name


def _base_url(section: _Section, server: str | None) -> str:
    base_url = section.string("base_url")
    if base_url is None:
        return f"https://{server}.wolkvox.com"
    return _check_url(base_url, section.where("base_url"))


def _ca_file(section: _Section, base_dir: str) -> str | None:
    ca_file = section.string("ca_file")
    if ca_file is None:
        return None
    _require_nonempty(ca_file, section.where("ca_file"))
    ca_file = os.path.join(base_dir, ca_file)
    _read_file(ca_file, section.where("ca_file"), limit=1)
    return ca_file


def _token(section: _Section, base_dir: str) -> Secret:
    # Messages here may name keys, files and variables, never the value.
    token = section.string("token")
    token_file = section.string("token_file")
    if token is not None and token_file is not None:
        raise ConfigError("set either token or token_file, not both", section.where("token_file"))
    if token is not None:
        where, what, value = section.where("token"), "the token", token.strip()
    elif token_file is not None:
        where = section.where("token_file")
        _require_nonempty(token_file, where)
        path = os.path.join(base_dir, token_file)
        what, value = f"the token in {path}", _read_token_file(path, where)
    else:
        raise ConfigError("missing; set token or token_file", section.where("token"))
    if not value:
        raise ConfigError(f"{what} is empty", where)
    if not sendable(value):
        # An HTTP header cannot carry it: every refresh would fail.
        raise ConfigError(f"{what} contains whitespace, control or non-ASCII characters", where)
    return Secret(value)


def _read_token_file(path: str, where: str) -> str:
    raw = _read_file(path, where, limit=MAX_TOKEN_FILE_BYTES)
    if len(raw) > MAX_TOKEN_FILE_BYTES:
        raise ConfigError(f"{path} is larger than {MAX_TOKEN_FILE_BYTES} bytes; not a token file?", where)
    try:
        return raw.decode("utf-8-sig").strip()
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not valid UTF-8 text", where) from None


def _check_url(url: str, where: str) -> str:
    # The URL is not quoted back: if it carries credentials, they must not reach the log.
    if any(_is_unprintable(ch) or ch.isspace() for ch in url):
        raise ConfigError("contains whitespace or control characters", where)
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError as error:
        raise ConfigError(f"invalid URL ({error})", where) from None
    if parts.scheme not in ("http", "https"):
        raise ConfigError("must start with http:// or https://", where)
    if not parts.hostname:
        raise ConfigError("has no host name", where)
    if parts.username is not None or parts.password is not None:
        raise ConfigError("must not contain credentials (user:password@)", where)
    if parts.query or parts.fragment or url.endswith(("?", "#")):
        raise ConfigError("must not contain a query (?) or a fragment (#)", where)
    return url.rstrip("/")


def _read_file(path: str, where: str, limit: int) -> bytes:
    """Up to ``limit + 1`` bytes of a regular file (so callers can tell it is too big)."""
    try:
        # Checked first: opening a FIFO would block the load (and a reload) forever.
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise ConfigError(f"cannot read {path}: not a regular file", where)
        with open(path, "rb") as handle:
            return handle.read(limit + 1)
    except OSError as error:
        raise ConfigError(f"cannot read {path}: {_os_reason(error)}", where) from None


def _require_nonempty(value: str, where: str) -> None:
    if not value.strip():
        raise ConfigError("is empty", where)


def _warnings(
    refresh_interval: float, max_age: float, read_timeout: float, operations: list[OperationConfig]
) -> list[tuple[str, str]]:
    warnings: list[tuple[str, str]] = []
    # The 5-minute rule is wolkvox's: a base_url elsewhere (the bundled simulator, a proxy under test)
    # need not keep it.
    on_wolkvox = any(_is_wolkvox_host(op.base_url) for op in operations)
    if refresh_interval < API_MIN_INTERVAL and on_wolkvox:
        text = f"{format_duration(refresh_interval)} is below {format_duration(API_MIN_INTERVAL)}"
        warnings.append(
            (
                "refresh_interval",
                f"{text}: the wolkvox API allows each report once per 5 minutes, "
                "expect refused requests (api_error)",
            )
        )
    if read_timeout > API_MAX_CALL:
        text = f"{format_duration(read_timeout)} is above {API_MAX_CALL:g}s"
        warnings.append(
            (
                "read_timeout",
                f"{text}, the longest the wolkvox API spends on a call; a longer wait only delays failures",
            )
        )
    if max_age <= refresh_interval:
        interval = format_duration(refresh_interval)
        text = f"{format_duration(max_age)} is not longer than refresh_interval {interval}"
        warnings.append(("max_age", f"{text}; values will drop out of /metrics between refreshes"))
    return warnings


def _api_warnings(
    operations: list[OperationConfig], prices: dict[str, float], own_prices: list[dict[str, float]]
) -> list[tuple[str, str]]:
    """An api the exporter does not know (wolkvox would answer unknown_api), and a price or a budget for
    an api no operation queries (it would never be used): likely typos, named with the closest match."""
    warnings: list[tuple[str, str]] = []
    queried = {api for op in operations for api in op.apis}
    for index, (op, mine) in enumerate(zip(operations, own_prices, strict=True)):
        where = f"operations[{index}]"
        for position, api in enumerate(op.apis):
            if api not in BILLING_APIS:
                warnings.append(
                    (
                        f"{where}.apis[{position}]",
                        f"unknown api {_show(api)}{_did_you_mean(api, BILLING_APIS)}; wolkvox will most "
                        "likely answer THE API YOU WANT TO CONSULT DOES NOT EXIST (reason unknown_api)",
                    )
                )
        for api in mine:
            if api not in op.apis:
                hint = _did_you_mean(api, op.apis)
                warnings.append(
                    (f"{where}.prices.{api}", f"this operation does not query {_show(api)}{hint}; unused")
                )
        if op.budget_minutes is not None and STEREO_REC not in op.apis:
            warnings.append(
                (
                    f"{where}.budget_minutes",
                    f"is a budget of {STEREO_REC} minutes, which this operation does not query; unused",
                )
            )
        if op.cost_budget is not None and not any(api in op.apis for api, _ in op.prices):
            warnings.append(
                (f"{where}.cost_budget", "no api of this operation has a price, so it has no cost; unused")
            )
    for api in prices:
        if api not in queried:
            hint = _did_you_mean(api, queried | set(BILLING_APIS))
            warnings.append((f"prices.{api}", f"no operation queries {_show(api)}{hint}; unused"))
    return warnings


def _did_you_mean(word: str, candidates: Collection[str]) -> str:
    close = difflib.get_close_matches(word, sorted(candidates), n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def _is_wolkvox_host(base_url: str) -> bool:
    host = (urlsplit(base_url).hostname or "").lower()
    return host == "wolkvox.com" or host.endswith(".wolkvox.com")


# ----- one mapping of the file ------------------------------------------------------------------------


class _Section:
    """A mapping being validated: typed getters that expand ``${VAR}`` and name errors by key path.

    An absent key and an explicit null (``key:``) both mean "use the default".
    """

    def __init__(
        self,
        data: dict[Any, Any],
        prefix: str,
        environ: Mapping[str, str],
        keys: Collection[str],
        problems: _Problems | None = None,
    ) -> None:
        self._data = data
        self._prefix = prefix
        self._environ = environ
        unknown: list[ConfigError] = []
        for key in data:
            if key not in keys:
                hint = _did_you_mean(str(key), keys)
                unknown.append(
                    ConfigError(f"unknown key{hint}; known keys: {', '.join(sorted(keys))}", self.where(key))
                )
        if unknown and problems is not None:
            problems.errors.extend(unknown)
        elif unknown:
            raise ConfigError.of(unknown)

    def get(self, key: str) -> object:
        """The raw value (None when absent or null), for presence checks."""
        return self._data.get(key)

    def where(self, key: object) -> str:
        name = key if isinstance(key, str) else repr(key)
        return f"{self._prefix}.{name}" if self._prefix else name

    def _raw(self, key: str) -> tuple[object, bool]:
        """The value with ``${VAR}`` expanded, and whether a variable was substituted."""
        value = self._data.get(key)
        if isinstance(value, str):
            return _expand(value, self.where(key), self._environ)
        return value, False

    def string(self, key: str) -> str | None:
        value, _ = self._raw(key)
        if value is None or isinstance(value, str):
            return value
        # The value is not shown: this may be a token written without quotes.
        raise ConfigError(f"expected a string, got {_type_name(value)} (quote it)", self.where(key))

    def duration(self, key: str, default: float) -> float:
        value, _ = self._raw(key)
        return default if value is None else parse_duration(value, self.where(key))

    def integer(self, key: str, default: int, minimum: int) -> int:
        value, from_env = self._raw(key)
        if value is None:
            return default
        if from_env and isinstance(value, str):  # `${VAR}` always gives a string; accept a number in it
            try:
                value = int(value.strip())
            except ValueError:
                raise ConfigError(f"expected an integer, got {_show(value)}", self.where(key)) from None
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"expected an integer, got {_type_name(value)}", self.where(key))
        if value < minimum:
            raise ConfigError(f"must be at least {minimum}, got {value}", self.where(key))
        return value

    def number(self, key: str) -> float | None:
        value, from_env = self._raw(key)
        if value is None:
            return None
        if from_env and isinstance(value, str):
            try:
                value = float(value.strip())
            except ValueError:
                raise ConfigError(f"expected a number, got {_show(value)}", self.where(key)) from None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"expected a number, got {_type_name(value)}", self.where(key))
        try:
            number = float(value)
        except OverflowError:  # a huge YAML integer
            number = math.inf
        if not math.isfinite(number) or number < 0:
            raise ConfigError(f"must be a finite number >= 0, got {_show(value)}", self.where(key))
        return number

    def boolean(self, key: str, default: bool) -> bool:
        value, _ = self._raw(key)
        if value is None:
            return default
        if isinstance(value, str) and value.strip().lower() in ("true", "false"):  # from ${VAR}
            return value.strip().lower() == "true"
        if not isinstance(value, bool):
            raise ConfigError(f"expected true or false, got {_type_name(value)}", self.where(key))
        return value

    def optional_duration(self, key: str) -> float | None:
        value, _ = self._raw(key)
        return None if value is None else parse_duration(value, self.where(key))

    def prices(self, key: str) -> dict[str, float]:
        """A mapping of api name -> unit price (a number >= 0)."""
        value = self._data.get(key)
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise ConfigError(
                f"expected a mapping of api: unit price, got {_type_name(value)}", self.where(key)
            )
        prices: dict[str, float] = {}
        for api in value:
            if not isinstance(api, str) or not _API.fullmatch(api):
                raise ConfigError(f"invalid api name {_show(api)}; expected [a-z0-9_]+", self.where(key))
            price = _Section(value, self.where(key), self._environ, value.keys()).number(api)
            if price is not None:
                prices[api] = price
        return prices

    def labels(self, key: str, operation: str | None) -> dict[str, str]:
        """A mapping of label name -> value (``labels:``); ``operation`` names the operation in errors."""
        value = self._data.get(key)
        if value is None:
            return {}
        of = f" (operation {_show(operation)})" if operation is not None else ""
        if not isinstance(value, dict):
            raise ConfigError(
                f"expected a mapping of label name: value{of}, got {_type_name(value)}", self.where(key)
            )
        labels: dict[str, str] = {}
        for name, raw in value.items():
            where = f"{self.where(key)}.{name}" if isinstance(name, str) else self.where(key)
            if not isinstance(name, str) or not _LABEL_NAME.fullmatch(name):
                raise ConfigError(
                    f"invalid label name {_show(name)}{of}; expected [a-zA-Z_][a-zA-Z0-9_]*", where
                )
            if name.startswith("__") or name in RESERVED_LABELS:
                raise ConfigError(
                    f"label name {_show(name)} is reserved{of}; the exporter or Prometheus sets it "
                    f"(reserved: {', '.join(sorted(RESERVED_LABELS))} and names starting with __)",
                    where,
                )
            if isinstance(raw, str):
                raw, _ = _expand(raw, where, self._environ)
            elif isinstance(raw, int) and not isinstance(raw, bool):
                raw = str(raw)  # cost_center: 12
            else:
                raise ConfigError(f"expected a string value, got {_type_name(raw)}{of}", where)
            if not raw.strip():
                raise ConfigError(f"is empty{of}; give a value or leave the label out", where)
            if any(_is_unprintable(ch) for ch in raw):
                raise ConfigError(f"contains control characters{of}", where)
            if len(raw) > MAX_LABEL_VALUE_CHARS:
                raise ConfigError(
                    f"is longer than {MAX_LABEL_VALUE_CHARS} characters{of} ({len(raw)})", where
                )
            labels[name] = raw
        return labels

    def api_list(self, key: str) -> tuple[str, ...]:
        value = self._data.get(key)
        where = self.where(key)
        if value is None:
            return DEFAULT_APIS
        if not isinstance(value, list):
            raise ConfigError(f"expected a list of api names, got {_type_name(value)}", where)
        if not value:
            raise ConfigError(f"is empty; list at least one api (default: {', '.join(DEFAULT_APIS)})", where)
        apis: list[str] = []
        for index, item in enumerate(value):
            item_where = f"{where}[{index}]"
            if isinstance(item, str):
                item, _ = _expand(item, item_where, self._environ)
            if not isinstance(item, str):
                raise ConfigError(f"expected an api name, got {_type_name(item)}", item_where)
            if not _API.fullmatch(item):
                raise ConfigError(f"invalid api name {_show(item)}; expected [a-z0-9_]+", item_where)
            if item in apis:
                raise ConfigError(f"duplicate api {_show(item)}", item_where)
            apis.append(item)
        return tuple(apis)


def _expand(text: str, where: str, environ: Mapping[str, str]) -> tuple[str, bool]:
    """Replace ``${VAR}`` from ``environ`` and ``$$`` by ``$``; any other ``$`` is kept as it is.

    Substituted values are not expanded again, so a variable may hold a ``$``.
    """
    out: list[str] = []
    pos, substituted = 0, False
    while (dollar := text.find("$", pos)) >= 0:
        out.append(text[pos:dollar])
        following = text[dollar + 1 : dollar + 2]
        if following == "$":
            out.append("$")
            pos = dollar + 2
        elif following == "{":
            match = _VAR_REF.match(text, dollar)
            if match is None:
                # Not quoted back: this may be a token.
                raise ConfigError(
                    "malformed ${...}; use ${NAME} (letters, digits, _) or $$ for a literal $", where
                )
            name = match.group(1)
            if name not in environ:
                raise ConfigError(f"environment variable {name} is not set", where)
            out.append(environ[name])
            substituted, pos = True, match.end()
        else:
            out.append("$")
            pos = dollar + 1
    out.append(text[pos:])
    return "".join(out), substituted


# ----- message helpers --------------------------------------------------------------------------------


def _render(file: str | None, key: str | None, problem: str) -> str:
    return one_line(": ".join(part for part in (file, key, problem) if part))


def _is_unprintable(ch: str) -> bool:
    # Cc control, Cf format (bidi overrides), Zl/Zp line and paragraph separators.
    return unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp")


def _show(value: object) -> str:
    """A short quoted rendering of a (non-secret) value for messages."""
    text = repr(value) if isinstance(value, str) else str(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _os_reason(error: OSError) -> str:
    return error.strerror or type(error).__name__


def _type_name(value: object) -> str:
    names = {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean", int: "an integer"}
    if value is None:
        return "null"
    if isinstance(value, float):
        return "a number"
    return names.get(type(value), type(value).__name__)
