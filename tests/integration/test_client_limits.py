"""Per-client limits (``limits``): one greedy client cannot deny service to the others.

In each mode a greedy client on 127.0.0.2 either holds hundreds of idle connections (more than the
service's ``maxconn`` would let everyone share without the limit) or opens connections as fast as it
can; a second client on 127.0.0.3 must be served meanwhile, the greedy one must get the documented answer
(tcp: closed at once; dicom: A-ASSOCIATE-RJ 2-3-2; http: 429 with Retry-After), and the log must say so
in a few ``client_limited`` lines with counts, not a line per refused connection. dicom mode also bounds
the associations of one calling AE title and the AE titles one client may create persistence entries for.
"""

from __future__ import annotations

import asyncio
import contextlib
import select
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import peers
import pytest
from peers import EchoSCP, NginxNode, PacslbProcess
from test_http_proxy import PacslbFactory

#: Bound on every wait (a shared 2-core machine: generous, and never a sleep).
WAIT = 30.0
GREEDY, OTHER = "127.0.0.2", "127.0.0.3"
#: The default ``limits.client_maxconn``.
DEFAULT_CLIENT_MAXCONN = 256
#: Connections the greedy client holds: more than the default per-client limit and than maxconn below.
HELD = 320
MAXCONN = 300


class EchoNode:
    """A tcp node on a free loopback port that echoes, on its own event loop in a thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.port = peers.free_port()
        ready = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(ready,), daemon=True)
        self.thread.start()
        assert ready.wait(10), "echo node did not start"

    def _run(self, ready: threading.Event) -> None:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError):
                while data := await reader.read(65536):
                    writer.write(data)
                    await writer.drain()
            writer.close()

        async def main() -> asyncio.Server:
            return await asyncio.start_server(handle, "127.0.0.1", self.port, backlog=1024)

        server = self.loop.run_until_complete(main())
        ready.set()
        try:
            self.loop.run_forever()
        finally:
            server.close()

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture
def node() -> Iterator[EchoNode]:
    echo = EchoNode()
    yield echo
    echo.stop()


def connect_from(source: str, port: int, timeout: float = WAIT) -> socket.socket:
    sock = socket.socket()
    sock.settimeout(timeout)
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", port))
    return sock


def round_trip(port: int, source: str, payload: bytes = b"ping") -> bytes:
    """One client from ``source``: connect, send, read the echo (empty: pacslb closed it)."""
    with connect_from(source, port) as sock:
        try:
            sock.sendall(payload)
            got = b""
            while len(got) < len(payload):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                got += chunk
        except ConnectionResetError:
            return b""
    return got


def hold(port: int, source: str, count: int) -> list[socket.socket]:
    """``count`` idle connections from ``source``, each connected (the kernel completes them)."""
    return [connect_from(source, port) for _ in range(count)]


def rejection_to(port: int, source: str, calling: str) -> bytes:
    """The first 10 bytes pacslb answers an A-ASSOCIATE-RQ from ``source`` with (an A-ASSOCIATE-RJ is 10)."""
    with connect_from(source, port) as sock:
        sock.sendall(peers.associate_rq_pdu(calling=calling))
        answer = b""
        while len(answer) < 10 and (more := sock.recv(10 - len(answer))):
            answer += more
        return answer


def closed_by_peer(sock: socket.socket) -> bool | None:
    """True when the peer closed ``sock`` (end of stream or reset), False when it sent data, None: idle."""
    readable, _, _ = select.select([sock], [], [], 0)
    if not readable:
        return None
    try:
        return sock.recv(65536, socket.MSG_PEEK) == b""
    except ConnectionResetError:
        return True


def count_refused(held: list[socket.socket]) -> int:
    """Connections pacslb closed or answered (those it admitted stay silent: nobody sent anything)."""
    return sum(1 for s in held if closed_by_peer(s) is not None)


def refused_counts(lb: PacslbProcess, since: int = 0, **criteria: str) -> int:
    """Refusals the ``client_limited`` lines matching ``criteria`` add up to."""
    return sum(int(e.get("count")) for e in lb.events("client_limited", since, **criteria))


def metric(admin: int, name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` with these labels on the admin listener's /metrics page."""
    text = httpx.get(f"http://127.0.0.1:{admin}/metrics", timeout=WAIT).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items())
    )


