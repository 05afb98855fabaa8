"""Time limits in tcp mode: an idle client holds a connection only as long as ``timeouts.client_idle``.

An association may sit idle for hours between studies (the default is 12 h); here the limit is one
second so that the test is quick.
"""

from __future__ import annotations

import socket
from collections.abc import Callable

import peers
import pytest
from peers import OrthancNode, PacslbProcess

pytestmark = pytest.mark.peers

NodesFactory = Callable[[int], list[OrthancNode]]
PacslbFactory = Callable[[str], PacslbProcess]

IDLE = 1.0
#: How long past the idle limit a connection may live before the test calls it a leak.
SLACK = 4.0


def test_idle_association_and_silent_client_are_closed_after_client_idle(
    orthanc_nodes: NodesFactory, pacslb: PacslbFactory
) -> None:
    nodes = orthanc_nodes(2)
    port = peers.free_port()
    timeouts = {"connect": "1s", "client_idle": f"{IDLE:g}s", "server_idle": "1h"}
    lb = pacslb(peers.config_text({"dicom": peers.service(port, nodes, timeouts=timeouts)}))

    # A client that connects and never sends a byte.
    with socket.create_connection(("127.0.0.1", port), timeout=IDLE + SLACK) as silent:
        silent.settimeout(IDLE + SLACK)
        try:
            data = silent.recv(1)
        except ConnectionResetError:
            data = b""
        assert data == b"", "pacslb should have closed a connection that stayed silent past client_idle"

    # A real association that goes idle after one C-ECHO.
    held = peers.DicomClient(port, "127.0.0.2").open()
    try:
        assert held.echo() == 0
        peers.wait_for(lambda: not held.assoc.is_established, IDLE + SLACK, "the idle association to be closed")
    finally:
        held.close()

    conns = lb.wait_events("conn", 2, timeout=5.0)
    assert [c.get("end") for c in conns] == ["client_timeout", "client_timeout"], [c.line for c in conns]
    assert conns[0].get("bytes_up") == "0", conns[0].line
    assert conns[1].get("client").startswith("127.0.0.2:"), conns[1].line
    assert float(conns[1].get("duration")) >= IDLE, conns[1].line
