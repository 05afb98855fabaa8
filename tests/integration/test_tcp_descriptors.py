"""Out of file descriptors: pacslb under a 256-descriptor limit while one client holds hundreds of idle
connections to a tcp service.

What a user would look at: the log stays a few lines a second (no tracebacks, no line per attempt), the
node is not marked down (its checks use the descriptors pacslb keeps in reserve, and a check that could
not be made would not count), /healthz answers 503 with the reason and the metrics count it, so that
keepalived can move the virtual IP; once the client lets go, the next client is served on its first try.

pacslb runs as a child process whose soft and hard RLIMIT_NOFILE are both 256 (raising the soft limit to
the hard one at start then changes nothing). The node is an echo server in this process.
"""

from __future__ import annotations

import asyncio
import contextlib
import resource
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import peers
import pytest
from peers import PacslbProcess

LIMIT = 256
#: Idle connections the client holds: more than 256 descriptors' worth of connections, less than the
#: listener's accept queue (1,024), so every one of them connects at the TCP level.
HELD = 400
INTERVAL, FALL = 0.2, 2
CHECK = {"type": "tcp", "interval": "200ms", "timeout": "200ms", "rise": 2, "fall": FALL}
#: Bounds on waits (the machine is shared and slow: generous, and never a sleep).
WAIT = 30.0
#: pacslb/descriptors.py's RECENT: /healthz says 503 this long after the last occurrence.
RECENT = 10.0


class LimitedPacslb(PacslbProcess):
    """``pacslb run`` with RLIMIT_NOFILE set to :data:`LIMIT` (soft and hard) before it starts."""

    def start(self) -> LimitedPacslb:
        original = peers._popen

        def limited(args: list[str], log: Path, **kwargs: Any) -> subprocess.Popen[bytes]:
            limit = (LIMIT, LIMIT)
            return original(args, log, preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, limit), **kwargs)

        peers._popen = limited  # PacslbProcess.start starts its child through it
        try:
            super().start()
        finally:
            peers._popen = original
        return self


class EchoNode:
    """A node on a free loopback port that echoes, on its own event loop in a thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.port = 0
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
            return await asyncio.start_server(handle, "127.0.0.1", 0, backlog=4096)

        self.server = self.loop.run_until_complete(main())
        self.port = self.server.sockets[0].getsockname()[1]
        ready.set()
        self.loop.run_forever()
        self.server.close()
        self.loop.run_until_complete(self.server.wait_closed())
        self.loop.close()

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture
def node() -> Iterator[EchoNode]:
    echo = EchoNode()
    yield echo
    echo.stop()


@pytest.fixture(autouse=True)
def _enough_descriptors_here() -> None:
    """This process holds the client's connections: it needs more descriptors than pacslb gets."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 4 * HELD:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 8 * HELD), hard))
    assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] >= 2 * HELD, "the test itself needs ~2x HELD descriptors"


