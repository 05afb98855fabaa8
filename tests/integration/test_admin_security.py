"""Who may use the admin API of a running pacslb (a child process), as an attacker would probe it and as an
operator uses it: DNS rebinding (a foreign Host), reads of client data without the token from loopback,
writes a web page elsewhere could make (``Origin: null``, text/plain, forms), idle connections held to
crowd out /healthz, and the warning when no token is set. Behind a DICOM service on a pynetdicom node,
so that the persistence table holds what must not leak: client addresses and calling AE titles.
"""

from __future__ import annotations

import select
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import peers
import pytest
from peers import EchoSCP, PacslbProcess

from pacslb.admin.connections import ADMIN_IDLE_MARK, ADMIN_IDLE_TIMEOUT, ADMIN_MAX_CONNECTIONS

PacslbFactory = Callable[[str], PacslbProcess]
TOKEN = "security-token-0123456789abcdef"
#: The held connections of the idle tests: more than the admin listener serves at once (64).
HELD = 70
#: Closing a connection idle past ADMIN_IDLE_TIMEOUT is a timer on the balancer's loop; a loaded machine
#: may run it late, never this late.
CLOSE_BOUND = ADMIN_IDLE_TIMEOUT + 10.0


def start(pacslb: PacslbFactory, tmp_path: Path, node: EchoSCP, token: bool) -> tuple[PacslbProcess, int, int]:
    admin, dicom = peers.free_port(), peers.free_port()
    token_file = None
    if token:
        token_file = tmp_path / "token"
        token_file.write_text(TOKEN + "\n")
    services = {
        "dicom": peers.dicom_service(
            dicom, {"pacs1": node.address}, persistence={"type": "calling_ae+source_ip", "timeout": "10m"}
        )
    }
    lb = pacslb(peers.config_text(services, admin=peers.admin_section(admin, token_file), workers=1))
    return lb, admin, dicom


@pytest.fixture
def node() -> Iterator[EchoSCP]:
    with EchoSCP() as scp:
        yield scp


def get(admin: int, path: str, **headers: str) -> httpx.Response:
    """A GET as a browser page or a local process would make it: no token unless given in ``headers``."""
    return httpx.get(f"http://127.0.0.1:{admin}{path}", headers=headers, timeout=peers.ADMIN_TIMEOUT, trust_env=False)


def post(admin: int, path: str, **kwargs: object) -> httpx.Response:
    return httpx.post(f"http://127.0.0.1:{admin}{path}", timeout=peers.ADMIN_TIMEOUT, trust_env=False, **kwargs)  # type: ignore[arg-type]


def test_with_a_token_client_data_needs_it_and_a_rebound_host_gets_403(
    pacslb: PacslbFactory, tmp_path: Path, node: EchoSCP
) -> None:
    lb, admin, dicom = start(pacslb, tmp_path, node, token=True)
    peers.echo_as(dicom, "MODALITY7", "127.0.0.7")
    assert not lb.events("admin_no_token")
    bearer = f"Bearer {TOKEN}"

    # The token's holder sees the table: an AE title and a client address.
    table = get(admin, "/api/v1/services/dicom/persistence", Authorization=bearer)
    assert table.status_code == 200 and "MODALITY7" in table.text, table.text

    # A local process or page without the token, from loopback: nothing that names a client.
    for path in ("/api/v1/status", "/api/v1/services/dicom/persistence", "/api/v1/events", "/api/v1/history",
                 "/metrics"):  # fmt: skip
        answer = get(admin, path)
        assert answer.status_code == 401, (path, answer.status_code, answer.text)
        assert "MODALITY7" not in answer.text and "127.0.0.7" not in answer.text
        assert answer.headers["www-authenticate"] == "Bearer"
    # A DNS-rebinding page (its own name resolved to 127.0.0.1): refused before anything else, token or not.
    for path in ("/api/v1/status", "/api/v1/services/dicom/persistence", "/healthz", "/"):
        for headers in ({}, {"Authorization": bearer}):
            rebound = get(admin, path, Host=f"rebind.evil.example:{admin}", **headers)
            assert rebound.status_code == 403, (path, headers, rebound.status_code)
            assert "MODALITY7" not in rebound.text
    # What stays open: the probe, and the dashboard's files (they hold no data; the page asks for the token).
    for path in ("/healthz", "/", "/static/dashboard.js", "/openapi.json"):
        assert get(admin, path).status_code == 200, path
    # Loopback names and literal IPv6 forms keep working.
    for host in (f"localhost:{admin}", f"127.0.0.1:{admin}", f"[::1]:{admin}", f"[::ffff:127.0.0.1]:{admin}"):
        assert get(admin, "/api/v1/status", Host=host, Authorization=bearer).status_code == 200, host


