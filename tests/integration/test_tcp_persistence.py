"""Source-IP persistence in tcp mode: one workstation stays on one node, different workstations spread.

dcmtk's tools always connect from 127.0.0.1, so the clients here are pynetdicom associations bound to
other loopback addresses (127.0.0.2, 127.0.0.3, ...), as several modalities would be.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import peers
import pytest
from peers import LogEvent, OrthancNode, PacslbProcess, Study

pytestmark = pytest.mark.peers

NodesFactory = Callable[[int], list[OrthancNode]]
PacslbFactory = Callable[[str], PacslbProcess]


def conns_from(lb: PacslbProcess, ip: str, count: int) -> list[LogEvent]:
    """The connection log lines of the first ``count`` connections from ``ip`` (waiting for them)."""
    return lb.wait_events("conn", count, timeout=5.0, client=peers.client_ip(ip))[:count]


def test_one_client_stays_on_one_node_while_others_spread(
    orthanc_nodes: NodesFactory, pacslb: PacslbFactory, study: Study
) -> None:
    nodes = orthanc_nodes(3)
    port = peers.free_port()
    persistence = {"type": "source_ip", "timeout": "5m"}
    lb = pacslb(peers.config_text({"dicom": peers.service(port, nodes, persistence=persistence)}))

    # One modality sends its study in five associations of four instances each.
    datasets = study.datasets()
    for first in range(0, 20, 4):
        with peers.DicomClient(port, "127.0.0.2") as client:
            assert client.store(datasets[first : first + 4]) == [0] * 4

    counts = {node.name: node.instance_count() for node in nodes}
    holders = [node for node in nodes if counts[node.name]]
    assert len(holders) == 1, f"one client's associations went to several nodes: {counts}"
    assert holders[0].sop_instance_uids() == set(study.sop_uids)
    conns = conns_from(lb, "127.0.0.2", 5)
    assert {c.get("server") for c in conns} == {holders[0].name}
    assert [c.get("rule") for c in conns] == ["balance"] + ["persistence"] * 4

    # Eight other workstations: the scheduler spreads them, and each then keeps its own node.
    others = [f"127.0.0.{i}" for i in range(3, 11)]
    for ip in others:
        peers.echo_from(port, ip)
    first_node = {ip: conns_from(lb, ip, 1)[0].get("server") for ip in others}
    assert len(set(first_node.values())) == 3, f"roundrobin left a node out: {first_node}"
    for ip in others:
        peers.echo_from(port, ip)
    for ip in others:
        again = conns_from(lb, ip, 2)[1]
        assert again.get("server") == first_node[ip], again.line
        assert again.get("rule") == "persistence", again.line


def test_netmask_24_keeps_a_whole_subnet_on_one_node(orthanc_nodes: NodesFactory, pacslb: PacslbFactory) -> None:
    nodes = orthanc_nodes(2)
    port = peers.free_port()
    persistence = {"type": "source_ip", "timeout": "5m", "netmask": 24}
    lb = pacslb(peers.config_text({"dicom": peers.service(port, nodes, persistence=persistence)}))

    subnet = [f"127.0.0.{i}" for i in range(2, 7)]
    for ip in subnet:
        peers.echo_from(port, ip)
    peers.echo_from(port, "127.0.1.2")

    lines = [conns_from(lb, ip, 1)[0] for ip in subnet]
    assert len({c.get("server") for c in lines}) == 1, [c.line for c in lines]
    assert [c.get("rule") for c in lines] == ["balance"] + ["persistence"] * 4
    outsider = conns_from(lb, "127.0.1.2", 1)[0]
    assert outsider.get("rule") == "balance", outsider.line
    assert outsider.get("server") != lines[0].get("server"), "roundrobin should have picked the other node"


def test_timeout_counts_from_the_end_of_the_last_association(
    orthanc_nodes: NodesFactory, pacslb: PacslbFactory
) -> None:
    nodes = orthanc_nodes(2)
    port = peers.free_port()
    timeout = 2.0
    persistence = {"type": "source_ip", "timeout": f"{timeout:g}s"}
    lb = pacslb(peers.config_text({"dicom": peers.service(port, nodes, persistence=persistence)}))

    with peers.DicomClient(port, "127.0.0.2") as long_association:
        time.sleep(timeout + 0.5)  # a study that takes longer than the persistence timeout
        peers.echo_from(port, "127.0.0.2")
        assert long_association.echo() == 0
    during, long_line = conns_from(lb, "127.0.0.2", 2)
    assert during.get("rule") == "persistence", during.line
    assert during.get("server") == long_line.get("server")
    assert long_line.get("end") == "client_closed", long_line.line

    peers.echo_from(port, "127.0.0.2")  # right after the last association ended: still pinned
    right_after = conns_from(lb, "127.0.0.2", 3)[2]
    assert right_after.get("rule") == "persistence", right_after.line

    time.sleep(timeout + 0.5)  # idle for longer than the timeout: the entry is gone
    peers.echo_from(port, "127.0.0.2")
    later = conns_from(lb, "127.0.0.2", 4)[3]
    assert later.get("rule") == "balance", later.line
