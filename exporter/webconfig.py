"""``--web.config.file``: TLS, basic auth, response headers and a rate limit, in the file format of
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
toolkit does, or refused with a one-line error saying why (see the README's "Security"): a file is never
accepted and then enforced more weakly than written.

``LiveWebConfig`` keeps the file current: each new connection and each request costs one ``stat`` per
file involved, and a changed file is read again; an invalid new version is logged once and ignored.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import os
import re
import secrets
import ssl
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import bcrypt
import yaml
from cachetools import TTLCache

from exporter.config import StrictLoader  # duplicate keys refused, like the toolkit's strict YAML

log = logging.getLogger(__name__)

_TLS_VERSIONS = {
    "TLS10": ssl.TLSVersion.TLSv1,
    "TLS11": ssl.TLSVersion.TLSv1_1,
    "TLS12": ssl.TLSVersion.TLSv1_2,
    "TLS13": ssl.TLSVersion.TLSv1_3,
}
# Go's client auth policies. Python's ssl always verifies a certificate the client sends, so the two
# policies that accept a certificate without verifying it become the verifying ones (stricter, warned).
_CLIENT_AUTH = {
    "NoClientCert": ssl.CERT_NONE,
    "RequestClientCert": ssl.CERT_OPTIONAL,
    "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
    "RequireAnyClientCert": ssl.CERT_REQUIRED,
    "RequireClientCert": ssl.CERT_REQUIRED,  # the toolkit's old name for RequireAnyClientCert
    "RequireAndVerifyClientCert": ssl.CERT_REQUIRED,
}
_UNVERIFIED_IN_GO = {"RequestClientCert", "RequireAnyClientCert", "RequireClientCert"}
# The cipher suites Go lists in tls.CipherSuites() (the ones the toolkit accepts), as OpenSSL names.
# None: a TLS 1.3 suite, which neither Go nor OpenSSL's TLS 1.2 list lets one choose.
_CIPHERS: dict[str, str | None] = {
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
_CURVES = {"CurveP256": "prime256v1", "CurveP384": "secp384r1", "CurveP521": "secp521r1", "X25519": "X25519"}
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
_BCRYPT_ALPHABET = "./ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
# bcrypt uses at most this many bytes of a password (bcrypt >= 5 raises ValueError beyond it).
_BCRYPT_MAX_PASSWORD_BYTES = 72
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
class WebConfig:
    ssl_context: ssl.SSLContext | None = None
    users: dict[str, bytes] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)
    path: str | None = None
    # None: any client certificate the context accepts; else one of its SANs must be in the set.
    allowed_sans: frozenset[str] | None = None
    rate_limit: RateLimit | None = None
    # Every file read to build this (the web config itself first); a change to any of them means reload.
    files: tuple[str, ...] = ()
    # Where this exporter does less or more than the toolkit would, said once at start.
    warnings: tuple[str, ...] = ()


def load_web_config(path: str | os.PathLike[str] | None) -> WebConfig:
    """Parse and check the file; ``None`` or an empty path means no web config (plain HTTP, no auth)."""
    if path is None or str(path) == "":
        return WebConfig()
    where = str(path)
    raw = _read(where)
    _no_unknown(raw, _TOP_KEYS, where, "")
    base = Path(where).parent
    warnings: list[str] = []
    files = [where]
    tls = _section(raw, "tls_server_config", where)
    context, sans = _tls(tls, base, where, warnings, files)
    users = _users(raw.get("basic_auth_users"), where)
    http = _section(raw, "http_server_config", where)
    _no_unknown(http, _HTTP_KEYS, where, "http_server_config.")
    if "http2" in http and not isinstance(http["http2"], bool):
        raise WebConfigError(f"{where}: http_server_config.http2: expected true or false")
    headers = _headers(http.get("headers"), where)
    rate = _rate_limit(_section(raw, "rate_limit", where), where, warnings)
    return WebConfig(
        ssl_context=context,
        users=users,
        headers=headers,
        path=where,
        allowed_sans=sans,
        rate_limit=rate,
        files=tuple(files),
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


def _tls(
    raw: dict[str, Any], base: Path, where: str, warnings: list[str], files: list[str]
) -> tuple[ssl.SSLContext | None, frozenset[str] | None]:
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
        return None, None

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
    if auth_type not in _CLIENT_AUTH:
        choices = ", ".join(name for name in _CLIENT_AUTH if name != "RequireClientCert")
        raise WebConfigError(f"{where_key('client_auth_type')}: expected one of {choices}")
    has_ca = bool(text["client_ca"] or text["client_ca_file"])
    if has_ca and _CLIENT_AUTH[auth_type] == ssl.CERT_NONE:
        raise WebConfigError(
            f"{where_key('client_ca_file' if text['client_ca_file'] else 'client_ca')}: client CAs are "
            "configured without a client auth policy: set client_auth_type"
        )
    if sans is not None and _CLIENT_AUTH[auth_type] == ssl.CERT_NONE:
        # The toolkit would check SANs of certificates it never asks for: nobody could connect.
        raise WebConfigError(
            f"{where_key('client_allowed_sans')}: needs a client_auth_type that asks for one"
        )

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    minimum = versions["min_version"] or ssl.TLSVersion.TLSv1_2
    maximum = versions["max_version"] or ssl.TLSVersion.TLSv1_3
    if minimum > maximum:
        raise WebConfigError(f"{where_key('min_version')}: is above max_version: no client could connect")
    context.minimum_version = minimum
    context.maximum_version = maximum
    if minimum < ssl.TLSVersion.TLSv1_2:
        warnings.append(
            f"{where_key('min_version')}: OpenSSL's default security level refuses TLS 1.0 and 1.1: "
            "clients need TLS 1.2 or later"
        )
    _load_key_pair(context, text, base, where, files)
    context.verify_mode = _CLIENT_AUTH[auth_type]
    if context.verify_mode != ssl.CERT_NONE:
        _load_client_cas(context, text, base, where, files)
    if auth_type in _UNVERIFIED_IN_GO:
        warnings.append(
            f"{where_key('client_auth_type')}: {auth_type} accepts any client certificate in Go; here a "
            "certificate is accepted only if it verifies against the client CAs (Python's ssl "
            "cannot skip that)"
        )
    if ciphers is not None:
        _ciphers(context, ciphers, where_key("cipher_suites"))
    if prefer_server:
        context.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    else:
        context.options &= ~ssl.OP_CIPHER_SERVER_PREFERENCE
    if curves is not None:
        _curves(context, curves, where_key("curve_preferences"))
    return context, (frozenset(sans) if sans is not None else None)


def _version(raw: dict[str, Any], key: str, where: str) -> ssl.TLSVersion | None:
    if key not in raw:
        return None
    version = _TLS_VERSIONS.get(str(raw[key]))
    if version is None:
        raise WebConfigError(
            f"{where}: tls_server_config.{key}: unknown TLS version, expected one of "
            f"{', '.join(_TLS_VERSIONS)}"
        )
    return version


def _load_key_pair(
    context: ssl.SSLContext, text: dict[str, str], base: Path, where: str, files: list[str]
) -> None:
    cert_file = str(base / text["cert_file"]) if text["cert_file"] else None
    key_file = str(base / text["key_file"]) if text["key_file"] else None
    culprit = "cert_file/key_file" if cert_file and key_file else ("cert_file" if cert_file else "cert")
    files.extend(name for name in (cert_file, key_file) if name)
    # ssl loads keys only from files: inline PEM goes through a private temporary directory.
    with tempfile.TemporaryDirectory(prefix="webcfg-") as private:
        if cert_file is None:
            cert_file = os.path.join(private, "cert.pem")
            _write_private(cert_file, text["cert"])
        if key_file is None:
            key_file = os.path.join(private, "key.pem")
            _write_private(key_file, text["key"])
        try:
            # An encrypted key gets an empty password (and fails) instead of a prompt on the terminal.
            context.load_cert_chain(cert_file, key_file, password=lambda: b"")
        except (OSError, ssl.SSLError) as error:
            raise WebConfigError(
                f"{where}: tls_server_config.{culprit}: cannot load: {_reason(error)}"
            ) from None


def _write_private(path: str, content: str) -> None:
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
        handle.write(content)


def _load_client_cas(
    context: ssl.SSLContext, text: dict[str, str], base: Path, where: str, files: list[str]
) -> None:
    try:
        if text["client_ca_file"]:
            ca_file = str(base / text["client_ca_file"])
            files.append(ca_file)
            context.load_verify_locations(cafile=ca_file)
        elif text["client_ca"]:
            context.load_verify_locations(cadata=text["client_ca"])
        else:
            context.load_default_certs(ssl.Purpose.CLIENT_AUTH)  # the toolkit: Go's system pool
    except (OSError, ssl.SSLError, ValueError) as error:
        key = "client_ca_file" if text["client_ca_file"] else "client_ca"
        raise WebConfigError(f"{where}: tls_server_config.{key}: cannot load: {_reason(error)}") from None


def _ciphers(context: ssl.SSLContext, names: list[str], where: str) -> None:
    unknown = [name for name in names if name not in _CIPHERS]
    if unknown:
        raise WebConfigError(f"{where}: unknown cipher {unknown[0]} (Go's names from tls.CipherSuites())")
    chosen = [openssl for name in names if (openssl := _CIPHERS[name]) is not None]
    if not chosen:
        # Only TLS 1.3 suites listed: Go then has no TLS 1.2 suite left, so only TLS 1.3 connects.
        context.minimum_version = ssl.TLSVersion.TLSv1_3
        return
    try:
        context.set_ciphers(":".join(chosen))
    except ssl.SSLError:
        raise WebConfigError(f"{where}: none of these cipher suites is available in this OpenSSL") from None


def _curves(context: ssl.SSLContext, names: list[str], where: str) -> None:
    unknown = [name for name in names if name not in _CURVES]
    if unknown:
        raise WebConfigError(f"{where}: unknown curve {unknown[0]} (expected {', '.join(_CURVES)})")
    if len(set(names)) != 1:
        # Python's ssl can restrict the key exchange to one group (set_ecdh_curve), not to a list.
        raise WebConfigError(
            f"{where}: Python's ssl can enforce a single curve only, not a list of {len(names)}"
        )
    context.set_ecdh_curve(_CURVES[names[0]])


def _reason(error: Exception) -> str:
    return getattr(error, "strerror", None) or getattr(error, "reason", None) or type(error).__name__


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


def peer_sans(certificate: dict[str, Any]) -> list[str]:
    """A verified peer certificate's SANs as Go prints them: DNS names, e-mail addresses, IPs, URIs."""
    values: list[str] = []
    for kind, value in certificate.get("subjectAltName", ()):
        value = str(value).strip()
        if kind == "IP Address":
            try:
                address = ipaddress.ip_address(value)
            except ValueError:
                continue
            # Go's net.IP.String(): compressed IPv6, and an IPv4-mapped address as plain IPv4.
            mapped = getattr(address, "ipv4_mapped", None)
            values.append(str(mapped if mapped is not None else address))
        elif kind in ("DNS", "email", "URI"):
            values.append(value)
    return values


