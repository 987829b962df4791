"""Tests of the web config: exporter/webconfig.py (the ``--web.config.file`` parser: an error for every
key), webtls.py (the TLS context, client SANs), webauth.py (the basic-auth checker, the rate limiter),
weblive.py (reloading), and of the web face under it (exporter/web.py), in-process with real TLS clients
on loopback.

The expectations follow the exporter-toolkit's documented behaviour (docs/web-configuration.md) and
what its tests check (web/tls_config_test.go, web/handler_test.go): every key works as there, or the
file is refused with a one-line error.

Certificates are made fresh per session by tests/fixtures/web/make_certs.sh (openssl CLI) in a tmp dir.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import shutil
import socket
import ssl
import threading
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import bcrypt
import pytest
import requests
import yaml
from aiohttp import web
from harness import LoopThread, wait_until_async
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from exporter.store import Store
from exporter.web import LimitedSite, WebApp
from exporter.webauth import BasicAuth, TokenBucket
from exporter.webconfig import RateLimit, WebConfigError, read_web_config
from exporter.weblive import WebConfig, load_web_config
from exporter.webtls import peer_sans

PASSWORD = "correct horse battery staple"


@pytest.fixture(scope="module")
def hashes() -> dict[str, str]:
    """A python-bcrypt hash ($2b$) and the same hash as htpasswd writes it ($2y$). Cost 4: fast tests."""
    hashed = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=4)).decode()
    assert hashed.startswith("$2b$")
    return {"2b": hashed, "2y": "$2y$" + hashed[4:], "2a": "$2a$" + hashed[4:]}


def write(path: Path, document: object) -> Path:
    path.write_text(yaml.safe_dump(document) if not isinstance(document, str) else document, "utf-8")
    return path


def load_error(path: Path) -> str:
    with pytest.raises(WebConfigError) as info:
        load_web_config(path)
    message = str(info.value)
    assert "\n" not in message, message
    assert message.startswith(str(path)), message  # names the file
    return message


# ----- no file, empty file, the happy paths ----------------------------------------------------------


def test_no_file_means_plain_http_without_auth() -> None:
    config = load_web_config(None)
    assert config == WebConfig()
    assert config.ssl_context is None and config.users == {} and config.headers == {}


def test_an_empty_path_means_no_web_config() -> None:
    """``--web.config.file=`` with nothing after it: the toolkit's "no web config"."""
    assert load_web_config("") == WebConfig()


def test_an_empty_file_is_valid_and_changes_nothing(tmp_path: Path) -> None:
    config = load_web_config(write(tmp_path / "web.yml", ""))
    assert config.ssl_context is None and config.users == {} and config.headers == {}
    assert config.path == str(tmp_path / "web.yml")


def test_tls_with_defaults(pki: Path, tmp_path: Path) -> None:
    path = write(
        tmp_path / "web.yml",
        {"tls_server_config": {"cert_file": str(pki / "server.crt"), "key_file": str(pki / "server.key")}},
    )
    context = load_web_config(path).ssl_context
    assert isinstance(context, ssl.SSLContext)
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2  # never older than TLS 1.2 by default
    assert context.verify_mode == ssl.CERT_NONE


