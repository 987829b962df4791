"""``--web.config.file`` read and checked: the file's keys in, frozen dataclasses out, in the format of
Prometheus' exporter-toolkit (docs/web-configuration.md there), with the toolkit's checks.

```yaml
tls_server_config:
  cert_file: server.crt              # or `cert:` with the PEM inline (not both)
  key_file: server.key               # or `key:` with the PEM inline (not both)
  client_auth_type: RequireAndVerifyClientCert
  client_ca_file: ca.crt             # or `client_ca:` inline; none: the system CAs
  client_allowed_sans: [prometheus.example.net]
  min_version: TLS12                 # the default
basic_auth_users:
  alice: $2y$10$...                  # bcrypt hash (htpasswd -nBC 10 "" | tr -d ':\\n')
http_server_config:
  headers: {X-Frame-Options: deny}
rate_limit: {interval: 1s, burst: 10}
```
Relative paths are relative to the web config file. Every key of the toolkit is either enforced as the
toolkit does, or refused with a one-line error ``<file>: <key path>: <problem>`` saying why (see
docs/security.md): a file is never accepted and then enforced more weakly than written.

This module only reads the file itself; the certificate, key and CA files it names are loaded by
``webtls`` (as the toolkit's tls_config.go), and the rules are enforced by ``webtls`` (TLS, client SANs)
and ``webauth`` (basic auth, rate limit), the way its handler.go does.
"""

from __future__ import annotations

import re
import ssl
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from exporter.config import StrictLoader  # duplicate keys refused, like the toolkit's strict YAML

TLS_VERSIONS = {
    "TLS10": ssl.TLSVersion.TLSv1,
    "TLS11": ssl.TLSVersion.TLSv1_1,
    "TLS12": ssl.TLSVersion.TLSv1_2,
    "TLS13": ssl.TLSVersion.TLSv1_3,
}
# Go's client auth policies, and whether each asks for a client certificate (False), requires one (True),
# or neither (None).
CLIENT_AUTH: dict[str, bool | None] = {
    "NoClientCert": None,
    "RequestClientCert": False,
    "VerifyClientCertIfGiven": False,
    "RequireAndVerifyClientCert": True,
}
# Go accepts a certificate under these without verifying it; Python's ssl verifies every certificate a
# client sends. RequestClientCert still serves every client Go would (those without a certificate, or
# with one that verifies), so it is accepted with a warning; the two that require an unverified one are
# refused at start rather than accepted and then refusing every client certificate the CAs do not sign.
_UNVERIFIED_OPTIONAL = "RequestClientCert"
_UNVERIFIED_REQUIRED = ("RequireAnyClientCert", "RequireClientCert")  # the second is the toolkit's old name
# The cipher suites Go lists in tls.CipherSuites() (the ones the toolkit accepts), as OpenSSL names.
# None: a TLS 1.3 suite, which neither Go nor OpenSSL's TLS 1.2 list lets one choose.
CIPHERS: dict[str, str | None] = {
    "TLS_AES_128_GCM_SHA256": None,
    "TLS_AES_256_GCM_SHA384": None,
    "TLS_CHACHA20_POLY1305_SHA256": None,
    "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA": "ECDHE-ECDSA-AES128-SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA": "ECDHE-ECDSA-AES256-SHA",
    "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA": "ECDHE-RSA-AES128-SHA",
    "TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA": "ECDHE-RSA-AES256-SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256": "ECDHE-ECDSA-AES128-GCM-SHA256",
    "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384": "ECDHE-ECDSA-AES256-GCM-SHA384",
    "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256": "ECDHE-RSA-AES128-GCM-SHA256",
    "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384": "ECDHE-RSA-AES256-GCM-SHA384",
    "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-ECDSA-CHACHA20-POLY1305",
    "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-RSA-CHACHA20-POLY1305",
}
CURVES = {"CurveP256": "prime256v1", "CurveP384": "secp384r1", "CurveP521": "secp521r1", "X25519": "X25519"}
# The only response headers the toolkit lets a file set, with their allowed values (None: any value).
_HEADERS: dict[str, tuple[str, ...] | None] = {
    "Strict-Transport-Security": None,
    "X-Content-Type-Options": ("nosniff",),
    "X-Frame-Options": ("deny", "sameorigin"),
    "X-XSS-Protection": None,
    "Content-Security-Policy": None,
}
_TOP_KEYS = ("tls_server_config", "http_server_config", "basic_auth_users", "rate_limit")
_TLS_KEYS = (
    "cert",
    "key",
    "client_ca",
    "cert_file",
    "key_file",
    "client_auth_type",
    "client_ca_file",
    "client_allowed_sans",
    "min_version",
    "max_version",
    "cipher_suites",
    "prefer_server_cipher_suites",
    "curve_preferences",
)
# Any of these turns TLS on (the toolkit's TLSConfig.IsEnabled); the rest alone leave plain HTTP.
_TLS_ENABLING = ("cert", "key", "client_ca", "cert_file", "key_file", "client_auth_type", "client_ca_file")
_HTTP_KEYS = ("http2", "headers")
_RATE_KEYS = ("interval", "burst")
# A whole bcrypt hash: version, cost 04-31, 22 characters of salt and 31 of hash.
_BCRYPT_HASH = re.compile(r"\$2[aby]\$(0[4-9]|[12][0-9]|3[01])\$[./A-Za-z0-9]{53}")
# Go's time.ParseDuration units, in seconds.
_GO_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_GO_DURATION = re.compile(r"([0-9]*\.?[0-9]*)(ns|us|µs|μs|ms|s|m|h)")


