"""The control experiment: the same clients and Orthanc nodes as the pacslb tests, without pacslb.

When a pacslb test fails and this one passes, the fault is pacslb's, not the peers' or the fixtures'.
"""

from __future__ import annotations

from collections.abc import Callable

import peers
import pytest
from peers import OrthancNode, Study


@pytest.mark.peers
def test_dcmtk_and_pynetdicom_against_orthanc_directly(
    orthanc_nodes: Callable[[int], list[OrthancNode]], study: Study
) -> None:
    (node,) = orthanc_nodes(1)

    echo = peers.echoscu(node.dicom_port, called=node.aet)
    assert echo.ok, echo

    store = peers.storescu(node.dicom_port, study.directory, called=node.aet)
    assert store.ok, store
    assert node.sop_instance_uids() == set(study.sop_uids)
    assert node.instance_count() == 20

    find = peers.findscu_study(node.dicom_port, study.study_uid, called=node.aet)
    assert find.ok, find
    assert peers.count_responses(find) == 1, find
    assert study.study_uid in find.output

    worklist = peers.findscu_worklist(node.dicom_port, called=node.aet)
    assert worklist.ok, worklist
    assert peers.count_responses(worklist) == 1, worklist
    assert peers.WORKLIST_ACCESSION in worklist.output

    with peers.DicomClient(node.dicom_port, "127.0.0.2", called_ae=node.aet) as client:
        assert client.local_address.startswith("127.0.0.2:")
        assert client.echo() == 0

    # A crash and a restart on the same ports and storage: the node comes back with its data.
    node.kill()
    assert peers.tcp_connect_refused(node.dicom_port)
    node.start()
    assert node.instance_count() == 20
    assert peers.echoscu(node.dicom_port).ok


def test_log_line_parser() -> None:
    """The helper that the pacslb tests read logs with (no peers needed)."""
    line = (
        "2026-11-27T20:41:49.123Z warning health service=dicom server=pacs1 old=up new=down "
        'reason="connect: [Errno 111] Connection refused" duration=0.001'
    )
    event = peers.parse_log_line(line)
    assert event is not None
    assert (event.level, event.event) == ("warning", "health")
    assert event.fields == {
        "service": "dicom",
        "server": "pacs1",
        "old": "up",
        "new": "down",
        "reason": "connect: [Errno 111] Connection refused",
        "duration": "0.001",
    }
    conn = peers.parse_log_line(
        "2026-11-27T20:41:49.123Z info    conn service=dicom client=127.0.0.2:4242 server=pacs1 end=client_closed"
    )
    assert conn is not None
    assert conn.matches("conn", {"client": peers.client_ip("127.0.0.2"), "end": "client_closed"})
    assert not conn.matches("conn", {"client": peers.client_ip("127.0.0.3")})
    assert peers.parse_log_line("Traceback (most recent call last):") is None
