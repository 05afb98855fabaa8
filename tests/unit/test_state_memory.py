"""Unit tests for the in-memory state store (pacslb/state/memory.py)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from pacslb.balance.persistence import PersistenceTable
from pacslb.state.memory import MemoryStore


def test_a_service_gets_a_table_with_its_limits() -> None:
    table = MemoryStore().persistence_table("dicom", 1800.0, 100)
    assert isinstance(table, PersistenceTable)
    assert (table.timeout, table.max_entries, len(table)) == (1800.0, 100, 0)


def test_the_same_table_across_calls_keeps_its_entries() -> None:
    store = MemoryStore()
    first = store.persistence_table("dicom", 1800.0, 100)
    first.acquire("10.0.0.5", "pacs1", 0.0)
    again = store.persistence_table("dicom", 1800.0, 100)
    assert again is first
    assert again.lookup("10.0.0.5", 1.0) == "pacs1"


def test_new_limits_are_applied_to_the_existing_table() -> None:
    """A reload changes the limits, not the clients' bindings."""
    store = MemoryStore()
    table = store.persistence_table("dicom", 1800.0, 100)
    table.acquire("10.0.0.5", "pacs1", 0.0)
    table.release("10.0.0.5", "pacs1", 0.0)
    reloaded = store.persistence_table("dicom", 60.0, 50)
    assert reloaded is table
    assert (table.timeout, table.max_entries) == (60.0, 50)
    assert table.lookup("10.0.0.5", 59.0) == "pacs1"
    assert table.lookup("10.0.0.5", 60.0) is None  # the new timeout counts


def test_a_smaller_max_entries_bounds_the_table_at_once() -> None:
    """Lowering max_entries on reload must bound the table: it is the memory limit of the service."""
    store = MemoryStore()
    table = store.persistence_table("dicom", 1800.0, 10)
    for i in range(5):
        table.acquire(f"10.0.0.{i}", "pacs1", float(i))
    store.persistence_table("dicom", 1800.0, 2)
    assert len(table) <= 2
    assert {k for k, _ in table.items()} == {"10.0.0.3", "10.0.0.4"}  # the most recently used stay


def test_services_have_separate_tables() -> None:
    store = MemoryStore()
    dicom = store.persistence_table("dicom", 1800.0, 100)
    web = store.persistence_table("web", 600.0, 10)
    assert dicom is not web
    dicom.acquire("10.0.0.5", "pacs1", 0.0)
    assert web.lookup("10.0.0.5", 0.0) is None
    assert (web.timeout, web.max_entries) == (600.0, 10)
    assert (dicom.timeout, dicom.max_entries) == (1800.0, 100)


def test_discard_forgets_a_service() -> None:
    store = MemoryStore()
    old = store.persistence_table("dicom", 1800.0, 100)
    old.acquire("10.0.0.5", "pacs1", 0.0)
    keep = store.persistence_table("web", 1800.0, 100)
    store.discard("dicom")
    store.discard("never-existed")
    new = store.persistence_table("dicom", 1800.0, 100)
    assert new is not old
    assert len(new) == 0
    assert store.persistence_table("web", 1800.0, 100) is keep


def test_close_releases_every_table() -> None:
    store = MemoryStore()
    old = store.persistence_table("dicom", 1800.0, 100)
    old.acquire("10.0.0.5", "pacs1", 0.0)
    asyncio.run(store.close())
    assert store.persistence_table("dicom", 1800.0, 100) is not old


def test_the_snapshot_brings_the_tables_back_with_their_expiry(tmp_path: Path) -> None:
    """Written at stop, read at start: bindings come back; an idle entry keeps what remained of its timeout,
    one whose client was still connected starts idle, one that expired meanwhile stays gone."""
    path = str(tmp_path / "state.persistence.json")

    async def first_life() -> None:
        store = MemoryStore(path)
        table = store.persistence_table("dicom", 60.0, 100)
        await store.start()
        now = asyncio.get_running_loop().time()
        table.acquire("10.0.0.5", "pacs1", now - 50)  # idle for 50 s of its 60
        table.release("10.0.0.5", "pacs1", now - 50)
        table.acquire("10.0.0.6", "pacs2", now)  # connected when pacslb stops
        table.acquire("10.0.0.7", "pacs3", now - 100)  # expired already
        table.release("10.0.0.7", "pacs3", now - 100)
        await store.close()

    async def second_life() -> tuple[dict[str, str | None], dict[str, str | None], int]:
        store = MemoryStore(path)
        table = store.persistence_table("dicom", 60.0, 100)
        store.persistence_table("web", 60.0, 100)
        await store.start()
        now = asyncio.get_running_loop().time()
        at_start = {k: table.lookup(k, now) for k in ("10.0.0.5", "10.0.0.6", "10.0.0.7")}
        later = {k: table.lookup(k, now + 30) for k in ("10.0.0.5", "10.0.0.6")}
        loaded = store.loaded
        await store.close()
        return at_start, later, loaded

    asyncio.run(first_life())
    document = json.loads(Path(path).read_text())
    assert document["version"] == 1 and len(document["services"]["dicom"]) == 3
    at_start, later, loaded = asyncio.run(second_life())
    assert at_start == {"10.0.0.5": "pacs1", "10.0.0.6": "pacs2", "10.0.0.7": None}
    assert later == {"10.0.0.5": None, "10.0.0.6": "pacs2"}  # 50 + 30 > 60; the other started idle at start
    assert loaded == 2


def test_an_unreadable_snapshot_is_ignored_with_a_log_line(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "state.persistence.json"
    path.write_text("{not json")

    async def start() -> int:
        store = MemoryStore(str(path))
        store.persistence_table("dicom", 60.0, 100)
        await store.start()
        await store.close()
        return store.loaded

    with caplog.at_level("ERROR"):
        assert asyncio.run(start()) == 0
    assert "persistence_ignored" in caplog.text
    assert json.loads(path.read_text())["version"] == 1  # replaced by a good one at stop
