"""Choosing the node for a new connection: persistence first, then the scheduler.

The order of decision, for a client with persistence key ``key``:
1. an entry in the persistence table whose node honours persistence (up, and online or drained);
   an entry naming a node that is down or halted is dropped and the client re-balanced;
2. otherwise the scheduler, among servers that are up, online and of non-zero weight.
Servers in ``exclude`` (already tried for this connection) are never chosen again.

:class:`Attempts` is the retry on another node, the same in every mode: a connection tries the node
decided for it; when that one cannot be reached (or, in dicom mode, refuses for now), a new decision is
made without it, at most ``retries`` times more, then the service's fallback node when it has one.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Literal

from pacslb.balance.persistence import PersistenceTable
from pacslb.balance.scheduler import Scheduler
from pacslb.balance.server import ServerState

Rule = Literal["persistence", "balance"]


@dataclass(slots=True, init=False)
class Decision:
    """A choice. Made for every new connection and every HTTP request, so its ``__init__`` is written out:
    compiled (pacslb/compiled.py), it costs a fraction of a named tuple's or a generated one's."""

    server: ServerState
    #: What decided, as the log line says: ``persistence`` or ``balance`` (choose's own :data:`Rule`);
    #: in http mode ``cookie``, ``source_ip`` or ``balance``; ``fallback`` (the node taken when no other can).
    rule: str

    def __init__(self, server: ServerState, rule: str) -> None:
        self.server = server
        self.rule = rule


def choose(
    servers: Sequence[ServerState],
    scheduler: Scheduler,
    table: PersistenceTable | None,
    key: str | None,
    now: float,
    exclude: Collection[ServerState] = (),
) -> Decision | None:
    """The server for a new connection, or None when no server can take it.

    Args:
        servers: the service's servers.
        scheduler: the service's balancing algorithm.
        table: the service's persistence table, or None without persistence.
        key: the client's persistence key (None without persistence).
        now: the caller's monotonic time.
        exclude: servers that already failed for this connection.
    """
    if table is not None and key is not None:
        pinned = table.lookup(key, now)
        if pinned is not None:
            for server in servers:
                if server.name == pinned:
                    if server.honours_persistence and server not in exclude:
                        return Decision(server, "balance" if table.fresh else "persistence")
                    break
            if not any(s.name == pinned and s in exclude for s in servers):
                table.forget(key)  # its node is gone, down or halted: re-balance this client
    if exclude:
        candidates = [s for s in servers if s.schedulable and s not in exclude]
    else:
        candidates = [s for s in servers if s.schedulable]
    picked = scheduler.pick(candidates, key)
    return Decision(picked, "balance") if picked is not None else None


class Attempts:
    """The nodes one connection tries in turn (see the module's docstring). Pure: the driver connects, and
    says when the node it was given failed.

    Args:
        decide: the decision for this connection, excluding the nodes given (those that failed).
        retries: how many more nodes after the first, at most.
        fallback: the node taken when no other can (tried once; never a persistence target).
        first: a decision made already (the first node to try).
    """

    def __init__(
        self,
        decide: Callable[[list[ServerState]], Decision | None],
        retries: int,
        fallback: ServerState | None = None,
        first: Decision | None = None,
    ) -> None:
        self.decide = decide
        self.retries = retries
        self.fallback = fallback
        self.first = first
        self.tried: list[ServerState] = []  # the nodes that failed, in order
        self.current: Decision | None = None

    def next(self) -> Decision | None:
        """The node to try now, or None: none is left to try."""
        decision = self.first
        if decision is not None:
            self.first = None
        elif len(self.tried) <= self.retries:
            decision = self.decide(self.tried)
        if decision is None:
            fallback = self.fallback
            if fallback is not None and fallback not in self.tried:
                decision = Decision(fallback, "fallback")
        self.current = decision
        return decision

    def failed(self) -> int:
        """The node :meth:`next` gave could not take the connection. Returns how many have failed."""
        if self.current is not None:
            self.tried.append(self.current.server)
            self.current = None
        return len(self.tried)

    def again(self) -> None:
        """Start over: every node may be tried again (dicom towards a modality that may be restarting)."""
        self.tried.clear()
        self.current = None
