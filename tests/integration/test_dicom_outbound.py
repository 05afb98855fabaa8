"""Associations a PACS node opens towards modalities, through pacslb (``dicom.destination: called_ae``).

C-MOVE sub-operations (and storage commitment reports) are associations the node opens itself, from its
own table of modality addresses. With an outbound service, every node's table points each modality's AE
title at pacslb, and pacslb forwards each association to the address its one registry (the service's
servers, named by AE title) gives for the called AE title, from the service's ``source`` address (the
virtual IP a modality knows). Real peers: Orthanc performs the C-MOVE that dcmtk's movescu asks for, and
dcmtk's storescp receives it; pynetdicom plays the node and the modality where a test needs to choose.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import peers
import pytest
from peers import EchoSCP, OrthancCluster, OrthancNode, PacslbProcess, Study

pytestmark = pytest.mark.peers

PacslbFactory = Callable[[str], PacslbProcess]
SOURCE = "127.0.0.9"  # the "virtual IP" the modalities see


def outbound(port: int, destinations: dict[str, str], **extra: Any) -> dict[str, Any]:
    return peers.dicom_service(
        port, destinations, dicom={"destination": "called_ae"}, source=SOURCE, balance="roundrobin", **extra
    )


@pytest.fixture
def node_and_ports(tmp_path: Path) -> Iterator[tuple[OrthancNode, int]]:
    """An Orthanc node whose modality table sends WS01 (and NOBODY) to pacslb's outbound port."""
    out_port = peers.free_port()
    cluster = OrthancCluster(tmp_path / "orthanc")
    node = OrthancNode(
        "pacs1", peers.free_port(), peers.free_port(), cluster.root / "pacs1", cluster.worklists,
        extra={
            "DicomAlwaysAllowMove": True,
            "DicomModalities": {
                "ws01": ["WS01", "127.0.0.1", out_port],
                "nobody": ["NOBODY", "127.0.0.1", out_port],
            },
        },
    )  # fmt: skip
    cluster.nodes.append(node)
    cluster.worklists.mkdir(parents=True, exist_ok=True)
    try:
        node.start()
        yield node, out_port
    finally:
        cluster.discard()


def test_a_c_move_reaches_the_workstation_through_the_outbound_service(
    pacslb: PacslbFactory, node_and_ports: tuple[OrthancNode, int], study: Study, tmp_path: Path
) -> None:
    node, out_port = node_and_ports
    stored = peers.storescu(node.dicom_port, study.directory, calling="CT01")
    assert stored.ok, stored
    with peers.StoreSCP(tmp_path / "ws01", ae_title="WS01") as workstation:
        in_port = peers.free_port()
        services = {
            "dicom": peers.dicom_service(in_port, [node]),
            "outbound": outbound(out_port, {"WS01": workstation.address}),
        }
        lb = pacslb(peers.config_text(services))

        move = peers.dcmtk(
            "movescu", "-v", "-S", "-aet", "WS01", "-aec", node.aet, "-aem", "WS01",
            "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study.study_uid}",
            "127.0.0.1", str(in_port), timeout=60.0,
        )  # fmt: skip
        assert move.ok, move
        received = {p.name.split(".", 1)[1] for p in (workstation.root / "out").iterdir()}
    assert received == set(study.sop_uids), f"{len(received)} of {len(study.sop_uids)} instances arrived"
    line = lb.wait_event("assoc", 10.0, service="outbound")
    assert (line.get("calling"), line.get("called"), line.get("server")) == (node.aet, "WS01", "WS01"), line.line
    assert line.get("outcome") == "accepted" and int(line.get("bytes_up")) > 0, line.line

    # A C-MOVE to an AE title the registry does not have: the node hears 1-1-7 and reports the failure.
    failed = peers.dcmtk(
        "movescu", "-v", "-S", "-aet", "WS01", "-aec", node.aet, "-aem", "NOBODY",
        "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study.study_uid}",
        "127.0.0.1", str(in_port), timeout=60.0,
    )  # fmt: skip
    assert "Failed" in failed.output or "Warning" in failed.output or not failed.ok, failed
    refused = lb.wait_event("assoc", 10.0, service="outbound", called="NOBODY")
    assert (refused.get("outcome"), refused.get("by")) == ("rejected", "balancer"), refused.line
    assert refused.get("detail").startswith("1-1-7"), refused.line


def test_the_modality_sees_the_source_address_and_a_restarting_modality_is_waited_for(
    pacslb: PacslbFactory,
) -> None:
    modality = EchoSCP("WS02")
    modality.start()
    try:
        port = peers.free_port()
        lb = pacslb(peers.config_text({"outbound": outbound(port, {"WS02": modality.address})}))
        first = peers.attempt_association(port, calling_ae="PACS1", called_ae="WS02")
        assert first.established and first.echo_status == 0, first
        assert modality.peers == [SOURCE], modality.peers

        # The modality goes away and comes back while the node's association waits: it is retried
        # (every 0.5 s, within the negotiation time) and succeeds.
        modality.stop()
        result: list[peers.AssociationAttempt] = []
        waiting = threading.Thread(
            target=lambda: result.append(peers.attempt_association(port, calling_ae="PACS1", called_ae="WS02"))
        )
        waiting.start()
        lb.wait_event("connect_failed", 10.0, server="WS02")
        modality.start()
        waiting.join(30.0)
        assert result and result[0].established and result[0].echo_status == 0, result
        _, line = lb.wait_events("assoc", 2, timeout=10.0)
        assert (line.get("outcome"), line.get("server")) == ("accepted", "WS02"), line.line
        assert modality.peers == [SOURCE, SOURCE], modality.peers
    finally:
        modality.stop()


