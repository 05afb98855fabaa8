"""The HTTP exchange state machine (pacslb/proxy/exchange.py) with no socket: fake transports, a fake
clock and a fake host stand for the event loop and the service, and the tests play both peers byte by
byte. (The same machine against real clients and nodes: tests/integration/test_http_*.py.)"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, cast

import pytest

from pacslb.balance.claim import Claims
from pacslb.balance.scheduler import make_scheduler
from pacslb.balance.server import ServerState
from pacslb.config.loader import load_config_text
from pacslb.protocols.http1 import RequestReader
from pacslb.proxy import exchange as ex
from pacslb.proxy.exchange import Client, Exchange, NodeConn, Record, Upstream
from pacslb.proxy.outcome import End

CONFIG = """
services:
  web:
    listen: 127.0.0.1:8080
    mode: http
    retries: {retries}
    persistence: {{type: none}}
    servers: {{a: 127.0.0.1:8081, b: 127.0.0.1:8082}}
    http:
      timeouts: {{server: 5s, client: 4s, keep_alive: 3s, request_head: 2s}}
"""

GET = b"GET /study/1 HTTP/1.1\r\nHost: pacs\r\n\r\n"
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


class Handle:
    def __init__(self, when: float, callback: Callable[[], None]) -> None:
        self.when = when
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class Clock:
    """The parts of an event loop the machine uses: the time and timers, moved on by the test."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.timers: list[Handle] = []

    def time(self) -> float:
        return self.now

    def call_at(self, when: float, callback: Callable[[], None]) -> Handle:
        handle = Handle(when, callback)
        self.timers.append(handle)
        return handle

    def call_later(self, delay: float, callback: Callable[[], None]) -> Handle:
        return self.call_at(self.now + delay, callback)

    def advance(self, seconds: float) -> None:
        """Move the time on, running the timers that come due on the way, in order."""
        end = self.now + seconds
        while True:
            due = sorted((h for h in self.timers if not h.cancelled and h.when <= end), key=lambda h: h.when)
            if not due:
                break
            handle = due[0]
            self.timers.remove(handle)
            self.now = max(self.now, handle.when)
            handle.callback()
        self.now = end


class Transport:
    """A transport that keeps what is written, and says whether it was closed or reset."""

    def __init__(self) -> None:
        self.written = bytearray()
        self.closed = False
        self.aborted = False
        self.reading = True
        self.buffered = 0  # what get_write_buffer_size says (a peer that does not read)

    def write(self, data: bytes) -> None:
        assert not self.closed and not self.aborted
        self.written += data

    def take(self) -> bytes:
        data = bytes(self.written)
        self.written.clear()
        return data

    def is_closing(self) -> bool:
        return self.closed or self.aborted

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = True

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def set_write_buffer_limits(self, high: int, low: int) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def get_extra_info(self, name: str) -> Any:
        return None


class Host:
    """The service as the machine sees it: what it was asked, for the test to answer."""

    def __init__(self) -> None:
        self.connects: list[tuple[Exchange, ServerState]] = []
        self.failures: list[tuple[str, str, int]] = []
        self.records: list[Record] = []
        self.ends: list[Exchange] = []

    def connect(self, exchange: Exchange, server: ServerState) -> None:
        self.connects.append((exchange, server))

    def connect_failed(self, peer: tuple[str, int], server: ServerState, reason: str, attempt: int) -> None:
        self.failures.append((server.name, reason, attempt))

    def log(self, record: Record) -> None:
        self.records.append(record)

    def ended(self, exchange: Exchange) -> None:
        self.ends.append(exchange)


