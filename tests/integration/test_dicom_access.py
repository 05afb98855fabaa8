"""What pacslb refuses at the edge in ``mode: dicom``, and how a modality hears it.

Access control (``dicom.allowed_calling_ae``, ``dicom.called_ae``) and the balancer's own rejections (no
usable node, ``maxconn`` reached) are answered with the A-ASSOCIATE-RJ PS3.8 prescribes, never a TCP reset:
dcmtk prints the result, source and reason; a pynetdicom client reads them from the A-ASSOCIATE-RJ
primitive; pacslb logs ``assoc ... outcome=rejected by=balancer`` with the three numbers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import peers
import pytest
from peers import LogEvent, OrthancNode, PacslbProcess, ToolResult

pytestmark = pytest.mark.peers

NodesFactory = Callable[[int], list[OrthancNode]]
PacslbFactory = Callable[[str], PacslbProcess]

ACCESS = {
    "allowed_calling_ae": ["CT*", "MR01", {"ae": "US*", "sources": ["127.0.5.0/24"]}],
    "called_ae": ["PACSLB", "ANY-SCP"],
}


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancNode]:
    """One Orthanc node behind the access-control service (shared by this module's tests)."""
    cluster = peers.OrthancCluster(tmp_path_factory.mktemp("orthanc"))
    try:
        yield cluster.start(1)[0]
    finally:
        cluster.discard()


def start_guarded(pacslb: PacslbFactory, node: OrthancNode) -> tuple[PacslbProcess, int]:
    port = peers.free_port()
    spec = peers.dicom_service(port, [node], dicom=ACCESS)
    return pacslb(peers.config_text({"dicom": spec})), port


def assert_rejected(result: ToolResult, *words: str) -> None:
    """echoscu printed an A-ASSOCIATE-RJ with these words and exited with an error (no echo happened)."""
    assert not result.ok, result
    assert "Association Rejected" in result.output, result
    for word in words:
        assert word in result.output, f"{word!r} missing from:\n{result}"
    assert "Echo Response" not in result.output, result


def rejected_line(lb: PacslbProcess, since: int, calling: str, detail: str) -> LogEvent:
    line = lb.wait_event("assoc", timeout=5.0, since=since, calling=calling)
    assert line.level == "warning", line.line
    assert line.get("outcome") == "rejected", line.line
    assert line.get("by") == "balancer", line.line
    assert line.get("detail").startswith(detail), line.line
    assert line.get("server") == "-", line.line
    assert line.get("end") == "rejected", line.line
    return line


def test_calling_ae_not_allowed_is_rejected_permanently(node: OrthancNode, pacslb: PacslbFactory) -> None:
    lb, port = start_guarded(pacslb, node)

    refused = peers.echoscu(port, calling="XR01")

    assert_rejected(refused, "Rejected Permanent", "Service User", "Calling AE Title Not Recognized")
    rejected_line(lb, 0, "XR01", "1-1-3")
    # Globs and exact titles let their modalities in; titles compare case-sensitively.
    for calling in ("CT01", "CTX", "MR01"):
        allowed = peers.echoscu(port, calling=calling)
        assert allowed.ok and "Received Echo Response (Success)" in allowed.output, allowed
    for calling in ("MR02", "ct01"):
        mark = lb.mark()
        assert_rejected(peers.echoscu(port, calling=calling), "Calling AE Title Not Recognized")
        rejected_line(lb, mark, calling, "1-1-3")


def test_called_ae_not_accepted_is_rejected_permanently(node: OrthancNode, pacslb: PacslbFactory) -> None:
    lb, port = start_guarded(pacslb, node)

    refused = peers.echoscu(port, called="SOMEPACS", calling="CT01")

    assert_rejected(refused, "Rejected Permanent", "Service User", "Called AE Title Not Recognized")
    line = rejected_line(lb, 0, "CT01", "1-1-7")
    assert line.get("called") == "SOMEPACS", line.line
    accepted = peers.echoscu(port, called="PACSLB", calling="CT01")
    assert accepted.ok, accepted


def test_an_ae_bound_to_source_networks_is_refused_from_another_address(
    node: OrthancNode, pacslb: PacslbFactory
) -> None:
    lb, port = start_guarded(pacslb, node)

    inside = peers.attempt_association(port, "127.0.5.7", calling_ae="US01")
    outside = peers.attempt_association(port, "127.0.0.2", calling_ae="US01")
    from_dcmtk = peers.echoscu(port, calling="US01")  # dcmtk connects from 127.0.0.1, outside 127.0.5.0/24

    assert inside.established and inside.echo_status == 0, inside
    assert outside.rejected and not outside.established, outside
    assert outside.rejection == (1, 1, 3), f"expected rejected permanent, service user, calling AE: {outside}"
    assert_rejected(from_dcmtk, "Rejected Permanent", "Calling AE Title Not Recognized")
    line = lb.wait_event("assoc", timeout=5.0, client=outside.local_address)
    assert (line.get("outcome"), line.get("by"), line.get("calling")) == ("rejected", "balancer", "US01"), line.line
    assert line.get("detail").startswith("1-1-3"), line.line
    ok = lb.wait_event("assoc", timeout=5.0, client=inside.local_address)
    assert (ok.get("outcome"), ok.get("server")) == ("accepted", node.name), ok.line


def test_a_reload_lets_a_new_modality_in_and_locks_it_out_again(node: OrthancNode, pacslb: PacslbFactory) -> None:
    port = peers.free_port()

    def config(allowed: list[str]) -> str:
        return peers.config_text({"dicom": peers.dicom_service(port, [node], dicom={"allowed_calling_ae": allowed})})

    lb = pacslb(config(["CT*"]))
    assert_rejected(peers.echoscu(port, calling="MR07"), "Calling AE Title Not Recognized")

    mark = lb.mark()
    lb.reload(config(["CT*", "MR07"]))
    lb.wait_event("reloaded", timeout=5.0, since=mark)
    let_in = peers.echoscu(port, calling="MR07")
    assert let_in.ok, let_in

    mark = lb.mark()
    lb.reload(config(["CT*"]))
    lb.wait_event("reloaded", timeout=5.0, since=mark)
    assert_rejected(peers.echoscu(port, calling="MR07"), "Calling AE Title Not Recognized")
    assert peers.echoscu(port, calling="CT01").ok


def test_no_usable_node_is_a_transient_temporary_congestion(orthanc_nodes: NodesFactory, pacslb: PacslbFactory) -> None:
    nodes = orthanc_nodes(2)
    port = peers.free_port()
    lb = pacslb(peers.config_text({"dicom": peers.dicom_service(port, nodes, check=peers.DICOM_ECHO_CHECK)}))
    assert peers.echoscu(port).ok

    for n in nodes:
        n.kill()
    for n in nodes:
        lb.wait_event("health", timeout=5.0, server=n.name, new="down")
    mark = lb.mark()
    refused = peers.echoscu(port, calling="CT01")

    assert_rejected(refused, "Rejected Transient", "Service Provider (Presentation Related)", "Temporary Congestion")
    rejected_line(lb, mark, "CT01", "2-3-1")
    assert not lb.events("connect_failed", since=mark), "down nodes should not be tried"

    # The modality retries later, as a transient rejection tells it to: once a node is back, it gets through.
    nodes[0].start()
    lb.wait_event("health", timeout=5.0, server=nodes[0].name, new="up")
    again = peers.echoscu(port, calling="CT01")
    assert again.ok, again


def test_every_node_failing_to_connect_is_a_transient_temporary_congestion(pacslb: PacslbFactory) -> None:
    closed = {"dead1": f"127.0.0.1:{peers.free_port()}", "dead2": f"127.0.0.1:{peers.free_port()}"}
    port = peers.free_port()
    lb = pacslb(peers.config_text({"dicom": peers.dicom_service(port, closed)}))  # check none: both "up"

    refused = peers.echoscu(port, calling="CT01")

    assert_rejected(refused, "Rejected Transient", "Temporary Congestion")
    line = rejected_line(lb, 0, "CT01", "2-3-1")
    assert line.get("retries") == "2", line.line
    failed = lb.wait_events("connect_failed", 2, timeout=5.0)
    assert {e.get("server") for e in failed} == {"dead1", "dead2"}


def test_maxconn_reached_is_a_transient_local_limit_exceeded(node: OrthancNode, pacslb: PacslbFactory) -> None:
    port = peers.free_port()
    lb = pacslb(peers.config_text({"dicom": peers.dicom_service(port, [node], maxconn=1)}))

    with peers.DicomClient(port, "127.0.0.2", calling_ae="CT01") as held:
        refused = peers.echoscu(port, calling="CT02")
        assert held.echo() == 0, "the association already open must go on undisturbed"

    assert_rejected(refused, "Rejected Transient", "Service Provider (Presentation Related)", "Local Limit Exceeded")
    rejected_line(lb, 0, "CT02", "2-3-2")
    after = peers.echoscu(port, calling="CT02")
    assert after.ok, after