class Flood:
    """A greedy client on a thread: ``attempt()`` one new connection after another, as fast as it can,
    until it saw ``refusals`` refused ones (or ``WAIT`` passed, or it is stopped). It counts both."""

    def __init__(self, attempt: Any, refusals: int = 50) -> None:
        self.attempt = attempt
        self.wanted = refusals
        self.admitted = self.refused = 0
        self.first_refusal = threading.Event()
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.started = self.ended = 0.0
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        self.started = time.monotonic()
        try:
            while not self.stop.is_set() and self.refused < self.wanted and time.monotonic() - self.started < WAIT:
                if self.attempt():
                    self.admitted += 1
                else:
                    self.refused += 1
                    self.first_refusal.set()
        except BaseException as exc:  # reported by the test
            self.error = exc
        finally:
            self.ended = time.monotonic()
            self.first_refusal.set()

    def __enter__(self) -> Flood:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(WAIT)
        assert not self.thread.is_alive()


# -------------------------------------------------------------------------------------------------- tcp


def tcp_config(port: int, node: EchoNode, admin: int, **extra: Any) -> str:
    spec = peers.service(port, {"pacs1": f"127.0.0.1:{node.port}"}, check={"type": "none"}, **extra)
    return peers.config_text({"svc": spec}, workers=1, shutdown_grace="1s", admin={"listen": f"127.0.0.1:{admin}"})


def test_tcp_a_client_holding_hundreds_of_connections_leaves_room_for_the_others(
    pacslb: PacslbFactory, node: EchoNode
) -> None:
    """Default limits: the greedy client gets 256 of the 300 slots, the rest of its connections are closed
    at once, and another client is served; once the greedy one lets go, it is served again."""
    port, admin = peers.free_port(), peers.free_port()
    lb = pacslb(tcp_config(port, node, admin, maxconn=MAXCONN))
    held = hold(port, GREEDY, HELD)
    try:
        refused = HELD - DEFAULT_CLIENT_MAXCONN
        peers.wait_for(lambda: count_refused(held) >= refused, WAIT, "the connections past the limit to be closed")
        assert round_trip(port, OTHER) == b"ping"  # the other client is served at once
        # The greedy client's own connections within the limit are relayed (pick the first and the last).
        states = [closed_by_peer(s) for s in held]
        assert states.count(True) == refused and states.count(None) == DEFAULT_CLIENT_MAXCONN, states
        for sock in (held[0], held[DEFAULT_CLIENT_MAXCONN - 1]):
            sock.sendall(b"mine")
            assert sock.recv(16) == b"mine"
        assert round_trip(port, GREEDY) == b""  # a new one of its own is closed at once
        # A few lines with counts (the first at once, the rest within the log interval), not one each.
        peers.wait_for(
            lambda: refused_counts(lb, client=GREEDY, limit="client_maxconn") == refused + 1,
            WAIT,
            "client_limited lines adding up to every refusal",
        )
        lines = lb.events("client_limited")
        assert 2 <= len(lines) <= 4, [e.line for e in lines]
        first = lines[0]
        assert (first.level, first.get("count"), first.get("max"), first.get("answer")) == (
            "warning",
            "1",
            "256",
            "closed",
        ), first.line
        assert not lb.events("client_limited", client=OTHER)
        # The admin listener is no service: the greedy address reaches it as ever, and it counts.
        with httpx.Client(transport=httpx.HTTPTransport(local_address=GREEDY)) as client:
            assert client.get(f"http://127.0.0.1:{admin}/healthz", timeout=WAIT).status_code == 200
        assert metric(admin, "pacslb_service_rejections_total", reason="limit_client_maxconn") == refused + 1
    finally:
        for sock in held:
            sock.close()
    # Its connections released, the greedy client is served again.
    peers.wait_for(
        lambda: len(lb.events("conn", client=peers.client_ip(GREEDY))) >= DEFAULT_CLIENT_MAXCONN,
        WAIT,
        "pacslb to see the held connections end",
    )
    assert round_trip(port, GREEDY) == b"ping"