class Rig:
    """One service's upstream, one client connection on it, and the helpers to play the peers."""

    def __init__(self, retries: int = 1) -> None:
        spec = load_config_text(CONFIG.format(retries=retries)).services["web"]
        self.clock = Clock()
        self.host = Host()
        self.servers = [ServerState(name, s.address.host, s.address.port) for name, s in spec.servers.items()]
        self.loop = cast(asyncio.AbstractEventLoop, self.clock)
        self.up = Upstream(
            self.loop, self.host, "web", spec, self.servers, make_scheduler(spec.balance), None, Claims()
        )
        self.client_transport = Transport()
        self.client = self.connect_client()
        self.exchange = Exchange(self.up, self.client)
        self.exchange.start()

    def connect_client(self) -> Client:
        client = Client(self.loop, RequestReader(16384, 100), ("10.0.0.7", 40000), "10.0.0.7:40000")
        client.connection_made(cast(asyncio.BaseTransport, self.client_transport))
        return client

    def node(self) -> tuple[NodeConn, Transport]:
        """Answer the connect the machine asked for last: a node connection on a fresh transport."""
        exchange, server = self.host.connects[-1]
        conn = NodeConn(self.loop, server)
        transport = Transport()
        conn.connection_made(cast(asyncio.BaseTransport, transport))
        exchange.connected(conn)
        return conn, transport

    def active(self) -> int:
        return sum(s.active for s in self.servers)


def test_a_request_goes_to_a_connected_node_and_its_connection_serves_the_next_from_the_pool() -> None:
    rig = Rig()
    rig.servers[1].health = "down"  # (else round robin sends the next request to the other node)
    rig.client.data_received(GET)
    assert len(rig.host.connects) == 1 and rig.exchange.state == ex.CONNECTING
    assert rig.active() == 1  # counted on its node from the decision on
    conn, node = rig.node()
    head = node.take()
    assert head.startswith(b"GET /study/1 HTTP/1.1\r\n") and b"X-Forwarded-For: 10.0.0.7\r\n" in head
    conn.data_received(OK)
    answer = rig.client_transport.take()
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n") and answer.endswith(b"\r\n\r\nok")
    assert rig.active() == 0 and sum(s.total for s in rig.servers) == 1
    assert rig.exchange.state == ex.IDLE and rig.host.ends == []
    pool = rig.up.pools[conn.server]
    assert pool.conns == [conn]  # back in its node's pool, for the next request
    rig.client.data_received(GET)
    assert len(rig.host.connects) == 1  # no new connection: the pooled one took it
    assert node.take().startswith(b"GET /study/1 HTTP/1.1\r\n")
    conn.data_received(OK)
    assert rig.client_transport.take().endswith(b"ok") and pool.conns == [conn] and conn.uses == 2


def test_pipelined_requests_are_answered_in_order_one_at_a_time() -> None:
    rig = Rig()
    rig.servers[1].health = "down"
    rig.client.data_received(GET + GET.replace(b"/study/1", b"/study/2"))
    conn, node = rig.node()
    assert b"/study/2" not in node.take()  # the second waits for the first's answer
    conn.data_received(OK)
    assert rig.client_transport.take().endswith(b"ok")
    assert node.take().startswith(b"GET /study/2 ")  # sent as soon as the first was answered
    conn.data_received(OK.replace(b"ok", b"OK"))
    assert rig.client_transport.take().endswith(b"OK") and rig.exchange.state == ex.IDLE


def test_a_node_that_cannot_be_connected_to_is_skipped_and_reported(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "pacslb.http")  # every exchange logged
    rig = Rig(retries=1)
    rig.client.data_received(GET)
    exchange, first = rig.host.connects[0]
    exchange.connect_failed("Connection refused")
    assert rig.host.failures == [(first.name, "Connection refused", 1)]
    assert len(rig.host.connects) == 2 and rig.host.connects[1][1] is not first
    assert first.active == 0  # its claim given back
    conn, _ = rig.node()
    conn.data_received(OK)
    assert rig.client_transport.take().endswith(b"ok")
    assert [(r.status, r.retries, r.reused, r.end) for r in rig.host.records] == [(200, 1, False, End.OK)]


