"""The throughput history (pacslb/admin/history.py): rates from sampled counters, bounded buffers."""

from __future__ import annotations

from pacslb.admin.history import History
from pacslb.balance.server import ServerState


def test_rates_between_samples_and_counter_restarts() -> None:
    server = ServerState("pacs1", "10.0.0.1", 104)
    servers = [("dicom", server)]
    history = History(lambda: servers, interval=5.0, limit=3)
    history.sample(100.0)
    server.bytes_up, server.bytes_down, server.active = 5000, 1000, 2
    history.sample(105.0)
    replaced = ServerState("pacs1", "10.0.0.9", 104)  # a reload gave it a new address: counters from zero
    replaced.bytes_up = 500
    servers[0] = ("dicom", replaced)
    history.sample(110.0)
    series = history.rates()["series"]["dicom/pacs1"]
    assert series["t"] == [105.0, 110.0]
    assert series["up"] == [1000.0, 100.0] and series["down"] == [200.0, 0.0] and series["active"] == [2, 0]
    for t in (115.0, 120.0, 125.0):
        history.sample(t)
    assert len(history.samples[("dicom", "pacs1")]) == 3  # bounded


def test_a_removed_server_is_forgotten_after_the_window() -> None:
    servers = [("dicom", ServerState("pacs1", "10.0.0.1", 104))]
    history = History(lambda: servers)
    history.sample(0.0)
    servers.clear()
    history.sample(10.0)
    assert ("dicom", "pacs1") in history.samples
    history.sample(4000.0)
    assert history.samples == {}
