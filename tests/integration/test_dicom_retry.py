"""Association-level retry in ``mode: dicom``: the client sees only success while a node refuses.

pacslb holds the client's A-ASSOCIATE-RQ until a node accepts it. A failed connect, a *transient*
A-ASSOCIATE-RJ, an A-ABORT, a close or silence before the node answers move the same RQ to the next node;
a *permanent* rejection from a node reaches the client unchanged. The faulty nodes here are real or close
to it: a closed port, a pynetdicom SCP at its ``maximum_associations``, a pynetdicom SCP that checks the
called AE title, dcmtk's ``storescp --refuse``, and scripted sockets that abort, close or say nothing.

With smooth round robin over ``[faulty, pacs1]`` the first association always tries the faulty node first
and the second goes to pacs1, so two associations show one retry.
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import peers
import pytest
from peers import OrthancNode, PacslbProcess, ToolResult

pytestmark = pytest.mark.peers

PacslbFactory = Callable[[str], PacslbProcess]


@pytest.fixture(scope="module")
def pacs1(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancNode]:
    """The healthy node (Orthanc), shared by this module's tests."""
    cluster = peers.OrthancCluster(tmp_path_factory.mktemp("orthanc"))
    try:
        yield cluster.start(1)[0]
    finally:
        cluster.discard()


def start(pacslb: PacslbFactory, servers: dict[str, str], **kwargs: Any) -> tuple[PacslbProcess, int]:
    port = peers.free_port()
    spec = peers.dicom_service(port, servers, balance="roundrobin", **kwargs)  # check none: nodes stay "up"
    return pacslb(peers.config_text({"dicom": spec})), port


def echo_ok(port: int, calling: str) -> ToolResult:
    result = peers.echoscu(port, calling=calling)
    assert result.ok, result
    assert "Association Accepted" in result.output and "Received Echo Response (Success)" in result.output, result
    assert "Rejected" not in result.output and "Abort" not in result.output, result
    return result


def test_a_node_on_a_closed_port_is_skipped_and_every_association_succeeds(
    pacs1: OrthancNode, pacslb: PacslbFactory
) -> None:
    lb, port = start(pacslb, {"dead": f"127.0.0.1:{peers.free_port()}", "pacs1": pacs1.address})

    for _ in range(4):
        echo_ok(port, "RETRY1")

    lines = lb.wait_events("assoc", 4, timeout=5.0)
    assert {(e.get("outcome"), e.get("server")) for e in lines} == {("accepted", "pacs1")}, [e.line for e in lines]
    failed = lb.events("connect_failed", server="dead")
    assert len(failed) == 2, lb.log()
    events = lb.events()
    for fail in failed:
        (assoc,) = [e for e in lines if e.get("client") == fail.get("client")]
        assert assoc.get("retries") == "1", assoc.line
        assert events.index(fail) < events.index(assoc), "connect_failed comes before the accepted association"
    assert sorted(e.get("retries") for e in lines) == ["0", "0", "1", "1"]


def test_a_transient_rejection_from_a_busy_node_is_retried_on_the_next(
    pacs1: OrthancNode, pacslb: PacslbFactory
) -> None:
    with peers.EchoSCP("BUSY", maximum_associations=1) as busy:
        lb, port = start(pacslb, {"busy": busy.address, "pacs1": pacs1.address})
        with peers.DicomClient(busy.port, calling_ae="DIRECT") as held:  # the busy node's only association
            for _ in range(4):
                echo_ok(port, "RETRY2")
            assert held.echo() == 0

        retries = lb.wait_events("assoc_retry", 2, timeout=5.0)
        lines = lb.wait_events("assoc", 4, timeout=5.0)
        assert len(lb.events("assoc_retry")) == 2, lb.log()
        for retry in retries:
            assert retry.level == "warning", retry.line
            assert (retry.get("server"), retry.get("calling"), retry.get("attempt")) == ("busy", "RETRY2", "1")
            assert "transient" in retry.get("reason") and "2-3-2" in retry.get("reason"), retry.line
            assert "local limit exceeded" in retry.get("reason"), retry.line
        assert {(e.get("outcome"), e.get("server")) for e in lines} == {("accepted", "pacs1")}
        assert sorted(e.get("retries") for e in lines) == ["0", "0", "1", "1"]

        # Its association released, the busy node takes its turn again.
        mark = lb.mark()
        for _ in range(2):
            echo_ok(port, "RETRY2")
        after = lb.wait_events("assoc", 2, timeout=5.0, since=mark)
        assert {e.get("server") for e in after} == {"busy", "pacs1"}, [e.line for e in after]
        assert not lb.events("assoc_retry", since=mark)


