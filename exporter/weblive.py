"""The web config in force: the checked file (``webconfig``) with its TLS context (``webtls``), and
``LiveWebConfig``, which keeps it current: each new connection and each request costs one ``stat`` per
file involved, and a changed file is read again; an invalid new version is logged once and ignored."""

from __future__ import annotations

import logging
import os
import ssl
from collections.abc import Iterable
from dataclasses import dataclass, field

from exporter.webconfig import RateLimit, WebConfigError, WebConfigFile, read_web_config
from exporter.webtls import server_context

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WebConfig:
    """A web config ready to enforce. The default instance enforces nothing (plain HTTP, no auth)."""

    file: WebConfigFile = field(default_factory=WebConfigFile)
    ssl_context: ssl.SSLContext | None = None

    @property
    def path(self) -> str | None:
        return self.file.path

    @property
    def users(self) -> dict[str, bytes]:
        return self.file.users

    @property
    def headers(self) -> dict[str, str]:
        return self.file.headers

    @property
    def rate_limit(self) -> RateLimit | None:
        return self.file.rate_limit

    @property
    def allowed_sans(self) -> frozenset[str] | None:
        """None: any client certificate the context accepts; else one of its SANs must be in the set."""
        return self.file.tls.client_allowed_sans if self.file.tls is not None else None

    @property
    def files(self) -> tuple[str, ...]:
        return self.file.files

    @property
    def warnings(self) -> tuple[str, ...]:
        return self.file.warnings


def load_web_config(path: str | os.PathLike[str] | None) -> WebConfig:
    """Read and check the file, and load the files it names; ``None`` or ``""``: no web config."""
    checked = read_web_config(None if path is None else os.fspath(path))
    context = server_context(checked.tls) if checked.tls is not None else None
    return WebConfig(checked, context)


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
