"""The scheduler interface and the table of algorithms by config name."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from pacslb.balance.leastconn import LeastConnections
from pacslb.balance.roundrobin import RoundRobin
from pacslb.balance.server import ServerState


class Scheduler(Protocol):
    """Chooses among servers that are already known to be usable."""

    name: str

    def pick(self, candidates: Sequence[ServerState]) -> ServerState | None: ...


def make_scheduler(name: str) -> Scheduler:
    """A new scheduler for the config's ``balance`` value."""
    if name == "roundrobin":
        return RoundRobin()
    if name == "leastconn":
        return LeastConnections()
    raise ValueError(f"unknown balance algorithm {name!r}")