def round_trip(port: int, payload: bytes = b"ping", timeout: float = WAIT) -> bytes:
    """One client: connect, send, read the echo (one attempt)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(payload)
        got = b""
        while len(got) < len(payload):
            chunk = s.recv(65536)
            if not chunk:
                break
            got += chunk
        return got


def hold(port: int, count: int) -> list[socket.socket]:
    """``count`` connections that each send one byte and then stay idle (the queue takes those not accepted)."""
    held = []
    for _ in range(count):
        s = socket.socket()
        s.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            s.connect(("127.0.0.1", port))
        held.append(s)
    for s in held:
        with contextlib.suppress(OSError):
            s.send(b"x")  # the connections that get relayed make pipes
    return held


def get(admin: int, path: str) -> httpx.Response | None:
    """GET from the admin API; None when it cannot be reached at the moment."""
    try:
        return httpx.get(f"http://127.0.0.1:{admin}{path}", timeout=5.0)
    except httpx.HTTPError:
        return None


def metric(text: str, name: str) -> float | None:
    """The sum of the samples of ``name`` (any labels) in a Prometheus text page; None when absent."""
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith((name + "{", name + " "))]
    return sum(values) if values else None


@pytest.mark.parametrize("workers", [1, 2])
def test_out_of_descriptors_the_log_stays_small_nodes_stay_up_and_service_resumes(
    tmp_path: Path, node: EchoNode, workers: int
) -> None:
    port, admin = peers.free_port(), peers.free_port()
    config = peers.config_text(
        {"svc": peers.service(port, {"pacs1": f"127.0.0.1:{node.port}"}, check=CHECK)},
        workers=workers,
        shutdown_grace="1s",
        admin={"listen": f"127.0.0.1:{admin}"},
    )
    lb = LimitedPacslb(tmp_path / "pacslb", config)
    held: list[socket.socket] = []
    try:
        lb.start()
        # The default maxconn (4,096) cannot fit in 256 descriptors: said once, at start.
        low = lb.wait_event("descriptors_low", WAIT)
        assert low.get("limit") == str(LIMIT) and low.get("maxconn") == "4096", low.line
        assert round_trip(port) == b"ping"
        assert get(admin, "/healthz").status_code == 200  # type: ignore[union-attr]

        mark = lb.mark()
        started = time.monotonic()
        held = hold(port, HELD)
        first = lb.wait_event("descriptors_exhausted", WAIT, since=mark)
        assert first.level == "error", first.line

        # /healthz and the metrics say so (the admin API works from the reserve).
        def degraded() -> httpx.Response | None:
            r = get(admin, "/healthz")
            return r if r is not None and r.status_code == 503 else None

        answer = peers.wait_for(degraded, WAIT, "/healthz to answer 503")
        assert answer.json()["ok"] is False and answer.json()["reason"] == "descriptors_exhausted", answer.text
        exhausted_at = time.time()

        # The node's checks go on while descriptors are out, and it stays up: wait until checks ran for
        # more than fall x interval after /healthz first said 503, while it still says 503.
        def checked_since() -> str | None:
            r = get(admin, "/metrics")
            if r is None or r.status_code != 200:
                return None
            last = metric(r.text, "pacslb_server_last_check_timestamp_seconds")
            if last is None or last < exhausted_at + (FALL + 1) * INTERVAL:
                return None
            return r.text

        page = peers.wait_for(checked_since, WAIT, "checks to run while out of descriptors")
        assert metric(page, "pacslb_descriptors_exhausted_recently") == 1.0
        assert (metric(page, "pacslb_descriptors_exhausted_total") or 0) >= 1
        assert metric(page, "pacslb_server_up") == 1.0
        assert metric(page, "pacslb_server_check_success") == 1.0
        held_for = time.monotonic() - started

        # The log: a line a second at most about it, nothing per attempt, no traceback, no node down.
        lines = lb.events(since=mark)
        about = [e for e in lines if e.event == "descriptors_exhausted"]
        assert len(about) <= held_for / 1.0 + 2, [e.line for e in about]
        assert sum(int(e.get("count")) for e in about) >= 1
        others = [e.line for e in lines if e.event not in ("descriptors_exhausted", "conn")]
        assert not others, others  # no health, connect_failed, accept_error lines
        conns = [e for e in lines if e.event == "conn"]
        assert len(conns) <= HELD  # at most one line per connection, whatever ended it
        assert all(e.get("end") in ("client_closed", "no_descriptors") for e in conns), [e.line for e in conns]
        assert "Traceback" not in lb.log()
        assert not lb.events("health")

        # Let go: the next client is served at once (on its first try).
        for s in held:
            s.close()
        held = []
        assert round_trip(port, b"after") == b"after"

        # The episode ends with one line, and /healthz is back to 200.
        ok = lb.wait_event("descriptors_ok", RECENT + WAIT, since=mark)
        assert ok.level == "info", ok.line
        answer = peers.wait_for(lambda: get(admin, "/healthz"), WAIT, "/healthz")
        assert answer.status_code == 200 and answer.json() == {"ok": True}, answer.text
        assert round_trip(port, b"again") == b"again"
        assert not lb.events("health")
        assert "Traceback" not in lb.log()
        assert len(lb.events(since=mark)) < HELD + 100  # bounded whatever the duration
    except BaseException:
        print(f"----- pacslb log ({lb.log_path}) -----\n{lb.log()[-20000:]}", file=sys.stderr)
        raise
    finally:
        for s in held:
            s.close()
        lb.stop()


def test_a_node_socket_pacslb_cannot_afford_is_its_own_failure_not_the_node_s(monkeypatch: pytest.MonkeyPatch) -> None:
    """The path of the dicom and http modes (connect_to): no socket for the node is a local ConnectFailed,
    counted once, that neither wakes the node's check nor writes a connect_failed line."""
    from inproc import run

    from pacslb import descriptors
    from pacslb.balance.server import ServerState
    from pacslb.config import load_config_text
    from pacslb.errors import ConnectFailed
    from pacslb.proxy import service as base
    from pacslb.proxy import tcp

    monkeypatch.setattr(base, "in_reserve", lambda fd: True)  # every new descriptor is in the reserve
    spec = load_config_text("services:\n  svc:\n    listen: 127.0.0.1:1\n    servers: {a: 127.0.0.1:1}\n")
    woken: list[str] = []

    async def scenario() -> ConnectFailed:
        service = tcp.TcpService("svc", spec.services["svc"], [ServerState("a", "127.0.0.1", 1, 1)], None)
        service.on_connect_failed = lambda name, server: woken.append(server.name)
        try:
            await base.connect_to(service.servers[0], 1.0)
        except ConnectFailed as exc:
            service.connect_failed(("127.0.0.1", 5), service.servers[0], exc.reason, 1)
            return exc
        raise AssertionError("connect_to should have failed")

    before = descriptors.EXHAUSTION.by_place["reserve"]
    failed = run(scenario)
    assert failed.reason.startswith(base.LOCAL_FAILURE), failed.reason
    assert descriptors.EXHAUSTION.by_place["reserve"] == before + 1
    assert woken == []  # the node is not checked for pacslb's own shortage
