"""Unit tests of exporter/webconfig.py: the ``--web.config.file`` parser and the basic-auth checker.

Certificates are made fresh per session by tests/fixtures/web/make_certs.sh (openssl CLI) in a tmp dir.
"""

from __future__ import annotations

import logging
import ssl
from pathlib import Path

import bcrypt
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from exporter.webconfig import BasicAuth, WebConfig, WebConfigError, load_web_config

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
        ("NoClientCert", ssl.CERT_NONE),
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


def test_unsupported_toolkit_keys_are_accepted_with_a_warning(
    pki: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = write(
        tmp_path / "web.yml",
        {
            "tls_server_config": {
                "cert_file": str(pki / "server.crt"),
                "key_file": str(pki / "server.key"),
                "cipher_suites": ["TLS_AES_128_GCM_SHA256"],
            }
        },
    )
    with caplog.at_level(logging.WARNING, logger="exporter.webconfig"):
        assert load_web_config(path).ssl_context is not None
    assert any("cipher_suites" in record.getMessage() for record in caplog.records)


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


def test_client_cert_verification_needs_a_ca(pki: Path, tmp_path: Path) -> None:
    path = write(
        tmp_path / "web.yml",
        {
            "tls_server_config": {
                "cert_file": str(pki / "server.crt"),
                "key_file": str(pki / "server.key"),
                "client_auth_type": "RequireAndVerifyClientCert",
            }
        },
    )
    message = load_error(path)
    assert "tls_server_config.client_ca_file" in message and "RequireAndVerifyClientCert" in message


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
