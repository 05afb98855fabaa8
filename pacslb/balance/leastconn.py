"""Weighted least connections: the server with the fewest active connections per unit of weight.

Ties (common when all nodes are idle) are broken by rotating through the tied servers, so a quiet
cluster still spreads its first connections instead of sending them all to the first node listed.
"""

from __future__ import annotations

from collections.abc import Sequence

from pacslb.balance.server import ServerState


class LeastConnections:
    """Pick the server minimising (active + 1) / weight; rotate among ties."""

    name = "leastconn"

    def __init__(self) -> None:
        self._turn = 0

    def pick(self, candidates: Sequence[ServerState], key: str | None = None) -> ServerState | None:
        """Return the least loaded server among ``candidates`` (weight 0 never), or None."""
        best: list[ServerState] = []
        best_load = 0.0
        for server in candidates:
            if server.weight <= 0:
                continue
            load = (server.active + 1) / server.weight
            if not best or load < best_load:
                best, best_load = [server], load
            elif load == best_load:
                best.append(server)
        if not best:
            return None
        self._turn += 1
        return best[self._turn % len(best)]
