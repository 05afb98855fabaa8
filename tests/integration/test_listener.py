"""The listener hands over connections ready for the relay: non-blocking, with TCP_NODELAY and SO_KEEPALIVE
set (inherited from the listening socket, see pacslb/proxy/listener.py), and a descriptor received from
another process becomes a non-blocking socket object without being asked what it is."""

from __future__ import annotations

import asyncio
import os
import socket

import pytest
from inproc import run

from pacslb.config.values import HostPort
from pacslb.descriptors import stream_socket
from pacslb.proxy.listener import Listener, bind_listener


def test_an_accepted_connection_is_non_blocking_without_nagle_and_with_keepalive() -> None:
    async def scenario() -> tuple[float | None, int, int, bool, bytes]:
        loop = asyncio.get_running_loop()
        accepted: asyncio.Future[socket.socket] = loop.create_future()
        sock = bind_listener(HostPort("127.0.0.1", 0))
        listener = Listener("t", sock, lambda conn, _peer: accepted.set_result(conn))
        listener.resume()
        client = socket.create_connection(sock.getsockname()[:2])
        conn = await asyncio.wait_for(accepted, 10)
        listener.close()
        client.sendall(b"hello")
        got = await asyncio.wait_for(loop.sock_recv(conn, 16), 10)
        values = (
            conn.gettimeout(),
            conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY),
            conn.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
            os.get_blocking(conn.fileno()),
            got,
        )
        conn.close()
        client.close()
        return values

    timeout, nodelay, keepalive, blocking, got = run(scenario)
    assert timeout == 0.0
    assert nodelay and keepalive
    assert not blocking
    assert got == b"hello"


def test_a_received_descriptor_becomes_a_non_blocking_stream_socket() -> None:
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    left.setblocking(False)
    copy = stream_socket(os.dup(left.fileno()))  # as a worker gets it: a copy of a non-blocking descriptor
    try:
        assert copy.gettimeout() == 0.0
        assert copy.type == socket.SOCK_STREAM
        assert copy.family == socket.AF_UNIX  # asked of the descriptor itself
        with pytest.raises(BlockingIOError):
            copy.recv(1)
        right.sendall(b"x")
        right.close()
        assert copy.recv(1) == b"x"
    finally:
        copy.close()
        left.close()
