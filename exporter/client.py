"""One request to the wolkvox billing API in, one parsed answer or one typed failure out.

The client knows nothing of threads, scheduling or metrics. ``WolkvoxClient.fetch`` sends
``GET {base_url}/api/v2/billing.php?api={api}`` with the ``wolkvox-token`` and ``wolkvox_server``
headers and returns a :class:`Reading`; every failure is a :class:`FetchError` whose ``reason`` is one
of :data:`REASONS` and whose ``detail`` is one line, safe to log, and never contains the token.

The value of a reading is the SUM of ``items`` over all rows of ``data``. The API documents one row
per operation; if it ever splits the month into several rows, the total is what is billed. An empty
``data`` list with code 200 is a reading of 0 (no usage recorded yet this month).

Failure reasons (``REASONS``, in this order) and when each is raised:

``timeout``
    Connect timeout; read timeout; or the whole answer not received within connect_timeout +
    read_timeout (the total deadline, enforced while the body is streamed).
``connection``
    Connection refused or reset (also mid-body), DNS failure, TLS failure (certificate, handshake),
    broken chunked encoding, a body shorter than its Content-Length.
``http_status``
    HTTP status not 200 and the body is not a wolkvox error document: any 3xx (redirects are never
    followed), 5xx HTML pages, 403 with an empty body (wolkvox maintenance or backup); also an HTTP
    status not 200 with a body that says code 200.
``api_error``
    A wolkvox error document (``code`` not 200) not covered below, e.g. "EXCEEDS THE LIMIT OF
    SIMULTANEOUS REQUESTS PER TOKEN (2)" or "SOME PARAMETERS ARE REQUIRED".
``auth``
    HTTP 401 or code 401, "PLEASE ENTER THE WOLKVOX-TOKEN", "PLEASE VALIDATE TOKEN"; also a token that
    cannot be sent in an HTTP header (empty, or with whitespace or control characters).
``token_limit``
    "TOKEN LIMIT EXCEEDED": the token's daily request budget is spent.
``unknown_api``
    "THE API YOU WANT TO CONSULT DOES NOT EXIST".
``invalid_response``
    HTTP 200 but the body is empty, not UTF-8, not JSON, or of the wrong shape (not an object, no
    numeric ``code``, ``data`` missing or not a list, a row not an object, a row without ``items``); a
    body larger than max_body_bytes; a Content-Encoding that cannot be decoded.
``parse``
    An ``items`` value that is not a plain non-negative decimal number (see ``parse_items``), or a sum
    too large for a float.

Error texts are matched case-insensitively as substrings of the body's ``error`` and ``msg``. ``code``
may be the string ``"200"`` or the number ``200``. When the HTTP status is not 200 but the body is a
wolkvox error document, the body decides the reason.

Limits: a server that sends the status line and headers slowly is bounded per socket read by the read
timeout only (http.client caps their number and size); the total deadline is enforced from the end of
the headers on, while the body is streamed.
"""

from __future__ import annotations

import http.cookiejar
import json
import logging
import math
import re
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import requests
import requests.adapters
import urllib3.exceptions

from exporter import __version__
from exporter.secret import Secret

__all__ = [
    "REASONS",
    "FetchError",
    "ItemsError",
    "Reading",
    "TokenInfo",
    "WolkvoxClient",
    "parse_body",
    "parse_items",
    "parse_token_info",
]

logger = logging.getLogger(__name__)

REASONS: tuple[str, ...] = (
    "timeout",
    "connection",
    "http_status",
    "api_error",
    "auth",
    "token_limit",
    "unknown_api",
    "invalid_response",
    "parse",
)

DEFAULT_USER_AGENT = f"wolkvox-exporter/{__version__}"
MAX_DETAIL_CHARS = 300
REDACTED = "<redacted>"

_BILLING_PATH = "/api/v2/billing.php"
_INFORMATION_PATH = "/api/v2/information.php"
_CHUNK_BYTES = 64 * 1024
_REPR_CHARS = 80
_SNIPPET_CHARS = 120