def test_no_node_left_is_a_503_with_retry_after_and_nothing_is_held() -> None:
    rig = Rig(retries=0)
    for server in rig.servers:
        server.health = "down"
    rig.client.data_received(GET)
    assert rig.host.connects == [] and rig.host.ends == [rig.exchange]
    assert rig.exchange.how == ex.REFUSE and rig.exchange.refusal is not None
    assert rig.exchange.refusal.startswith(b"HTTP/1.1 503 ") and b"Retry-After: " in rig.exchange.refusal
    record = rig.exchange.record
    assert record is not None and record.end is End.NO_SERVER and record.status == 503
    assert rig.active() == 0


def test_a_pooled_connection_the_node_closed_is_replaced_and_the_request_sent_again() -> None:
    rig = Rig()
    rig.servers[1].health = "down"
    rig.client.data_received(GET)
    conn, node = rig.node()
    conn.data_received(OK)
    rig.client_transport.take()
    rig.client.data_received(GET)  # on the pooled connection...
    assert node.take().startswith(b"GET ")
    conn.eof_received()  # ... which the node had closed while idle: no byte of a response
    assert node.closed and len(rig.host.connects) == 2
    fresh, fresh_node = rig.node()
    assert fresh_node.take().startswith(b"GET /study/1 ")
    fresh.data_received(OK)
    assert rig.client_transport.take().endswith(b"ok") and rig.active() == 0


def test_a_node_silent_past_the_server_timeout_gets_a_504_and_its_connection_reset() -> None:
    rig = Rig()
    rig.client.data_received(GET)
    _, node = rig.node()
    rig.clock.advance(4.9)
    assert rig.host.ends == []
    rig.clock.advance(0.2)
    assert rig.host.ends == [rig.exchange] and rig.exchange.how == ex.REFUSE
    assert rig.exchange.refusal is not None and rig.exchange.refusal.startswith(b"HTTP/1.1 504 ")
    assert node.aborted and rig.active() == 0
    record = rig.exchange.record
    assert record is not None and record.end is End.SERVER_TIMEOUT


def test_a_slow_but_steady_response_head_is_waited_for() -> None:
    rig = Rig()
    rig.client.data_received(GET)
    conn, _ = rig.node()
    for byte in OK[:20]:  # one byte every 4 s: each within the server timeout of the one before
        rig.clock.advance(4.0)
        conn.data_received(bytes([byte]))
    assert rig.host.ends == []
    conn.data_received(OK[20:])
    assert rig.client_transport.take().endswith(b"ok")


def test_an_idle_keep_alive_connection_closes_quietly_after_its_timeout(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "pacslb.http")  # every exchange logged: the close adds no line
    rig = Rig()
    rig.client.data_received(GET)
    conn, _ = rig.node()
    conn.data_received(OK)
    rig.clock.advance(2.9)
    assert rig.host.ends == []
    rig.clock.advance(0.2)
    assert rig.host.ends == [rig.exchange] and rig.exchange.how == ex.CLOSE
    assert [(r.status, r.end) for r in rig.host.records] == [(200, End.OK)]


def test_a_head_that_does_not_arrive_in_time_gets_a_408() -> None:
    rig = Rig()
    rig.clock.advance(1.0)
    rig.client.data_received(b"GET / HTTP/1.1\r\nHo")
    rig.clock.advance(1.9)  # the head timeout counts from its first byte
    assert rig.host.ends == []
    rig.clock.advance(0.2)
    assert rig.exchange.how == ex.REFUSE and rig.exchange.refusal is not None
    assert rig.exchange.refusal.startswith(b"HTTP/1.1 408 ") and rig.host.connects == []


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
        b"GET /\x00 HTTP/1.1\r\n\r\n",
    ],
)
def test_a_malformed_or_ambiguous_request_is_refused_and_no_node_sees_it(request_bytes: bytes) -> None:
    rig = Rig()
    rig.client.data_received(request_bytes)
    assert rig.host.connects == [] and rig.exchange.how == ex.REFUSE
    assert rig.exchange.refusal is not None and rig.exchange.refusal.startswith(b"HTTP/1.1 400 ")


