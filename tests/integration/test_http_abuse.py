"""mode http under hostile clients, all at once: heads that trickle, garbage, bodies that stall, trailer
fields without end, responses nobody reads (one at a time, or thousands pipelined), readers that are slow
but read, resets in mid-exchange, connections that never send a byte. A well-behaved client on the same
service must see every one of its requests answered, each hostile connection must end by its own timeout
or answer, and once those timeouts have passed pacslb must hold no more sockets than before."""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import threading
import time
from collections.abc import Callable

import httpx
import pytest
from peers import NginxNode
from test_http_proxy import PacslbFactory, echo, port_of, start
from test_http_proxy import web as web  # a fixture, used by name

pytestmark = pytest.mark.peers

#: The big file the nodes serve to clients that never read it (more than any socket buffers can hold).
BIG_SIZE = 32 * 1024 * 1024
#: A small file, and how many times one client asks for it without reading the answers (all of them
#: answered would be 54 MB).
SMALL_SIZE = 1024
PIPELINED = 40000
#: How long any one hostile connection is given to be ended by pacslb (its timeouts are 0.5-1 s here).
END_WITHIN = 10.0
#: How long the sockets pacslb held for the hostile clients may take to be closed once they are gone.
SETTLE_WITHIN = 10.0


def _open(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=END_WITHIN)


def _until_closed(sock: socket.socket) -> bytes:
    """What pacslb sends until it closes the connection (a reset counts as a close). Raises TimeoutError
    when it does not close within END_WITHIN."""
    data = bytearray()
    deadline = time.monotonic() + END_WITHIN
    while True:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return bytes(data)
        if not chunk:
            return bytes(data)
        data += chunk


def _slowloris(port: int) -> bytes:
    """A head that trickles in, a field every 100 ms, never complete."""
    with _open(port) as sock:
        sock.sendall(b"GET /whoami HTTP/1.1\r\nHost: pacs\r\n")
        deadline = time.monotonic() + END_WITHIN
        with contextlib.suppress(OSError):
            while time.monotonic() < deadline:
                sock.sendall(b"X-Slow: 1\r\n")
                sock.settimeout(0.1)
                with contextlib.suppress(TimeoutError):
                    answer = sock.recv(4096)
                    return answer + _until_closed(sock)
        return _until_closed(sock)


def _garbage(port: int, payload: bytes) -> bytes:
    with _open(port) as sock:
        sock.sendall(payload)
        return _until_closed(sock)


def _stalled_body(port: int) -> bytes:
    """An upload that announces a megabyte, sends a kilobyte, and stops."""
    with _open(port) as sock:
        sock.sendall(b"PUT /upload/stalled HTTP/1.1\r\nHost: pacs\r\nContent-Length: 1000000\r\n\r\n" + b"x" * 1000)
        return _until_closed(sock)


def _endless_trailer(port: int) -> bytes:
    """A chunked upload whose trailer field never ends (httptools holds a field until its end)."""
    with _open(port) as sock:
        sock.sendall(b"PUT /upload/t HTTP/1.1\r\nHost: pacs\r\nTransfer-Encoding: chunked\r\n\r\n")
        sock.sendall(b"5\r\nhello\r\n0\r\nX: ")
        with contextlib.suppress(OSError):  # answered and closed before all of it is sent
            for _ in range(64):
                sock.sendall(b"a" * 16384)
                time.sleep(0.01)
        return _until_closed(sock)


def _no_reader(port: int) -> int:
    """Asks for the big file and reads nothing of it for longer than the client timeout; returns how much
    arrived once reading (pacslb must have given up before the end)."""
    with _open(port) as sock:
        sock.sendall(b"GET /big.bin HTTP/1.1\r\nHost: pacs\r\n\r\n")
        time.sleep(2.5)  # client timeout 1 s: pacslb stops waiting for this reader
        return len(_until_closed(sock))


def _slow_reader(port: int) -> int:
    """Asks for the big file and reads it slowly but steadily (about 80 KB/s) for longer than the client
    timeout: a slow reader is not a dead one, and must not be cut off. Returns what it read."""
    with _open(port) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        sock.sendall(b"GET /big.bin HTTP/1.1\r\nHost: pacs\r\n\r\n")
        got = 0
        until = time.monotonic() + 3.0
        while time.monotonic() < until:
            data = sock.recv(4096)
            if not data:
                raise ConnectionError(f"closed after {got} bytes while the client was still reading")
            got += len(data)
            time.sleep(0.05)
        return got