def test_tcp_a_client_opening_connections_as_fast_as_it_can_is_held_to_its_rate(
    pacslb: PacslbFactory, node: EchoNode
) -> None:
    port, admin = peers.free_port(), peers.free_port()
    lb = pacslb(tcp_config(port, node, admin, limits={"client_rate": "20/s", "client_burst": 20}))

    def attempt() -> bool:
        return round_trip(port, GREEDY, b"x") == b"x"

    with Flood(attempt) as flood:
        assert flood.first_refusal.wait(WAIT)
        # While it floods, the other client is served every time.
        assert [round_trip(port, OTHER, b"%d" % i) for i in range(10)] == [b"%d" % i for i in range(10)]
    assert flood.error is None, flood.error
    assert flood.refused >= 1
    # No more admitted than the bucket allows over the time the flood lasted (a bound, not a timing).
    assert flood.admitted <= 20 + 20 * (flood.ended - flood.started) + 1, (flood.admitted, flood.refused)
    peers.wait_for(
        lambda: refused_counts(lb, client=GREEDY, limit="client_rate") == flood.refused,
        WAIT,
        "client_limited lines adding up to every refusal",
    )
    assert len(lb.events("client_limited")) <= 2 + (flood.ended - flood.started) / 5.0 + 1
    assert lb.events("client_limited")[0].get("max") == "20/s,burst=20"


# ------------------------------------------------------------------------------------------------ dicom


def test_dicom_a_client_holding_hundreds_of_connections_is_rejected_and_the_others_are_served(
    pacslb: PacslbFactory,
) -> None:
    """The greedy client holds 320 connections silent in negotiation; past 256 the next association it asks
    for gets A-ASSOCIATE-RJ (2, 3, 2), and a modality on another address associates and echoes."""
    with EchoSCP() as scp:
        port = peers.free_port()
        spec = peers.dicom_service(port, {"pacs1": scp.address}, maxconn=MAXCONN, timeouts={"negotiation": "60s"})
        lb = pacslb(peers.config_text({"dicom": spec}, workers=1, shutdown_grace="1s"))
        held = hold(port, GREEDY, HELD)
        try:
            refused = HELD - DEFAULT_CLIENT_MAXCONN
            # Silent connections past the limit are closed unanswered (the answer needs their request).
            peers.wait_for(lambda: count_refused(held) >= refused, WAIT, "the connections past the limit to close")
            other = peers.attempt_association(port, OTHER, calling_ae="CT01")
            assert other.established and other.echo_status == 0, other
            # (Read off the wire: pynetdicom, told no this fast, can report its own close after the
            # A-ASSOCIATE-RJ as an abort: its requestor thread checks the transport after its reader
            # thread has acted on the rejection.)
            assert rejection_to(port, GREEDY, "CT99") == peers.associate_rj_pdu(2, 3, 2)
            peers.wait_for(
                lambda: refused_counts(lb, client=GREEDY, limit="client_maxconn") == refused + 1,
                WAIT,
                "client_limited lines adding up to every refusal",
            )
            first = lb.events("client_limited")[0]
            assert first.get("answer") == "A-ASSOCIATE-RJ", first.line
            assert not lb.events("assoc", client=peers.client_ip(GREEDY), outcome="rejected")
        finally:
            for sock in held:
                sock.close()