# (substring of error/msg, reason), checked in this order. Everything else with a code other than 200
# is "api_error" (401 is "auth").
_ERROR_TEXTS: tuple[tuple[str, str], ...] = (
    ("token limit exceeded", "token_limit"),
    ("api you want to consult does not exist", "unknown_api"),
    ("please enter the wolkvox-token", "auth"),
    ("please validate token", "auth"),
)

_NUMBER_RE = re.compile(r"\+?(?P<int>[0-9]+)(?:(?P<sep>[.,])(?P<frac>[0-9]+))?")
_CODE_RE = re.compile(r"[0-9]{1,4}")
_WHITESPACE_RE = re.compile(r"\s+")
# What an HTTP header value may hold here: visible ASCII, single inner spaces allowed.
_TOKEN_RE = re.compile(r"[\x21-\x7e]+(?: [\x21-\x7e]+)*")


# --------------------------------------------------------------------------------------------- results


@dataclass(frozen=True)
class Reading:
    """One successful billing answer: ``value`` is the sum of ``items`` over ``rows`` rows."""

    value: float
    rows: int


@dataclass(frozen=True)
class TokenInfo:
    """``information.php?api=token_info``: the daily request budget of a token (None = not in the answer)."""

    limit: float | None
    used_today: float | None
    all_today: float | None


class ItemsError(ValueError):
    """An ``items`` value that is not a plain non-negative decimal number.

    ``raw`` is the rejected value and ``problem`` what is wrong with it; ``str()`` shows both, the value
    as a shortened repr.
    """

    def __init__(self, raw: object, problem: str) -> None:
        super().__init__(f"{_short_repr(raw)} {problem}")
        self.raw = raw
        self.problem = problem


class FetchError(Exception):
    """A failed fetch. ``reason`` is one of REASONS; ``detail`` is one line, safe to log.

    ``secret`` (the token) is replaced by ``<redacted>`` in the detail, case-insensitively, before the
    detail is shortened, so neither the whole token nor a cut-off head of it can survive.
    """

    def __init__(self, reason: str, detail: str, *, secret: Secret | None = None) -> None:
        if reason not in REASONS:
            raise ValueError(f"unknown fetch failure reason {reason!r}")
        clean = _clean_detail(detail, secret)
        super().__init__(reason, clean)
        self.reason = reason
        self.detail = clean

    def __str__(self) -> str:
        return f"{self.reason}: {self.detail}"


# --------------------------------------------------------------------------------------------- helpers


def _redact(text: str, secret: Secret | None) -> str:
    if secret is None:
        return text
    value = secret.reveal()
    if not value:
        return text
    return re.sub(re.escape(value), REDACTED, text, flags=re.IGNORECASE)


def _clean_detail(detail: str, secret: Secret | None) -> str:
    text = _redact(str(detail), secret)
    text = _WHITESPACE_RE.sub(" ", text).strip()
    text = "".join(ch if ch.isprintable() else "?" for ch in text)
    if len(text) > MAX_DETAIL_CHARS:
        text = text[: MAX_DETAIL_CHARS - 3] + "..."
    return text or "(no detail)"


def _short_repr(value: object, limit: int = _REPR_CHARS, secret: Secret | None = None) -> str:
    """repr(value), the secret redacted BEFORE shortening (so no cut-off head of it survives)."""
    try:
        text = _redact(repr(value), secret)
    except RecursionError:
        return f"<deeply nested {type(value).__name__}>"
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return text


def _snippet(body: bytes, secret: Secret | None) -> str:
    """The start of a body as one short line, the secret redacted before shortening."""
    # Redact the whole body (at most max_body_bytes) before cutting anything: a cut made first could
    # end inside the token, and whitespace collapsed later could pull that cut-off head into view.
    text = _redact(body.decode("utf-8", errors="replace"), secret)
    text = _WHITESPACE_RE.sub(" ", text).strip()
    if len(text) > _SNIPPET_CHARS:
        text = text[: _SNIPPET_CHARS - 3] + "..."
    return text


