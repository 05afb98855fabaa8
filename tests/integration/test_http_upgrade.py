"""mode http with Upgrade: a WebSocket through pacslb to a real WebSocket server (the ``websockets``
package), after which the relay carries the frames. Run with one process and with relay workers."""

from __future__ import annotations

import asyncio
import base64
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import peers
import pytest
from peers import PacslbProcess
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

pytestmark = pytest.mark.peers

PacslbFactory = Callable[[str], PacslbProcess]


class EchoServer:
    """A WebSocket echo server in a thread of its own; it answers each message with ``NAME:message``."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.port = peers.free_port()
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.stop_event: asyncio.Event | None = None
        self.thread = threading.Thread(target=self.loop.run_until_complete, args=(self._main(),), daemon=True)

    async def _handler(self, ws: ServerConnection) -> None:
        async for message in ws:
            await ws.send(f"{self.name}:{message}" if isinstance(message, str) else message)

    async def _main(self) -> None:
        self.stop_event = asyncio.Event()
        async with serve(self._handler, "127.0.0.1", self.port, max_size=None):
            self.ready.set()
            await self.stop_event.wait()

    def __enter__(self) -> EchoServer:
        self.thread.start()
        assert self.ready.wait(5)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.stop_event is not None
        self.loop.call_soon_threadsafe(self.stop_event.set)
        self.thread.join(5)


@pytest.fixture
def echo_server() -> Iterator[EchoServer]:
    with EchoServer("ws1") as server:
        yield server


@pytest.mark.parametrize("workers", [1, 2])
def test_websocket_upgrade_passes_through(pacslb: PacslbFactory, echo_server: EchoServer, workers: int) -> None:
    port = peers.free_port()
    spec = peers.service(
        port,
        {"ws1": f"127.0.0.1:{echo_server.port}"},
        mode="http",
        check={"type": "none"},
        persistence={"type": "cookie+source_ip"},
    )
    lb = pacslb(peers.http_config({"web": spec}, workers=workers))
    with connect(f"ws://127.0.0.1:{port}/socket", max_size=None, open_timeout=5) as ws:
        # The handshake's answer carries the persistence cookie like any other response.
        assert ws.response.status_code == 101
        assert "SERVERID=" in ws.response.headers.get("Set-Cookie", "")
        for text in ("hello", "world"):
            ws.send(text)
            assert ws.recv(timeout=5) == f"ws1:{text}"
        big = os.urandom(10_000_000)  # in one frame: the tunnel is not a message buffer (random: not compressible)
        ws.send(big)
        assert ws.recv(timeout=10) == big
    line = lb.wait_event("request", timeout=5)
    assert (line.get("status"), line.get("path"), line.get("server")) == ("101", "/socket", "ws1")
    assert line.level == "info"
    assert int(line.get("bytes_up")) > len(big) and int(line.get("bytes_down")) > len(big)


@pytest.mark.parametrize("workers", [1, 2])
def test_a_halt_closes_a_websocket_after_its_grace(
    pacslb: PacslbFactory, echo_server: EchoServer, workers: int, tmp_path: Path
) -> None:
    token = "ws-halt-token-0123456789abcdef"
    token_file = tmp_path / "token"
    token_file.write_text(token + "\n")
    port, admin = peers.free_port(), peers.free_port()
    spec = peers.service(port, {"ws1": f"127.0.0.1:{echo_server.port}"}, mode="http", check={"type": "none"})
    lb = pacslb(
        peers.http_config(
            {"web": spec}, workers=workers, admin=peers.admin_section(admin, token_file), halt_grace="300ms"
        )
    )
    noise = os.urandom(6000)  # random: the WebSocket's deflate cannot shrink it below its size
    before = base64.b64encode(noise).decode()
    with connect(f"ws://127.0.0.1:{port}/socket", open_timeout=5) as ws:
        ws.send(before)
        assert ws.recv(timeout=5) == "ws1:" + before
        halted = peers.admin_api(admin, "POST", "/api/v1/services/web/servers/ws1/halt", token=token)
        assert halted.status_code == 200, halted.text
        with pytest.raises(ConnectionClosed):
            ws.recv(timeout=10)  # the tunnel is closed once the grace is over
    line = lb.wait_event("request", timeout=5)
    assert (line.get("status"), line.get("end"), line.level) == ("101", "halted", "warning")
    # What the tunnel moved before the halt cut it is counted, both ways.
    assert int(line.get("bytes_up") or 0) > len(noise) and int(line.get("bytes_down") or 0) > len(noise)
    assert lb.wait_event("halt_closed", timeout=5).get("connections") == "1"
