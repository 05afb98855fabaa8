"""The relays' epoll loop: readers, writers and timers behave as asyncio's, and a relay runs on it, in a relay
worker and hosted inside the main process's asyncio loop."""

from __future__ import annotations

import asyncio
import os
import socket

import uvloop

from pacslb.proxy.eventloop import EpollLoop, hosted
from pacslb.proxy.outcome import End
from pacslb.proxy.pumps import RelayResult, close_idle_pipes, start_splice

#: Every loop in these tests stops by itself within this (a timer), whatever happens.
BOUND = 5.0


def bounded(loop: EpollLoop) -> None:
    timer = loop.call_later(BOUND, loop.stop)
    loop.run()
    timer.cancel()


def test_readers_writers_and_timers() -> None:
    loop = EpollLoop()
    a, b = socket.socketpair()
    a.setblocking(False)
    seen: list[str] = []

    def readable() -> None:
        seen.append(f"read {a.recv(100)!r}")
        loop.remove_reader(a.fileno())
        loop.add_writer(a.fileno(), writable)

    def writable() -> None:
        seen.append("writable")
        loop.remove_writer(a.fileno())
        loop.call_later(0.01, loop.stop)

    loop.add_reader(a.fileno(), readable)
    cancelled = loop.call_later(0.0, lambda: seen.append("cancelled timer ran"))
    cancelled.cancel()
    loop.call_later(0.01, lambda: b.send(b"hi"))
    bounded(loop)
    assert seen == ["read b'hi'", "writable"]
    assert not loop.remove_reader(a.fileno()) and not loop.remove_writer(a.fileno())
    loop.close()
    a.close()
    b.close()


def test_timers_run_in_order_and_a_callback_error_stops_nothing() -> None:
    loop = EpollLoop()
    order: list[int] = []

    def boom() -> None:
        raise RuntimeError("a bug in one callback")

    for delay, n in ((0.03, 3), (0.01, 1), (0.02, 2), (0.02, 22)):
        loop.call_later(delay, lambda n=n: order.append(n))
    loop.call_later(0.015, boom)
    loop.call_later(0.05, loop.stop)
    bounded(loop)
    assert order == [1, 2, 22, 3]
    loop.close()


def test_a_closed_descriptor_reused_by_a_new_one_is_watched_again() -> None:
    loop = EpollLoop()
    a, b = socket.socketpair()
    number = a.fileno()
    loop.add_reader(number, lambda: None)
    a.close()  # closed while registered: epoll forgets it, the loop does not know yet
    c, d = socket.socketpair()
    if c.fileno() != number:  # the kernel gives the lowest free number: normally the same one
        os.dup2(c.fileno(), number)
        c.close()
        c = socket.socket(fileno=number)
    got: list[bytes] = []

    def readable() -> None:
        got.append(c.recv(10))
        loop.stop()

    loop.remove_reader(number)
    loop.add_reader(number, readable)
    d.send(b"again")
    bounded(loop)
    assert got == [b"again"]
    loop.close()
    for s in (b, c, d):
        s.close()


def test_a_splice_relay_runs_on_it() -> None:
    loop = EpollLoop()
    client_out, client_in = socket.socketpair()
    server_in, server_out = socket.socketpair()
    for s in (client_in, server_in):
        s.setblocking(False)
    results: list[RelayResult] = []

    def done(result: RelayResult) -> None:
        results.append(result)
        loop.stop()

    start_splice(loop, client_in, server_in, idle_timeout=10, timeout_end=End.CLIENT_TIMEOUT, on_done=done)
    payload = os.urandom(50_000)  # fits in the socket buffer: sent before the loop runs
    client_out.sendall(payload)
    client_out.shutdown(socket.SHUT_WR)
    received = b""

    def drain() -> None:
        nonlocal received
        data = server_out.recv(1 << 16)
        if data:
            received += data
            return
        loop.remove_reader(server_out.fileno())
        server_out.sendall(b"answer")
        server_out.shutdown(socket.SHUT_WR)

    server_out.setblocking(False)
    loop.add_reader(server_out.fileno(), drain)
    bounded(loop)
    assert received == payload
    assert client_out.recv(100) == b"answer"
    assert results == [RelayResult(len(payload), len(b"answer"), End.CLIENT_CLOSED)]  # the client ended first
    loop.close()
    close_idle_pipes()
    for s in (client_out, server_out):
        s.close()


def test_cancelled_timers_do_not_pile_up() -> None:
    """Each connection cancels its idle timer when it closes, hours before it is due: with connections
    coming and going, the heap must stay the size of the live timers."""
    loop = EpollLoop()
    live = [loop.call_later(3600, lambda: None) for _ in range(10)]
    for _ in range(100_000):
        loop.call_later(3600, lambda: None).cancel()
    assert len(loop._timers) < 1_000
    assert all(not t.cancelled for t in live)
    loop.call_later(0, loop.stop)
    bounded(loop)
    loop.close()


def test_a_relay_hosted_in_an_asyncio_loop() -> None:
    """Inside uvloop (as in the main process): the hosted set is made once per loop, a relay's sockets wait
    on it while the clock and the timers are the asyncio loop's, and a closed loop's set is not reused."""

    async def main() -> tuple[RelayResult, bool]:
        loop = asyncio.get_running_loop()
        assert hosted(loop) is hosted(loop)
        assert abs(hosted(loop).time() - loop.time()) < 1.0
        client, client_peer = socket.socketpair()
        server, server_peer = socket.socketpair()
        for sock in (client, server, client_peer, server_peer):
            sock.setblocking(False)
        done: asyncio.Future[RelayResult] = loop.create_future()
        start_splice(
            hosted(loop), client, server, idle_timeout=BOUND, timeout_end=End.CLIENT_TIMEOUT,
            on_done=done.set_result,
        )  # fmt: skip
        client_peer.send(b"ping")
        data = await _recv(loop, server_peer)  # (4 bytes on a socketpair: one splice, one read)
        server_peer.send(b"pong!")
        answer = await _recv(loop, client_peer)
        client_peer.close()
        server_peer.close()
        result = await asyncio.wait_for(done, BOUND)
        return result, data == b"ping" and answer == b"pong!"

    first = uvloop.new_event_loop()
    try:
        result, echoed = first.run_until_complete(main())
    finally:
        first.close()
    assert echoed
    assert (result.bytes_up, result.bytes_down) == (4, 5)
    second = uvloop.new_event_loop()
    try:
        assert second.run_until_complete(_hosted_host(second))
    finally:
        second.close()
    close_idle_pipes()


async def _recv(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> bytes:
    return await asyncio.wait_for(loop.sock_recv(sock, 100), BOUND)


async def _hosted_host(loop: asyncio.AbstractEventLoop) -> bool:
    return hosted(loop).host is loop