# --------------------------------------------------------------------------------------------- parsing


def parse_items(raw: object) -> float:
    """Parse one ``items`` value into a finite float >= 0, or raise ItemsError.

    Accepted: JSON numbers (not booleans), and strings of ASCII digits with an optional leading ``+``,
    surrounding whitespace and at most one decimal separator, ``.`` or ``,``, with digits on both sides
    (``"1234"``, ``" 1234 "``, ``"12.5"``, ``"12,5"``, ``"+3"``, ``"1.234"`` = 1.234).
    Rejected: empty or blank strings, letters, signs other than a leading ``+`` (so every negative),
    NaN and infinities, exponents, underscores, thousands separators (``"1.234,5"``, ``"1 234"``), and a
    comma followed by exactly three digits (``"12,500"`` could be 12.5 or 12500: never guessed).
    """
    if isinstance(raw, bool):
        raise ItemsError(raw, "is a boolean, not a number")
    if isinstance(raw, int):
        if raw < 0:
            raise ItemsError(raw, "is negative")
        try:
            return float(raw)
        except OverflowError:
            raise ItemsError(raw, "is too large") from None
    if isinstance(raw, float):
        if not math.isfinite(raw):
            raise ItemsError(raw, "is not a finite number")
        if raw < 0:
            raise ItemsError(raw, "is negative")
        return raw + 0.0  # -0.0 -> 0.0
    if not isinstance(raw, str):
        raise ItemsError(raw, f"is a {type(raw).__name__}, not a number or a numeric string")
    text = raw.strip()
    if not text:
        raise ItemsError(raw, "is empty")
    match = _NUMBER_RE.fullmatch(text)
    if match is None:
        if text.startswith("-") and _NUMBER_RE.fullmatch(text[1:]) is not None:
            raise ItemsError(raw, "is negative")
        raise ItemsError(
            raw,
            "is not a plain decimal number (digits, at most one '.' or ',' decimal separator, "
            "no thousands separators)",
        )
    frac = match.group("frac")
    if match.group("sep") == "," and len(frac) == 3:
        raise ItemsError(
            raw,
            "is ambiguous: a comma followed by three digits may be a decimal comma or a thousands separator",
        )
    number = match.group("int") + ("." + frac if frac is not None else "")
    value = float(number)
    if not math.isfinite(value):
        raise ItemsError(raw, "is too large")
    return value


def _code_of(doc: Mapping[str, Any]) -> int | None:
    """The numeric ``code`` of a document, or None when it is missing or not a number."""
    code = doc.get("code")
    if isinstance(code, bool):
        return None
    if isinstance(code, int):
        return code
    if isinstance(code, float):
        return int(code) if code.is_integer() else None
    if isinstance(code, str) and _CODE_RE.fullmatch(code.strip()):
        return int(code.strip())
    return None


def _text_field(doc: Mapping[str, Any], key: str) -> str:
    value = doc.get(key)
    return value if isinstance(value, str) else ""


def _error_from_document(
    doc: Mapping[str, Any], code: int, http_status: int, secret: Secret | None
) -> FetchError:
    """Classify a wolkvox error document (a JSON object whose code is not 200)."""
    error = _text_field(doc, "error").strip()
    msg = _text_field(doc, "msg").strip()
    haystack = f"{error} {msg}".casefold()
    reason = "api_error"
    for needle, candidate in _ERROR_TEXTS:
        if needle in haystack:
            reason = candidate
            break
    else:
        if code == 401:
            reason = "auth"
    where = f"code {code}" if http_status == 200 else f"code {code} (HTTP {http_status})"
    said = ": ".join(part for part in (error, msg) if part) or "no error text"
    return FetchError(reason, f"wolkvox answered {where}: {said}", secret=secret)


