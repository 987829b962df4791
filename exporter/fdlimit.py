"""The process's open-files limit: read it, and raise the soft limit to the hard one at start.

Each upstream connection and each scrape holds a descriptor; a soft limit of 1,024 (a common default)
would cap them long before memory does. Go exporters raise it at start; so do the exporter and the
simulator. Unlimited is reported as -1.
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)

UNLIMITED = -1


def soft_fd_limit() -> int:
    """The soft open-files limit; -1 when unlimited or unknown (no ``resource`` module)."""
    try:
        import resource  # POSIX only
    except ImportError:  # pragma: no cover
        return UNLIMITED
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return UNLIMITED if soft == resource.RLIM_INFINITY else soft


def raise_fd_limit() -> tuple[int, int]:
    """Raise the soft open-files limit to the hard one; returns (old soft limit, new soft limit).

    When the hard limit is unlimited, or the kernel refuses, the soft limit stays as it was (and both
    numbers are equal).
    """
    try:
        import resource
    except ImportError:  # pragma: no cover
        return UNLIMITED, UNLIMITED
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    old = UNLIMITED if soft == resource.RLIM_INFINITY else soft
    if soft == hard or hard == resource.RLIM_INFINITY:
        return old, old
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError) as exc:
        logger.debug("cannot raise the open-files limit from %d to %d: %s", soft, hard, exc)
        return old, old
    return old, hard
