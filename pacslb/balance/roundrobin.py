"""Weighted round robin, smooth (each server's turns spread evenly over a cycle, not in bursts).

For weights 5, 1, 1 the order is a a b a c a a rather than a a a a a b c: a burst of connections
to one node is what least connections and persistence already risk, so the scheduler avoids adding one.
"""

from __future__ import annotations

from collections.abc import Sequence

from pacslb.balance.server import ServerState


class RoundRobin:
    """Smooth weighted round robin over whichever candidates are usable at each pick."""

    name = "roundrobin"

    def __init__(self) -> None:
        self._current: dict[str, int] = {}

    def pick(self, candidates: Sequence[ServerState], key: str | None = None) -> ServerState | None:
        """Return the next server among ``candidates`` (weight 0 never), or None when there is none."""
        best: ServerState | None = None
        best_current = 0
        total = 0
        current = self._current
        for server in candidates:
            if server.weight <= 0:
                continue
            value = current.get(server.name, 0) + server.weight
            current[server.name] = value
            total += server.weight
            if best is None or value > best_current:
                best, best_current = server, value
        if best is not None:
            current[best.name] = best_current - total
        return best