def test_a_request_body_streams_to_the_node_and_waits_while_the_node_does_not_read(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, "pacslb.http")
    rig = Rig()
    rig.client.data_received(b"POST /up HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\n01234")
    conn, node = rig.node()
    assert node.take().endswith(b"\r\n\r\n01234")
    conn.pause_writing()  # the node stopped reading (its transport says so as it takes a write)
    rig.client.data_received(b"56")
    assert node.take() == b"56"
    rig.client.data_received(b"78")
    assert node.take() == b""  # nothing more is written to it meanwhile
    conn.resume_writing()
    assert node.take() == b"78"
    rig.client.data_received(b"9")
    assert node.take() == b"9" and rig.exchange.state == ex.RESPONSE
    conn.data_received(OK)
    assert rig.client_transport.take().endswith(b"ok")
    assert [(r.method, r.bytes_up, r.bytes_down > 2) for r in rig.host.records] == [("POST", 10, True)]


def test_a_client_that_stops_sending_its_body_gets_a_408() -> None:
    rig = Rig()
    rig.client.data_received(b"POST /up HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\n01234")
    _, node = rig.node()
    rig.clock.advance(3.9)
    assert rig.host.ends == []
    rig.clock.advance(0.2)
    assert rig.exchange.how == ex.REFUSE and rig.exchange.refusal is not None
    assert rig.exchange.refusal.startswith(b"HTTP/1.1 408 ") and node.aborted and rig.active() == 0


def test_a_client_that_takes_nothing_of_a_large_response_is_cut_after_its_timeout() -> None:
    rig = Rig()
    rig.client.data_received(GET)
    conn, node = rig.node()
    size = ex.GATHER_BYTES * 3
    conn.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size + b"x" * ex.GATHER_BYTES * 2)
    assert rig.exchange.state == ex.STREAM
    rig.client.pause_writing()  # the client does not read
    rig.client_transport.buffered = 10**6
    conn.data_received(b"x" * ex.GATHER_BYTES)
    rig.clock.advance(3.9)
    assert rig.host.ends == []
    rig.clock.advance(0.2)
    assert rig.exchange.how == ex.ABORT  # its response was cut short: reset, not closed
    assert rig.host.records[-1].end is End.CLIENT_TIMEOUT and rig.active() == 0 and node.closed


def test_a_client_that_reads_slowly_is_waited_for() -> None:
    rig = Rig()
    rig.client.data_received(GET)
    conn, _ = rig.node()
    size = ex.GATHER_BYTES * 2
    conn.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size + b"x" * ex.GATHER_BYTES)
    rig.client.pause_writing()
    rig.client_transport.buffered = 10**6
    for _ in range(5):  # 20 s in all, each 4 s timeout seeing progress
        rig.client_transport.buffered -= 1000
        rig.clock.advance(3.9)
    assert rig.host.ends == []
    rig.client_transport.buffered = 0
    rig.client.resume_writing()
    conn.data_received(b"x" * ex.GATHER_BYTES)
    assert len(rig.client_transport.take()) > size and rig.exchange.state == ex.IDLE


