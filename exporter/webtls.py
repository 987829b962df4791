"""TLS as the web config asks: the server's ``ssl.SSLContext`` built from a checked
``tls_server_config`` (its certificate, key and client CA files loaded here), and the client SAN rule
checked on each verified connection. Errors are one line, ``<file>: <key path>: <problem>``.
"""

from __future__ import annotations

import ipaddress
import os
import ssl
import tempfile
from typing import Any

from exporter.webconfig import CIPHERS, CLIENT_AUTH, CURVES, TLSServerConfig, WebConfigError

# How each Go policy maps onto Python's ssl (see webconfig.CLIENT_AUTH).
_VERIFY_MODE = {None: ssl.CERT_NONE, False: ssl.CERT_OPTIONAL, True: ssl.CERT_REQUIRED}


def server_context(tls: TLSServerConfig) -> ssl.SSLContext:
    """The context for every connection under ``tls``; loads the files it names. In the toolkit's order:
    key pair, then client CAs, then whether CAs came without a policy asking for certificates."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = tls.min_version
    context.maximum_version = tls.max_version
    _load_key_pair(context, tls)
    ca_key = "client_ca_file" if tls.client_ca_file else "client_ca"
    if tls.client_ca_file or tls.client_ca:
        _load_client_cas(context, tls, ca_key)
    mode = _VERIFY_MODE[CLIENT_AUTH[tls.client_auth_type]]
    if mode == ssl.CERT_NONE and (tls.client_ca_file or tls.client_ca):
        raise WebConfigError(
            f"{tls.where}: tls_server_config.{ca_key}: client CAs are configured without a client auth "
            "policy: set client_auth_type"
        )
    context.verify_mode = mode
    if mode != ssl.CERT_NONE and not (tls.client_ca_file or tls.client_ca):
        context.load_default_certs(ssl.Purpose.CLIENT_AUTH)  # the toolkit: Go's system pool
    if tls.cipher_suites is not None:
        _ciphers(context, tls)
    if tls.prefer_server_cipher_suites:
        context.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    else:
        context.options &= ~ssl.OP_CIPHER_SERVER_PREFERENCE
    if tls.curve is not None:
        context.set_ecdh_curve(CURVES[tls.curve])
    return context


def _load_key_pair(context: ssl.SSLContext, tls: TLSServerConfig) -> None:
    culprit = (
        "cert_file/key_file" if tls.cert_file and tls.key_file else ("cert_file" if tls.cert_file else "cert")
    )
    # ssl loads keys only from files: inline PEM goes through a private temporary directory.
    with tempfile.TemporaryDirectory(prefix="webcfg-") as private:
        cert_file, key_file = tls.cert_file, tls.key_file
        if cert_file is None:
            cert_file = os.path.join(private, "cert.pem")
            _write_private(cert_file, tls.cert)
        if key_file is None:
            key_file = os.path.join(private, "key.pem")
            _write_private(key_file, tls.key)
        try:
            # An encrypted key gets an empty password (and fails) instead of a prompt on the terminal.
            context.load_cert_chain(cert_file, key_file, password=lambda: b"")
        except (OSError, ssl.SSLError) as error:
            raise WebConfigError(
                f"{tls.where}: tls_server_config.{culprit}: cannot load: {_reason(error)}"
            ) from None


def _write_private(path: str, content: str) -> None:
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
        handle.write(content)


def _load_client_cas(context: ssl.SSLContext, tls: TLSServerConfig, key: str) -> None:
    try:
        if tls.client_ca_file:
            context.load_verify_locations(cafile=tls.client_ca_file)
        else:
            context.load_verify_locations(cadata=tls.client_ca)
    except (OSError, ssl.SSLError, ValueError) as error:
        raise WebConfigError(f"{tls.where}: tls_server_config.{key}: cannot load: {_reason(error)}") from None


def _ciphers(context: ssl.SSLContext, tls: TLSServerConfig) -> None:
    assert tls.cipher_suites is not None
    chosen = [openssl for name in tls.cipher_suites if (openssl := CIPHERS[name]) is not None]
    if not chosen:
        # Only TLS 1.3 suites listed: Go then has no TLS 1.2 suite left, so only TLS 1.3 connects.
        context.minimum_version = ssl.TLSVersion.TLSv1_3
        return
    try:
        context.set_ciphers(":".join(chosen))
    except ssl.SSLError:
        raise WebConfigError(
            f"{tls.where}: tls_server_config.cipher_suites: none of these cipher suites is available in "
            "this OpenSSL"
        ) from None


def _reason(error: Exception) -> str:
    return getattr(error, "strerror", None) or getattr(error, "reason", None) or type(error).__name__


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