class WebConfigError(Exception):
    """A one-line error naming the web config file and the key."""


@dataclass(frozen=True)
class RateLimit:
    """The toolkit's token bucket: one request per ``interval`` seconds, bursts of ``burst``."""

    interval: float
    burst: int


@dataclass(frozen=True)
class TLSServerConfig:
    """``tls_server_config`` as written, checked; paths made absolute (relative to the file)."""

    where: str  # the web config file, for errors about the files named here
    cert_file: str | None = None
    key_file: str | None = None
    cert: str = ""  # inline PEM
    key: str = ""
    client_ca_file: str | None = None
    client_ca: str = ""
    client_auth_type: str = "NoClientCert"
    # None: any client certificate the CAs accept; else one of its SANs must be in the set.
    client_allowed_sans: frozenset[str] | None = None
    min_version: ssl.TLSVersion = ssl.TLSVersion.TLSv1_2
    max_version: ssl.TLSVersion = ssl.TLSVersion.TLSv1_3
    cipher_suites: tuple[str, ...] | None = None  # Go's names, each one of CIPHERS
    prefer_server_cipher_suites: bool = True
    curve: str | None = None  # Go's name of the one curve offered (the first of curve_preferences)


@dataclass(frozen=True)
class WebConfigFile:
    """A whole web config file, checked. The default instance is "no web config": plain HTTP, no auth."""

    path: str | None = None
    tls: TLSServerConfig | None = None
    users: dict[str, bytes] = field(default_factory=dict)  # user: bcrypt hash
    headers: dict[str, str] = field(default_factory=dict)
    rate_limit: RateLimit | None = None
    # Every file read to build the config in force (this one first); a change to any of them means reload.
    files: tuple[str, ...] = ()
    # Where this exporter does less or more than the toolkit would, said once at start.
    warnings: tuple[str, ...] = ()


def read_web_config(path: str | None) -> WebConfigFile:
    """Read and check the file; ``None`` or an empty path means no web config (plain HTTP, no auth)."""
    if path is None or str(path) == "":
        return WebConfigFile()
    where = str(path)
    raw = _read(where)
    _no_unknown(raw, _TOP_KEYS, where, "")
    warnings: list[str] = []
    tls = _tls(_section(raw, "tls_server_config", where), Path(where).parent, where, warnings)
    users = _users(raw.get("basic_auth_users"), where)
    http = _section(raw, "http_server_config", where)
    _no_unknown(http, _HTTP_KEYS, where, "http_server_config.")
    if "http2" in http and not isinstance(http["http2"], bool):
        raise WebConfigError(f"{where}: http_server_config.http2: expected true or false")
    headers = _headers(http.get("headers"), where)
    rate = _rate_limit(_section(raw, "rate_limit", where), where, warnings)
    named = (tls.cert_file, tls.key_file, tls.client_ca_file) if tls is not None else ()
    return WebConfigFile(
        path=where,
        tls=tls,
        users=users,
        headers=headers,
        rate_limit=rate,
        files=(where, *(name for name in named if name)),
        warnings=tuple(warnings),
    )