def _pipeliner(port: int) -> str:
    """Sends many requests for a small file in one go and reads none of the answers, for far longer than
    the client timeout, with a small receive buffer (the kernel could otherwise hold them all for it).
    Returns its address, to find what pacslb served it."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        sock.settimeout(END_WITHIN)
        sock.connect(("127.0.0.1", port))
        host, local_port = sock.getsockname()
        address = f"{host}:{local_port}"
        with contextlib.suppress(OSError):  # pacslb may cut it off before all are sent
            sock.sendall(b"GET /small.bin HTTP/1.1\r\nHost: pacs\r\n\r\n" * PIPELINED)
        time.sleep(5.0)
        return address


def _reset(port: int) -> None:
    """Asks for the big file and resets the connection at once."""
    sock = _open(port)
    sock.sendall(b"GET /big.bin HTTP/1.1\r\nHost: pacs\r\n\r\n")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def _silent(port: int) -> bytes:
    """Connects and sends nothing."""
    with _open(port) as sock:
        return _until_closed(sock)


def _sockets(pid: int) -> int:
    """How many sockets the process holds."""
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:"):
                count += 1
    return count


def test_hostile_clients_do_not_disturb_a_well_behaved_one_and_leave_nothing_behind(
    pacslb: PacslbFactory, web: list[NginxNode]
) -> None:
    for node in web:
        (node.root / "www").mkdir(parents=True, exist_ok=True)
        (node.root / "www" / "big.bin").write_bytes(os.urandom(1024) * (BIG_SIZE // 1024))
        (node.root / "www" / "small.bin").write_bytes(os.urandom(SMALL_SIZE))
    lb, url = start(
        pacslb,
        web,
        check={"type": "none"},  # no health-check sockets coming and going while they are counted
        http={"timeouts": {"request_head": "500ms", "keep_alive": "1s", "client": "1s", "pool_idle": "500ms"}},
    )
    port = port_of(url)
    before = _sockets(lb.pid)

    results: dict[str, list[object]] = {}
    errors: list[str] = []
    lock = threading.Lock()

    def run(kind: str, job: Callable[[], object]) -> None:
        try:
            outcome = job()
        except Exception as exc:  # the assertion below names the job and what went wrong
            with lock:
                errors.append(f"{kind}: {type(exc).__name__}: {exc}")
            return
        with lock:
            results.setdefault(kind, []).append(outcome)

    garbage = [b"\x00\x01\x02\x03\r\n\r\n", b"G\x00T / HTTP/1.1\r\n\r\n", b"GET / HTTP/1.1\r\nHost a\r\n\r\n"]
    jobs: list[tuple[str, Callable[[], object]]] = []
    jobs += [("slowloris", lambda: _slowloris(port))] * 30
    jobs += [("garbage", lambda p=p: _garbage(port, p)) for p in garbage * 5]  # type: ignore[misc]
    jobs += [("stalled_body", lambda: _stalled_body(port))] * 8
    jobs += [("endless_trailer", lambda: _endless_trailer(port))] * 4
    jobs += [("no_reader", lambda: _no_reader(port))] * 4
    jobs += [("slow_reader", lambda: _slow_reader(port))] * 2
    jobs += [("pipeliner", lambda: _pipeliner(port))] * 2
    jobs += [("reset", lambda: _reset(port))] * 20
    jobs += [("silent", lambda: _silent(port))] * 20
    threads = [threading.Thread(target=run, args=job, daemon=True) for job in jobs]
    for thread in threads:
        thread.start()

    # Meanwhile, a well-behaved client: one keep-alive connection, and new connections besides.
    answered: list[str] = []
    started = time.monotonic()
    with httpx.Client(base_url=url, timeout=5) as client:
        while time.monotonic() - started < 2.0 or len(answered) < 100:
            response = client.get("/whoami")
            assert response.status_code == 200, response.text
            answered.append(echo(response.text)["node"])
            if len(answered) % 10 == 0:
                assert httpx.get(f"{url}/whoami", timeout=5).status_code == 200
            if len(answered) >= 2000:
                break
    assert set(answered) <= {node.name for node in web} and answered

    for thread in threads:
        thread.join(END_WITHIN + 5)
    assert not [t for t in threads if t.is_alive()], "a hostile connection was never ended"
    assert not errors, errors
    # Each hostile connection got the answer it deserved, or was closed by a timeout.
    assert all(bytes(a).startswith(b"HTTP/1.1 408 ") for a in results["slowloris"]), results["slowloris"][:3]
    assert all(bytes(a).startswith(b"HTTP/1.1 400 ") for a in results["garbage"]), results["garbage"]
    assert len(results["stalled_body"]) == 8
    assert all(bytes(a).startswith(b"HTTP/1.1 431 ") for a in results["endless_trailer"]), results["endless_trailer"]
    assert all(isinstance(n, int) and n < BIG_SIZE for n in results["no_reader"]), results["no_reader"]
    assert all(a == b"" for a in results["silent"]), results["silent"][:3]
    assert len(results["slow_reader"]) == 2
    # A client that does not take its answers is served no further until it does: pacslb holds no more
    # for it than its write buffer (here: well under half the answers), and ends it after the timeout.
    log = lb.log_path.read_text().splitlines()
    for client in results["pipeliner"]:
        mine = [line for line in log if f"client={client} " in line]
        served = [line for line in mine if "path=/small.bin" in line]
        assert 0 < len(served) < PIPELINED // 2, (len(served), [x[11:23] for x in served[:: max(1, len(served) // 6)]])
        assert any("end=client_timeout" in line for line in mine), mine[-1]

    # Once their timeouts have passed, nothing of them is left in pacslb.
    deadline = time.monotonic() + SETTLE_WITHIN
    while (held := _sockets(lb.pid)) > before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert held <= before, f"{held} sockets held, {before} before the hostile clients came"
    assert httpx.get(f"{url}/whoami", timeout=5).status_code == 200
    assert "Traceback" not in lb.log()
