"""Bad input on a ``mode: dicom`` service: what a broken or hostile client gets, and that nobody else notices.

A plain socket sends what no modality would: a first PDU of the wrong type, an oversized length, garbage,
a truncated RQ, nothing at all. pacslb answers with an A-ABORT (10 bytes, type 0x07, source 2 = service
provider, with the PS3.8 reason) or the A-ASSOCIATE-RJ PS3.8 prescribes, closes, and logs an ``assoc``
line. All tests share one pacslb process: after each, a normal echoscu through it must still succeed.
"""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import peers
import pytest
from peers import PacslbProcess, RawAnswer

pytestmark = pytest.mark.peers

NEGOTIATION = 0.5  # timeouts.negotiation of the service under test


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[PacslbProcess, int]]:
    """One pacslb (negotiation timeout 500 ms) in front of one Orthanc node, for the whole module."""
    cluster = peers.OrthancCluster(tmp_path_factory.mktemp("orthanc"))
    lb: PacslbProcess | None = None
    try:
        nodes = cluster.start(1)
        port = peers.free_port()
        spec = peers.dicom_service(port, nodes, timeouts={"negotiation": f"{NEGOTIATION * 1000:g}ms"})
        lb = PacslbProcess(tmp_path_factory.mktemp("pacslb"), peers.config_text({"dicom": spec})).start()
        yield lb, port
    finally:
        if lb is not None:
            lb.stop()
        cluster.discard()


def still_serving(lb: PacslbProcess, port: int) -> None:
    assert lb.running(), f"pacslb exited:\n{lb.log()}"
    mark = lb.mark()
    result = peers.echoscu(port, calling="AFTERBAD")
    assert result.ok and "Received Echo Response (Success)" in result.output, f"{result}\n{lb.log()}"
    # Its line is written as the association ends, which can be after echoscu has returned: wait for it, so
    # that the next test's first line is its own (the module's tests share this pacslb).
    lb.wait_event("assoc", 10.0, since=mark, calling="AFTERBAD")


def assert_abort(answer: RawAnswer, reason: int) -> None:
    """Exactly one A-ABORT from the service provider with this reason, then the connection closed."""
    assert answer.data == peers.abort_pdu(source=2, reason=reason), answer
    assert answer.closed, answer


def logged(lb: PacslbProcess, since: int, outcome: str) -> peers.LogEvent:
    line = lb.wait_event("assoc", timeout=5.0, since=since)
    assert (line.get("outcome"), line.get("by"), line.get("server")) == (outcome, "balancer", "-"), line.line
    assert line.get("detail"), line.line
    assert line.level == "warning", line.line
    return line


def with_length(pdu: bytes, length: int) -> bytes:
    return pdu[:2] + struct.pack(">I", length) + pdu[6:]


RQ = peers.associate_rq_pdu("ANY-SCP", "BADSCU")
# The application context item starts at byte 74: type 0x10, reserved, 2-byte length, then its UID.
RQ_ITEM_TOO_LONG = RQ[:76] + struct.pack(">H", 0x7FFF) + RQ[78:]
P_DATA_TF = bytes([0x04, 0]) + struct.pack(">I", 8) + struct.pack(">I", 4) + bytes([1, 0x03, 0, 0])


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        pytest.param(P_DATA_TF, 2, id="p-data-tf-first: unexpected PDU"),
        pytest.param(peers.abort_pdu(), 2, id="a-abort-first: unexpected PDU"),
        pytest.param(bytes([0x09, 0, 0, 0, 0, 4, 0, 0, 0, 0]), 1, id="pdu-type-9: unrecognized PDU"),
        pytest.param(b"GET / HTTP/1.1\r\nHost: pacs\r\n\r\n", 1, id="http-request: unrecognized PDU"),
        pytest.param(bytes(range(256)) * 4, 1, id="binary-garbage: unrecognized PDU"),
        pytest.param(with_length(RQ[:80], 300 * 1024), 6, id="rq-length-300KiB: invalid parameter"),
        pytest.param(with_length(RQ, 0xFFFFFFFF), 6, id="rq-length-4GiB: invalid parameter"),
        pytest.param(with_length(RQ[:40], 20), 6, id="rq-shorter-than-fixed-part: invalid parameter"),
        pytest.param(RQ_ITEM_TOO_LONG, 6, id="item-longer-than-rq: invalid parameter"),
    ],
)
def test_malformed_first_pdu_gets_an_a_abort(service: tuple[PacslbProcess, int], payload: bytes, reason: int) -> None:
    lb, port = service
    mark = lb.mark()

    answer = peers.raw_exchange(port, payload)

    assert_abort(answer, reason)
    assert answer.elapsed < 2.0, f"the abort should come at once, not after a timeout: {answer}"
    logged(lb, mark, "aborted")
    still_serving(lb, port)


