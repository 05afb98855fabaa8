"""A connection's hold on one node, and the registry a halt cuts connections from.

A :class:`Claim` is the only thing that counts a node's open connections (``ServerState.active`` and
``total``), adds what a connection moved to the node's byte counters, and holds and gives back the client's
persistence entry. Every mode follows the same life:

    claim = claims.take(server)          # chosen: counted while connecting too
    claim.bind(table, key, now, cut)     # connected: one more for the node, the entry held, cuttable
    claim.release(now, up, down)         # over, or the connection failed: everything given back

:meth:`Claim.release` may be called twice (a connection ended by a halt and by its own end in the same
turn): only the first counts. :class:`Claims` is a service's registry of bound claims by node: a halt
whose grace is over cuts them (:meth:`Claims.cut`), whatever the mode.

Compiled with the per-request path (pacslb/compiled.py): an HTTP request takes a claim.
"""

from __future__ import annotations

from typing import Protocol

from pacslb.balance.persistence import PersistenceTable
from pacslb.balance.server import ServerState


class Cuttable(Protocol):
    def cut_short(self) -> None:
        """A halt's grace is over: end the connection now (it then releases its claim as it ends)."""


class Claim:
    """One connection's hold on ``server`` (see the module's docstring)."""

    def __init__(self, claims: Claims, server: ServerState) -> None:
        self.claims = claims
        self.server = server
        self.table: PersistenceTable | None = None  # the entry held, once bound with persistence
        self.key = ""
        self.cut: Cuttable | None = None  # registered for halts, once bound
        self.held = True
        server.active += 1

    def bind(self, table: PersistenceTable | None, key: str | None, now: float, cut: Cuttable | None) -> None:
        """The connection to the node is there: it counts as given to the node, holds the client's entry
        (with a table and a key) and, with ``cut``, is cut by a halt of the node."""
        server = self.server
        server.total += 1
        if table is not None and key is not None:
            table.acquire(key, server.name, now)
            self.table = table
            self.key = key
        if cut is not None:
            self.cut = cut
            self.claims.add(self)

    def release(self, now: float, bytes_up: int = 0, bytes_down: int = 0) -> bool:
        """The connection is over (or never reached the node): give everything back. Only the first call
        counts; returns whether this one did."""
        if not self.held:
            return False
        self.held = False
        server = self.server
        server.active -= 1
        server.bytes_up += bytes_up
        server.bytes_down += bytes_down
        if self.cut is not None:
            self.claims.discard(self)
        table = self.table
        if table is not None:
            table.release(self.key, server.name, now)
        return True


class Claims:
    """A service's bound claims, by node."""

    def __init__(self) -> None:
        self.by_server: dict[ServerState, set[Claim]] = {}

    def take(self, server: ServerState) -> Claim:
        return Claim(self, server)

    def add(self, claim: Claim) -> None:
        claims = self.by_server.get(claim.server)
        if claims is None:
            claims = self.by_server[claim.server] = set()
        claims.add(claim)

    def discard(self, claim: Claim) -> None:
        claims = self.by_server.get(claim.server)
        if claims is not None:
            claims.discard(claim)  # an empty set stays for the node's next claim (see prune)

    def prune(self) -> None:
        """Forget the nodes without a bound claim (on reload: a node taken out is not kept alive here)."""
        for server in [server for server, claims in self.by_server.items() if not claims]:
            del self.by_server[server]

    def cut(self, server: ServerState) -> int:
        """A halt's grace is over: cut every connection bound to ``server``. Returns how many."""
        claims = self.by_server.pop(server, None)
        if not claims:
            return 0
        for claim in list(claims):
            if claim.cut is not None:
                claim.cut.cut_short()
        return len(claims)
