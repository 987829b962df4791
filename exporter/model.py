"""The exporter's shared vocabulary: failure reasons, what an answer comes to, the billing apis.

A new failure reason or billing service is one edit here: the exporter's HELP text, the simulator and
the dashboards read ``BILLING_APIS`` (a new ``level`` service also joins the LEVEL list of
prometheus/rules/wolkvox.rules.yml, whose regexes PromQL cannot read from here; tests/test_rules.py fails
until it does). Nothing in this module does I/O, and every other module takes these names from here
(never from the transport).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from exporter.secret import Secret, one_line

# Why a request failed, in the order docs/fetching.md's table lists them (see exporter/answers.py for when
# each one is raised).
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

# Failures of the token itself, whichever request met them: they pause the whole token (planner) and put
# every operation of the token down (store).
TOKEN_WIDE: frozenset[str] = frozenset({"auth", "token_limit"})

# The API's two documents, under an operation's base_url (the client asks them, the simulator answers them).
BILLING_PATH = "/api/v2/billing.php"
INFORMATION_PATH = "/api/v2/information.php"

# The pseudo-api of a token_info read (information.php): it takes a turn on its token like a report.
TOKEN_INFO = "token_info"  # noqa: S105 (an api name, not a password)

STEREO_REC = "stereo_rec"

Kind = Literal["usage", "level"]


@dataclass(frozen=True)
class BillingApi:
    """One wolkvox billing service. ``usage`` grows through the month and drops at its start;
    ``level`` is a number of active licences or connectors right now (it does not drop).

    ``measures`` is what the number counts (the HELP text of ``wolkvox_billing_usage`` lists it),
    ``unit`` its short unit (the dashboards show it beside the api), ``description`` the row
    description wolkvox sends (the simulator answers it) and ``simulated_rate`` how fast the simulator
    grows a ``usage`` value, as a fraction of its ``--minutes-per-hour``."""

    name: str
    measures: str
    unit: str
    kind: Kind
    description: str
    simulated_rate: float = 0.1


BILLING_APIS: dict[str, BillingApi] = {
    api.name: api
    for api in (
        BillingApi(
            "stereo_rec", "minutes of stereo recording", "minutes", "usage", "Stereo recording minutes", 1.0
        ),
        BillingApi("ivr_minutes", "IVR minutes", "minutes", "usage", "IVR minutes used", 0.4),
        BillingApi("ivr_calls", "IVR calls", "calls", "usage", "IVR calls", 0.25),
        BillingApi(
            "amd_ai",
            "AI answering-machine detections",
            "detections",
            "usage",
            "AI answering machine detections",
            0.125,
        ),
        BillingApi(
            "rec_screen",
            "screen-recording time, as the API reports it",
            "screen-recording time",
            "usage",
            "Screen recording minutes",
            0.15,
        ),
        BillingApi(
            "rsync_s3_mp3",
            "audio files copied to storage",
            "audio files",
            "usage",
            "Audio files copied to external storage",
            0.2,
        ),
        BillingApi(
            "interactions",
            "omnichannel interactions",
            "interactions",
            "usage",
            "Omnichannel interactions (mail, social networks)",
            0.1,
        ),
        BillingApi(
            "agent_script",
            "active Agent Script licences",
            "licences",
            "level",
            "Active Agent Script licenses",
        ),
        BillingApi(
            "intelligent_dial",
            "active smart-dialling licences",
            "licences",
            "level",
            "Active intelligent dialing licenses",
        ),
        BillingApi(
            "amazon_s3",
            "licences enabled for external storage",
            "licences",
            "level",
            "Licenses enabled for external storage",
        ),
        BillingApi("chat_licenses", "chat licences", "licences", "level", "Chat licenses"),
        BillingApi(
            "interaction_licenses", "interaction licences", "licences", "level", "Interaction licenses"
        ),
        BillingApi("wp_connectors", "WhatsApp connectors", "connectors", "level", "WhatsApp connectors"),
        BillingApi(
            "wp_connectors_official",
            "official WhatsApp connectors",
            "connectors",
            "level",
            "Official WhatsApp connectors",
        ),
    )
}

MAX_DETAIL_CHARS = 300


class FetchError(Exception):
    """A failed fetch. ``reason`` is one of REASONS; ``detail`` is one line, safe to log.

    The detail is ``secret.one_line``'s: escaped to one line, the token (``secret``) redacted, shortened
    to ``MAX_DETAIL_CHARS``.
    """

    def __init__(self, reason: str, detail: str, *, secret: Secret | None = None) -> None:
        if reason not in REASONS:
            raise ValueError(f"unknown fetch failure reason {reason!r}")
        clean = one_line(str(detail), secret, MAX_DETAIL_CHARS).strip() or "(no detail)"
        super().__init__(reason, clean)
        self.reason = reason
        self.detail = clean

    def __str__(self) -> str:
        return f"{self.reason}: {self.detail}"


@dataclass(frozen=True, slots=True)
class Reading:
    """One successful billing answer: ``value`` is the sum of ``items`` over ``rows`` rows.
    ``month`` is the vendor's month of the rows (``"YYYY-MM"``) when their ``date`` is readable."""

    value: float
    rows: int
    month: str | None = None


@dataclass(frozen=True, slots=True)
class TokenInfo:
    """``information.php?api=token_info``: the daily request budget of a token (None = not in the answer)."""

    limit: float | None
    used_today: float | None
    all_today: float | None


@dataclass(frozen=True, slots=True)
class FetchResult:
    """The outcome of one request for one (operation, api), passed from the refresher to the store.

    ``value`` is set on success (a ``Reading`` for a billing api, a ``TokenInfo`` for a token_info
    read); ``reason`` (one of ``REASONS``) and ``detail`` on failure. ``finished_at`` is wall-clock
    time (seconds since the epoch), ``duration`` in seconds.
    """

    operation: str
    api: str
    finished_at: float
    duration: float
    value: Any = None
    reason: str | None = None
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.reason is None


@dataclass(frozen=True, slots=True)
class ReportStatus:
    """The pace of one report, from the refresher to the store (for /metrics and the status page): the
    interval in use and when the report is next due (wall clock)."""

    interval: float
    next_due: float
    failures: int