def _decode_json(body: bytes, secret: Secret | None) -> tuple[Any, str | None]:
    """(document, None) or (None, problem)."""
    if not body.strip():
        return None, "empty body"
    try:
        text = body.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        return None, f"body is not UTF-8 (invalid byte at offset {exc.start})"
    try:
        return json.loads(text), None
    except RecursionError:
        return None, "body is not usable JSON (nested too deeply)"
    except ValueError as exc:  # json.JSONDecodeError, and too many digits in an integer
        problem = exc.msg if isinstance(exc, json.JSONDecodeError) else type(exc).__name__
        return (
            None,
            f"body is not JSON ({problem} at char {getattr(exc, 'pos', '?')}): {_snippet(body, secret)}",
        )


def _check_document(body: bytes, http_status: int, secret: Secret | None) -> dict[str, Any]:
    """The JSON object of a successful answer (HTTP 200, code 200), or raise the classified FetchError."""
    if 300 <= http_status < 400:
        raise FetchError("http_status", f"HTTP {http_status} redirect (not followed)", secret=secret)
    doc, problem = _decode_json(body, secret)
    code = _code_of(doc) if isinstance(doc, dict) else None

    if http_status != 200:
        if code is not None and code != 200:
            raise _error_from_document(doc, code, http_status, secret)
        if http_status == 401:
            raise FetchError("auth", f"HTTP 401: {_snippet(body, secret) or 'empty body'}", secret=secret)
        if code == 200:
            detail = f"HTTP {http_status} although the body says code 200"
        elif not body.strip():
            detail = f"HTTP {http_status} with an empty body"
            if http_status == 403:
                detail += " (wolkvox maintenance or backup?)"
        else:
            detail = f"HTTP {http_status}: {_snippet(body, secret)}"
        raise FetchError("http_status", detail, secret=secret)

    if problem is not None:
        raise FetchError("invalid_response", problem, secret=secret)
    if not isinstance(doc, dict):
        raise FetchError(
            "invalid_response", f"body is a JSON {type(doc).__name__}, not an object", secret=secret
        )
    if "code" not in doc:
        raise FetchError("invalid_response", "body has no 'code'", secret=secret)
    if code is None:
        raise FetchError(
            "invalid_response",
            f"'code' is not a number: {_short_repr(doc['code'], secret=secret)}",
            secret=secret,
        )
    if code != 200:
        raise _error_from_document(doc, code, http_status, secret)
    return doc


def _items_problem(exc: ItemsError, secret: Secret | None) -> str:
    return f"{_short_repr(exc.raw, secret=secret)} {exc.problem}"


def _reading_from_document(doc: Mapping[str, Any], secret: Secret | None) -> Reading:
    data = doc.get("data")
    if not isinstance(data, list):
        what = "missing" if "data" not in doc else f"a {type(data).__name__}, not a list"
        raise FetchError("invalid_response", f"'data' is {what}", secret=secret)
    values: list[float] = []
    for index, row in enumerate(data):
        if not isinstance(row, dict):
            raise FetchError(
                "invalid_response", f"data[{index}] is a {type(row).__name__}, not an object", secret=secret
            )
        if "items" not in row:
            raise FetchError("invalid_response", f"data[{index}] has no 'items'", secret=secret)
        try:
            values.append(parse_items(row["items"]))
        except ItemsError as exc:
            raise FetchError(
                "parse", f"data[{index}].items: {_items_problem(exc, secret)}", secret=secret
            ) from None
    try:
        total = math.fsum(values)
    except OverflowError:
        total = math.inf
    if not math.isfinite(total):
        raise FetchError("parse", f"the sum of items over {len(values)} rows is too large", secret=secret)
    return Reading(value=total, rows=len(values))


_TOKEN_INFO_FIELDS = (
    ("limit", "token_limit"),
    ("used_today", "token_use_today"),
    ("all_today", "all_token_today"),
)