def test_dicom_a_flood_of_associations_is_rejected_at_its_rate(pacslb: PacslbFactory) -> None:
    with EchoSCP() as scp:
        port = peers.free_port()
        spec = peers.dicom_service(port, {"pacs1": scp.address}, limits={"client_rate": "10/s", "client_burst": 5})
        lb = pacslb(peers.config_text({"dicom": spec}, workers=1, shutdown_grace="1s"))
        rejections: list[bytes] = []

        def attempt() -> bool:
            with connect_from(GREEDY, port) as sock:
                sock.sendall(peers.associate_rq_pdu(calling="GREEDY"))
                head = sock.recv(6)
                if not head:
                    return False  # closed unanswered: more of its connections than are told at once
                if head[:1] == bytes([peers.PDU_ASSOCIATE_RJ]):
                    rejections.append(head + sock.recv(4))
                    return False
                return True  # an A-ASSOCIATE-AC: closing here aborts it, as a crashing client would

        with Flood(attempt, refusals=20) as flood:
            assert flood.first_refusal.wait(WAIT)
            for _ in range(3):
                other = peers.attempt_association(port, OTHER, calling_ae="MR01")
                assert other.established and other.echo_status == 0, other
        assert flood.error is None, flood.error
        assert rejections and all(r == peers.associate_rj_pdu(2, 3, 2) for r in rejections), rejections[:3]
        assert flood.admitted <= 5 + 10 * (flood.ended - flood.started) + 1
        peers.wait_for(
            lambda: refused_counts(lb, client=GREEDY, limit="client_rate") >= len(rejections),
            WAIT,
            "client_limited lines adding up to the rejections",
        )


def test_dicom_associations_per_calling_ae_and_ae_titles_per_client(pacslb: PacslbFactory) -> None:
    with EchoSCP() as scp:
        port = peers.free_port()
        spec = peers.dicom_service(
            port,
            {"pacs1": scp.address},
            persistence={"type": "calling_ae", "timeout": "30m"},
            limits={"calling_ae_maxconn": 2, "client_ae_titles": 3},
        )
        lb = pacslb(peers.config_text({"dicom": spec}, workers=1, shutdown_grace="1s"))
        # Two associations of CT1 open (from two addresses): a third CT1 is rejected, from anywhere.
        with (
            peers.DicomClient(port, "127.0.0.4", calling_ae="CT1"),
            peers.DicomClient(port, "127.0.0.5", calling_ae="CT1"),
        ):
            third = peers.attempt_association(port, "127.0.0.6", calling_ae="CT1")
            assert third.rejected and third.rejection == (2, 3, 2), third
            assert peers.attempt_association(port, "127.0.0.6", calling_ae="MR1").echo_status == 0
        line = lb.wait_event("client_limited", WAIT, limit="calling_ae_maxconn")
        assert (line.get("calling"), line.get("max"), line.get("answer")) == ("CT1", "2", "A-ASSOCIATE-RJ"), line.line
        assert peers.attempt_association(port, "127.0.0.6", calling_ae="CT1").echo_status == 0  # released
        # One address inventing AE titles: the fourth distinct one (each would be a persistence entry) is
        # rejected; the titles it has still work, and another address is not affected.
        for ae in ("AE1", "AE2", "AE3"):
            assert peers.attempt_association(port, "127.0.0.7", calling_ae=ae).echo_status == 0
        fourth = peers.attempt_association(port, "127.0.0.7", calling_ae="AE4")
        assert fourth.rejected and fourth.rejection == (2, 3, 2), fourth
        assert peers.attempt_association(port, "127.0.0.7", calling_ae="AE2").echo_status == 0
        assert peers.attempt_association(port, "127.0.0.8", calling_ae="AE4").echo_status == 0
        line = lb.wait_event("client_limited", WAIT, limit="client_ae_titles")
        assert (line.get("client"), line.get("max")) == ("127.0.0.7", "3"), line.line


# ------------------------------------------------------------------------------------------------- http


@pytest.fixture
def web(tmp_path: Path) -> Iterator[list[NginxNode]]:
    nodes = peers.start_nginx(tmp_path / "nginx", 1)
    yield nodes
    for n in nodes:
        n.stop()


