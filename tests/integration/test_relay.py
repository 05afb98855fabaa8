"""The relay on its own: byte integrity, half-close each way, idle timeout, cancellation, no fd leaks.

These drive pacslb.proxy.relay directly with real TCP sockets on loopback (a client, pacslb's two
sockets, a server), under uvloop as in production: the splice relay, the buffered one, and the buffered
one over transports that already exist (``relay_transports``, what a TLS association in mode dicom uses;
plain transports here, made the way it makes them).
"""

from __future__ import annotations

import asyncio
import gc
import hashlib
import os
import socket
from collections.abc import Iterator

import pytest
from inproc import run, tcp_pair

from pacslb.proxy.dicomtls import StreamConn
from pacslb.proxy.outcome import End
from pacslb.proxy.relay import RelayResult, close_idle_pipes, relay, relay_transports


async def recv_all(sock: socket.socket) -> bytes:
    loop = asyncio.get_running_loop()
    chunks = []
    while chunk := await loop.sock_recv(sock, 1 << 16):
        chunks.append(chunk)
    return b"".join(chunks)


METHOD = "splice"


@pytest.fixture(autouse=True, params=["splice", "buffered", "transports"])
def relay_method(request: pytest.FixtureRequest) -> Iterator[str]:
    """Every test runs against both ways of moving bytes: they must behave the same."""
    global METHOD
    METHOD = request.param
    yield request.param
    METHOD = "splice"


async def start_relay(idle: float = 30.0) -> tuple[socket.socket, socket.socket, asyncio.Task[RelayResult]]:
    client, lb_client = await tcp_pair()
    server, lb_server = await tcp_pair()
    loop = asyncio.get_running_loop()
    if METHOD == "transports":
        sides = (await StreamConn.accept(lb_client, None, 5.0), await StreamConn.connect(lb_server, None, None, 5.0))
        return client, server, loop.create_task(relay_transports(*sides, idle_timeout=idle))
    task = loop.create_task(relay(lb_client, lb_server, idle_timeout=idle, method=METHOD))
    return client, server, task


def open_fds() -> int:
    close_idle_pipes()  # pipes kept for reuse are a bounded cache, not a leak
    gc.collect()  # sockets other tests dropped without closing close here, not in the middle of a count
    return len(os.listdir("/proc/self/fd"))


async def warm_up() -> None:
    """One relayed connection first: the loop opens a few descriptors of its own on first use."""
    client, server, task = await start_relay()
    client.close()
    server.close()
    await task


def test_bulk_both_ways_intact_with_counts() -> None:
    up_data = os.urandom(24 * 1024 * 1024)
    down_data = os.urandom(16 * 1024 * 1024)

    async def scenario() -> tuple[bytes, bytes, RelayResult]:
        loop = asyncio.get_running_loop()
        client, server, task = await start_relay()

        async def client_side() -> bytes:
            await loop.sock_sendall(client, up_data)
            client.shutdown(socket.SHUT_WR)
            return await recv_all(client)

        async def server_side() -> bytes:
            got = await recv_all(server)  # until the client's half-close arrives
            await loop.sock_sendall(server, down_data)
            server.close()
            return got

        down, up = await asyncio.gather(client_side(), server_side())
        result = await task
        client.close()
        return up, down, result

    up, down, result = run(scenario)
    assert hashlib.sha256(up).digest() == hashlib.sha256(up_data).digest()
    assert hashlib.sha256(down).digest() == hashlib.sha256(down_data).digest()
    assert result.bytes_up == len(up_data)
    assert result.bytes_down == len(down_data)
    assert result.end == End.CLIENT_CLOSED  # the client half-closed first


def test_server_half_close_keeps_the_other_direction_open() -> None:
    async def scenario() -> tuple[bytes, bytes, RelayResult]:
        loop = asyncio.get_running_loop()
        client, server, task = await start_relay()
        await loop.sock_sendall(server, b"greeting")
        server.shutdown(socket.SHUT_WR)  # server done sending, still reading
        first = await recv_all(client)  # EOF reaches the client after the data
        await loop.sock_sendall(client, b"late request")
        client.shutdown(socket.SHUT_WR)
        late = await recv_all(server)
        server.close()
        result = await task
        client.close()
        return first, late, result

    first, late, result = run(scenario)
    assert first == b"greeting"
    assert late == b"late request"
    assert result.end == End.SERVER_CLOSED
    assert (result.bytes_up, result.bytes_down) == (len(b"late request"), len(b"greeting"))


def test_idle_timeout_closes_both_sides() -> None:
    async def scenario() -> tuple[RelayResult, bytes, bytes, float]:
        loop = asyncio.get_running_loop()
        client, server, task = await start_relay(idle=0.4)
        started = loop.time()
        result = await task
        elapsed = loop.time() - started
        # Both outside ends see the connection gone (EOF or reset), nothing hangs.
        got_c = await _recv_or_reset(client)
        got_s = await _recv_or_reset(server)
        client.close()
        server.close()
        return result, got_c, got_s, elapsed

    result, got_c, got_s, elapsed = run(scenario)
    assert result.end == End.CLIENT_TIMEOUT
    assert got_c == b"" and got_s == b""
    assert elapsed >= 0.4


async def _recv_or_reset(sock: socket.socket) -> bytes:
    try:
        return await asyncio.get_running_loop().sock_recv(sock, 100)
    except ConnectionResetError:
        return b""


def test_traffic_keeps_an_idle_timer_from_firing() -> None:
    async def scenario() -> RelayResult:
        loop = asyncio.get_running_loop()
        client, server, task = await start_relay(idle=0.3)
        for _ in range(8):  # 8 x 0.1 s of trickle: longer than the timeout, never idle for it
            await loop.sock_sendall(client, b"x")
            assert await loop.sock_recv(server, 10) == b"x"
            await asyncio.sleep(0.1)
        client.close()
        server.close()
        return await task

    result = run(scenario)
    assert result.end in (End.CLIENT_CLOSED, End.SERVER_CLOSED)
    assert result.bytes_up == 8


def test_cancel_closes_everything_and_leaks_nothing() -> None:
    async def scenario() -> tuple[int, int, bytes]:
        await warm_up()
        before = open_fds()
        client, server, task = await start_relay()
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        got = await _recv_or_reset(client)
        client.close()
        server.close()
        await asyncio.sleep(0.05)
        return before, open_fds(), got

    before, after, got = run(scenario)
    assert got == b""
    assert after <= before  # more would be a leak; fewer is the garbage collector closing what others left


def test_many_connections_leak_no_file_descriptors() -> None:
    async def scenario() -> tuple[int, int]:
        loop = asyncio.get_running_loop()
        await warm_up()
        before = open_fds()
        for _ in range(200):
            client, server, task = await start_relay()
            await loop.sock_sendall(client, b"ping")
            client.shutdown(socket.SHUT_WR)
            assert await recv_all(server) == b"ping"
            server.close()
            await task
            client.close()
        await asyncio.sleep(0.05)
        return before, open_fds()

    before, after = run(scenario)
    assert after <= before  # more would be a leak; fewer is the garbage collector closing what others left
