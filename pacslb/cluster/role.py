"""The role keepalived last reported for this balancer: does it hold the virtual IP?

What this module owns: the role (``unknown`` until keepalived says, then ``master``, ``backup``, ``fault``
or ``stopped``), since when, and telling a change to the log (a ``role`` line) and to the event log (the
dashboard). keepalived reports it through its notify hooks (``pacslb role CONFIG ROLE``, the admin API's
POST /api/v1/cluster/role). pacslb only shows it; nothing here changes how traffic is handled, and a
balancer that is told nothing serves exactly as one that is.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Literal, get_args

from pacslb.logs import log_event

if TYPE_CHECKING:
    from pacslb.admin.events import EventLog

#: The roles keepalived reports: holds the address, stands by, cannot serve, keepalived stopped.
ReportedRole = Literal["master", "backup", "fault", "stopped"]
#: ``unknown``: nothing reported yet (a balancer without keepalived stays so).
Role = Literal["unknown", ReportedRole]
REPORTED_ROLES: tuple[ReportedRole, ...] = get_args(ReportedRole)
#: Every role, in the order the metrics list them.
ROLES: tuple[Role, ...] = ("unknown", *REPORTED_ROLES)

#: What each role means, for the event line a person reads.
MEANING: dict[str, str] = {
    "master": "holds the virtual IP",
    "backup": "stands by (the peer holds the virtual IP)",
    "fault": "cannot hold the virtual IP (a check failed)",
    "stopped": "keepalived stopped on this balancer",
    "unknown": "keepalived has not reported",
}

log = logging.getLogger("pacslb.cluster")


class ClusterRole:
    """This balancer's role, kept for the life of the process (a reload does not forget it)."""

    def __init__(self, events: EventLog | None = None) -> None:
        self.role: Role = "unknown"
        self.since: float | None = None  # when the role last changed (seconds since the epoch)
        self.events = events

    def set(self, role: ReportedRole, node: str, by: str = "keepalived") -> bool:
        """Take a reported role; a change is logged (``role``) and told to the event log.

        Returns:
            Whether the role changed (keepalived may report the same role again).
        """
        if role not in REPORTED_ROLES:
            raise ValueError(f"unknown role {role!r} (roles: {', '.join(REPORTED_ROLES)})")
        old = self.role
        if role == old:
            return False
        self.role = role
        self.since = time.time()
        level = logging.WARNING if role in ("fault", "stopped") else logging.INFO
        log_event(log, "role", level, node=node, old=old, new=role, by=by)
        if self.events is not None:
            self.events.add(
                "cluster", "warning" if level == logging.WARNING else "info",
                f"{node} is {role}: {MEANING[role]} (was {old})", node=node, old=old, new=role,
            )  # fmt: skip
        return True

    def to_json(self, node: str) -> dict[str, object]:
        return {"node": node, "role": self.role, "since": self.since}
