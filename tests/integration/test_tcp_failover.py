"""Failover in tcp mode: a dead node that no check has noticed costs the client nothing (connect retry),
and when no node is left the client is told at once (its connection closed, not left hanging).
"""

from __future__ import annotations

from collections.abc import Callable

import peers
import pytest
from peers import OrthancNode, PacslbProcess, Study

pytestmark = pytest.mark.peers

NodesFactory = Callable[[int], list[OrthancNode]]
PacslbFactory = Callable[[str], PacslbProcess]

NO_CHECK = {"type": "none"}
CHECK = {"type": "tcp", "interval": "300ms", "timeout": "300ms", "rise": 2, "fall": 2}
#: A client whose connection is closed "at once" sees it within this (its own timeouts are 10 s).
PROMPT = 5.0


def test_undetected_dead_node_costs_the_client_nothing(
    orthanc_nodes: NodesFactory, pacslb: PacslbFactory, study: Study
) -> None:
    pacs1, pacs2 = orthanc_nodes(2)
    port = peers.free_port()
    # Nothing listens on "dead"'s port, and with no health check pacslb believes it is up.
    servers = {"pacs1": pacs1.address, "dead": f"127.0.0.1:{peers.free_port()}", "pacs2": pacs2.address}
    lb = pacslb(peers.config_text({"dicom": peers.service(port, servers, balance="roundrobin", check=NO_CHECK)}))

    for _ in range(6):
        result = peers.echoscu(port)
        assert result.ok, result
    store = peers.storescu(port, study.directory)
    assert store.ok, store

    conns = lb.wait_events("conn", 7, timeout=5.0)
    assert {c.get("end") for c in conns} == {"client_closed"}, [c.line for c in conns]
    assert {c.get("server") for c in conns} == {"pacs1", "pacs2"}
    assert any(c.get("retries") == "1" for c in conns), "roundrobin should have tried 'dead' at least once"
    failed = lb.events("connect_failed")
    assert failed and {f.get("server") for f in failed} == {"dead"}, [f.line for f in failed]
    assert pacs1.instance_count() + pacs2.instance_count() == 20


def test_all_nodes_refusing_closes_the_client_at_once(pacslb: PacslbFactory) -> None:
    """No Orthanc needed: every configured node is a port where nothing listens, and nothing checks."""
    port = peers.free_port()
    servers = {"pacs1": f"127.0.0.1:{peers.free_port()}", "pacs2": f"127.0.0.1:{peers.free_port()}"}
    lb = pacslb(peers.config_text({"dicom": peers.service(port, servers, check=NO_CHECK)}))

    result = peers.echoscu(port)

    assert not result.ok, result
    assert result.elapsed < PROMPT, f"the client waited {result.elapsed:.1f} s for nothing:\n{result}"
    (conn,) = lb.wait_events("conn", 1, timeout=5.0)
    assert conn.get("end") == "refused", conn.line
    assert conn.get("server") == "-", conn.line
    assert conn.level == "warning", conn.line
    assert {f.get("server") for f in lb.events("connect_failed")} == {"pacs1", "pacs2"}


def test_all_nodes_down_closes_the_client_at_once_and_recovers(
    orthanc_nodes: NodesFactory, pacslb: PacslbFactory
) -> None:
    nodes = orthanc_nodes(2)
    port = peers.free_port()
    lb = pacslb(peers.config_text({"dicom": peers.service(port, nodes, check=CHECK)}))
    assert peers.echoscu(port).ok

    mark = lb.mark()
    for node in nodes:
        node.kill()
    for node in nodes:
        lb.wait_event("health", 0.3 * 2 + 3.0, since=mark, server=node.name, new="down")
    lb.wait_event("service_down", 5.0, since=mark, service="dicom")

    mark = lb.mark()
    result = peers.echoscu(port)
    assert not result.ok, result
    assert result.elapsed < PROMPT, f"the client waited {result.elapsed:.1f} s for nothing:\n{result}"
    (conn,) = lb.wait_events("conn", 1, timeout=5.0, since=mark)
    assert conn.get("end") == "no_server", conn.line

    mark = lb.mark()
    nodes[0].start()
    lb.wait_event("health", 0.3 * 2 + 3.0, since=mark, server=nodes[0].name, new="up")
    result = peers.echoscu(port)
    assert result.ok, result
    conn = lb.wait_event("conn", 5.0, since=mark)
    assert conn.get("server") == nodes[0].name, conn.line
    assert conn.get("end") == "client_closed", conn.line
