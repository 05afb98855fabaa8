"""The state store interface.

Theory of operation. The decision code reads a persistence table on every new connection, so a read
must never wait on a network. Every store therefore hands out *local* :class:`PersistenceTable` objects
that the decision code reads and updates synchronously. The in-memory store (memory.py) is just that.
A store shared by a clustered pair (Redis) keeps the same local tables as a cache: it publishes local
changes in the background and applies its peer's changes to the local tables, so a failover finds the
clients' entries already in place, and the hot path never makes a round trip.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, Protocol

from pacslb.balance.persistence import PersistenceTable
from pacslb.config.model import ClusterSpec

#: Told of admin settings made by another balancer: (changes as AdminStates.fields() gives them, origin).
AdminListener = Callable[[dict[str, dict[str, Any]], str], None]


class StateStore(Protocol):
    """Hands out the persistence table of each service, shares admin settings, lives as long as the engine."""

    #: Set by the engine before start(): applies admin settings another balancer made.
    on_admin: AdminListener | None

    def persistence_table(self, service: str, timeout: float, max_entries: int) -> PersistenceTable:
        """The table of ``service``; the same object across reloads, with new limits applied."""
        ...

    def discard(self, service: str) -> None:
        """Forget the table of a service that no longer exists."""
        ...

    def admin_changed(self, changes: dict[str, dict[str, Any]]) -> None:
        """Admin settings changed here (``{}``: cleared): shared with the other balancers, in the background."""
        ...

    async def start(self) -> None:
        """Begin sharing (a shared store connects and synchronises in the background; never waited on)."""
        ...

    async def close(self) -> None:
        """Flush and release whatever the store holds."""
        ...

    def status(self) -> dict[str, Any]:
        """What the status, dashboard and metrics show of the store: at least ``kind``, ``connected`` and
        ``synced``."""
        ...


def snapshot_path(state_file: str | None) -> str | None:
    """Where the memory store keeps its snapshot: beside the admin state file (``state.json`` ->
    ``state.persistence.json``); None without a state file."""
    if state_file is None:
        return None
    return os.path.splitext(state_file)[0] + ".persistence.json"


def open_store(cluster: ClusterSpec, snapshot: str | None = None) -> StateStore:
    """The store ``cluster.store`` names (``snapshot``: the memory store's file, see :func:`snapshot_path`).

    Raises:
        OSError: the password file cannot be read.
    """
    location = cluster.store
    if location.kind == "memory":
        from pacslb.state.memory import MemoryStore

        return MemoryStore(snapshot)
    from pacslb.state.redis import RedisStore  # (redis is imported only by a balancer that uses it)

    return RedisStore(
        location,
        cluster.node,
        _first_line(cluster.password_file),
        sentinel_password=_first_line(cluster.sentinel_password_file),
        ca_file=cluster.ca_file,
    )


def _first_line(path: str | None) -> str | None:
    """A password file's first line (None: no file, or an empty line)."""
    if path is None:
        return None
    with open(path, encoding="utf-8") as handle:
        return handle.readline().strip() or None