def test_after_a_retry_the_modality_stays_on_the_node_that_accepted_it(
    pacs1: OrthancNode, pacslb: PacslbFactory
) -> None:
    with peers.EchoSCP("BUSY", maximum_associations=1) as busy:
        lb, port = start(
            pacslb, {"busy": busy.address, "pacs1": pacs1.address}, persistence={"type": "calling_ae", "timeout": "5m"}
        )
        echo_ok(port, "CT01")  # round robin starts with busy, which is free: CT01 is pinned there
        busy.wait_idle()  # (CT01's association counts there until busy's thread for it has ended)
        with peers.DicomClient(busy.port, calling_ae="DIRECT"):
            echo_ok(port, "CT01")  # busy refuses transiently: retried on pacs1
        echo_ok(port, "CT01")  # busy is free again, but CT01's next association follows its last one

    first, retried, later = lb.wait_events("assoc", 3, timeout=5.0)
    assert (first.get("server"), first.get("rule")) == ("busy", "balance"), first.line
    (retry,) = lb.events("assoc_retry")
    assert retry.get("server") == "busy" and "2-3-2" in retry.get("reason"), retry.line
    assert (retried.get("server"), retried.get("retries")) == ("pacs1", "1"), retried.line
    assert (later.get("server"), later.get("rule")) == ("pacs1", "persistence"), later.line


@pytest.mark.parametrize(
    ("fault", "reason"),
    [("abort", "A-ABORT before answering"), ("close", "closed before answering"), ("silent", "no answer within")],
)
def test_a_node_that_aborts_closes_or_stays_silent_is_retried(
    pacs1: OrthancNode, pacslb: PacslbFactory, fault: str, reason: str
) -> None:
    answer = peers.abort_pdu(source=2) if fault == "abort" else None
    with peers.ScriptedNode(answer, silent=fault == "silent") as faulty:
        lb, port = start(pacslb, {"faulty": faulty.address, "pacs1": pacs1.address}, timeouts={"negotiation": "500ms"})

        first = echo_ok(port, "RETRY3")
        echo_ok(port, "RETRY3")

        (retry,) = lb.wait_events("assoc_retry", 1, timeout=5.0)
        assert retry.get("server") == "faulty" and reason in retry.get("reason"), retry.line
        lines = lb.wait_events("assoc", 2, timeout=5.0)
        assert [(e.get("server"), e.get("retries")) for e in lines] == [("pacs1", "1"), ("pacs1", "0")]
        if fault == "silent":
            assert first.elapsed >= 0.45, f"the silent node should have been given 500 ms: {first}"
        # The faulty node was offered the client's own A-ASSOCIATE-RQ.
        from pynetdicom.pdu import A_ASSOCIATE_RQ

        (forwarded,) = faulty.requests
        rq = A_ASSOCIATE_RQ()
        rq.decode(forwarded)
        assert (rq.calling_ae_title, rq.called_ae_title) == ("RETRY3", "ANY-SCP")