def _token_info_from_document(doc: Mapping[str, Any], secret: Secret | None) -> TokenInfo:
    data = doc.get("data")
    if isinstance(data, list) and len(data) == 1:
        data = data[0]
    if not isinstance(data, dict):
        what = "missing" if "data" not in doc else _short_repr(data, secret=secret)
        raise FetchError(
            "invalid_response", f"'data' is not an object or a list of one object: {what}", secret=secret
        )
    if not any(key in data for _, key in _TOKEN_INFO_FIELDS):
        keys = ", ".join(key for _, key in _TOKEN_INFO_FIELDS)
        raise FetchError("invalid_response", f"'data' has none of {keys}", secret=secret)
    values: dict[str, float | None] = {}
    for attr, key in _TOKEN_INFO_FIELDS:
        raw = data.get(key)
        if raw is None:
            values[attr] = None
            continue
        try:
            values[attr] = parse_items(raw)
        except ItemsError as exc:
            raise FetchError("parse", f"data.{key}: {_items_problem(exc, secret)}", secret=secret) from None
    return TokenInfo(**values)


def parse_body(body: bytes, http_status: int, *, secret: Secret | None = None) -> Reading:
    """Classify a billing answer: a Reading, or FetchError (never another exception).

    ``secret``, when given, is redacted from every error detail.
    """
    return _reading_from_document(_check_document(body, http_status, secret), secret)


def parse_token_info(body: bytes, http_status: int, *, secret: Secret | None = None) -> TokenInfo:
    """Classify a ``token_info`` answer. ``data`` may be an object or a list holding one object; a field
    that is missing or null is None. Same error classification as parse_body."""
    return _token_info_from_document(_check_document(body, http_status, secret), secret)


# --------------------------------------------------------------------------------------------- errors


def _exception_chain(exc: BaseException) -> list[BaseException]:
    """exc and what it wraps: MaxRetryError.reason, an exception in args[0], __cause__, __context__."""
    chain: list[BaseException] = []
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen and len(chain) < 10:
        seen.add(id(current))
        chain.append(current)
        nxt: BaseException | None = None
        reason = getattr(current, "reason", None)
        if isinstance(reason, BaseException):
            nxt = reason
        elif current.args and isinstance(current.args[0], BaseException):
            nxt = current.args[0]
        elif current.__cause__ is not None:
            nxt = current.__cause__
        elif not current.__suppress_context__:
            nxt = current.__context__
        current = nxt
    return chain


def _os_error_text(exc: BaseException) -> str | None:
    """A short, header-free description from an OS/TLS error (never str() of a requests exception)."""
    verify_message = getattr(exc, "verify_message", None)
    if isinstance(verify_message, str) and verify_message:
        return verify_message
    if isinstance(exc, OSError) and isinstance(exc.strerror, str) and exc.strerror:
        return exc.strerror
    ssl_reason = getattr(exc, "reason", None)
    if isinstance(ssl_reason, str) and ssl_reason:
        return ssl_reason
    return None


def _describe_exception(exc: BaseException) -> str:
    chain = _exception_chain(exc)
    names: list[str] = []
    for item in chain:
        name = type(item).__name__
        if not names or names[-1] != name:
            names.append(name)
    text = None
    for item in reversed(chain):
        text = _os_error_text(item)
        if text:
            break
    described = " > ".join(names)
    return f"{described}: {text}" if text else described


def _is_timeout(exc: BaseException) -> bool:
    if isinstance(exc, requests.exceptions.Timeout):
        return True
    for item in _exception_chain(exc):
        if isinstance(item, urllib3.exceptions.ReadTimeoutError | TimeoutError):
            return True
        if isinstance(item, urllib3.exceptions.ConnectTimeoutError) and not isinstance(
            item, urllib3.exceptions.NewConnectionError
        ):
            return True
    return False


