"""DICOM traffic through a tcp-mode service: echo, store, query, worklist, and how associations spread.

Real clients (dcmtk) talk to real PACS nodes (Orthanc) through pacslb; the assertions are what a user
would check: the client's exit code and output, which node stored the study (Orthanc's REST API), and
pacslb's connection log.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import peers
import pytest
from peers import OrthancNode, PacslbProcess, Study

pytestmark = pytest.mark.peers

NodesFactory = Callable[[int], list[OrthancNode]]
PacslbFactory = Callable[[str], PacslbProcess]


def test_echo_through_pacslb(orthanc_nodes: NodesFactory, pacslb: PacslbFactory) -> None:
    nodes = orthanc_nodes(2)
    port = peers.free_port()
    lb = pacslb(peers.config_text({"dicom": peers.service(port, nodes)}))

    result = peers.echoscu(port)

    assert result.ok, result
    assert "Received Echo Response (Success)" in result.output, result
    (conn,) = lb.wait_events("conn", 1, timeout=5.0)
    assert conn.get("service") == "dicom"
    assert conn.get("server") in {"pacs1", "pacs2"}
    assert conn.get("end") == "client_closed", conn.line
    assert int(conn.get("bytes_up")) > 0 and int(conn.get("bytes_down")) > 0, conn.line
    assert conn.get("client").startswith("127.0.0.1:")


def test_study_of_20_instances_lands_whole_on_one_node(
    orthanc_nodes: NodesFactory, pacslb: PacslbFactory, study: Study
) -> None:
    nodes = orthanc_nodes(3)
    port = peers.free_port()
    lb = pacslb(peers.config_text({"dicom": peers.service(port, nodes, balance="leastconn")}))

    result = peers.storescu(port, study.directory)

    assert result.ok, result
    counts = {node.name: node.instance_count() for node in nodes}
    holders = [name for name, count in counts.items() if count]
    assert len(holders) == 1, f"the study was split over nodes: {counts}"
    (holder,) = [node for node in nodes if node.name == holders[0]]
    assert holder.sop_instance_uids() == set(study.sop_uids)
    assert holder.study_instance_uids() == {study.study_uid}
    (conn,) = lb.wait_events("conn", 1, timeout=5.0)
    assert conn.get("server") == holder.name, conn.line
    assert conn.get("end") == "client_closed", conn.line


def test_query_finds_the_study_on_the_node_that_stored_it(
    orthanc_nodes: NodesFactory, pacslb: PacslbFactory, study: Study
) -> None:
    nodes = orthanc_nodes(3)
    port = peers.free_port()
    lb = pacslb(
        peers.config_text({"dicom": peers.service(port, nodes, persistence={"type": "source_ip", "timeout": "5m"})})
    )

    store = peers.storescu(port, study.directory)
    assert store.ok, store
    find = peers.findscu_study(port, study.study_uid)

    assert find.ok, find
    assert peers.count_responses(find) == 1, find
    assert study.study_uid in find.output
    store_conn, find_conn = lb.wait_events("conn", 2, timeout=5.0)
    assert find_conn.get("server") == store_conn.get("server"), (store_conn.line, find_conn.line)
    assert find_conn.get("rule") == "persistence", find_conn.line
    holder = next(node for node in nodes if node.name == store_conn.get("server"))
    assert holder.instance_count() == 20


def test_worklist_query_returns_the_scheduled_ct_step(orthanc_nodes: NodesFactory, pacslb: PacslbFactory) -> None:
    nodes = orthanc_nodes(2)
    port = peers.free_port()
    pacslb(peers.config_text({"mwl": peers.service(port, nodes)}))

    result = peers.findscu_worklist(port)

    assert result.ok, result
    assert peers.count_responses(result) == 1, result
    assert peers.WORKLIST_ACCESSION in result.output, result
    assert peers.WORKLIST_PATIENT in result.output, result


def test_without_persistence_roundrobin_spreads_associations_over_every_node(
    orthanc_nodes: NodesFactory, pacslb: PacslbFactory, study: Study
) -> None:
    nodes = orthanc_nodes(3)
    port = peers.free_port()
    lb = pacslb(
        peers.config_text({"dicom": peers.service(port, nodes, balance="roundrobin", persistence={"type": "none"})})
    )

    sent = study.files[:6]
    for path in sent:  # six associations, one instance each
        result = peers.storescu(port, path)
        assert result.ok, result

    counts = {node.name: node.instance_count() for node in nodes}
    assert counts == {"pacs1": 2, "pacs2": 2, "pacs3": 2}, counts
    stored = set().union(*(node.sop_instance_uids() for node in nodes))
    assert stored == {peers.read_sop_uid(p) for p in sent}
    conns = lb.wait_events("conn", 6, timeout=5.0)
    assert Counter(c.get("server") for c in conns) == Counter(counts)
    assert {c.get("rule") for c in conns} == {"balance"}


def test_weights_share_associations_in_proportion(orthanc_nodes: NodesFactory, pacslb: PacslbFactory) -> None:
    pacs1, pacs2 = orthanc_nodes(2)
    port = peers.free_port()
    servers: dict[str, Any] = {"pacs1": {"address": pacs1.address, "weight": 3}, "pacs2": pacs2.address}
    lb = pacslb(peers.config_text({"dicom": peers.service(port, servers, balance="roundrobin")}))

    for _ in range(8):
        result = peers.echoscu(port)
        assert result.ok, result

    conns = lb.wait_events("conn", 8, timeout=5.0)
    assert Counter(c.get("server") for c in conns) == {"pacs1": 6, "pacs2": 2}