def sans_allowed(certificate: dict[str, Any] | None, allowed: frozenset[str]) -> bool:
    """The toolkit's rule: some SAN of the client certificate is exactly one of ``allowed``."""
    return certificate is not None and any(san in allowed for san in peer_sans(certificate))


class TokenBucket:
    """The toolkit's rate limiter (golang.org/x/time/rate): starts full with ``burst`` tokens, gains one
    per ``interval``, holds at most ``burst``; a request takes a token or is refused."""

    def __init__(self, limit: RateLimit, clock: Any = time.monotonic) -> None:
        self.limit = limit
        self._clock = clock
        self._tokens = float(limit.burst)
        self._last = clock()

    def allow(self) -> bool:
        now = self._clock()
        elapsed = max(0.0, now - self._last)
        self._last = now
        self._tokens = min(float(self.limit.burst), self._tokens + elapsed / self.limit.interval)
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False


class BasicAuth:
    """Checks user and password against bcrypt hashes, remembering recent answers.

    bcrypt is slow on purpose (tens to hundreds of ms); Prometheus sends the same credentials on every
    scrape, so a small TTL cache keyed by a salted digest (never the password itself) keeps scrapes fast.
    An unknown user is checked against a decoy hash of the users' usual cost, so the time taken does not
    tell whether a user exists.
    """

    def __init__(self, users: dict[str, bytes], *, cache_size: int = 1024, cache_ttl: float = 300.0) -> None:
        self._users = users
        self._salt = os.urandom(16)
        self._cache: TTLCache[bytes, bool] = TTLCache(maxsize=cache_size, ttl=cache_ttl)
        self._lock = threading.Lock()
        self._decoy = _decoy_hash(users.values())

    def cached(self, user: str, password: str) -> bool | None:
        with self._lock:
            return self._cache.get(self._digest(user, password))

    def check(self, user: str, password: str) -> bool:
        """The full (slow) check; call it off the event loop."""
        hashed = self._users.get(user)
        secret = password.encode()
        if len(secret) > _BCRYPT_MAX_PASSWORD_BYTES:
            ok = False  # bcrypt >= 5 raises on these; no stored hash can match them
        else:
            ok = bcrypt.checkpw(secret, hashed if hashed is not None else self._decoy)
            ok = ok and hashed is not None
        with self._lock:
            self._cache[self._digest(user, password)] = ok
        return ok

    def _digest(self, user: str, password: str) -> bytes:
        # Each part carries its length, so no (user, password) split can give another pair's key; the
        # stored hash is part of it as in the toolkit, so a changed hash never reuses an old answer.
        digest = hashlib.sha256(self._salt)
        for part in (user.encode(), self._users.get(user, b""), password.encode()):
            digest.update(len(part).to_bytes(8, "big"))
            digest.update(part)
        return digest.digest()