def _error_from_exception(
    exc: BaseException, secret: Secret, connect_timeout: float, read_timeout: float
) -> FetchError:
    description = _describe_exception(exc)
    if isinstance(exc, requests.exceptions.ConnectTimeout):
        return FetchError(
            "timeout", f"could not connect within {connect_timeout:g}s ({description})", secret=secret
        )
    if _is_timeout(exc):
        return FetchError(
            "timeout", f"no data within the read timeout {read_timeout:g}s ({description})", secret=secret
        )
    decoding = (requests.exceptions.ContentDecodingError, urllib3.exceptions.DecodeError)
    if any(isinstance(item, decoding) for item in _exception_chain(exc)):
        return FetchError("invalid_response", f"cannot decode the body ({description})", secret=secret)
    return FetchError("connection", f"request failed: {description}", secret=secret)


# --------------------------------------------------------------------------------------------- client


class _NoCookies(http.cookiejar.DefaultCookiePolicy):
    """Neither store nor send cookies: a session is shared by the tokens a worker thread serves."""

    def set_ok(self, cookie: http.cookiejar.Cookie, request: Any) -> bool:
        return False

    def return_ok(self, cookie: http.cookiejar.Cookie, request: Any) -> bool:
        return False


def _set_socket_timeout(raw: Any, seconds: float) -> None:
    """Bound the next socket read of a streamed urllib3 response (no-op when there is no socket)."""
    sock = getattr(getattr(raw, "connection", None), "sock", None)
    settimeout: Callable[[float], None] | None = getattr(sock, "settimeout", None)
    if settimeout is None:
        return
    try:
        settimeout(max(seconds, 0.001))
    except OSError:
        pass


