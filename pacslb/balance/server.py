"""The runtime view of one server of one service, as the decision code sees it.

The driver (proxy/) and the health monitor (checks/) update these fields; the decision code only reads
them, except the active-connection count that :mod:`pacslb.balance.decision` users maintain.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Health = Literal["up", "down"]
AdminState = Literal["online", "drain", "halt"]


@dataclass(slots=True, eq=False)
class ServerState:
    """One node as a member of one service.

    Attributes:
        name: the node's name (the same name in several services is the same node).
        host, port: where connections go.
        weight: 0..256; 0 takes nothing from the scheduler but keeps persistent clients.
        health: set by the health monitor. Servers start ``up`` (see docs/configuration.md, "check").
        admin: online (normal), drain (only clients pinned to it), halt (nothing).
        active: connections open to it right now (including ones still connecting).
        total: connections it has been given since start.
        bytes_up, bytes_down: bytes relayed to and from it by connections that have ended (for the
            dashboard's throughput and the metrics; counted once per connection, never per read).
        down_elsewhere: with fate sharing, the service whose check found this node down: it then takes
            nothing here either, whatever this service's own check says (None: not taken out).
    """

    name: str
    host: str
    port: int
    weight: int = 1
    health: Health = "up"
    admin: AdminState = "online"
    active: int = 0
    total: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    down_elsewhere: str | None = None

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def schedulable(self) -> bool:
        """May the scheduler give it a new client?"""
        return self.health == "up" and self.admin == "online" and self.weight > 0 and self.down_elsewhere is None

    @property
    def honours_persistence(self) -> bool:
        """May a client pinned to it by persistence still come back to it? (a drained node: yes)"""
        return self.health == "up" and self.admin != "halt" and self.down_elsewhere is None
