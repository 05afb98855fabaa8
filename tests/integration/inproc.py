"""Helpers for integration tests that run pacslb's engine or relay inside the test process, on uvloop."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable
from typing import TypeVar

import peers
import uvloop

T = TypeVar("T")

#: Every scenario is bounded: a hung one fails instead of hanging the suite.
SCENARIO_TIMEOUT = 90.0


def run(coro_fn: Callable[[], Awaitable[T]], timeout: float = SCENARIO_TIMEOUT) -> T:
    """Run one scenario on a fresh uvloop event loop, as production does."""

    async def main() -> T:
        return await asyncio.wait_for(coro_fn(), timeout)

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main())


def free_port() -> int:
    """A port for a test to listen on (see :func:`peers.free_port`)."""
    return peers.free_port()


async def echo_server(greeting: bytes = b"") -> tuple[asyncio.Server, int]:
    """A backend on a free loopback port that sends ``greeting`` to each new connection, then echoes."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if greeting:
            writer.write(greeting)
        try:
            while data := await reader.read(1 << 16):
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def tcp_pair() -> tuple[socket.socket, socket.socket]:
    """Two connected non-blocking TCP sockets over loopback: (outside end, inside end)."""
    loop = asyncio.get_running_loop()
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(1)
    lsock.setblocking(False)
    outside = socket.socket()
    outside.setblocking(False)
    connect = loop.create_task(loop.sock_connect(outside, lsock.getsockname()))
    inside, _ = await loop.sock_accept(lsock)
    await connect
    lsock.close()
    inside.setblocking(False)
    return outside, inside