def test_a_permanent_rejection_from_a_node_reaches_the_client_unchanged(
    pacs1: OrthancNode, pacslb: PacslbFactory
) -> None:
    with peers.EchoSCP("STRICT", require_called_aet=True) as strict:
        lb, port = start(pacslb, {"strict": strict.address, "pacs1": pacs1.address})

        refused = peers.echoscu(port, called="ANY-SCP", calling="PERM1")
        accepted = peers.echoscu(port, called="ANY-SCP", calling="PERM1")

    assert not refused.ok, refused
    for words in ("Association Rejected", "Rejected Permanent", "Service User", "Called AE Title Not Recognized"):
        assert words in refused.output, refused
    assert accepted.ok, accepted
    first, second = lb.wait_events("assoc", 2, timeout=5.0)
    assert (first.get("outcome"), first.get("by"), first.get("server")) == ("rejected", "node", "strict"), first.line
    assert first.get("detail").startswith("1-1-7"), first.line
    assert first.get("retries") == "0", first.line
    assert (second.get("outcome"), second.get("server")) == ("accepted", "pacs1"), second.line
    assert not lb.events("assoc_retry"), "a permanent rejection must not be retried"


def test_the_node_rejection_pdu_is_passed_byte_for_byte(pacs1: OrthancNode, pacslb: PacslbFactory) -> None:
    # 1-2-2 (permanent, ACSE, protocol version) is a rejection pacslb never makes up for a valid RQ.
    rj = peers.associate_rj_pdu(1, 2, 2)
    with peers.ScriptedNode(rj) as odd:
        lb, port = start(pacslb, {"odd": odd.address, "pacs1": pacs1.address})
        rq = peers.associate_rq_pdu("ANY-SCP", "RAWSCU")

        answer = peers.raw_exchange(port, rq)

    assert answer.data == rj and answer.closed, answer
    assert odd.requests == [rq], "the node must get the client's A-ASSOCIATE-RQ as sent"
    line = lb.wait_event("assoc", timeout=5.0)
    assert (line.get("outcome"), line.get("by"), line.get("server")) == ("rejected", "node", "odd"), line.line


def test_storescp_refuse_is_a_permanent_rejection_the_client_sees(
    pacs1: OrthancNode, pacslb: PacslbFactory, tmp_path: Path
) -> None:
    with peers.StoreSCP(tmp_path / "refuser", "--refuse") as refuser:
        lb, port = start(pacslb, {"refuser": refuser.address, "pacs1": pacs1.address})

        refused = peers.echoscu(port, calling="PERM2")
        accepted = peers.echoscu(port, calling="PERM2")

    assert not refused.ok, refused
    assert "Rejected Permanent, Source: Service User" in refused.output, refused
    assert "No Reason" in refused.output, refused
    assert accepted.ok, accepted
    first, second = lb.wait_events("assoc", 2, timeout=5.0)
    assert (first.get("by"), first.get("server")) == ("node", "refuser"), first.line
    assert first.get("detail").startswith("1-1-1"), first.line
    assert second.get("server") == "pacs1", second.line


def test_retries_are_bounded_and_then_the_client_hears_the_nodes_own_reason(pacslb: PacslbFactory) -> None:
    busy = peers.associate_rj_pdu(2, 3, 2)
    with peers.ScriptedNode(busy) as n1, peers.ScriptedNode(busy) as n2, peers.ScriptedNode(busy) as n3:
        lb, port = start(pacslb, {"n1": n1.address, "n2": n2.address, "n3": n3.address}, retries=1)

        refused = peers.echoscu(port, calling="BOUND")
        tried = [len(n.requests) for n in (n1, n2, n3)]

    assert not refused.ok, refused
    assert "Rejected Transient" in refused.output and "Local Limit Exceeded" in refused.output, refused
    assert sorted(tried) == [0, 1, 1], f"retries: 1 means two nodes tried, got {tried}"
    assert len(lb.wait_events("assoc_retry", 2, timeout=5.0)) == 2
    line = lb.wait_event("assoc", timeout=5.0)
    assert (line.get("outcome"), line.get("by"), line.get("retries")) == ("rejected", "node", "2"), line.line
    assert line.get("detail").startswith("2-3-2") and "most informative of 2" in line.get("detail"), line.line


