"""``--web.config.file``: TLS and basic auth, in the file format of Prometheus' exporter-toolkit.

```yaml
tls_server_config:
  cert_file: server.crt
  key_file: server.key
  client_auth_type: RequireAndVerifyClientCert   # optional
  client_ca_file: ca.crt                         # optional
  min_version: TLS12                             # optional
basic_auth_users:
  alice: $2y$10$...                              # bcrypt hash (htpasswd -nBC 10 "" | tr -d ':')
http_server_config:
  headers: {X-Frame-Options: deny}               # optional extra response headers
```
Relative paths are relative to the web config file.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import ssl
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import bcrypt
import yaml
from cachetools import TTLCache

log = logging.getLogger(__name__)

_TLS_VERSIONS = {
    "TLS10": ssl.TLSVersion.TLSv1,
    "TLS11": ssl.TLSVersion.TLSv1_1,
    "TLS12": ssl.TLSVersion.TLSv1_2,
    "TLS13": ssl.TLSVersion.TLSv1_3,
}
_CLIENT_AUTH = {
    "NoClientCert": ssl.CERT_NONE,
    "RequestClientCert": ssl.CERT_OPTIONAL,
    "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
    "RequireAnyClientCert": ssl.CERT_REQUIRED,
    "RequireAndVerifyClientCert": ssl.CERT_REQUIRED,
}
_TLS_KEYS = {"cert_file", "key_file", "client_auth_type", "client_ca_file", "min_version", "max_version"}
# Keys of the exporter-toolkit format that Python's ssl module cannot honour the same way: accepted, warned.
_TLS_IGNORED = {"cipher_suites", "curve_preferences", "prefer_server_cipher_suites", "client_allowed_sans"}
_TOP_KEYS = {"tls_server_config", "basic_auth_users", "http_server_config"}
_HTTP_KEYS = {"headers", "http2"}
# A whole bcrypt hash: version, cost 04-31, 22 characters of salt and 31 of hash.
_BCRYPT_HASH = re.compile(r"\$2[aby]\$(0[4-9]|[12][0-9]|3[01])\$[./A-Za-z0-9]{53}")
# bcrypt uses at most this many bytes of a password (bcrypt >= 5 raises ValueError beyond it).
_BCRYPT_MAX_PASSWORD_BYTES = 72


class WebConfigError(Exception):
    """A one-line error naming the web config file and the key."""


@dataclass(frozen=True)
class WebConfig:
    ssl_context: ssl.SSLContext | None = None
    users: dict[str, bytes] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)
    path: str | None = None


def load_web_config(path: str | os.PathLike[str] | None) -> WebConfig:
    if path is None:
        return WebConfig()
    where = str(path)
    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as error:
        raise WebConfigError(f"{where}: cannot read: {error.strerror or error}") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        position = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        raise WebConfigError(f"{where}{position}: invalid YAML") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise WebConfigError(f"{where}: expected a mapping at the top level")
    _no_unknown(raw, _TOP_KEYS, where, "")
    base = Path(path).parent
    context = _tls(raw.get("tls_server_config"), base, where)
    users = _users(raw.get("basic_auth_users"), where)
    headers = _headers(raw.get("http_server_config"), where)
    return WebConfig(ssl_context=context, users=users, headers=headers, path=where)


def _no_unknown(mapping: dict[str, Any], allowed: set[str], where: str, prefix: str) -> None:
    for key in mapping:
        if key not in allowed:
            raise WebConfigError(f"{where}: {prefix}{key}: unknown key")


def _tls(raw: Any, base: Path, where: str) -> ssl.SSLContext | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise WebConfigError(f"{where}: tls_server_config: expected a mapping")
    _no_unknown(raw, _TLS_KEYS | _TLS_IGNORED, where, "tls_server_config.")
    for key in _TLS_IGNORED & raw.keys():
        log.warning("%s: tls_server_config.%s is not supported and is ignored", where, key)
    cert, key = raw.get("cert_file"), raw.get("key_file")
    if not cert or not key:
        raise WebConfigError(f"{where}: tls_server_config: cert_file and key_file are both required")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(base / str(cert), base / str(key))
    except (OSError, ssl.SSLError) as error:
        raise WebConfigError(
            f"{where}: tls_server_config.cert_file/key_file: cannot load: {_reason(error)}"
        ) from None
    for name, attribute in (("min_version", "minimum_version"), ("max_version", "maximum_version")):
        if name in raw:
            version = _TLS_VERSIONS.get(str(raw[name]))
            if version is None:
                raise WebConfigError(
                    f"{where}: tls_server_config.{name}: expected one of {', '.join(_TLS_VERSIONS)}"
                )
            setattr(context, attribute, version)
    auth_type = raw.get("client_auth_type", "NoClientCert")
    if auth_type not in _CLIENT_AUTH:
        raise WebConfigError(
            f"{where}: tls_server_config.client_auth_type: expected one of {', '.join(_CLIENT_AUTH)}"
        )
    context.verify_mode = _CLIENT_AUTH[auth_type]
    ca_file = raw.get("client_ca_file")
    if ca_file:
        try:
            context.load_verify_locations(cafile=str(base / str(ca_file)))
        except (OSError, ssl.SSLError) as error:
            raise WebConfigError(
                f"{where}: tls_server_config.client_ca_file: cannot load: {_reason(error)}"
            ) from None
    elif context.verify_mode != ssl.CERT_NONE:
        raise WebConfigError(f"{where}: tls_server_config.client_ca_file: required by {auth_type}")
    return context


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
        raise WebConfigError(f"{where}: http_server_config: expected a mapping")
    _no_unknown(raw, _HTTP_KEYS, where, "http_server_config.")
    headers = raw.get("headers") or {}
    if not isinstance(headers, dict):
        raise WebConfigError(f"{where}: http_server_config.headers: expected a mapping")
    return {str(k): str(v) for k, v in headers.items()}


class BasicAuth:
    """Checks user and password against bcrypt hashes, remembering recent answers.

    bcrypt is slow on purpose (tens to hundreds of ms); Prometheus sends the same credentials on every
    scrape, so a small TTL cache keyed by a salted digest (never the password itself) keeps scrapes fast.
    """

    def __init__(self, users: dict[str, bytes], *, cache_size: int = 1024, cache_ttl: float = 300.0) -> None:
        self._users = users
        self._salt = os.urandom(16)
        self._cache: TTLCache[bytes, bool] = TTLCache(maxsize=cache_size, ttl=cache_ttl)
        self._lock = threading.Lock()
        # Compare against a dummy hash for unknown users so timing does not reveal which users exist.
        self._dummy = bcrypt.hashpw(b"dummy", bcrypt.gensalt(rounds=10))

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
            ok = bcrypt.checkpw(secret, hashed if hashed is not None else self._dummy)
            ok = ok and hashed is not None
        with self._lock:
            self._cache[self._digest(user, password)] = ok
        return ok

    def _digest(self, user: str, password: str) -> bytes:
        return hashlib.sha256(self._salt + user.encode() + b"\0" + password.encode()).digest()