def http_start(pacslb: PacslbFactory, nodes: list[NginxNode], **extra: Any) -> tuple[PacslbProcess, int]:
    port = peers.free_port()
    spec = peers.http_service(port, nodes, persistence={"type": "source_ip"}, **extra)
    return pacslb(peers.http_config({"web": spec})), port


def get_from(source: str, port: int) -> httpx.Response:
    with httpx.Client(transport=httpx.HTTPTransport(local_address=source), timeout=WAIT) as client:
        return client.get(f"http://127.0.0.1:{port}/whoami")


@pytest.mark.peers
def test_http_a_client_holding_hundreds_of_connections_gets_429_and_the_others_are_served(
    pacslb: PacslbFactory, web: list[NginxNode]
) -> None:
    lb, port = http_start(
        pacslb,
        web,
        maxconn=MAXCONN,
        http={"timeouts": {"request_head": "60s", "keep_alive": "60s"}},
    )
    held = hold(port, GREEDY, HELD)
    try:
        refused = HELD - DEFAULT_CLIENT_MAXCONN
        peers.wait_for(lambda: count_refused(held) >= refused, WAIT, "the connections past the limit to close")
        assert get_from(OTHER, port).status_code == 200
        answered = 0
        for sock in held:
            if closed_by_peer(sock) is not None:
                data = sock.recv(4096, socket.MSG_PEEK)
                if data:
                    answered += 1
                    head = data.split(b"\r\n\r\n", 1)[0]
                    assert head.startswith(b"HTTP/1.1 429 Too Many Requests\r\n"), data
                    assert b"\r\nRetry-After: 1\r\n" in head and b"\r\nConnection: close" in head, data
        assert 1 <= answered <= 4, answered  # a few are told, the rest of the flood is closed

        def told() -> httpx.Response | None:
            """A new request of the greedy client, once pacslb holds no answered socket of it (1 s)."""
            with contextlib.suppress(httpx.TransportError):
                return get_from(GREEDY, port)
            return None

        greedy = peers.wait_for(told, WAIT, "a new connection of the greedy client to be answered")
        assert greedy.status_code == 429 and greedy.headers["retry-after"] == "1", greedy
        peers.wait_for(
            lambda: refused_counts(lb, client=GREEDY, limit="client_maxconn") >= refused + 1,
            WAIT,
            "client_limited lines adding up to every refusal",
        )
        assert lb.events("client_limited")[0].get("answer") == "429"
    finally:
        for sock in held:
            sock.close()


@pytest.mark.peers
def test_http_a_client_opening_connections_as_fast_as_it_can_gets_429(
    pacslb: PacslbFactory, web: list[NginxNode]
) -> None:
    lb, port = http_start(pacslb, web, limits={"client_rate": "20/s", "client_burst": 20})
    statuses: list[int] = []

    def attempt() -> bool:
        with connect_from(GREEDY, port) as sock:
            sock.sendall(b"GET /whoami HTTP/1.1\r\nHost: pacs\r\nConnection: close\r\n\r\n")
            data = b""
            with contextlib.suppress(ConnectionResetError):
                while chunk := sock.recv(65536):
                    data += chunk
        status = int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/1.1 ") else 0
        statuses.append(status)
        return status == 200

    with Flood(attempt) as flood:
        assert flood.first_refusal.wait(WAIT)
        for _ in range(10):
            assert get_from(OTHER, port).status_code == 200
    assert flood.error is None, flood.error
    assert set(statuses) <= {200, 429, 0}, set(statuses)
    assert statuses.count(429) >= 1  # told why (a few at a time; the rest of a flood is closed)
    assert flood.admitted <= 20 + 20 * (flood.ended - flood.started) + 1
    peers.wait_for(
        lambda: refused_counts(lb, client=GREEDY, limit="client_rate") == flood.refused,
        WAIT,
        "client_limited lines adding up to every refusal",
    )
