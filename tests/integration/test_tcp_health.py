"""Health checks in tcp mode: a crashed node is taken out within interval x fall, and rejoins after rise.

The node really dies (SIGKILL of its Orthanc process) and really comes back (a new process on the same
ports and storage). Check intervals are short (300 ms) so that the test is quick; the bounds below add
slack for a loaded machine but stay far below what a client would notice as "hanging".
"""

from __future__ import annotations

import time
from collections.abc import Callable

import peers
import pytest
from peers import OrthancNode, PacslbProcess

pytestmark = pytest.mark.peers

NodesFactory = Callable[[int], list[OrthancNode]]
PacslbFactory = Callable[[str], PacslbProcess]

INTERVAL, FALL, RISE = 0.3, 2, 2
CHECK = {"type": "tcp", "interval": "300ms", "timeout": "300ms", "rise": RISE, "fall": FALL}
#: Scheduling slack on top of interval x fall (or x rise): a loaded CI machine may run checks late.
SLACK = 3.0


def echo_n(port: int, n: int) -> None:
    for _ in range(n):
        result = peers.echoscu(port)
        assert result.ok, result


def test_killed_node_is_taken_out_then_rejoins(orthanc_nodes: NodesFactory, pacslb: PacslbFactory) -> None:
    nodes = orthanc_nodes(3)
    pacs2 = nodes[1]
    port = peers.free_port()
    lb = pacslb(peers.config_text({"dicom": peers.service(port, nodes, balance="roundrobin", check=CHECK)}))
    echo_n(port, 3)
    lb.wait_events("conn", 3, timeout=5.0)
    assert not lb.events("health"), "no node should have changed state yet"

    mark = lb.mark()
    pacs2.kill()
    echo_n(port, 3)  # while the checks have not noticed yet: the connect retry covers it
    down = lb.wait_event("health", INTERVAL * FALL + SLACK, since=mark, server="pacs2", new="down")
    assert down.get("old") == "up", down.line
    assert down.get("service") == "dicom"
    assert down.level == "warning", down.line
    assert not [c.line for c in lb.events("conn", since=mark) if c.get("end") != "client_closed"]

    mark = lb.mark()
    echo_n(port, 6)
    conns = lb.wait_events("conn", 6, timeout=5.0, since=mark)
    assert {c.get("server") for c in conns} == {"pacs1", "pacs3"}
    assert {c.get("retries") for c in conns} == {"0"}, "a node known down must not even be tried"
    assert not lb.events("connect_failed", since=mark)

    mark = lb.mark()
    pacs2.start()  # same ports, same storage
    up = lb.wait_event("health", INTERVAL * RISE + SLACK, since=mark, server="pacs2", new="up")
    assert up.get("old") == "down", up.line
    mark = lb.mark()
    echo_n(port, 6)
    conns = lb.wait_events("conn", 6, timeout=5.0, since=mark)
    assert {c.get("server") for c in conns} == {"pacs1", "pacs2", "pacs3"}, "pacs2 gets clients again"


def test_client_pinned_to_a_dead_node_is_rebalanced(orthanc_nodes: NodesFactory, pacslb: PacslbFactory) -> None:
    nodes = orthanc_nodes(2)
    port = peers.free_port()
    persistence = {"type": "source_ip", "timeout": "5m"}
    lb = pacslb(peers.config_text({"dicom": peers.service(port, nodes, persistence=persistence, check=CHECK)}))
    peers.echo_from(port, "127.0.0.2")
    (first,) = lb.wait_events("conn", 1, timeout=5.0)
    pinned = next(node for node in nodes if node.name == first.get("server"))

    mark = lb.mark()
    pinned.kill()
    lb.wait_event("health", INTERVAL * FALL + SLACK, since=mark, server=pinned.name, new="down")
    peers.echo_from(port, "127.0.0.2")
    peers.echo_from(port, "127.0.0.2")

    moved, stays = lb.wait_events("conn", 2, timeout=5.0, since=mark)
    assert moved.get("server") != pinned.name, moved.line
    assert moved.get("rule") == "balance", moved.line
    assert stays.get("server") == moved.get("server"), stays.line
    assert stays.get("rule") == "persistence", stays.line

    # The old node coming back does not pull the client back: it is pinned to its new node now.
    mark = lb.mark()
    pinned.start()
    lb.wait_event("health", INTERVAL * RISE + SLACK, since=mark, server=pinned.name, new="up")
    peers.echo_from(port, "127.0.0.2")
    (after,) = lb.wait_events("conn", 1, timeout=5.0, since=mark)
    assert after.get("server") == moved.get("server"), after.line