def test_an_unknown_or_unreachable_modality_gets_the_proper_rejection(pacslb: PacslbFactory) -> None:
    port = peers.free_port()
    gone = f"127.0.0.1:{peers.free_port()}"
    lb = pacslb(peers.config_text({"outbound": outbound(port, {"WS03": gone}, timeouts={"negotiation": "2s"})}))

    unknown = peers.attempt_association(port, calling_ae="PACS1", called_ae="NOBODY")
    down = peers.attempt_association(port, calling_ae="PACS1", called_ae="WS03")

    assert unknown.rejection == (1, 1, 7), unknown
    assert down.rejection == (2, 3, 1), down
    attempts = lb.events("connect_failed", server="WS03")
    assert len(attempts) >= 2, "retried within the negotiation time"


def test_a_storage_commitment_report_comes_back_through_the_outbound_service(pacslb: PacslbFactory) -> None:
    """The modality asks for commitment (N-ACTION) through the inbound service; the node answers later on
    a new association it opens itself (N-EVENT-REPORT, the node in the SCP role), which the outbound
    service carries to the modality. pynetdicom plays both: each side's handler is the test's."""
    from pydicom.dataset import Dataset
    from pydicom.uid import generate_uid
    from pynetdicom import AE, build_role, evt
    from pynetdicom.sop_class import StorageCommitmentPushModel

    well_known = "1.2.840.10008.1.20.1.1"  # the Storage Commitment Push Model SOP Instance
    in_port, out_port, node_port, modality_port = (peers.free_port() for _ in range(4))
    reports: list[Dataset] = []
    reported, finished = threading.Event(), threading.Event()
    sent: list[Any] = []  # the status the node was answered with

    def on_report(event: Any) -> tuple[int, None]:
        reports.append(event.event_information)
        reported.set()
        return 0x0000, None

    def report_later(request: Dataset) -> None:
        node = AE("PACSX")
        node.add_requested_context(StorageCommitmentPushModel)
        assoc = node.associate(
            "127.0.0.1", out_port, ae_title="CT05", ext_neg=[build_role(StorageCommitmentPushModel, scp_role=True)]
        )
        if assoc.is_established:
            result = Dataset()
            result.TransactionUID = request.TransactionUID
            result.ReferencedSOPSequence = request.ReferencedSOPSequence
            status, _ = assoc.send_n_event_report(result, 1, StorageCommitmentPushModel, well_known)
            sent.append(status.Status if status else None)
            assoc.release()
        node.shutdown()
        finished.set()

    def on_action(event: Any) -> tuple[int, None]:
        threading.Thread(target=report_later, args=(event.action_information,), daemon=True).start()
        return 0x0000, None

    node_ae = AE("PACSX")
    node_ae.add_supported_context(StorageCommitmentPushModel)
    node_server = node_ae.start_server(("127.0.0.1", node_port), block=False,
                                       evt_handlers=[(evt.EVT_N_ACTION, on_action)])  # fmt: skip
    modality = AE("CT05")
    modality.add_supported_context(StorageCommitmentPushModel, scu_role=True, scp_role=True)
    modality.add_requested_context(StorageCommitmentPushModel)
    modality_server = modality.start_server(("127.0.0.1", modality_port), block=False,
                                            evt_handlers=[(evt.EVT_N_EVENT_REPORT, on_report)])  # fmt: skip
    try:
        services = {
            "dicom": peers.dicom_service(in_port, {"pacsx": f"127.0.0.1:{node_port}"}),
            "outbound": outbound(out_port, {"CT05": f"127.0.0.1:{modality_port}"}),
        }
        lb = pacslb(peers.config_text(services))
        request = Dataset()
        request.TransactionUID = generate_uid()
        item = Dataset()
        item.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        item.ReferencedSOPInstanceUID = generate_uid()
        request.ReferencedSOPSequence = [item]
        assoc = modality.associate("127.0.0.1", in_port, ae_title="PACSX")
        assert assoc.is_established
        status, _ = assoc.send_n_action(request, 1, StorageCommitmentPushModel, well_known)
        assoc.release()
        assert status is not None and status.Status == 0, status

        assert reported.wait(30.0), "no N-EVENT-REPORT reached the modality"
        assert finished.wait(30.0), "the node's reporting association did not end"
        assert reports[0].TransactionUID == request.TransactionUID and sent == [0], (reports, sent)
        line = lb.wait_event("assoc", 10.0, service="outbound")
        assert (line.get("calling"), line.get("called"), line.get("outcome")) == ("PACSX", "CT05", "accepted")
    finally:
        node_server.shutdown()
        modality_server.shutdown()
