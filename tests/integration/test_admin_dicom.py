"""Drain and halt with real PACS nodes (Orthanc) and real DICOM clients (dcmtk, pynetdicom), operated with
the ``pacslb`` CLI, as an administrator patching a node would.

- drain: new associations go to the other node while an association in progress on the drained one
  keeps storing, and every instance it sends arrives.
- halt: the association in progress is closed once the halt grace is over (logged ``end=halted``).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import peers
import pytest
from peers import OrthancNode, PacslbProcess, Study

pytestmark = pytest.mark.peers

NodesFactory = Callable[[int], list[OrthancNode]]
PacslbFactory = Callable[[str], PacslbProcess]
#: The halt grace of these tests: long enough to store during it, short enough to keep the test quick.
HALT_GRACE = 2.0


def _start(orthanc_nodes: NodesFactory, pacslb: PacslbFactory) -> tuple[list[OrthancNode], int, int, PacslbProcess]:
    nodes = orthanc_nodes(2)
    port, admin = peers.free_port(), peers.free_port()
    text = peers.config_text(
        {"dicom": peers.dicom_service(port, nodes, balance="roundrobin")},
        admin=peers.admin_section(admin),
        halt_grace=f"{HALT_GRACE:g}s",
        shutdown_grace="1s",
    )
    return nodes, port, admin, pacslb(text)


def _cli(admin: int, *args: str) -> peers.ToolResult:
    result = peers.run_pacslb_cli(*args, "--admin", f"http://127.0.0.1:{admin}")
    assert result.ok, result
    return result


def _node_of_open_association(admin: int) -> str:
    busy = [s["name"] for s in peers.admin_api(admin, "GET", "/api/v1/status").json()["services"][0]["servers"]
            if s["active"]]  # fmt: skip
    assert len(busy) == 1, busy
    return busy[0]


def test_drained_node_finishes_its_association_while_new_ones_go_elsewhere(
    orthanc_nodes: NodesFactory, pacslb: PacslbFactory, study: Study
) -> None:
    nodes, port, admin, lb = _start(orthanc_nodes, pacslb)
    by_name = {n.name: n for n in nodes}
    datasets = study.datasets()
    with peers.DicomClient(port, "127.0.0.2") as held:
        assert held.store(datasets[:10]) == [0] * 10
        drained = _node_of_open_association(admin)
        other = next(n for n in by_name if n != drained)

        mark = lb.mark()
        out = _cli(admin, "drain", drained)
        assert f"{drained}: drain in dicom" in out.output

        for _ in range(6):
            result = peers.echoscu(port)
            assert result.ok, result
        new = lb.wait_events("assoc", 6, timeout=10.0, since=mark, outcome="accepted")
        assert {e.get("server") for e in new} == {other}, "a drained node must take no new association"

        # The association that was open before the drain goes on to its end, on its node.
        assert held.store(datasets[10:]) == [0] * (len(datasets) - 10)
        status = _cli(admin, "status").output
        assert any(line.split()[:5] == ["dicom", drained, by_name[drained].address, "up", "drain"]
                   for line in status.splitlines()), status  # fmt: skip
    assert by_name[drained].sop_instance_uids() == study.sop_uids
    assert by_name[other].instance_count() == 0

    out = _cli(admin, "online", drained)
    assert f"{drained}: online in dicom" in out.output
    assert peers.admin_server(admin, "dicom", drained)["admin"] == "online"


def test_halted_node_has_its_association_closed_after_the_grace(
    orthanc_nodes: NodesFactory, pacslb: PacslbFactory, study: Study
) -> None:
    _, port, admin, lb = _start(orthanc_nodes, pacslb)
    datasets = study.datasets()
    held = peers.DicomClient(port, "127.0.0.3").open()
    try:
        assert held.store(datasets[:5]) == [0] * 5
        halted = _node_of_open_association(admin)
        mark = lb.mark()
        started = time.monotonic()
        out = _cli(admin, "halt", halted, "--service", "dicom")
        assert f"{halted}: halt in dicom" in out.output
        assert held.store(datasets[5:8]) == [0] * 3, "within the grace the association still works"
        peers.wait_for(lambda: not held.assoc.is_established, HALT_GRACE + 8.0, "the halted association to close")
        assert time.monotonic() - started >= HALT_GRACE * 0.8
        line = lb.wait_event("assoc", 5.0, since=mark, server=halted, end="halted")
        assert line.get("outcome") == "accepted"
        # What the association moved until the halt cut it counts: the 8 instances stored through it.
        assert int(line.get("bytes_up") or 0) > sum(len(d.PixelData) for d in datasets[:8])
        lb.wait_event("halt_closed", 5.0, since=mark, server=halted, connections="1")
        # New associations go to the other node.
        result = peers.echoscu(port)
        assert result.ok, result
        echo = lb.wait_event("assoc", 5.0, since=mark, calling="ECHOSCU")
        assert echo.get("server") != halted
    finally:
        held.close()