def test_an_upgrade_answered_101_leaves_the_machine_with_its_claim_for_the_tunnel() -> None:
    rig = Rig()
    rig.client.data_received(b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
    conn, node = rig.node()
    assert b"Upgrade: websocket" in node.take()
    conn.data_received(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
    assert rig.exchange.how == ex.TUNNEL and rig.exchange.response is not None
    assert rig.active() == 1  # held until the tunnel ends
    claim = rig.exchange.take_claim()
    assert claim is not None and claim.release(rig.clock.now) and rig.active() == 0


def test_a_halt_of_the_node_during_the_wait_for_its_answer_is_a_502_logged_as_halted() -> None:
    rig = Rig()
    rig.client.data_received(GET)
    conn, node = rig.node()
    assert rig.up.claims.cut(conn.server) == 1
    assert node.aborted
    conn.connection_lost(None)  # what the reset brings
    assert rig.exchange.how == ex.REFUSE and rig.exchange.refusal is not None
    assert rig.exchange.refusal.startswith(b"HTTP/1.1 502 ")
    record = rig.exchange.record
    assert record is not None and record.halted and rig.active() == 0


def test_a_stop_during_a_connect_ends_the_machine_and_a_late_connection_is_closed() -> None:
    rig = Rig()
    rig.client.data_received(GET)
    rig.exchange.abandon(End.SHUTDOWN, "the service stopped")
    assert rig.exchange.how == ex.ABORT and rig.active() == 0
    assert rig.host.records[-1].end is End.SHUTDOWN
    conn, node = rig.node()
    assert node.closed and conn.exchange is None


def test_a_stop_lets_idle_clients_go_at_once_and_others_finish() -> None:
    rig = Rig()
    other = Exchange(rig.up, rig.connect_client())
    other.start()
    rig.client.data_received(GET)
    conn, _ = rig.node()
    rig.up.stop()
    assert rig.host.ends == [other]  # idle: closed at once
    conn.data_received(OK)
    answer = rig.client_transport.take()
    assert answer.endswith(b"ok") and b"Connection: close" in answer
    assert rig.host.ends == [other, rig.exchange] and conn.transport is not None and conn.transport.is_closing()


def test_interim_responses_pass_and_an_expectation_is_answered_by_the_balancer() -> None:
    rig = Rig()
    rig.client.data_received(b"PUT /x HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n")
    conn, node = rig.node()
    assert rig.client_transport.take() == ex.CONTINUE  # once the node's connection is there
    assert b"expect" not in node.take().lower()  # not forwarded
    rig.client.data_received(b"hi")
    assert node.take() == b"hi"
    conn.data_received(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n")
    assert rig.client_transport.take().startswith(b"HTTP/1.1 103 Early Hints\r\n")  # the node's 100 is not repeated
    conn.data_received(OK)
    assert rig.client_transport.take().startswith(b"HTTP/1.1 200 OK\r\n")


def test_a_chunked_response_to_an_http10_client_ends_with_the_close() -> None:
    rig = Rig()
    rig.client.data_received(b"GET / HTTP/1.0\r\n\r\n")
    conn, node = rig.node()
    # An HTTP/1.0 request without a Host gets the node's address as its Host.
    assert b"\r\nHost: %s\r\n" % conn.server.address.encode() in node.take()
    conn.data_received(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n")
    answer = rig.client_transport.take()
    assert b"chunked" not in answer.lower() and answer.endswith(b"\r\n\r\nok")
    assert rig.exchange.how == ex.CLOSE and rig.host.ends == [rig.exchange]


def test_a_node_that_stops_taking_the_body_still_gets_its_answer_forwarded_then_the_client_closed() -> None:
    rig = Rig()
    rig.client.data_received(b"POST /up HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\n01")
    conn, node = rig.node()
    conn.pause_writing()
    rig.client.data_received(b"23")  # written, and now the node is waited for
    node.buffered = 100
    rig.clock.advance(5.1)  # the server timeout with no progress: the rest of the body is not sent
    assert rig.exchange.state == ex.RESPONSE
    conn.data_received(b"HTTP/1.1 413 Content Too Large\r\nContent-Length: 0\r\n\r\n")
    answer = rig.client_transport.take()
    assert answer.startswith(b"HTTP/1.1 413 ") and b"Connection: close" in answer
    assert rig.exchange.how == ex.CLOSE and node.closed  # not pooled: the request was not sent whole