def _read(where: str) -> dict[str, Any]:
    try:
        text = Path(where).read_text(encoding="utf-8")
    except OSError as error:
        raise WebConfigError(f"{where}: cannot read: {error.strerror or error}") from None
    except UnicodeDecodeError:
        raise WebConfigError(f"{where}: not valid UTF-8") from None
    try:
        raw = yaml.load(text, Loader=StrictLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        position = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        problem = getattr(error, "problem", None) or "syntax error"
        # Only the problem, never the offending text: it may be a password pasted by mistake.
        raise WebConfigError(f"{where}{position}: invalid YAML: {problem}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise WebConfigError(f"{where}: expected a mapping at the top level")
    return raw


def _section(raw: dict[str, Any], key: str, where: str) -> dict[str, Any]:
    value = raw.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise WebConfigError(f"{where}: {key}: expected a mapping")
    return value


def _no_unknown(mapping: dict[str, Any], allowed: Iterable[str], where: str, prefix: str) -> None:
    for key in mapping:
        if key not in allowed:
            raise WebConfigError(f"{where}: {prefix}{key}: unknown key")


def _string(raw: dict[str, Any], key: str, where: str) -> str:
    """A scalar as text ('' when absent), as Go's YAML reads any scalar into a string field."""
    value = raw.get(key)
    if value is None:
        return ""
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise WebConfigError(f"{where}: tls_server_config.{key}: expected a string")
    return str(value)


def _string_list(raw: dict[str, Any], key: str, where: str) -> list[str] | None:
    value = raw.get(key)
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise WebConfigError(f"{where}: tls_server_config.{key}: expected a list of strings")
    return value


def _tls(raw: dict[str, Any], base: Path, where: str, warnings: list[str]) -> TLSServerConfig | None:
    _no_unknown(raw, _TLS_KEYS, where, "tls_server_config.")
    text = {key: _string(raw, key, where) for key in _TLS_ENABLING}
    ciphers = _string_list(raw, "cipher_suites", where)
    curves = _string_list(raw, "curve_preferences", where)
    sans = _string_list(raw, "client_allowed_sans", where)
    versions = {name: _version(raw, name, where) for name in ("min_version", "max_version")}
    prefer_server = raw.get("prefer_server_cipher_suites", True)
    if not isinstance(prefer_server, bool):
        raise WebConfigError(
            f"{where}: tls_server_config.prefer_server_cipher_suites: expected true or false"
        )
    if not any(text.values()):
        if raw:
            warnings.append(
                f"{where}: tls_server_config has no certificate, key, client CA or client_auth_type: "
                "serving plain HTTP (as the exporter-toolkit does)"
            )
        return None

    def where_key(key: str) -> str:
        return f"{where}: tls_server_config.{key}"

    for inline, file in (("cert", "cert_file"), ("key", "key_file"), ("client_ca", "client_ca_file")):
        if text[inline] and text[file]:
            raise WebConfigError(f"{where_key(file)}: set either {file} or {inline}, not both")
    if not text["cert"] and not text["cert_file"]:
        raise WebConfigError(f"{where_key('cert_file')}: missing one of cert or cert_file")
    if not text["key"] and not text["key_file"]:
        raise WebConfigError(f"{where_key('key_file')}: missing one of key or key_file")
    auth_type = text["client_auth_type"] or "NoClientCert"
    if auth_type in _UNVERIFIED_REQUIRED:
        raise WebConfigError(
            f"{where_key('client_auth_type')}: {auth_type} accepts any client certificate unverified in "
            "Go; Python's ssl verifies every client certificate, so only those the client CAs sign could "
            "connect: use RequireAndVerifyClientCert with client_ca_file"
        )
    if auth_type not in CLIENT_AUTH:
        raise WebConfigError(f"{where_key('client_auth_type')}: expected one of {', '.join(CLIENT_AUTH)}")
    if sans is not None and CLIENT_AUTH[auth_type] is None:
        # The toolkit would check SANs of certificates it never asks for: nobody could connect.
        raise WebConfigError(
            f"{where_key('client_allowed_sans')}: needs a client_auth_type that asks for one"
        )
    if auth_type == _UNVERIFIED_OPTIONAL:
        warnings.append(
            f"{where_key('client_auth_type')}: {auth_type} accepts any client certificate in Go; here a "
            "certificate is accepted only if it verifies against the client CAs (Python's ssl "
            "cannot skip that)"
        )
    minimum = versions["min_version"] or ssl.TLSVersion.TLSv1_2
    maximum = versions["max_version"] or ssl.TLSVersion.TLSv1_3
    if minimum > maximum:
        raise WebConfigError(f"{where_key('min_version')}: is above max_version: no client could connect")
    if minimum < ssl.TLSVersion.TLSv1_2:
        warnings.append(
            f"{where_key('min_version')}: OpenSSL's default security level refuses TLS 1.0 and 1.1: "
            "clients need TLS 1.2 or later"
        )
    if ciphers is not None:
        unknown = [name for name in ciphers if name not in CIPHERS]
        if unknown:
            raise WebConfigError(
                f"{where_key('cipher_suites')}: unknown cipher {unknown[0]} (Go's names from "
                "tls.CipherSuites())"
            )
    curve = _curve(curves, where_key("curve_preferences"), warnings)

    def path(key: str) -> str | None:
        return str(base / text[key]) if text[key] else None

    return TLSServerConfig(
        where=where,
        cert_file=path("cert_file"),
        key_file=path("key_file"),
        cert=text["cert"],
        key=text["key"],
        client_ca_file=path("client_ca_file"),
        client_ca=text["client_ca"],
        client_auth_type=auth_type,
        client_allowed_sans=frozenset(sans) if sans is not None else None,
        min_version=minimum,
        max_version=maximum,
        cipher_suites=tuple(ciphers) if ciphers is not None else None,
        prefer_server_cipher_suites=prefer_server,
        curve=curve,
    )


def _version(raw: dict[str, Any], key: str, where: str) -> ssl.TLSVersion | None:
    if key not in raw:
        return None
    version = TLS_VERSIONS.get(str(raw[key]))
    if version is None:
        raise WebConfigError(
            f"{where}: tls_server_config.{key}: unknown TLS version, expected one of "
            f"{', '.join(TLS_VERSIONS)}"
        )
    return version


def _curve(names: list[str] | None, where: str, warnings: list[str]) -> str | None:
    """The one curve to offer: Python's ssl restricts the key exchange to one group (set_ecdh_curve),
    not to a list, so of Go's preference list the first, the one Go would pick with a client that
    offers every curve, is kept and the rest are not offered (stricter, warned)."""
    if names is None:
        return None
    unknown = [name for name in names if name not in CURVES]
    if unknown:
        raise WebConfigError(f"{where}: unknown curve {unknown[0]} (expected {', '.join(CURVES)})")
    if not names:
        return None  # an empty list: Go's defaults, as when the key is absent
    others = sorted(set(names) - {names[0]}, key=names.index)
    if others:
        warnings.append(
            f"{where}: only {names[0]} is offered, not {', '.join(others)}: Python's ssl sets one curve, "
            "not a list (clients that support none of them cannot connect)"
        )
    return names[0]


def _users(raw: Any, where: str) -> dict[str, bytes]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise WebConfigError(f"{where}: basic_auth_users: expected a mapping of user: bcrypt hash")
    users: dict[str, bytes] = {}
    for user, hashed in raw.items():
        if not isinstance(hashed, str) or not _BCRYPT_HASH.fullmatch(hashed):
            # Never print the value: someone may have pasted a plain password here.
            raise WebConfigError(f"{where}: basic_auth_users.{user}: expected a bcrypt hash ($2y$...)")
        users[str(user)] = hashed.encode()
    return users


def _headers(raw: Any, where: str) -> dict[str, str]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise WebConfigError(f"{where}: http_server_config.headers: expected a mapping")
    headers: dict[str, str] = {}
    for name, value in raw.items():
        key = f"{where}: http_server_config.headers.{name}"
        if name not in _HEADERS:
            # Exact spelling, as in the toolkit; Content-Type, Set-Cookie and the like are never settable.
            raise WebConfigError(f"{key}: this header can not be configured (allowed: {', '.join(_HEADERS)})")
        text = "" if value is None else str(value)
        allowed = _HEADERS[name]
        if allowed is not None and text not in allowed:
            raise WebConfigError(f"{key}: invalid value, expected one of {', '.join(allowed)}")
        if any(ch in text for ch in "\r\n\0"):
            raise WebConfigError(f"{key}: a header value must be one line")
        if text:  # blank: not sent
            headers[name] = text
    return headers


def _rate_limit(raw: dict[str, Any], where: str, warnings: list[str]) -> RateLimit | None:
    _no_unknown(raw, _RATE_KEYS, where, "rate_limit.")
    if not raw:
        return None
    interval = _go_duration(raw.get("interval", 0), f"{where}: rate_limit.interval")
    burst = raw.get("burst", 0)
    if isinstance(burst, bool) or not isinstance(burst, int) or burst < 0:
        raise WebConfigError(f"{where}: rate_limit.burst: expected a whole number, 0 or more")
    if interval == 0:
        return None  # the toolkit: 0 disables the limiter
    if burst == 0:
        warnings.append(
            f"{where}: rate_limit.burst is 0: every request is refused with 429 (as in the toolkit)"
        )
    return RateLimit(interval=interval, burst=burst)


def _go_duration(value: Any, where: str) -> float:
    """Seconds from a Go duration: ``1s``, ``1m30s``, ``250ms``, or a bare integer of nanoseconds."""
    if isinstance(value, int) and not isinstance(value, bool):
        seconds = value * 1e-9
    elif isinstance(value, str) and value not in ("", "+", "-"):
        text = value.lstrip("+-")
        if text == "0":
            return 0.0
        seconds, position = 0.0, 0
        while position < len(text):
            match = _GO_DURATION.match(text, position)
            if match is None or match.group(1) in ("", "."):
                raise WebConfigError(f"{where}: expected a duration such as 1s, 500ms or 1m30s")
            seconds += float(match.group(1)) * _GO_UNITS[match.group(2)]
            position = match.end()
        seconds = -seconds if value.startswith("-") else seconds
    else:
        raise WebConfigError(f"{where}: expected a duration such as 1s, 500ms or 1m30s")
    if seconds < 0:
        raise WebConfigError(f"{where}: must not be negative")
    return seconds
