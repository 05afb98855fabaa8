"""The state store interface.

Theory of operation. The decision code reads a persistence table on every new connection, so a read
must never wait on a network. Every store therefore hands out *local* :class:`PersistenceTable` objects
that the decision code reads and updates synchronously. The in-memory store (memory.py) is just that.
A store shared by a clustered pair (Redis) keeps the same local tables as a cache: it publishes local
changes in the background and applies its peer's changes to the local tables, so a failover finds the
clients' entries already in place, and the hot path never makes a round trip.
"""

from __future__ import annotations

from typing import Protocol

from pacslb.balance.persistence import PersistenceTable


class StateStore(Protocol):
    """Hands out the persistence table of each service and lives as long as the engine."""

    def persistence_table(self, service: str, timeout: float, max_entries: int) -> PersistenceTable:
        """The table of ``service``; the same object across reloads, with new limits applied."""
        ...

    def discard(self, service: str) -> None:
        """Forget the table of a service that no longer exists."""
        ...

    async def close(self) -> None:
        """Flush and release whatever the store holds."""
        ...