def test_dicom_echo_check_tells_a_pacs_from_a_port_that_merely_accepts(
    orthanc_nodes: NodesFactory, pacslb: PacslbFactory
) -> None:
    (pacs1,) = orthanc_nodes(1)
    port = peers.free_port()
    # "web1" accepts TCP connections (it is Orthanc's HTTP port) but speaks no DICOM: a tcp check would
    # call it healthy, a C-ECHO check must not.
    servers = {"pacs1": pacs1.address, "web1": f"127.0.0.1:{pacs1.http_port}"}
    # 500 ms is plenty for a C-ECHO on loopback (Orthanc answers in about 60 ms), including the first one.
    check = {"type": "dicom_echo", "interval": "500ms", "timeout": "500ms", "rise": 2, "fall": 2}
    check |= {"calling_ae": "PACSLB", "called_ae": pacs1.aet}
    lb = pacslb(peers.config_text({"dicom": peers.service(port, servers, balance="roundrobin", check=check)}))

    down = lb.wait_event("health", 0.5 * 2 + SLACK, server="web1", new="down")
    assert down.get("reason"), down.line
    time.sleep(0.5 * 3)  # a few more checks of both
    pacs1_changes = [e.line for e in lb.events("health", server="pacs1")]
    assert not pacs1_changes, f"the real PACS must pass its C-ECHO check from the first one on: {pacs1_changes}"
    mark = lb.mark()
    echo_n(port, 4)
    conns = lb.wait_events("conn", 4, timeout=5.0, since=mark)
    assert {c.get("server") for c in conns} == {"pacs1"}


def test_http_check_on_the_nodes_web_port(orthanc_nodes: NodesFactory, pacslb: PacslbFactory) -> None:
    """The check may probe another port than the one served (``check.port``): here Orthanc's REST API."""
    (pacs1,) = orthanc_nodes(1)
    ports = {name: peers.free_port() for name in ("get", "head", "body", "nobody")}
    base = {"type": "http", "interval": "300ms", "timeout": "300ms", "rise": 2, "fall": 2}
    get = base | {"port": pacs1.http_port, "method": "GET", "path": "/system", "expect_status": [200]}
    checks = {
        "get": get,
        "head": get | {"method": "HEAD"},  # Orthanc answers HEAD with 404 on every path
        "body": get | {"expect_body": '"DicomAet" : "PACS1"'},  # Orthanc gzips this body
        "nobody": get | {"expect_body": "no such text"},
    }
    lb = pacslb(peers.config_text({name: peers.service(ports[name], [pacs1], check=checks[name]) for name in checks}))

    head_down = lb.wait_event("health", 0.3 * 2 + SLACK, service="head", new="down")
    assert "404" in head_down.get("reason"), head_down.line
    body_down = lb.wait_event("health", 0.3 * 2 + SLACK, service="nobody", new="down")
    assert "no such text" in body_down.get("reason"), body_down.line
    time.sleep(0.3 * 3)
    assert not lb.events("health", service="get"), "GET /system answers 200"
    assert peers.echoscu(ports["get"]).ok
    refused = peers.echoscu(ports["head"])
    assert not refused.ok, refused
    conns = lb.wait_events("conn", 2, timeout=5.0)
    assert [(c.get("service"), c.get("end")) for c in conns] == [("get", "client_closed"), ("head", "no_server")]
    body_changes = [e.line for e in lb.events("health", service="body")]
    assert not body_changes, f"the body of GET /system does contain the expected text: {body_changes}"