def test_without_a_token_a_warning_and_no_simple_request_halts_a_node(
    pacslb: PacslbFactory, tmp_path: Path, node: EchoSCP
) -> None:
    lb, admin, _ = start(pacslb, tmp_path, node, token=False)
    warning = lb.wait_event("admin_no_token", 5.0)
    assert warning.level == "warning" and warning.get("address") == f"127.0.0.1:{admin}"

    halt = "/api/v1/nodes/pacs1/halt"
    # What a page elsewhere can send without a preflight: a sandboxed frame's fetch (Origin: null) with
    # text/plain, a form, a bare POST; and a fetch from a page on another origin.
    probes = {
        "null origin": post(admin, halt, content=b"{}", headers={"Origin": "null", "Content-Type": "text/plain"}),
        "text/plain": post(admin, halt, content=b"{}", headers={"Content-Type": "text/plain"}),
        "form": post(admin, halt, data={"node": "pacs1"}, headers={"Origin": "null"}),
        "urlencoded": post(admin, halt, data={"node": "pacs1"}),
        "bare": post(admin, halt),
        "other origin": post(admin, halt, json={}, headers={"Origin": "http://evil.example"}),
        "cross-site": post(admin, halt, headers={"X-Pacslb-Request": "1", "Sec-Fetch-Site": "cross-site"}),
        "rebound": post(admin, halt, headers={"X-Pacslb-Request": "1", "Host": "rebind.evil.example"}),
    }
    codes = {name: answer.status_code for name, answer in probes.items()}
    assert codes == {"null origin": 403, "text/plain": 415, "form": 403, "urlencoded": 415, "bare": 415,
                     "other origin": 403, "cross-site": 403, "rebound": 403}, codes  # fmt: skip
    assert peers.admin_server(admin, "dicom", "pacs1")["admin"] == "online"
    assert not lb.events("admin")  # no admin state changed

    # Programs and the dashboard: a JSON body or the header.
    assert post(admin, "/api/v1/nodes/pacs1/drain", json={}).status_code == 200
    assert peers.admin_server(admin, "dicom", "pacs1")["admin"] == "drain"
    assert post(admin, "/api/v1/nodes/pacs1/online", headers={"X-Pacslb-Request": "1"}).status_code == 200
    assert peers.admin_server(admin, "dicom", "pacs1")["admin"] == "online"


def _closed(sock: socket.socket) -> bool:
    """Whether the peer closed ``sock`` (without waiting; what it sent before is read and dropped)."""
    while select.select([sock], [], [], 0)[0]:
        try:
            if sock.recv(65536) == b"":
                return True
        except ConnectionResetError:
            return True
    return False


def _wait_closed(socks: list[socket.socket], timeout: float) -> list[socket.socket]:
    """Wait (bounded) until every socket is closed by the balancer; returns the ones still open."""
    deadline = time.monotonic() + timeout
    while True:
        still = [s for s in socks if not _closed(s)]
        if not still or time.monotonic() >= deadline:
            return still
        time.sleep(0.05)


def test_idle_connections_cannot_make_healthz_fail(pacslb: PacslbFactory, tmp_path: Path, node: EchoSCP) -> None:
    _, admin, _ = start(pacslb, tmp_path, node, token=True)
    head = f"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1:{admin}\r\n\r\n".encode()
    held: list[socket.socket] = []
    try:
        # A third answered once and kept alive, a third that never send a byte, a third half a request head.
        for i in range(HELD):
            sock = socket.create_connection(("127.0.0.1", admin), timeout=10)
            held.append(sock)
            if i % 3 == 0:
                sock.sendall(head)
                assert sock.recv(4096).startswith(b"HTTP/1.1 200"), i
            elif i % 3 == 1:
                sock.sendall(b"GET /api/v1/status HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        assert HELD > ADMIN_MAX_CONNECTIONS
        for _ in range(3):
            assert get(admin, "/healthz").status_code == 200
            assert get(admin, "/api/v1/status", Authorization=f"Bearer {TOKEN}").status_code == 200
        # The oldest idle connections were closed to make room; the newest are still open (so it was not the
        # idle timeout that made room: it would have closed them all).
        open_now = [s for s in held if not _closed(s)]
        assert 0 < len(open_now) <= ADMIN_IDLE_MARK, len(open_now)
        assert not _closed(held[-1])
        # Then every idle one is closed by the idle timeout, also one that keeps trickling a head.
        trickle = socket.create_connection(("127.0.0.1", admin), timeout=10)
        held.append(trickle)
        took = _trickle_until_closed(trickle, b"GET / HTTP/1.1\r\n", b"X-Slow: 1\r\n")
        assert ADMIN_IDLE_TIMEOUT - 0.5 <= took < CLOSE_BOUND
        assert not _wait_closed(open_now, CLOSE_BOUND), "idle connections outlived the idle timeout"
        assert get(admin, "/healthz").status_code == 200
    finally:
        for sock in held:
            sock.close()


def _trickle_until_closed(sock: socket.socket, first: bytes, more: bytes) -> float:
    """Send ``first``, then ``more`` every half second until the balancer closes ``sock`` (bounded);
    returns how long that took."""
    started = time.monotonic()
    sock.sendall(first)
    while not _closed(sock) and time.monotonic() - started < CLOSE_BOUND:
        time.sleep(0.5)
        try:
            sock.sendall(more)
        except OSError:
            break
    assert not _wait_closed([sock], 1.0), "trickled bytes kept the connection open"
    return time.monotonic() - started


def test_a_request_body_sent_slowly_is_cut_after_the_idle_timeout(
    pacslb: PacslbFactory, tmp_path: Path, node: EchoSCP
) -> None:
    _, admin, _ = start(pacslb, tmp_path, node, token=True)
    head = (
        f"PUT /api/v1/nodes/pacs1/weight HTTP/1.1\r\nHost: 127.0.0.1:{admin}\r\nContent-Type: application/json\r\n"
        "Content-Length: 100000\r\n\r\n{"
    ).encode()
    with socket.create_connection(("127.0.0.1", admin), timeout=10) as sock:
        took = _trickle_until_closed(sock, head, b" ")
    assert ADMIN_IDLE_TIMEOUT - 0.5 <= took < CLOSE_BOUND
    assert get(admin, "/healthz").status_code == 200
