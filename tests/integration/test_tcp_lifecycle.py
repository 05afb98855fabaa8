"""Lifecycle in tcp mode: SIGHUP reloads without dropping an association; SIGTERM stops gracefully.

The open association is a real one (pynetdicom, storing real CT instances into Orthanc) so "not dropped"
means what it means to a modality: the instances sent after the reload arrive too.
"""

from __future__ import annotations

import signal
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import peers
import pytest
from peers import OrthancNode, PacslbProcess, Study

pytestmark = pytest.mark.peers

NodesFactory = Callable[[int], list[OrthancNode]]
PacslbFactory = Callable[[str], PacslbProcess]


def test_reload_changes_servers_without_dropping_an_open_association(
    orthanc_nodes: NodesFactory, pacslb: PacslbFactory, study: Study
) -> None:
    pacs1, pacs2, pacs3 = orthanc_nodes(3)
    port = peers.free_port()

    def config(servers: dict[str, Any]) -> str:
        return peers.config_text({"dicom": peers.service(port, servers, balance="roundrobin")})

    lb = pacslb(config({"pacs1": pacs1.address, "pacs2": pacs2.address}))
    datasets = study.datasets()
    with peers.DicomClient(port, "127.0.0.2") as held:
        assert held.store(datasets[:10]) == [0] * 10

        mark = lb.mark()
        lb.reload(
            config(
                {
                    "pacs1": {"address": pacs1.address, "weight": 3},
                    "pacs2": pacs2.address,
                    "pacs3": pacs3.address,
                }
            )
        )
        lb.wait_event("reloaded", 5.0, since=mark)
        assert held.store(datasets[10:15]) == [0] * 5, "the open association must survive the reload"

        for _ in range(10):
            result = peers.echoscu(port)
            assert result.ok, result
        conns = lb.wait_events("conn", 10, timeout=5.0, since=mark)
        spread = Counter(c.get("server") for c in conns)
        assert spread["pacs3"] > 0, f"the added server gets no clients: {spread}"
        assert spread["pacs1"] > spread["pacs2"], f"weight 3 against 1 is not honoured: {spread}"

        # An invalid file is refused with its errors; the running config (with pacs3) stays.
        mark = lb.mark()
        lb.reload(f"services:\n  dicom:\n    listen: 127.0.0.1:{port}\n    servers: {{pacs1: nowhere}}\n")
        refused = lb.wait_event("reload_refused", 5.0, since=mark)
        assert refused.level == "error", refused.line
        errors = lb.events("config_error", since=mark)
        assert any("servers.pacs1" in e.get("error") for e in errors), [e.line for e in errors]
        assert not lb.events("reloaded", since=mark)
        assert held.store(datasets[15:]) == [0] * 5
        for _ in range(5):
            result = peers.echoscu(port)
            assert result.ok, result
        conns = lb.wait_events("conn", 5, timeout=5.0, since=mark)
        assert "pacs3" in {c.get("server") for c in conns}, "the refused file must not have replaced the config"

    # All 20 instances of the held association arrived, on the one node it was connected to.
    held_line = lb.wait_event("conn", 5.0, client=peers.client_ip("127.0.0.2"))
    assert held_line.get("end") == "client_closed", held_line.line
    holder = {"pacs1": pacs1, "pacs2": pacs2}[held_line.get("server")]
    assert holder.sop_instance_uids() == set(study.sop_uids)
    assert lb.running()


def test_sigterm_stops_accepting_and_lets_the_open_association_finish(
    orthanc_nodes: NodesFactory, pacslb: PacslbFactory, study: Study
) -> None:
    nodes = orthanc_nodes(2)
    port = peers.free_port()
    lb = pacslb(peers.config_text({"dicom": peers.service(port, nodes)}, shutdown_grace="30s"))
    datasets = study.datasets()

    with peers.DicomClient(port, "127.0.0.2") as held:
        assert held.store(datasets[:10]) == [0] * 10
        lb.send(signal.SIGTERM)
        stopping = lb.wait_event("stopping", 5.0)
        assert stopping.get("active") == "1", stopping.line
        assert peers.tcp_connect_refused(port), "pacslb still accepts connections after SIGTERM"
        assert held.store(datasets[10:]) == [0] * 10, "the open association is served to its end"
        assert held.echo() == 0
        assert lb.running(), "pacslb must wait for the open association (grace 30 s)"

    assert lb.wait_exit(5.0) == 0
    (conn,) = lb.events("conn", client=peers.client_ip("127.0.0.2"))
    assert conn.get("end") == "client_closed", conn.line
    assert lb.events("stopped")
    holder = next(node for node in nodes if node.name == conn.get("server"))
    assert holder.sop_instance_uids() == set(study.sop_uids)


def test_sigterm_closes_what_is_left_after_the_grace_period(orthanc_nodes: NodesFactory, pacslb: PacslbFactory) -> None:
    nodes = orthanc_nodes(2)
    port = peers.free_port()
    grace = 1.0
    lb = pacslb(peers.config_text({"dicom": peers.service(port, nodes)}, shutdown_grace=f"{grace:g}s"))

    held = peers.DicomClient(port, "127.0.0.2").open()
    try:
        assert held.echo() == 0
        sent = time.monotonic()
        lb.send(signal.SIGTERM)
        assert lb.wait_exit(grace + 5.0) == 0
        waited = time.monotonic() - sent
        assert waited >= grace * 0.8, f"pacslb exited after {waited:.2f} s, before its grace period"
        (conn,) = lb.events("conn")
        assert conn.get("end") == "shutdown", conn.line
        # The modality sees its association end (the TCP connection is closed), not a hang.
        peers.wait_for(lambda: not held.assoc.is_established, 5.0, "the client to see the connection close")
    finally:
        held.close()
