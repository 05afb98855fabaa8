"""The in-memory state store: the embedded default, for a single balancer.

The tables live in this process and are not shared with a peer (that is the Redis store's job). With a
snapshot file (beside the admin state file), they survive a restart: the store writes them every
:data:`SNAPSHOT_INTERVAL` while they change, and when pacslb stops, and reads them at start. Each entry
keeps its expiry: what remained of its timeout when it was written, less the time pacslb was away; an
entry whose client had a connection open starts idle at start (that connection is gone). A ``kill -9``
loses at most the last interval's changes. A snapshot that cannot be read is logged and ignored: pacslb
starts with empty tables rather than not at all.

What it must not do: block the event loop on the file (it is written from a thread, from a copy taken
on the loop), or slow the hot path (a change only sets a flag).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import tempfile
import time
from typing import Any

from pacslb.balance.persistence import PersistenceTable
from pacslb.logs import log_event
from pacslb.state.store import AdminListener

log = logging.getLogger("pacslb.store")

#: How often the snapshot is written while the tables change: what a kill -9 can lose at most.
SNAPSHOT_INTERVAL = 5.0
#: Format version of the snapshot file.
SNAPSHOT_VERSION = 1
#: A snapshot larger than this is not ours (a million entries take about 80 MB).
MAX_SNAPSHOT_BYTES = 256 * 1024 * 1024


class _Dirty:
    """The tables' listener: remembers that something changed."""

    __slots__ = ("changed_since",)

    def __init__(self) -> None:
        self.changed_since = False

    def changed(self, key: str, server: str | None, active: bool) -> None:
        self.changed_since = True


class MemoryStore:
    """Persistence tables held in this process, optionally snapshotted to ``snapshot`` (a file path)."""

    def __init__(self, snapshot: str | None = None) -> None:
        self._tables: dict[str, PersistenceTable] = {}
        self.on_admin: AdminListener | None = None  # (nobody else makes settings)
        self.snapshot = snapshot
        self._dirty = _Dirty()
        self._task: asyncio.Task[None] | None = None
        self._clock = time.monotonic
        self.loaded = 0
        self.saved_at: float | None = None

    def persistence_table(self, service: str, timeout: float, max_entries: int) -> PersistenceTable:
        table = self._tables.get(service)
        if table is None:
            table = self._tables[service] = PersistenceTable(timeout, max_entries)
            if self.snapshot is not None:
                table.listener = self._dirty
        else:
            table.timeout = timeout
            table.resize(max_entries)
        return table

    def discard(self, service: str) -> None:
        self._tables.pop(service, None)

    def admin_changed(self, changes: dict[str, dict[str, Any]]) -> None:
        pass  # the admin state file keeps them across restarts; nobody else needs them

    async def start(self) -> None:
        """Read the snapshot into the tables (the services' tables exist by now), then keep writing it."""
        if self.snapshot is None:
            return
        loop = asyncio.get_running_loop()
        self._clock = loop.time
        self.loaded = self._load(self.snapshot)
        if self.loaded:
            log_event(log, "persistence_loaded", file=self.snapshot, entries=self.loaded)
        self._task = loop.create_task(self._keep_writing(), name="pacslb-snapshot")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
            self._task = None
            await self._save()
        self._tables.clear()

    def status(self) -> dict[str, Any]:
        return {
            "kind": "memory",
            "connected": True,
            "synced": True,
            "snapshot": self.snapshot,
            "saved_at": self.saved_at,
            "loaded": self.loaded,
        }

    # -- the snapshot -------------------------------------------------------------------------------------------

    async def _keep_writing(self) -> None:
        while True:
            await asyncio.sleep(SNAPSHOT_INTERVAL)
            if self._dirty.changed_since:
                await self._save()

    def _document(self) -> dict[str, Any]:
        """The tables as written: per entry, key, node, and when its last connection ended (wall clock; null
        while one is open)."""
        now, wall = self._clock(), time.time()
        services: dict[str, list[list[Any]]] = {}
        for name, table in self._tables.items():
            rows: list[list[Any]] = []
            for key, entry in table.items():
                released = None if entry.released_at is None or entry.active else wall - (now - entry.released_at)
                rows.append([key, entry.server, released])
            services[name] = rows
        return {"version": SNAPSHOT_VERSION, "saved_at": wall, "services": services}

    async def _save(self) -> None:
        assert self.snapshot is not None
        self._dirty.changed_since = False
        document = self._document()
        try:
            await asyncio.to_thread(_write_atomically, self.snapshot, document)
            self.saved_at = document["saved_at"]
        except OSError as exc:
            self._dirty.changed_since = True  # tried again at the next interval
            log_event(log, "persistence_save_failed", logging.ERROR, file=self.snapshot, reason=str(exc))

    def _load(self, path: str) -> int:
        try:
            with open(path, "rb") as handle:
                raw = handle.read(MAX_SNAPSHOT_BYTES + 1)
        except FileNotFoundError:
            return 0
        except OSError as exc:
            log_event(log, "persistence_ignored", logging.ERROR, file=path, reason=str(exc))
            return 0
        try:
            if len(raw) > MAX_SNAPSHOT_BYTES:
                raise ValueError(f"larger than {MAX_SNAPSHOT_BYTES} bytes")
            document = json.loads(raw)
            if not isinstance(document, dict) or document.get("version") != SNAPSHOT_VERSION:
                raise ValueError(f"not a version {SNAPSHOT_VERSION} pacslb persistence snapshot")
            services = document["services"]
            if not isinstance(services, dict):
                raise ValueError("services is not a mapping")
        except (ValueError, KeyError, TypeError) as exc:
            log_event(log, "persistence_ignored", logging.ERROR, file=path, reason=str(exc))
            return 0
        now, wall = self._clock(), time.time()
        loaded = 0
        for name, rows in services.items():
            table = self._tables.get(name)
            if table is None or not isinstance(rows, list):
                continue  # a service no longer configured, or without persistence
            for row in rows:
                if not isinstance(row, list) or len(row) != 3:
                    continue
                key, node, released = row
                if not isinstance(key, str) or not isinstance(node, str):
                    continue
                idle = max(0.0, wall - released) if isinstance(released, int | float) else 0.0
                if idle >= table.timeout:
                    continue  # expired while pacslb was away
                table.adopt(key, node, now - idle)
                loaded += 1
        return loaded


def _write_atomically(path: str, document: dict[str, Any]) -> None:
    """Write ``document`` as JSON to ``path`` through a temporary file renamed over it (never half a file)."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, temporary = tempfile.mkstemp(prefix=".pacslb-persistence-", dir=folder)
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(document, handle, separators=(",", ":"))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