def _decoy_hash(hashes: Iterable[bytes]) -> bytes:
    """A well-formed bcrypt hash no password matches, at the most common cost of ``hashes`` (10 if none).

    Made from random characters rather than by hashing, so a cost of 18 costs nothing at start-up."""
    costs = Counter(int(hashed[4:6]) for hashed in hashes)
    cost = max(costs.items(), key=lambda item: (item[1], item[0]))[0] if costs else 10
    # The last salt character only carries 2 bits, and bcrypt wants them canonical: pick one of ".Oeu".
    salt = "".join(secrets.choice(_BCRYPT_ALPHABET) for _ in range(21)) + secrets.choice(".Oeu")
    checksum = "".join(secrets.choice(_BCRYPT_ALPHABET) for _ in range(31))
    return f"$2b${cost:02d}${salt}{checksum}".encode()


# ----- live reloading --------------------------------------------------------------------------------

_Signature = tuple[tuple[int, int, int, int] | None, ...]


def _signature(files: Iterable[str]) -> _Signature:
    result: list[tuple[int, int, int, int] | None] = []
    for name in files:
        try:
            info = os.stat(name)
        except OSError:
            result.append(None)
        else:
            result.append((info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns))
    return tuple(result)


class LiveWebConfig:
    """The web config in force, re-read when one of its files changes.

    ``current()`` is cheap (a ``stat`` per file) and is called for each new connection and request. A
    new version that fails to load, or that would switch TLS on or off (a restart is needed for that),
    is logged once, at error level, and the running version is kept.
    """

    def __init__(self, initial: WebConfig) -> None:
        self._config = initial
        self._signature = _signature(initial.files)
        self._refused: _Signature | None = None
        self.generation = 0  # bumped on each successful reload (for caches tied to one version)

    @property
    def config(self) -> WebConfig:
        return self._config

    def current(self) -> WebConfig:
        if self._config.path is None:
            return self._config
        signature = _signature(self._config.files)
        if signature != self._signature and signature != self._refused:
            self._reload(signature)
        return self._config

    def _reload(self, signature: _Signature) -> None:
        old = self._config
        try:
            new = load_web_config(old.path)
            if (new.ssl_context is None) != (old.ssl_context is None):
                raise WebConfigError(f"{old.path}: switching TLS on or off needs a restart")
        except WebConfigError as error:
            self._refused = signature
            log.error("web config not reloaded, keeping the running one: %s", error)
            return
        self._config = new
        self._signature = _signature(new.files)
        self._refused = None
        self.generation += 1
        for warning in new.warnings:
            log.warning("%s", warning)
        log.info("web config reloaded from %s", old.path)