def test_when_every_node_refuses_for_now_the_modality_gets_the_rejection_that_says_why(
    pacslb: PacslbFactory,
) -> None:
    """A node's "no reason given" tells a modality less than another's "local limit exceeded": that one is
    passed on, as the node sent it. With no node answering at all, pacslb's own temporary congestion."""
    vague, specific = peers.associate_rj_pdu(2, 1, 1), peers.associate_rj_pdu(2, 3, 2)
    with peers.ScriptedNode(vague) as n1, peers.ScriptedNode(specific) as n2:
        lb, port = start(pacslb, {"n1": n1.address, "n2": n2.address})
        answers = [peers.raw_exchange(port, peers.associate_rq_pdu(calling="WHY")) for _ in range(2)]
    assert [a.data for a in answers] == [specific, specific], answers
    first, second = lb.wait_events("assoc", 2, timeout=5.0)
    for line in (first, second):
        assert (line.get("by"), line.get("server"), line.get("retries")) == ("node", "n2", "2"), line.line

    with peers.ScriptedNode(None) as closer:  # closes without answering: no rejection to pass on
        lb, port = start(pacslb, {"closer": closer.address, "dead": f"127.0.0.1:{peers.free_port()}"})
        answer = peers.raw_exchange(port, peers.associate_rq_pdu(calling="WHY"))
    assert answer.data == peers.associate_rj_pdu(2, 3, 1), answer
    line = lb.wait_event("assoc", timeout=5.0)
    assert (line.get("by"), line.get("server")) == ("balancer", "-"), line.line


def test_a_hung_node_costs_an_association_its_node_answer_timeout_and_is_checked_at_once(
    pacs1: OrthancNode, pacslb: PacslbFactory, tmp_path: Path
) -> None:
    """A node stopped with SIGSTOP: its kernel still accepts the connection, the node never answers. The
    association waits ``timeouts.node_answer`` (3 s by default), not the client's negotiation time (60 s
    here, longer than echoscu's own 30 s wait, which would fail it), and succeeds on the next node; the
    hung node is checked at once (a C-ECHO check that would otherwise run once a minute) and goes down."""
    with peers.StoreSCP(tmp_path / "hung") as hung:
        check = {"type": "dicom_echo", "interval": "60s", "timeout": "2s", "fall": 1, "rise": 1}
        lb, port = start(
            pacslb, {"hung": hung.address, "pacs1": pacs1.address}, check=check, timeouts={"negotiation": "60s"}
        )
        # Servers start up; the first check runs at once: stop the node once it has answered it.
        peers.wait_for(lambda: "Association Release" in hung.log_path.read_text(), 30.0, "the first check")
        assert hung.proc is not None
        hung.proc.send_signal(signal.SIGSTOP)
        try:
            echo_ok(port, "HUNG1")  # (had pacslb waited 60 s, echoscu would have given up at 30)
            retry = lb.wait_event("assoc_retry", timeout=5.0)
            assert (retry.get("server"), retry.get("reason")) == ("hung", "no answer within 3s"), retry.line
            line = lb.wait_event("assoc", timeout=5.0)
            assert (line.get("server"), line.get("retries")) == ("pacs1", "1"), line.line
            lb.wait_event("health", 30.0, server="hung", new="down")
            echo_ok(port, "HUNG2")  # no longer offered to the hung node
            assert len(lb.events("assoc_retry")) == 1
        finally:
            hung.proc.send_signal(signal.SIGCONT)


def test_once_accepted_an_association_is_never_replayed_on_another_node(
    pacs1: OrthancNode, pacslb: PacslbFactory, tmp_path: Path
) -> None:
    study = peers.make_study(tmp_path / "one", count=1)
    with peers.StoreSCP(tmp_path / "aborter", "--abort-after") as aborter:
        lb, port = start(pacslb, {"aborter": aborter.address, "pacs1": pacs1.address})

        result = peers.storescu(port, study.files[0], calling="ONCE")

    assert "Association Accepted" in result.output, result
    assert "Abort" in result.output, result  # storescp aborted after receiving the instance
    assert not (pacs1.sop_instance_uids() & study.sop_uids), "the association was replayed on pacs1"
    line = lb.wait_event("assoc", timeout=5.0)
    assert (line.get("outcome"), line.get("server")) == ("accepted", "aborter"), line.line
    assert line.get("end") in {"client_closed", "server_closed"}, line.line  # whoever closed first after the abort
    assert not lb.events("assoc_retry")
