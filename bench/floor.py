"""The floor of pacslb's stack: a forwarder on the same event loop and parser that does no balancing work.

``python bench/floor.py http|tcp LISTEN_PORT NODE_PORT[,NODE_PORT...]`` (loopback only)

A subject of the bench beside pacslb and HAProxy (bench/cases/http.py and connrate.py), so that every run
says how far pacslb is from what uvloop (and, for HTTP, httptools) cost on their own on this machine, in
the same minutes, and what bench/instructions.py ``--floor`` counts. It is not a balancer:

- ``tcp``: accept, connect to the next node in turn, pass the bytes each way as they come, pass an end of
  file on, close. No decision, no persistence, no limit, no timeout, no splice, no log.
- ``http``: the same, with every byte fed to an httptools parser on each side (a request parser on the
  client's side, a response parser on the node's), as a proxy that frames messages must. The heads are
  neither read nor rewritten: no cookie, no X-Forwarded-For, no hop-by-hop fields removed. One node
  connection per client connection, made when the client connects.

What pacslb does beyond this floor is what a load balancer has to do, so pacslb cannot be faster than it
in the same conditions; the ratio pacslb / floor is how much of the stack's ceiling pacslb reaches, and
floor / HAProxy is that ceiling against HAProxy (docs/performance.md, "The floor of this stack").
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable
from typing import Any, cast

import httptools
import uvloop

#: The listening socket's backlog, as pacslb's (the bench opens 64 connections at once).
BACKLOG = 1024


class _Ends:
    """A parser's protocol object that only counts where messages end (a proxy that frames messages needs
    no less): httptools checks every byte and each message's framing, and calls nothing else."""

    def __init__(self) -> None:
        self.messages = 0

    def on_message_complete(self) -> None:
        self.messages += 1


class _Node(asyncio.Protocol):
    """The node's side of one forwarded connection."""

    def __init__(self, client: _Client) -> None:
        self.client = client
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass asyncio's

    def data_received(self, data: bytes) -> None:
        self.client.from_node(data)

    def eof_received(self) -> bool:
        return False  # the transport closes; connection_lost closes the client's side after what was written

    def connection_lost(self, exc: Exception | None) -> None:
        self.client.node_gone()


class _Client(asyncio.Protocol):
    """The client's side: connects to the next node at once and holds what comes before the node is there."""

    turn = 0

    def __init__(self, nodes: list[tuple[str, int]], parse: bool) -> None:
        self.nodes = nodes
        self.request_parser: Any = httptools.HttpRequestParser(_Ends()) if parse else None
        self.response_parser: Any = httptools.HttpResponseParser(_Ends()) if parse else None
        self.transport: asyncio.Transport | None = None
        self.node: _Node | None = None
        self.pending: list[bytes] = []
        self.eof = False
        self.connecting: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        _Client.turn += 1
        host, port = self.nodes[_Client.turn % len(self.nodes)]
        loop = asyncio.get_running_loop()
        self.connecting = loop.create_task(self._connect(loop, host, port))

    async def _connect(self, loop: asyncio.AbstractEventLoop, host: str, port: int) -> None:
        try:
            _, node = await loop.create_connection(lambda: _Node(self), host, port)
        except OSError:
            if self.transport is not None:
                self.transport.abort()
            return
        self.node = node
        if self.transport is None or self.transport.is_closing():
            self._close_node()
            return
        assert node.transport is not None
        for data in self.pending:
            node.transport.write(data)
        self.pending.clear()
        if self.eof:
            node.transport.write_eof()

    def data_received(self, data: bytes) -> None:
        if self.request_parser is not None:
            self.request_parser.feed_data(data)
        if self.node is None or self.node.transport is None:
            self.pending.append(data)
        elif not self.node.transport.is_closing():
            self.node.transport.write(data)

    def eof_received(self) -> bool:
        if self.node is None or self.node.transport is None:
            self.eof = True
        elif not self.node.transport.is_closing():
            self.node.transport.write_eof()
        return True  # keep the client's side open for the answer

    def from_node(self, data: bytes) -> None:
        if self.response_parser is not None:
            self.response_parser.feed_data(data)
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def node_gone(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self._close_node()

    def _close_node(self) -> None:
        if self.node is not None and self.node.transport is not None and not self.node.transport.is_closing():
            self.node.transport.close()


async def serve(port: int, nodes: list[tuple[str, int]], parse: bool) -> None:
    loop = asyncio.get_running_loop()
    factory: Callable[[], _Client] = lambda: _Client(nodes, parse)  # noqa: E731
    server = await loop.create_server(factory, "127.0.0.1", port, backlog=BACKLOG)
    await server.serve_forever()


def main(argv: list[str]) -> None:
    if len(argv) != 3 or argv[0] not in ("http", "tcp"):
        sys.exit("usage: python bench/floor.py http|tcp LISTEN_PORT NODE_PORT[,NODE_PORT...]")
    nodes = [("127.0.0.1", int(port)) for port in argv[2].split(",")]
    uvloop.run(serve(int(argv[1]), nodes, parse=argv[0] == "http"))


if __name__ == "__main__":
    main(sys.argv[1:])
