"""The in-memory state store: the embedded default, for a single balancer. Entries do not survive a
restart and are not shared with a peer (that is the Redis store's job)."""

from __future__ import annotations

from typing import Any

from pacslb.balance.persistence import PersistenceTable
from pacslb.state.store import AdminListener


class MemoryStore:
    """Persistence tables held in this process."""

    def __init__(self) -> None:
        self._tables: dict[str, PersistenceTable] = {}
        self.on_admin: AdminListener | None = None  # (nobody else makes settings)

    def persistence_table(self, service: str, timeout: float, max_entries: int) -> PersistenceTable:
        table = self._tables.get(service)
        if table is None:
            table = self._tables[service] = PersistenceTable(timeout, max_entries)
        else:
            table.timeout = timeout
            table.resize(max_entries)
        return table

    def discard(self, service: str) -> None:
        self._tables.pop(service, None)

    def admin_changed(self, changes: dict[str, dict[str, Any]]) -> None:
        pass  # the admin state file keeps them across restarts; nobody else needs them

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        self._tables.clear()

    def status(self) -> dict[str, Any]:
        return {"kind": "memory", "connected": True, "synced": True}