class WolkvoxClient:
    """Fetches billing readings. Thread-safe: each thread uses its own ``requests.Session``.

    No retries (the scheduler owns them), redirects are never followed (the token header must not go to
    another host), TLS is always verified (``ca_file`` replaces the CA bundle), cookies are neither
    stored nor sent. Proxies and a CA bundle from the environment (HTTPS_PROXY, REQUESTS_CA_BUNDLE) are
    honoured, as requests does.
    """

    def __init__(
        self,
        connect_timeout: float,
        read_timeout: float,
        max_body_bytes: int,
        user_agent: str = DEFAULT_USER_AGENT,
    ) -> None:
        if not connect_timeout > 0 or not read_timeout > 0:
            raise ValueError("connect_timeout and read_timeout must be > 0")
        if max_body_bytes < 1:
            raise ValueError("max_body_bytes must be >= 1")
        self.connect_timeout = float(connect_timeout)
        self.read_timeout = float(read_timeout)
        self.max_body_bytes = int(max_body_bytes)
        self.user_agent = user_agent
        self._local = threading.local()
        self._lock = threading.Lock()
        self._sessions: weakref.WeakSet[requests.Session] = weakref.WeakSet()
        self._generation = 0

    # -- public

    def fetch(
        self, *, base_url: str, server: str, token: Secret, api: str, ca_file: str | None = None
    ) -> Reading:
        """``GET {base_url}/api/v2/billing.php?api={api}``: a Reading, or FetchError."""
        status, body = self._get(base_url.rstrip("/") + _BILLING_PATH, api, server, token, ca_file)
        return parse_body(body, status, secret=token)

    def fetch_token_info(
        self, *, base_url: str, server: str, token: Secret, ca_file: str | None = None
    ) -> TokenInfo:
        """``GET {base_url}/api/v2/information.php?api=token_info``: a TokenInfo, or FetchError.

        Note that this call is itself a request on the token and may count against its daily budget.
        """
        status, body = self._get(
            base_url.rstrip("/") + _INFORMATION_PATH, "token_info", server, token, ca_file
        )
        return parse_token_info(body, status, secret=token)

    def close(self) -> None:
        """Close every session created so far; a later fetch opens a new one."""
        with self._lock:
            sessions = list(self._sessions)
            self._sessions = weakref.WeakSet()
            self._generation += 1
        for session in sessions:
            try:
                session.close()
            except Exception:  # closing is best effort
                logger.debug("closing a session failed", exc_info=True)

    def __enter__(self) -> WolkvoxClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- internals

    def _session(self) -> requests.Session:
        session: requests.Session | None = getattr(self._local, "session", None)
        if session is not None and getattr(self._local, "generation", -1) == self._generation:
            return session
        session = requests.Session()
        for prefix in ("https://", "http://"):
            session.mount(prefix, requests.adapters.HTTPAdapter(max_retries=0))
        session.cookies.set_policy(_NoCookies())
        session.headers.update(
            {
                "User-Agent": self.user_agent,
                "Accept": "application/json",
                # The answers are tiny; identity keeps max_body_bytes a limit on what crosses the wire.
                "Accept-Encoding": "identity",
            }
        )
        with self._lock:
            self._sessions.add(session)
            self._local.generation = self._generation
        self._local.session = session
        return session

    def _get(self, url: str, api: str, server: str, token: Secret, ca_file: str | None) -> tuple[int, bytes]:
        """(HTTP status, body) of one GET, or FetchError.

        FetchErrors are raised outside the ``except`` blocks, so they carry no reference to the requests
        exception (whose ``.request`` holds the token header).
        """
        if not token:
            raise FetchError("auth", "the token is empty")
        if _TOKEN_RE.fullmatch(token.reveal()) is None:
            raise FetchError(
                "auth",
                "the token has whitespace or control characters and cannot be sent in an HTTP header "
                "(a trailing newline in the token file?)",
                secret=token,
            )
        started = time.monotonic()
        deadline = started + self.connect_timeout + self.read_timeout
        failure: FetchError | None = None
        response: requests.Response | None = None
        try:
            response = self._session().get(
                url,
                params={"api": api},
                headers={"wolkvox-token": token.reveal(), "wolkvox_server": server},
                timeout=(self.connect_timeout, self.read_timeout),
                verify=ca_file if ca_file else True,
                allow_redirects=False,
                stream=True,
            )
        except (requests.RequestException, urllib3.exceptions.HTTPError, OSError) as exc:
            failure = _error_from_exception(exc, token, self.connect_timeout, self.read_timeout)
        if failure is not None or response is None:
            raise failure or FetchError("connection", "no response", secret=token)
        try:
            status = response.status_code
            if 300 <= status < 400:
                location = response.headers.get("Location", "")
                raise FetchError(
                    "http_status",
                    f"HTTP {status} redirect to {location!r} not followed (check base_url)",
                    secret=token,
                )
            body = self._read_body(response, deadline, token)
        finally:
            response.close()
        logger.debug(
            "GET %s?api=%s: HTTP %d, %d bytes in %.3fs",
            url,
            api,
            status,
            len(body),
            time.monotonic() - started,
        )
        return status, body

    def _read_body(self, response: requests.Response, deadline: float, token: Secret) -> bytes:
        limit = self.max_body_bytes
        total_seconds = self.connect_timeout + self.read_timeout
        too_large = FetchError("invalid_response", f"body larger than {limit} bytes")
        declared = response.headers.get("Content-Length", "")
        if declared.strip().isdigit() and int(declared) > limit:
            raise too_large
        raw = response.raw
        read: Callable[..., bytes] = getattr(raw, "read1", None) or raw.read
        chunks: list[bytes] = []
        received = 0
        failure: FetchError | None = None
        try:
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    failure = FetchError(
                        "timeout",
                        f"answer not complete within {total_seconds:g}s (connect_timeout + read_timeout)",
                    )
                    break
                _set_socket_timeout(raw, min(remaining, self.read_timeout))
                chunk = read(min(_CHUNK_BYTES, limit + 1 - received), decode_content=True)
                if not chunk:
                    break
                received += len(chunk)
                if received > limit:
                    failure = too_large
                    break
                chunks.append(chunk)
        except (requests.RequestException, urllib3.exceptions.HTTPError, OSError) as exc:
            failure = _error_from_exception(exc, token, self.connect_timeout, self.read_timeout)
            if failure.reason == "timeout" and time.monotonic() >= deadline:
                failure = FetchError(
                    "timeout",
                    f"answer not complete within {total_seconds:g}s (connect_timeout + read_timeout)",
                )
        if failure is not None:
            raise failure
        return b"".join(chunks)
