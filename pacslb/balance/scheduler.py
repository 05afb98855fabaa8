"""The scheduler interface and the table of algorithms by config name."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from pacslb.balance.consistent import Consistent
from pacslb.balance.leastconn import LeastConnections
from pacslb.balance.roundrobin import RoundRobin
from pacslb.balance.server import ServerState


class Scheduler(Protocol):
    """Chooses among servers that are already known to be usable; ``key`` is the client's persistence key
    (None without persistence), which only the consistent scheduler uses."""

    name: str

    def pick(self, candidates: Sequence[ServerState], key: str | None = None) -> ServerState | None: ...


def make_scheduler(name: str) -> Scheduler:
    """A new scheduler for the config's ``balance`` value."""
    if name == "roundrobin":
        return RoundRobin()
    if name == "leastconn":
        return LeastConnections()
    if name == "consistent":
        return Consistent()
    raise ValueError(f"unknown balance algorithm {name!r}")
