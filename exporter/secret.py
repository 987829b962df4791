"""Tokens, and what may be shown of them: the ``Secret`` wrapper, the one rule for a token that can be
sent, its stable key, redaction, and the one-line form of any message that may reach a log.

Every place that shows text from outside (an upstream answer, a config file, a log record) goes
through ``one_line`` and ``redact`` here, so there is one rule for each.
"""

from __future__ import annotations

import hashlib
import re
import threading
from collections.abc import Iterable

REDACTED = "<redacted>"


class Secret:
    """Holds a secret string; ``str()`` and ``repr()`` never show it. Use ``reveal()`` to send it."""

    __slots__ = ("_key", "_value")

    def __init__(self, value: str) -> None:
        self._value = value
        self._key: str | None = None  # token_key's, once asked

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return f"Secret('{REDACTED}')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    def __bool__(self) -> bool:
        return bool(self._value)


def sendable(token: str) -> bool:
    """Whether ``token`` can travel in an HTTP header as it is: visible ASCII, no whitespace at all."""
    return bool(token) and all("!" <= ch <= "~" for ch in token)


def token_key(token: Secret | str) -> str:
    """A stable, non-reversible name for a token: in logs, the planner, the state file and the simulator.
    Kept on the Secret: the planner and the store hold one string per token, not one each (interning
    them instead grew the interpreter's table of interned strings by 1 MB at 10,000 tokens)."""
    if isinstance(token, Secret):
        if token._key is None:
            token._key = _key_of(token.reveal())
        return token._key
    return _key_of(token)


def _key_of(value: str) -> str:
    return hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()[:16]


# ----- redaction -----------------------------------------------------------------------------------------

# re.IGNORECASE matches an ASCII letter with these four non-ASCII ones too: the quick test below folds
# them the same way, so it finds every place the regular expression would.
_FOLD: dict[int, str] = {
    **{ord(upper): upper.lower() for upper in "ABCDEFGHIJKLMNOPQRSTUVWXYZ"},
    0x130: "i",
    0x131: "i",
    0x212A: "k",
    0x17F: "s",
}


def _folded(value: str) -> str:
    """What the quick test looks for: ``value`` folded (``value`` itself when folding changes nothing: at
    10,000 tokens a copy of each is 0.7 MB); "" (found in any text) for a non-ASCII one."""
    if not value.isascii():
        return ""
    folded = value.translate(_FOLD)
    return value if folded == value else folded


def _masked(text: str, secrets: Iterable[tuple[str, str]]) -> str:
    """``text`` with each secret (pairs of the secret and its ``_folded`` form, longest first) replaced
    in any letter case."""
    folded = text.translate(_FOLD)
    for value, value_folded in secrets:
        if value_folded in folded:
            text = re.sub(re.escape(value), REDACTED, text, flags=re.IGNORECASE)
            folded = text.translate(_FOLD)
    return text


def redact(text: str, secret: Secret | None) -> str:
    """``text`` with every occurrence of the secret, in any letter case, replaced by ``<redacted>``."""
    if not secret:
        return text
    value = secret.reveal()
    return _masked(text, ((value, _folded(value)),))


class Redactor:
    """``redact`` over a set of secrets that can be replaced at any time (from any thread): the logs' last
    defence. Longest first, so a token that contains another is masked whole."""

    def __init__(self) -> None:
        # The secrets and their folded forms, side by side (not 10,000 pairs: 0.6 MB), replaced as one.
        self._secrets: tuple[tuple[str, ...], tuple[str, ...]] = ((), ())
        self._lock = threading.Lock()

    def set(self, secrets: Iterable[str]) -> None:
        ordered = tuple(sorted({s for s in secrets if s}, key=len, reverse=True))
        with self._lock:
            self._secrets = (ordered, tuple(_folded(value) for value in ordered))

    def __call__(self, text: str) -> str:
        values, folded = self._secrets
        return _masked(text, zip(values, folded, strict=True))


# ----- one line ------------------------------------------------------------------------------------------


def one_line(text: str, secret: Secret | None = None, limit: int | None = None) -> str:
    """``text`` as one line that cannot mislead a terminal: every character that is not printable (line
    breaks, tabs, controls, bidi overrides) written as its escape (``\\n``, ``\\x1b``, ``\\u202e``), the
    secret redacted in what is shown, then cut to ``limit`` characters (``...`` at the end). Redacting
    after escaping and before cutting: neither the token, nor a cut-off head of it, nor one spelled by
    escapes can remain."""
    shown = "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in text)
    shown = redact(shown, secret)
    if limit is not None and len(shown) > limit:
        shown = shown[: limit - 3] + "..."
    return shown