@pytest.mark.parametrize(
    ("payload", "rejection", "detail"),
    [
        pytest.param(peers.associate_rq_pdu(version=2), (1, 2, 2), "1-2-2", id="protocol-version-2"),
        pytest.param(peers.associate_rq_pdu(version=0), (1, 2, 2), "1-2-2", id="protocol-version-0"),
        pytest.param(peers.associate_rq_pdu(calling=" "), (1, 1, 3), "1-1-3", id="blank-calling-ae"),
        pytest.param(peers.associate_rq_pdu(called=""), (1, 1, 7), "1-1-7", id="blank-called-ae"),
    ],
)
def test_an_rq_the_standard_rejects_gets_that_a_associate_rj(
    service: tuple[PacslbProcess, int], payload: bytes, rejection: tuple[int, int, int], detail: str
) -> None:
    lb, port = service
    mark = lb.mark()

    answer = peers.raw_exchange(port, payload)

    assert answer.data == peers.associate_rj_pdu(*rejection), answer
    assert answer.closed, answer
    line = logged(lb, mark, "rejected")
    # docs/configuration.md: a rejected association's detail is result-source-reason, as for edge rejections.
    assert line.get("detail").startswith(detail), f"detail should start with {detail}: {line.line}"
    still_serving(lb, port)


@pytest.mark.parametrize("payload", [pytest.param(b"", id="nothing"), pytest.param(RQ[:50], id="half-an-rq")])
def test_silence_gets_an_a_abort_after_the_negotiation_timeout(
    service: tuple[PacslbProcess, int], payload: bytes
) -> None:
    lb, port = service
    mark = lb.mark()

    answer = peers.raw_exchange(port, payload)

    assert_abort(answer, 0)
    assert answer.first_byte_after is not None
    assert NEGOTIATION * 0.9 <= answer.first_byte_after <= NEGOTIATION + 1.0, answer
    line = logged(lb, mark, "aborted")
    assert "no A-ASSOCIATE-RQ" in line.get("detail"), line.line
    still_serving(lb, port)


def read_pdu(sock: socket.socket) -> bytes:
    """One whole PDU, framed by its length field (bounded by the socket's timeout)."""
    data = b""
    while len(data) < 6 or len(data) < 6 + int.from_bytes(data[2:6], "big"):
        chunk = sock.recv(65536)
        assert chunk, f"connection closed after {data.hex(' ')}"
        data += chunk
    return data


def test_an_rq_dribbled_in_small_pieces_is_framed_and_served(service: tuple[PacslbProcess, int]) -> None:
    lb, port = service
    mark = lb.mark()

    with socket.create_connection(("127.0.0.1", port), timeout=5.0) as sock:
        for start in range(0, len(RQ), 16):  # 12 pieces over about 0.1 s, within the 500 ms negotiation
            sock.sendall(RQ[start : start + 16])
            time.sleep(0.01)
        ac = read_pdu(sock)
        sock.sendall(bytes([0x05, 0, 0, 0, 0, 4, 0, 0, 0, 0]))  # A-RELEASE-RQ
        rp = read_pdu(sock)

    assert ac[0] == 0x02, f"expected an A-ASSOCIATE-AC, got {ac.hex(' ')}"
    assert rp[0] == 0x06, f"expected an A-RELEASE-RP, got {rp.hex(' ')}"
    line = lb.wait_event("assoc", timeout=5.0, since=mark)
    assert (line.get("outcome"), line.get("calling")) == ("accepted", "BADSCU"), line.line


def test_a_client_that_leaves_before_its_rq_is_logged_as_closed(service: tuple[PacslbProcess, int]) -> None:
    lb, port = service
    mark = lb.mark()

    with socket.create_connection(("127.0.0.1", port), timeout=5.0) as sock:
        sock.sendall(RQ[:30])

    line = lb.wait_event("assoc", timeout=5.0, since=mark)
    assert line.get("outcome") == "closed", line.line
    still_serving(lb, port)


def test_silent_clients_do_not_hold_up_anyone_else(tmp_path: Path) -> None:
    """Five connections that never send their A-ASSOCIATE-RQ, held open for far longer than echoscu waits
    (negotiation timeout 60 s; echoscu gives up after 10 s): echoscu is served while they
    are still open, so it was not queued behind them."""
    with peers.EchoSCP("PACS1") as node:
        port = peers.free_port()
        spec = peers.dicom_service(port, {"pacs1": node.address}, timeouts={"negotiation": "60s"})
        lb = PacslbProcess(tmp_path / "pacslb", peers.config_text({"dicom": spec})).start()
        try:
            silent = [socket.create_connection(("127.0.0.1", port), timeout=5.0) for _ in range(5)]
            try:
                result = peers.echoscu(port, calling="BUSYDAY")
                assert result.ok, result
                for sock in silent:  # still open: pacslb neither answered nor closed them meanwhile
                    sock.setblocking(False)
                    with pytest.raises(BlockingIOError):
                        sock.recv(1)
            finally:
                for sock in silent:
                    sock.close()
            lines = lb.wait_events("assoc", 6, timeout=15.0)
            assert [e.get("outcome") for e in lines].count("accepted") == 1, [e.line for e in lines]
        finally:
            lb.stop()
