"""What the web config enforces on each request: the rate limit (the toolkit's token bucket, one for the
whole server) and basic auth against bcrypt hashes."""

from __future__ import annotations

import hashlib
import os
import secrets
import threading
import time
from collections import Counter
from collections.abc import Iterable
from typing import Any

import bcrypt
from cachetools import TTLCache

from exporter.webconfig import RateLimit

_BCRYPT_ALPHABET = "./ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
# bcrypt uses at most this many bytes of a password (bcrypt >= 5 raises ValueError beyond it).
_BCRYPT_MAX_PASSWORD_BYTES = 72


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
