"""Worker status from presence and flags, and the order of presence reports (pure rules)."""

from __future__ import annotations

import enum


class WorkerStatus(enum.IntEnum):
    """``maw.registry.v1.WorkerStatus`` values."""

    ONLINE = 1
    OFFLINE = 2
    DRAINING = 3
    DISABLED = 4
    REVOKED = 5


class EventType(enum.IntEnum):
    """``maw.registry.v1.WorkerEventType`` values."""

    ADDED = 1
    UPDATED = 2
    REMOVED = 3


# A worker is online while its presence key lives: about three heartbeat intervals after the last report.
PRESENCE_HEARTBEATS = 3
DEFAULT_HEARTBEAT_S = 10.0


def status(*, revoked: bool, disabled: bool, draining: bool, present: bool) -> WorkerStatus:
    """Revocation beats the operator's flags, which beat presence."""
    if revoked:
        return WorkerStatus.REVOKED
    if disabled:
        return WorkerStatus.DISABLED
    if not present:
        return WorkerStatus.OFFLINE
    if draining:
        return WorkerStatus.DRAINING
    return WorkerStatus.ONLINE


def newer(report: tuple[int, str, int], stored: tuple[int, str, int] | None) -> bool:
    """Whether a report ``(connect_time_us, session_id, report_sequence)`` supersedes the stored one.

    Within a session a higher sequence wins; across sessions the later connection wins, so a late report
    of a stream that already closed cannot overwrite its successor's.
    """
    if stored is None:
        return True
    if report[1] == stored[1]:
        return report[2] > stored[2]
    return report[0] >= stored[0]


def presence_ttl_s(heartbeat_interval_s: float) -> int:
    """How long a presence key lives after a report."""
    interval = heartbeat_interval_s if heartbeat_interval_s > 0 else DEFAULT_HEARTBEAT_S
    return max(3, round(interval * PRESENCE_HEARTBEATS))