def test_relative_paths_are_relative_to_the_web_config_file(
    pki: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # somewhere else than the file's directory
    path = write(
        pki / "web-relative.yml",
        {
            "tls_server_config": {
                "cert_file": "server.crt",
                "key_file": "server.key",
                "client_ca_file": "ca.crt",
                "client_auth_type": "RequireAndVerifyClientCert",
            }
        },
    )
    context = load_web_config(path).ssl_context
    assert context is not None and context.verify_mode == ssl.CERT_REQUIRED
    # The client CA was loaded: the context knows exactly one CA certificate.
    assert [cert["subject"] for cert in context.get_ca_certs()] == [
        ((("commonName", "wolkvox-exporter test CA"),),)
    ]


@pytest.mark.parametrize(
    ("auth_type", "mode"),
    [
        ("RequestClientCert", ssl.CERT_OPTIONAL),
        ("VerifyClientCertIfGiven", ssl.CERT_OPTIONAL),
        ("RequireAndVerifyClientCert", ssl.CERT_REQUIRED),
    ],
)
def test_client_auth_types(pki: Path, tmp_path: Path, auth_type: str, mode: ssl.VerifyMode) -> None:
    path = write(
        tmp_path / "web.yml",
        {
            "tls_server_config": {
                "cert_file": str(pki / "server.crt"),
                "key_file": str(pki / "server.key"),
                "client_ca_file": str(pki / "ca.crt"),
                "client_auth_type": auth_type,
            }
        },
    )
    context = load_web_config(path).ssl_context
    assert context is not None and context.verify_mode == mode


@pytest.mark.parametrize("auth_type", ["RequireAnyClientCert", "RequireClientCert"])
def test_policies_that_require_an_unverified_certificate_are_refused_at_start(
    pki: Path, tmp_path: Path, auth_type: str
) -> None:
    """Go accepts any client certificate under these; Python's ssl cannot accept one it does not verify,
    so the exporter would start and then refuse every client certificate the CAs do not sign."""
    for ca in ({"client_ca_file": str(pki / "ca.crt")}, {}):
        message = load_error(write(tmp_path / "web.yml", tls_files(pki, client_auth_type=auth_type, **ca)))
        assert f"tls_server_config.client_auth_type: {auth_type} accepts any client certificate" in message
        assert "Python's ssl" in message and "use RequireAndVerifyClientCert" in message


def test_request_client_cert_is_accepted_with_a_warning(pki: Path, tmp_path: Path) -> None:
    """Every client Go would serve without a certificate is served here too: stricter only for
    certificates the CAs do not sign, and said at start."""
    path = write(tmp_path / "web.yml", tls_files(pki, client_auth_type="RequestClientCert"))
    warnings = load_web_config(path).warnings
    assert any("RequestClientCert accepts any client certificate in Go" in w for w in warnings), warnings


@pytest.mark.parametrize(
    ("name", "version"), [("TLS12", ssl.TLSVersion.TLSv1_2), ("TLS13", ssl.TLSVersion.TLSv1_3)]
)
def test_min_version(pki: Path, tmp_path: Path, name: str, version: ssl.TLSVersion) -> None:
    path = write(
        tmp_path / "web.yml",
        {
            "tls_server_config": {
                "cert_file": str(pki / "server.crt"),
                "key_file": str(pki / "server.key"),
                "min_version": name,
            }
        },
    )
    context = load_web_config(path).ssl_context
    assert context is not None and context.minimum_version == version


def test_users_keep_every_bcrypt_prefix(tmp_path: Path, hashes: dict[str, str]) -> None:
    path = write(tmp_path / "web.yml", {"basic_auth_users": {"alice": hashes["2b"], "bob": hashes["2y"]}})
    users = load_web_config(path).users
    assert users == {"alice": hashes["2b"].encode(), "bob": hashes["2y"].encode()}


def test_extra_headers(tmp_path: Path) -> None:
    path = write(
        tmp_path / "web.yml",
        {"http_server_config": {"headers": {"X-Frame-Options": "deny", "X-Content-Type-Options": "nosniff"}}},
    )
    assert load_web_config(path).headers == {"X-Frame-Options": "deny", "X-Content-Type-Options": "nosniff"}


def test_reading_checks_the_file_alone_and_gives_frozen_settings(tmp_path: Path) -> None:
    """The parser reads only the web config: the files it names are loaded when the TLS context is built
    (webtls), so a missing certificate is that step's error, not the parser's."""
    path = write(
        tmp_path / "web.yml",
        {
            "tls_server_config": {
                "cert_file": "absent.crt",
                "key_file": "absent.key",
                "min_version": "TLS13",
            },
            "rate_limit": {"interval": "2s", "burst": 4},
        },
    )
    checked = read_web_config(str(path))
    assert checked.tls is not None and checked.tls.cert_file == str(tmp_path / "absent.crt")
    assert checked.tls.min_version == ssl.TLSVersion.TLSv1_3 and checked.rate_limit == RateLimit(2.0, 4)
    assert checked.files == (str(path), str(tmp_path / "absent.crt"), str(tmp_path / "absent.key"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        checked.tls.min_version = ssl.TLSVersion.TLSv1_2  # type: ignore[misc]
    assert "tls_server_config.cert_file/key_file: cannot load" in load_error(path)


# ----- errors: one line, the file and the key named, no secret value -------------------------------


def test_missing_file(tmp_path: Path) -> None:
    message = load_error(tmp_path / "nope.yml")
    assert "cannot read" in message


def test_invalid_yaml_gives_a_position_but_not_the_line(tmp_path: Path) -> None:
    path = write(tmp_path / "web.yml", "basic_auth_users:\n  alice: [hunter2-plain-password\n")
    message = load_error(path)
    assert "invalid YAML" in message
    assert "hunter2" not in message


def test_top_level_must_be_a_mapping(tmp_path: Path) -> None:
    assert "mapping" in load_error(write(tmp_path / "web.yml", "- a\n- b\n"))


@pytest.mark.parametrize(
    ("document", "key"),
    [
        ({"tls_config": {}}, "tls_config"),
        ({"tls_server_config": {"cert_fil": "x"}}, "tls_server_config.cert_fil"),
        ({"http_server_config": {"header": {}}}, "http_server_config.header"),
    ],
)
def test_unknown_keys(tmp_path: Path, document: dict, key: str) -> None:
    message = load_error(write(tmp_path / "web.yml", document))
    assert f"{key}: unknown key" in message


@pytest.mark.parametrize("missing", ["cert_file", "key_file"])
def test_cert_and_key_are_both_required(pki: Path, tmp_path: Path, missing: str) -> None:
    tls = {"cert_file": str(pki / "server.crt"), "key_file": str(pki / "server.key")}
    del tls[missing]
    message = load_error(write(tmp_path / "web.yml", {"tls_server_config": tls}))
    assert missing in message


@pytest.mark.parametrize("problem", ["missing", "garbage", "directory", "mismatched-key"])
def test_unloadable_certificate(pki: Path, tmp_path: Path, problem: str) -> None:
    cert, key = pki / "server.crt", pki / "server.key"
    if problem == "missing":
        cert = tmp_path / "absent.crt"
    elif problem == "garbage":
        cert = tmp_path / "garbage.crt"
        cert.write_text("-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n")
    elif problem == "directory":
        cert = tmp_path
    else:
        key = pki / "client.key"  # a valid key, but not the certificate's
    path = write(tmp_path / "web.yml", {"tls_server_config": {"cert_file": str(cert), "key_file": str(key)}})
    message = load_error(path)
    assert "tls_server_config.cert_file" in message and "cannot load" in message


def test_unloadable_client_ca(pki: Path, tmp_path: Path) -> None:
    garbage = tmp_path / "ca.crt"
    garbage.write_text("this is not a certificate\n")
    path = write(
        tmp_path / "web.yml",
        {
            "tls_server_config": {
                "cert_file": str(pki / "server.crt"),
                "key_file": str(pki / "server.key"),
                "client_auth_type": "RequireAndVerifyClientCert",
                "client_ca_file": str(garbage),
            }
        },
    )
    assert "tls_server_config.client_ca_file" in load_error(path)


@pytest.mark.parametrize(("key", "bad"), [("client_auth_type", "RequireCert"), ("min_version", "SSL3")])
def test_bad_enumerations(pki: Path, tmp_path: Path, key: str, bad: str) -> None:
    tls = {"cert_file": str(pki / "server.crt"), "key_file": str(pki / "server.key"), key: bad}
    message = load_error(write(tmp_path / "web.yml", {"tls_server_config": tls}))
    assert f"tls_server_config.{key}" in message


@pytest.mark.parametrize(
    "bad_value",
    [
        "hunter2-plain-password",  # a password pasted instead of its hash
        "$1$saltsalt$hunter2hashhashhashhas",  # an md5-crypt hash: not bcrypt
        12345678,  # YAML reads an unquoted number
    ],
)
def test_a_user_without_a_bcrypt_hash_is_rejected_without_echoing_the_value(
    tmp_path: Path, bad_value: object
) -> None:
    message = load_error(write(tmp_path / "web.yml", {"basic_auth_users": {"alice": bad_value}}))
    assert "basic_auth_users.alice" in message and "bcrypt" in message
    assert str(bad_value) not in message
    assert "hunter2" not in message


def test_a_truncated_bcrypt_hash_is_rejected_at_load_time(tmp_path: Path, hashes: dict[str, str]) -> None:
    """A hash cut short when pasted passes a prefix check but makes bcrypt raise on every login attempt
    (``ValueError: Invalid salt``): the file must be refused at start-up, not fail at request time."""
    truncated = hashes["2y"][:20]
    message = load_error(write(tmp_path / "web.yml", {"basic_auth_users": {"alice": truncated}}))
    assert "basic_auth_users.alice" in message
    assert truncated not in message


@pytest.mark.parametrize(
    "document",
    [
        {"basic_auth_users": ["alice"]},
        {"tls_server_config": "server.crt"},
        {"http_server_config": ["headers"]},
        {"http_server_config": {"headers": ["X-Frame-Options: deny"]}},
    ],
)
def test_sections_of_the_wrong_type(tmp_path: Path, document: dict) -> None:
    message = load_error(write(tmp_path / "web.yml", document))
    assert "expected a mapping" in message


# ----- BasicAuth ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def auth(hashes: dict[str, str]) -> BasicAuth:
    return BasicAuth({name: hashes[name].encode() for name in ("2a", "2b", "2y")})


@pytest.mark.parametrize("user", ["2a", "2b", "2y"])
def test_right_password_for_every_prefix(auth: BasicAuth, user: str) -> None:
    assert auth.check(user, PASSWORD) is True


@pytest.mark.parametrize(
    ("user", "password"),
    [
        ("2y", PASSWORD + "x"),
        ("2y", PASSWORD.upper()),
        ("2y", ""),
        ("2b", PASSWORD[:-1]),
        ("mallory", PASSWORD),  # unknown user, even with a password that is right for someone else
        ("", PASSWORD),
    ],
)
def test_wrong_credentials(auth: BasicAuth, user: str, password: str) -> None:
    assert auth.check(user, password) is False


def test_a_password_longer_than_72_bytes_is_a_plain_no(auth: BasicAuth) -> None:
    """bcrypt >= 5 raises ValueError for passwords over 72 bytes; a client must not turn that into a
    server error (HTTP 500 and a traceback per request): it is just a wrong password."""
    assert auth.check("2y", "p" * 73) is False
    assert auth.check("mallory", "p" * 200) is False


def test_answers_are_cached_under_a_digest_never_the_password(auth: BasicAuth) -> None:
    secret = "a-distinct-password-for-the-cache-test"
    assert auth.cached("2y", secret) is None
    assert auth.check("2y", secret) is False
    assert auth.cached("2y", secret) is False
    assert auth.cached("2y", PASSWORD) in (None, True)
    auth.check("2y", PASSWORD)
    assert auth.cached("2y", PASSWORD) is True
    for key in list(auth._cache.keys()):
        assert secret.encode() not in key and PASSWORD.encode() not in key


def test_the_cache_does_not_confuse_user_and_password_boundaries(hashes: dict[str, str]) -> None:
    """("ab", "c") and ("a", "bc") must not share a cache entry."""
    auth = BasicAuth({"a": hashes["2b"].encode()})
    assert auth.check("a", PASSWORD) is True
    assert auth.cached("a" + PASSWORD[:1], PASSWORD[1:]) is None


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(user=st.text(max_size=20), password=st.text(max_size=60))
def test_arbitrary_credentials_never_raise(auth: BasicAuth, user: str, password: str) -> None:
    if (user, password) in {(name, PASSWORD) for name in ("2a", "2b", "2y")}:
        return
    assert auth.check(user, password) is False


def test_the_cache_key_holds_no_ambiguity_even_with_nul_bytes(hashes: dict[str, str]) -> None:
    """("a", "\\0x") and ("a\\0", "x") must not share a cache entry either: a separator byte can be typed."""
    auth = BasicAuth({"a": hashes["2b"].encode(), "a\0": hashes["2b"].encode()})
    assert auth.check("a", "\0" + PASSWORD) is False
    assert auth.cached("a\0", PASSWORD) is None


def test_credentials_built_from_a_stored_hash_find_no_cache_entry(hashes: dict[str, str]) -> None:
    """A cache keyed by user, hash and password simply joined could be hit by moving text across the
    boundaries (the toolkit's test of that bypass); with each part's length in the key it cannot."""
    stored = hashes["2b"]
    auth = BasicAuth({"alice": stored.encode()})
    assert auth.check("alice", PASSWORD) is True
    for user, password in (
        ("alice" + stored, PASSWORD),
        ("alice", stored + PASSWORD),
        ("", "alice" + stored + PASSWORD),
    ):
        assert auth.cached(user, password) is None
        assert auth.check(user, password) is False


def test_unknown_users_cost_a_bcrypt_check_at_the_users_cost(hashes: dict[str, str]) -> None:
    """The decoy hash an unknown user is checked against has the cost the configured users have, and is a
    hash bcrypt accepts (else an unknown user would be an error, or a fast and telling answer)."""
    auth = BasicAuth({"alice": hashes["2b"].encode(), "bob": hashes["2y"].encode()})
    assert auth._decoy[:7] == b"$2b$04$"
    assert bcrypt.checkpw(PASSWORD.encode(), auth._decoy) is False
    assert auth.check("mallory", PASSWORD) is False
    assert BasicAuth({})._decoy[:7] == b"$2b$10$"  # no users: the toolkit's cost


# ----- the toolkit's rules, at load time ---------------------------------------------------------


def tls_files(pki: Path, **extra: Any) -> dict[str, Any]:
    return {
        "tls_server_config": {
            "cert_file": str(pki / "server.crt"),
            "key_file": str(pki / "server.key"),
            **extra,
        }
    }


@pytest.mark.parametrize(
    ("document", "expected"),
    [
        ({"X-Frame-Options": "foo"}, "X-Frame-Options: invalid value"),
        ({"X-Content-Type-Options": "sniff"}, "X-Content-Type-Options: invalid value"),
        ({"X-Frame-Options": "DENY"}, "X-Frame-Options: invalid value"),  # values are exact, as in Go
        ({"Content-Type": "text/html"}, "Content-Type: this header can not be configured"),
        ({"x-frame-options": "deny"}, "x-frame-options: this header can not be configured"),
        ({"Set-Cookie": "a=b"}, "Set-Cookie: this header can not be configured"),
        ({"Strict-Transport-Security": "max-age=1\r\nSet-Cookie: a=b"}, "must be one line"),
    ],
)
def test_headers_the_toolkit_refuses_are_refused(tmp_path: Path, document: dict, expected: str) -> None:
    message = load_error(write(tmp_path / "web.yml", {"http_server_config": {"headers": document}}))
    assert f"http_server_config.headers.{expected}" in message or expected in message


def test_every_header_the_toolkit_allows(tmp_path: Path) -> None:
    headers = {
        "X-Frame-Options": "sameorigin",
        "X-Content-Type-Options": "nosniff",
        "X-XSS-Protection": "1; mode=block",
        "Strict-Transport-Security": "max-age=31536000; includeSubDomains",
        "Content-Security-Policy": "default-src 'self'",
    }
    document = {"http_server_config": {"http2": False, "headers": {**headers, "Content-Security-Policy": ""}}}
    loaded = load_web_config(write(tmp_path / "web.yml", document)).headers
    assert loaded == {name: value for name, value in headers.items() if name != "Content-Security-Policy"}


@pytest.mark.parametrize(
    ("tls", "expected"),
    [
        (
            {"client_ca_file": "ca.crt"},
            "client_ca_file: client CAs are configured without a client auth policy",
        ),
        ({"client_ca_file": "ca.crt", "client_auth_type": "NoClientCert"}, "without a client auth policy"),
        ({"cert": "inline"}, "cert_file: set either cert_file or cert, not both"),
        ({"key": "inline"}, "key_file: set either key_file or key, not both"),
        (
            {"client_ca": "inline", "client_ca_file": "ca.crt", "client_auth_type": "RequestClientCert"},
            "client_ca_file: set either client_ca_file or client_ca, not both",
        ),
        ({"cipher_suites": ["TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA2048"]}, "cipher_suites: unknown cipher"),
        ({"cipher_suites": ["TLS_RSA_WITH_AES_128_CBC_SHA"]}, "unknown cipher"),  # Go: insecure, refused
        ({"curve_preferences": ["CurveP257"]}, "curve_preferences: unknown curve CurveP257"),
        ({"curve_preferences": "X25519"}, "curve_preferences: expected a list of strings"),
        ({"cipher_suites": "TLS_AES_128_GCM_SHA256"}, "cipher_suites: expected a list of strings"),
        ({"max_version": "TLS14"}, "max_version: unknown TLS version"),
        ({"cert": ["a"], "cert_file": ""}, "cert: expected a string"),
        ({"client_ca": "not a certificate", "client_auth_type": "RequireAndVerifyClientCert"}, "client_ca: "),
        ({"min_version": "TLS111"}, "min_version: unknown TLS version"),
        ({"min_version": "TLS13", "max_version": "TLS12"}, "min_version: is above max_version"),
        ({"client_allowed_sans": ["x"]}, "client_allowed_sans: needs a client_auth_type"),
        ({"client_allowed_sans": "x", "client_auth_type": "RequireAndVerifyClientCert"}, "a list of strings"),
        (
            {"prefer_server_cipher_suites": "yes please"},
            "prefer_server_cipher_suites: expected true or false",
        ),
    ],
)
def test_tls_settings_the_toolkit_refuses_or_python_cannot_enforce(
    pki: Path, tmp_path: Path, tls: dict, expected: str
) -> None:
    tls = {key: (str(pki / value) if key.endswith("_file") else value) for key, value in tls.items()}
    message = load_error(write(tmp_path / "web.yml", tls_files(pki, **tls)))
    assert f"tls_server_config.{expected}" in message or expected in message, message


@pytest.mark.parametrize(
    ("tls", "expected"),
    [
        ({"cert_file": ""}, "cert_file: missing one of cert or cert_file"),
        ({"key_file": ""}, "key_file: missing one of key or key_file"),
        ({"cert_file": "", "key_file": "", "client_auth_type": "x"}, "missing one of cert or cert_file"),
    ],
)
def test_empty_paths_count_as_missing(pki: Path, tmp_path: Path, tls: dict, expected: str) -> None:
    assert expected in load_error(write(tmp_path / "web.yml", tls_files(pki, **tls)))


def test_tls_keys_without_a_certificate_leave_plain_http(tmp_path: Path) -> None:
    """The toolkit turns TLS on only when a certificate, key, client CA or client auth type is set."""
    config = load_web_config(write(tmp_path / "web.yml", {"tls_server_config": {"min_version": "TLS13"}}))
    assert config.ssl_context is None
    assert any("plain HTTP" in warning for warning in config.warnings)


@pytest.mark.parametrize(
    ("document", "expected"),
    [
        ({"rate_limit": {"interval": "1s", "burst": 5}}, RateLimit(interval=1.0, burst=5)),
        ({"rate_limit": {"interval": "1m30s", "burst": 1}}, RateLimit(interval=90.0, burst=1)),
        ({"rate_limit": {"interval": "250ms", "burst": 2}}, RateLimit(interval=0.25, burst=2)),
        ({"rate_limit": {"interval": 2_000_000_000, "burst": 3}}, RateLimit(interval=2.0, burst=3)),
        ({"rate_limit": {"interval": 0, "burst": 0}}, None),  # 0 turns the limiter off
        ({"rate_limit": {"interval": "0", "burst": 9}}, None),
    ],
)
def test_rate_limit(tmp_path: Path, document: dict, expected: RateLimit | None) -> None:
    assert load_web_config(write(tmp_path / "web.yml", document)).rate_limit == expected


@pytest.mark.parametrize(
    ("document", "expected"),
    [
        ({"rate_limit": {"interval": "1 second"}}, "rate_limit.interval: expected a duration"),
        ({"rate_limit": {"interval": "-1s"}}, "rate_limit.interval: must not be negative"),
        ({"rate_limit": {"interval": "1s", "burst": -1}}, "rate_limit.burst: expected a whole number"),
        ({"rate_limit": {"interval": "1s", "bursts": 1}}, "rate_limit.bursts: unknown key"),
    ],
)
def test_bad_rate_limits(tmp_path: Path, document: dict, expected: str) -> None:
    assert expected in load_error(write(tmp_path / "web.yml", document))


def test_the_token_bucket_starts_full_and_refills_one_per_interval() -> None:
    now = [0.0]
    bucket = TokenBucket(RateLimit(interval=2.0, burst=3), clock=lambda: now[0])
    assert [bucket.allow() for _ in range(4)] == [True, True, True, False]
    now[0] = 1.9
    assert bucket.allow() is False
    now[0] = 2.0
    assert bucket.allow() is True and bucket.allow() is False
    now[0] = 100.0  # a long pause refills to the burst, no further
    assert [bucket.allow() for _ in range(4)] == [True, True, True, False]
    assert TokenBucket(RateLimit(interval=1.0, burst=0)).allow() is False  # the toolkit: burst 0 refuses all


def test_duplicate_keys_are_refused_like_the_toolkits_strict_yaml(tmp_path: Path) -> None:
    path = write(tmp_path / "web.yml", "basic_auth_users:\n  alice: x\nbasic_auth_users:\n  bob: y\n")
    assert "duplicate key" in load_error(path)


def test_sans_are_read_as_go_prints_them() -> None:
    certificate = {
        "subjectAltName": (
            ("DNS", "a.example"),
            ("IP Address", "2001:DB8:0:0:0:0:0:1\n"),
            ("IP Address", "0:0:0:0:0:FFFF:A01:203"),
            ("email", "x@example.net"),
            ("URI", "spiffe://example.net/p"),
            ("othername", "<unsupported>"),
        )
    }
    assert peer_sans(certificate) == [
        "a.example",
        "2001:db8::1",
        "10.1.2.3",
        "x@example.net",
        "spiffe://example.net/p",
    ]


# ----- the web face, served on loopback from a thread -----------------------------------------------


class Served:
    """WebApp + LimitedSite on 127.0.0.1 (an ephemeral port), on an event loop in a thread."""

    def __init__(
        self, config_path: Path | None, reload: Callable[[], Awaitable[tuple[bool, str]]] | None = None
    ):
        self.loop = LoopThread()
        self.reload = reload
        self.port = self.call(self._start(config_path))

    def call(self, coroutine: Awaitable[Any]) -> Any:
        return self.loop.run(coroutine)

    async def _start(self, config_path: Path | None) -> int:
        config = load_web_config(config_path)
        store = Store([], max_age=60.0)
        app = WebApp(store, web_config=config, reload=self.reload).build()
        self.runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
        await self.runner.setup()
        self.site = LimitedSite(
            self.runner, "127.0.0.1", 0, ssl_context=config.ssl_context, max_connections=64
        )
        await self.site.start()
        return self.site.bound[0][1]

    def close(self) -> None:
        self.call(self.runner.cleanup())
        self.loop.close()


@pytest.fixture
def serve() -> Iterator[Callable[..., Served]]:
    started: list[Served] = []

    def start(config_path: Path | None, **kwargs: Any) -> Served:
        served = Served(config_path, **kwargs)
        started.append(served)
        return served

    yield start
    for served in started:
        served.close()


def client_context(pki: Path, cert: str | None = None, **settings: Any) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki / "ca.crt"))
    if cert is not None:
        context.load_cert_chain(str(pki / f"{cert}.crt"), str(pki / f"{cert}.key"))
    for name, value in settings.items():
        setattr(context, name, value)
    return context


def https_get(port: int, context: ssl.SSLContext, path: str = "/-/healthy", headers: str = "") -> bytes:
    """One request over a fresh TLS connection; the whole answer (head and body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            tls.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{headers}\r\n".encode())
            chunks = []
            while chunk := tls.recv(65536):
                chunks.append(chunk)
    return b"".join(chunks)


def served_certificate_cn(port: int, pki: Path) -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with client_context(pki).wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            subject = tls.getpeercert()["subject"]
    return dict(item[0] for item in subject)["commonName"]


def refused(port: int, context: ssl.SSLContext) -> bool:
    """True if the server ends the connection instead of answering (a TLS alert, or a close)."""
    try:
        return not https_get(port, context).startswith(b"HTTP/1.1 200")
    except (ssl.SSLError, ConnectionError):
        return True


SAN_CLIENT = {"client_auth_type": "RequireAndVerifyClientCert", "client_ca_file": "ca.crt"}


@pytest.mark.parametrize(
    "allowed",
    [
        "prometheus.example.net",
        "10.1.2.3",
        "2001:db8::1",
        "scraper@example.net",
        "spiffe://example.net/prometheus",
    ],
)
def test_a_client_with_an_allowed_san_is_served(
    pki: Path, serve: Callable[..., Served], allowed: str
) -> None:
    path = write(
        pki / f"web-san-{abs(hash(allowed))}.yml",
        tls_files(pki, **SAN_CLIENT, client_allowed_sans=["other", allowed]),
    )
    served = serve(path)
    assert https_get(served.port, client_context(pki, "client-sans")).startswith(b"HTTP/1.1 200")


def test_clients_without_an_allowed_san_are_refused(
    pki: Path, serve: Callable[..., Served], caplog: pytest.LogCaptureFixture
) -> None:
    # Near misses: Go compares whole strings, case and all, and an IPv6 address in Go's short form only.
    allowed = ["bad", "Prometheus.example.net", "2001:DB8::1", "2001:db8:0:0:0:0:0:1", "scraper"]
    path = write(pki / "web-san-bad.yml", tls_files(pki, **SAN_CLIENT, client_allowed_sans=allowed))
    served = serve(path)
    caplog.set_level(logging.DEBUG, logger="exporter.web")
    assert refused(served.port, client_context(pki, "client-sans"))
    assert refused(served.port, client_context(pki, "client"))  # a certificate with no SAN at all
    assert refused(served.port, client_context(pki))  # no certificate
    lines = [r.getMessage() for r in caplog.records if "client_allowed_sans" in r.getMessage()]
    assert len(lines) == 2 and all(
        r.levelno == logging.DEBUG for r in caplog.records if r.name == "exporter.web"
    )


def test_inline_certificate_key_and_client_ca(
    pki: Path, serve: Callable[..., Served], tmp_path: Path
) -> None:
    document = {
        "tls_server_config": {
            "cert": (pki / "server.crt").read_text(),
            "key": (pki / "server.key").read_text(),
            "client_ca": (pki / "ca.crt").read_text(),
            "client_auth_type": "RequireAndVerifyClientCert",
        }
    }
    served = serve(write(tmp_path / "web.yml", document))
    assert https_get(served.port, client_context(pki, "client")).startswith(b"HTTP/1.1 200")
    assert refused(served.port, client_context(pki, "rogue-client"))
    assert served_certificate_cn(served.port, pki) == "127.0.0.1"


def test_a_file_certificate_with_an_inline_key(
    pki: Path, serve: Callable[..., Served], tmp_path: Path
) -> None:
    document = {
        "tls_server_config": {"cert_file": str(pki / "server.crt"), "key": (pki / "server.key").read_text()}
    }
    served = serve(write(tmp_path / "web.yml", document))
    assert https_get(served.port, client_context(pki)).startswith(b"HTTP/1.1 200")


@pytest.mark.parametrize(
    "auth_type", ["RequireAndVerifyClientCert", "VerifyClientCertIfGiven", "RequestClientCert"]
)
def test_client_auth_without_a_ca_file_uses_the_system_cas(
    pki: Path, serve: Callable[..., Served], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, auth_type: str
) -> None:
    """As in the toolkit (Go's system pool): here OpenSSL's default paths, which SSL_CERT_FILE points
    at the test CA for this test."""
    monkeypatch.setenv("SSL_CERT_FILE", str(pki / "ca.crt"))
    monkeypatch.setenv("SSL_CERT_DIR", str(tmp_path))
    served = serve(write(tmp_path / "web.yml", tls_files(pki, client_auth_type=auth_type)))
    assert https_get(served.port, client_context(pki, "client")).startswith(b"HTTP/1.1 200")
    assert refused(served.port, client_context(pki, "rogue-client"))
    no_certificate_ok = not refused(served.port, client_context(pki))
    assert no_certificate_ok is (auth_type != "RequireAndVerifyClientCert")


def test_a_rotated_certificate_is_served_without_a_restart(
    pki: Path, serve: Callable[..., Served], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    shutil.copy(pki / "server.crt", cert)
    shutil.copy(pki / "server.key", key)
    served = serve(
        write(tmp_path / "web.yml", {"tls_server_config": {"cert_file": "tls.crt", "key_file": "tls.key"}})
    )
    assert served_certificate_cn(served.port, pki) == "127.0.0.1"

    # Renewed in place, as cert-manager or an ACME client does: the next connection gets the new one.
    for source, target in ((pki / "renewed.crt", cert), (pki / "renewed.key", key)):
        staged = target.with_suffix(".new")
        shutil.copy(source, staged)
        os.replace(staged, target)
    assert served_certificate_cn(served.port, pki) == "renewed"

    # A broken renewal (a key that does not match) is ignored: the running certificate stays, one line.
    shutil.copy(pki / "client.key", key)
    caplog.set_level(logging.INFO, logger="exporter.weblive")
    for _ in range(3):
        assert served_certificate_cn(served.port, pki) == "renewed"
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "keeping the running one" in errors[0].getMessage(), caplog.text
    assert "tls_server_config.cert_file/key_file" in errors[0].getMessage()


def test_users_and_headers_follow_the_file_on_a_kept_alive_connection(
    serve: Callable[..., Served], tmp_path: Path, hashes: dict[str, str]
) -> None:
    path = write(tmp_path / "web.yml", {"basic_auth_users": {"alice": hashes["2b"]}})
    served = serve(path)
    url = f"http://127.0.0.1:{served.port}/metrics"
    with requests.Session() as session:  # one connection, kept alive, as Prometheus does
        assert session.get(url, auth=("alice", PASSWORD), timeout=5).status_code == 200
        write(
            path,
            {
                "basic_auth_users": {"bob": hashes["2y"]},
                "http_server_config": {"headers": {"X-Frame-Options": "deny"}},
            },
        )
        answer = session.get(url, auth=("alice", PASSWORD), timeout=5)
        assert answer.status_code == 401 and answer.headers["X-Frame-Options"] == "deny"
        assert session.get(url, auth=("bob", PASSWORD), timeout=5).status_code == 200
        missing = session.get(url + "/nope", auth=("bob", PASSWORD), timeout=5)
        assert missing.status_code == 404 and missing.headers["X-Frame-Options"] == "deny"
        # Switching TLS on needs a restart: refused, and the running config stays.
        write(path, {"tls_server_config": {"cert_file": "x.crt", "key_file": "x.key"}})
        assert session.get(url, auth=("bob", PASSWORD), timeout=5).status_code == 200


def test_the_rate_limit_answers_429_once_the_burst_is_spent(
    serve: Callable[..., Served], tmp_path: Path
) -> None:
    document = {
        "rate_limit": {"interval": "1h", "burst": 3},
        "http_server_config": {"headers": {"X-Frame-Options": "deny"}},
    }
    served = serve(write(tmp_path / "web.yml", document))
    statuses = [requests.get(f"http://127.0.0.1:{served.port}/-/healthy", timeout=5) for _ in range(5)]
    assert [answer.status_code for answer in statuses] == [200, 200, 200, 429, 429]
    assert statuses[3].text == "Too Many Requests\n"
    assert statuses[0].headers["X-Frame-Options"] == "deny"


def test_curve_preferences_are_enforced(pki: Path, serve: Callable[..., Served], tmp_path: Path) -> None:
    served = serve(
        write(tmp_path / "web.yml", tls_files(pki, min_version="TLS13", curve_preferences=["CurveP521"]))
    )
    p521 = client_context(pki)
    p521.set_ecdh_curve("secp521r1")
    assert https_get(served.port, p521).startswith(b"HTTP/1.1 200")
    p384 = client_context(pki)
    p384.set_ecdh_curve("secp384r1")
    assert refused(served.port, p384)


def test_of_several_curves_the_first_is_enforced_and_the_rest_warned(
    pki: Path, serve: Callable[..., Served], tmp_path: Path
) -> None:
    """Go offers every listed curve, in order; Python's ssl sets one (set_ecdh_curve): the first, the one
    Go picks with a client that offers them all. Stricter than written, and said at start."""
    path = write(
        tmp_path / "web.yml",
        tls_files(pki, min_version="TLS13", curve_preferences=["CurveP521", "CurveP384", "CurveP521"]),
    )
    warnings = load_web_config(path).warnings
    assert [w for w in warnings if "curve_preferences" in w] == [
        f"{path}: tls_server_config.curve_preferences: only CurveP521 is offered, not CurveP384: Python's "
        "ssl sets one curve, not a list (clients that support none of them cannot connect)"
    ]
    served = serve(path)
    p521 = client_context(pki)
    p521.set_ecdh_curve("secp521r1")
    assert https_get(served.port, p521).startswith(b"HTTP/1.1 200")
    p384 = client_context(pki)
    p384.set_ecdh_curve("secp384r1")
    assert refused(served.port, p384)
    # An empty list is Go's defaults, as when the key is absent.
    empty = load_web_config(write(tmp_path / "web.yml", tls_files(pki, curve_preferences=[])))
    assert not [w for w in empty.warnings if "curve" in w]


def test_a_missing_client_ca_file_is_reported_before_the_missing_policy(pki: Path, tmp_path: Path) -> None:
    """As the toolkit (tls_config.go loads the client CAs, then checks the policy): the first thing to
    fix is the file that is not there."""
    absent = tmp_path / "absent-ca.crt"
    message = load_error(write(tmp_path / "web.yml", tls_files(pki, client_ca_file=str(absent))))
    assert message.endswith("tls_server_config.client_ca_file: cannot load: No such file or directory")
    present = load_error(write(tmp_path / "web.yml", tls_files(pki, client_ca_file=str(pki / "ca.crt"))))
    assert "client_ca_file: client CAs are configured without a client auth policy" in present


@pytest.mark.parametrize(
    ("document", "expected"),
    [
        ({"rate_limit": "1s"}, "rate_limit: expected a mapping"),
        ({"rate_limit": {"interval": "1s", "burst": "ten"}}, "rate_limit.burst: expected a whole number"),
        ({"rate_limit": {"interval": True}}, "rate_limit.interval: expected a duration"),
        ({"http_server_config": {"http2": "yes"}}, "http_server_config.http2: expected true or false"),
        ({"http_server_config": {"http3": True}}, "http_server_config.http3: unknown key"),
        ({"basic_auth_users": {"alice": None}}, "basic_auth_users.alice: expected a bcrypt hash"),
    ],
)
def test_the_other_keys_errors(tmp_path: Path, document: dict, expected: str) -> None:
    assert f": {expected}" in load_error(write(tmp_path / "web.yml", document))


def test_cipher_suites_are_enforced(pki: Path, serve: Callable[..., Served], tmp_path: Path) -> None:
    suites = ["TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256", "TLS_AES_128_GCM_SHA256"]  # the test keys are EC
    served = serve(write(tmp_path / "web.yml", tls_files(pki, max_version="TLS12", cipher_suites=suites)))
    listed = client_context(pki)
    listed.set_ciphers("ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-ECDSA-AES128-GCM-SHA256")
    with socket.create_connection(("127.0.0.1", served.port), timeout=5) as raw:
        with listed.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            assert tls.cipher()[0] == "ECDHE-ECDSA-AES128-GCM-SHA256"
    other = client_context(pki)
    other.set_ciphers("ECDHE-ECDSA-AES256-GCM-SHA384")
    assert refused(served.port, other)


def test_only_tls13_suites_listed_means_tls13_only(pki: Path, tmp_path: Path) -> None:
    context = load_web_config(
        write(tmp_path / "web.yml", tls_files(pki, cipher_suites=["TLS_AES_256_GCM_SHA384"]))
    ).ssl_context
    assert context is not None and context.minimum_version == ssl.TLSVersion.TLSv1_3


def test_a_burst_of_reload_requests_runs_one_reload(serve: Callable[..., Served]) -> None:
    calls = 0
    release = threading.Event()

    async def slow_reload() -> tuple[bool, str]:
        nonlocal calls
        calls += 1
        await asyncio.get_running_loop().run_in_executor(None, release.wait, 20)
        return True, f"reload #{calls}"

    served = serve(None, reload=slow_reload)
    url = f"http://127.0.0.1:{served.port}/-/reload"
    with ThreadPoolExecutor(max_workers=10) as pool:
        answers = [pool.submit(requests.post, url, timeout=30) for _ in range(10)]
        # Hold the reload until all ten requests are in: each of them joins the one running.
        assert served.call(_until_requests(served, 10)), "the ten requests did not arrive"
        release.set()
        results = [future.result() for future in answers]
    assert calls == 1
    assert [(r.status_code, r.text) for r in results] == [(200, "reload #1\n")] * 10
    assert requests.post(url, timeout=30).text == "reload #2\n"  # a later request runs a new one


async def _until_requests(served: Served, count: int) -> bool:
    """True once ``count`` requests are being handled by the served app (bounded wait)."""
    server = served.runner.server
    assert server is not None
    await wait_until_async(lambda: server.requests_count >= count, timeout=10, what=f"{count} requests")
    for _ in range(3):  # let the last request's task run up to its wait for the reload
        await asyncio.sleep(0)
    return True
