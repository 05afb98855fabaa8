"""Consistent choice by weighted rendezvous hashing (highest random weight): every balancer that sees the
same client key and the same usable nodes picks the same node, with no state shared at all.

For a client key k and each usable node n, a score is drawn from a hash of (k, n) that is the same in
every process and on every machine (BLAKE2b, not Python's salted ``hash``): h in (0, 1), score
-weight / ln(h), and the highest score wins (Schindelhauer and Schomaker's weighted form, so that a node
of weight 2 gets twice the clients of one of weight 1). When a node leaves, only its own clients move
(each to the node that came second for it); when it returns, only those come back.

This is what decides a client with no persistence entry anywhere (its first contact, or a store and a
peer both lost): several balancers behind DNS or ECMP agree on its node without talking. Without a key
(``persistence: none``), it falls back to round robin.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

from pacslb.balance.roundrobin import RoundRobin
from pacslb.balance.server import ServerState

#: Scores of recent (key, node) pairs: a returning client costs no hashing. Bounded; cleared when full.
MAX_CACHED_SCORES = 65536
_SCALE = float(1 << 64)


def _unit(key: str, node: str) -> float:
    """A number in (0, 1) drawn from (key, node), the same everywhere."""
    digest = hashlib.blake2b(f"{key}\x00{node}".encode(), digest_size=8).digest()
    return (int.from_bytes(digest, "big") + 0.5) / _SCALE


class Consistent:
    """Weighted rendezvous hashing of the client's persistence key over the usable nodes."""

    name = "consistent"

    def __init__(self) -> None:
        self._fallback = RoundRobin()
        self._units: dict[tuple[str, str], float] = {}

    def pick(self, candidates: Sequence[ServerState], key: str | None = None) -> ServerState | None:
        """The node of highest score for ``key`` among ``candidates`` (weight 0 never), or None."""
        if key is None:
            return self._fallback.pick(candidates)
        units = self._units
        best: ServerState | None = None
        best_score = 0.0
        for server in candidates:
            if server.weight <= 0:
                continue
            unit = units.get((key, server.name))
            if unit is None:
                if len(units) >= MAX_CACHED_SCORES:
                    units.clear()
                unit = units[(key, server.name)] = _unit(key, server.name)
            score = -server.weight / math.log(unit)
            # Ties (practically never) go to the greater name, so that every balancer breaks them alike.
            if best is None or score > best_score or (score == best_score and server.name > best.name):
                best, best_score = server, score
        return best
