"""Choosing the node for a new connection: persistence first, then the scheduler.

The order of decision, for a client with persistence key ``key``:
1. an entry in the persistence table whose node honours persistence (up, and online or drained);
   an entry naming a node that is down or halted is dropped and the client re-balanced;
2. otherwise the scheduler, among servers that are up, online and of non-zero weight.
Servers in ``exclude`` (already tried for this connection) are never chosen again.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
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
    rule: Rule  # what decided: a persistence entry, or the scheduler

    def __init__(self, server: ServerState, rule: Rule) -> None:
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
