"""DICOM traffic through a ``mode: dicom`` service to real Orthanc nodes: echo, a whole study, C-FIND, worklist.

In mode dicom pacslb reads each A-ASSOCIATE-RQ before it picks a node, so these tests show that what a
modality does still works end to end: dcmtk's exit code and output, which Orthanc node stored which SOP
instances (its REST API), and the ``assoc`` log line pacslb writes for every association.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import peers
import pytest
from peers import OrthancNode, PacslbProcess, Study

pytestmark = pytest.mark.peers

PacslbFactory = Callable[[str], PacslbProcess]


@pytest.fixture(scope="module")
def nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[OrthancNode]]:
    """Three Orthanc nodes shared by this module's tests (each test uses its own study and AE titles)."""
    cluster = peers.OrthancCluster(tmp_path_factory.mktemp("orthanc"))
    try:
        yield cluster.start(3)
    finally:
        cluster.discard()


def start(pacslb: PacslbFactory, nodes: list[OrthancNode], **kwargs: Any) -> tuple[PacslbProcess, int]:
    port = peers.free_port()
    spec = peers.dicom_service(port, nodes, check=peers.DICOM_ECHO_CHECK, **kwargs)
    return pacslb(peers.config_text({"dicom": spec})), port


def holders_of(nodes: list[OrthancNode], study: Study) -> dict[str, set[str]]:
    """For each node, which of the study's SOP Instance UIDs it stores."""
    return {node.name: node.sop_instance_uids() & study.sop_uids for node in nodes}


def test_echoscu_gets_an_echo_and_pacslb_logs_the_association(nodes: list[OrthancNode], pacslb: PacslbFactory) -> None:
    lb, port = start(pacslb, nodes)

    result = peers.echoscu(port, called="ANY-SCP", calling="ECHOMOD")

    assert result.ok, result
    assert "Association Accepted" in result.output, result
    assert "Received Echo Response (Success)" in result.output, result
    (assoc,) = lb.wait_events("assoc", 1, timeout=5.0)
    assert assoc.level == "info", assoc.line
    assert assoc.get("service") == "dicom"
    assert assoc.get("calling") == "ECHOMOD", assoc.line
    assert assoc.get("called") == "ANY-SCP", assoc.line
    assert assoc.get("client").startswith("127.0.0.1:"), assoc.line
    assert assoc.get("server") in {"pacs1", "pacs2", "pacs3"}, assoc.line
    assert assoc.get("outcome") == "accepted", assoc.line
    assert assoc.get("retries") == "0", assoc.line
    assert assoc.get("end") == "client_closed", assoc.line
    # The RQ (about 200 bytes from echoscu), the C-ECHO and the release went up; the AC and answers came down.
    assert int(assoc.get("bytes_up")) > 200 and int(assoc.get("bytes_down")) > 100, assoc.line


def test_storescu_study_of_20_instances_lands_whole_on_one_node(
    nodes: list[OrthancNode], pacslb: PacslbFactory, study: Study
) -> None:
    lb, port = start(pacslb, nodes)

    # storescu proposes every storage SOP class: its A-ASSOCIATE-RQ is about 9.6 KB and comes in several reads.
    result = peers.storescu(port, study.directory, calling="CTSTORE")

    assert result.ok, result
    assert result.output.count("Received Store Response (Success)") == 20, result
    holders = {name: uids for name, uids in holders_of(nodes, study).items() if uids}
    assert len(holders) == 1, f"the study was split over nodes: { {n: len(u) for n, u in holders.items()} }"
    ((holder, uids),) = holders.items()
    assert uids == set(study.sop_uids), f"{holder} lacks {len(study.sop_uids - uids)} instances"
    (assoc,) = lb.wait_events("assoc", 1, timeout=5.0)
    assert assoc.get("server") == holder, assoc.line
    assert assoc.get("calling") == "CTSTORE", assoc.line
    assert assoc.get("outcome") == "accepted", assoc.line
    study_bytes = sum(path.stat().st_size for path in study.files)
    assert int(assoc.get("bytes_up")) > study_bytes, assoc.line


def findscu_study_as(port: int, calling: str, study_uid: str) -> peers.ToolResult:
    """A study-root C-FIND (findscu -S) under a chosen calling AE title."""
    return peers.dcmtk(
        "findscu", "-v", "-to", "10", "-ta", "10", "-td", "10", "-S", "-aet", calling, "-aec", "ANY-SCP",
        "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study_uid}", "-k", "PatientName",
        "127.0.0.1", str(port),
    )  # fmt: skip


def test_findscu_study_query_goes_where_the_same_modality_stored(
    nodes: list[OrthancNode], pacslb: PacslbFactory, tmp_path: Path
) -> None:
    lb, port = start(pacslb, nodes, persistence={"type": "calling_ae", "timeout": "5m"})
    small = peers.make_study(tmp_path / "small", count=3, patient_name="PACSLB^FIND")

    store = peers.storescu(port, small.directory, calling="MODFIND")
    assert store.ok, store
    find = findscu_study_as(port, "MODFIND", small.study_uid)

    assert find.ok, find
    assert peers.count_responses(find) == 1, find
    assert small.study_uid in find.output, find
    assert "PACSLB^FIND" in find.output, find
    store_line, find_line = lb.wait_events("assoc", 2, timeout=5.0)
    assert find_line.get("server") == store_line.get("server"), (store_line.line, find_line.line)
    assert find_line.get("rule") == "persistence", find_line.line
    assert {n for n, uids in holders_of(nodes, small).items() if uids} == {store_line.get("server")}


def test_findscu_worklist_query_returns_the_scheduled_ct_step(nodes: list[OrthancNode], pacslb: PacslbFactory) -> None:
    lb, port = start(pacslb, nodes)

    result = peers.findscu_worklist(port)

    assert result.ok, result
    assert peers.count_responses(result) == 1, result
    assert peers.WORKLIST_ACCESSION in result.output, result
    assert peers.WORKLIST_PATIENT in result.output, result
    (assoc,) = lb.wait_events("assoc", 1, timeout=5.0)
    assert (assoc.get("calling"), assoc.get("outcome")) == ("CTSCANNER", "accepted"), assoc.line


def test_roundrobin_spreads_associations_evenly_without_persistence(
    nodes: list[OrthancNode], pacslb: PacslbFactory
) -> None:
    lb, port = start(pacslb, nodes, balance="roundrobin")

    for _ in range(6):
        result = peers.echoscu(port, calling="SPREAD")
        assert result.ok, result

    lines = lb.wait_events("assoc", 6, timeout=5.0)
    assert Counter(line.get("server") for line in lines) == {"pacs1": 2, "pacs2": 2, "pacs3": 2}
    assert {line.get("rule") for line in lines} == {"balance"}
