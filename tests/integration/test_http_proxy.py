"""mode http as a reverse proxy: keep-alive, pipelining, HEAD, bodies, forwarding fields, and the answers
pacslb gives on its own behalf (400, 408, 431, 502, 503, 504), driven by curl, httpx and raw sockets
against real nginx nodes (peers.NginxNode)."""

from __future__ import annotations

import contextlib
import itertools
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import peers
import pytest
from peers import NginxNode, PacslbProcess

pytestmark = pytest.mark.peers

PacslbFactory = Callable[[str], PacslbProcess]


@pytest.fixture
def web(tmp_path: Path) -> Iterator[list[NginxNode]]:
    nodes = peers.start_nginx(tmp_path / "nginx", 2)
    yield nodes
    for node in nodes:
        node.stop()


def start(pacslb: PacslbFactory, nodes: list[NginxNode], **options: object) -> tuple[PacslbProcess, str]:
    port = peers.free_port()
    spec = peers.http_service(port, nodes, **options)  # type: ignore[arg-type]
    lb = pacslb(peers.http_config({"web": spec}))
    return lb, f"http://127.0.0.1:{port}"


def echo(text: str) -> dict[str, str]:
    """The fields of an nginx /whoami answer: ``node=web1 xff=... proto=...``."""
    out = {}
    for part in text.split():
        key, _, value = part.partition("=")
        out[key] = value
    return out


def raw(port: int, payload: bytes, timeout: float = 5.0) -> bytes:
    """Send ``payload`` on one connection and read until the server closes it."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(payload)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return data


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def test_keep_alive_forwarding_fields_and_the_access_log(pacslb: PacslbFactory, web: list[NginxNode]) -> None:
    lb, url = start(pacslb, web)
    with httpx.Client(base_url=url) as client:
        first = client.get("/whoami", headers={"X-Forwarded-For": "10.9.8.7"})
        second = client.get("/whoami?patient=SECRET")
    assert first.status_code == second.status_code == 200
    fields = echo(first.text)
    # X-Forwarded-For is appended to; Host is kept; X-Forwarded-Host and -Proto say what pacslb received.
    assert fields["xff"] == "10.9.8.7,", fields  # nginx prints "10.9.8.7, 127.0.0.1" split by spaces
    assert "xff=10.9.8.7, 127.0.0.1 " in first.text
    assert fields["host"] == f"127.0.0.1:{port_of(url)}"
    assert fields["xfh"] == f"127.0.0.1:{port_of(url)}"
    assert fields["proto"] == "http"
    assert echo(second.text)["xff"] == "127.0.0.1"

    lines = lb.wait_events("request", 2, timeout=5.0)
    assert [e.get("status") for e in lines] == ["200", "200"]
    assert lines[0].get("method") == "GET" and lines[0].get("path") == "/whoami"
    assert lines[1].get("path") == "/whoami"  # the query (patient identifiers!) is not logged
    assert "SECRET" not in lb.log()
    assert lines[1].get("reused") == "1", "the second request did not reuse the pooled node connection"
    assert lines[0].get("client") == lines[1].get("client"), "the client connection was not kept alive"
    assert lines[0].get("server") in {"web1", "web2"}
    for key in ("bytes_down", "connect", "response", "duration", "rule"):
        assert lines[0].get(key), key


def node_connections(port: int) -> int:
    """Established TCP connections to 127.0.0.1:``port`` on this machine (from /proc/net/tcp)."""
    count = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        remote, state = fields[2], fields[3]
        if state == "01" and int(remote.rsplit(":", 1)[1], 16) == port:
            count += 1
    return count


def stalled_downloads(port: int, path: str, count: int) -> list[socket.socket]:
    """``count`` connections that each asked for ``path`` and read nothing yet: a body larger than every
    buffer on the way keeps each exchange, and its node connection, busy until it is read."""
    socks = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        sock.sendall(b"GET %s HTTP/1.1\r\nHost: h\r\n\r\n" % path.encode())
        socks.append(sock)
    return socks


def read_response(sock: socket.socket) -> int:
    """Read one response with a Content-Length body; returns its body's length."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
    received = len(body)
    while received < length:
        piece = sock.recv(1 << 20)
        assert piece, "the connection closed before the body's end"
        received += len(piece)
    return received


def test_the_connections_of_a_burst_serve_the_next_one(pacslb: PacslbFactory, web: list[NginxNode]) -> None:
    """Idle pooled connections beyond pool_size are closed by the pool's sweep once a sweep period did not
    need them, not as each comes back: a burst of parallel requests finds the connections the previous
    burst opened."""
    node = web[0]
    with (node.www / "big.bin").open("wb") as f:
        f.truncate(48 << 20)  # more than the socket buffers and pacslb's own hold between node and client
    # pool_idle 20s: a sweep every 5 s, and none closes anything before a whole period went unused.
    lb, url = start(
        pacslb, [node], persistence={"type": "none"}, http={"pool_size": 1, "timeouts": {"pool_idle": "20s"}}
    )
    port = port_of(url)
    for burst in (1, 2):
        socks = stalled_downloads(port, "/big.bin", 4)
        peers.wait_for(lambda: node_connections(node.port) >= 4, 10.0, "four node connections in use")
        try:
            assert [read_response(s) for s in socks] == [48 << 20] * 4
        finally:
            for sock in socks:
                sock.close()
        lines = lb.wait_events("request", 4 * burst, timeout=10.0)
        reused = [e.get("reused") for e in lines[4 * (burst - 1) :]]
        assert reused == (["0"] * 4 if burst == 1 else ["1"] * 4), reused
    # Then, a sweep period without requests later, the sweep closes what is idle beyond pool_size (1).
    peers.wait_for(lambda: node_connections(node.port) == 1, 40.0, "the pool trimmed to pool_size")


def test_forwarded_header_when_enabled(pacslb: PacslbFactory, web: list[NginxNode]) -> None:
    _, url = start(pacslb, web, http={"forward": {"forwarded": True, "x_forwarded_host": False}})
    text = httpx.get(f"{url}/whoami").text
    assert f'fwd=for=127.0.0.1;proto=http;host="127.0.0.1:{port_of(url)}"' in text
    assert echo(text)["xfh"] == ""


def test_pipelined_requests_are_answered_in_order(pacslb: PacslbFactory, web: list[NginxNode]) -> None:
    _, url = start(pacslb, web, persistence={"type": "none"})
    requests = (
        b"".join(b"GET /whoami?n=%d HTTP/1.1\r\nHost: h%d\r\n\r\n" % (i, i) for i in range(5))
        + b"HEAD /index.html HTTP/1.1\r\nHost: last\r\nConnection: close\r\n\r\n"
    )
    answer = raw(port_of(url), requests)
    assert answer.count(b"HTTP/1.1 200 OK") == 6
    hosts = [part.split(b" ")[0] for part in answer.split(b"host=")[1:]]
    assert hosts == [b"h0", b"h1", b"h2", b"h3", b"h4"], answer
    # The HEAD answer comes last, with the Content-Length of the page and no body after it.
    last = answer.rsplit(b"HTTP/1.1 200 OK", 1)[1]
    assert b"Content-Length: 31" in last and last.endswith(b"\r\n\r\n")
    assert b"Connection: close" in last


def test_head_and_http10(pacslb: PacslbFactory, web: list[NginxNode]) -> None:
    _, url = start(pacslb, web)
    head = httpx.head(f"{url}/index.html")
    assert head.status_code == 200 and head.headers["content-length"] == "31" and head.content == b""
    answer = raw(port_of(url), b"GET /whoami HTTP/1.0\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200 OK") and b"node=web" in answer
    assert b"Connection: close" in answer


def test_chunked_upload_and_expect_continue_with_curl(
    pacslb: PacslbFactory, web: list[NginxNode], tmp_path: Path
) -> None:
    _, url = start(pacslb, web, persistence={"type": "none"})
    data = tmp_path / "up.bin"
    data.write_bytes(bytes(range(256)) * 12289)  # 3 MiB + 256 bytes: curl asks Expect: 100-continue
    for name, extra in (("plain", []), ("chunked", ["-H", "Transfer-Encoding: chunked"])):
        done = subprocess.run(
            ["curl", "-sS", "-v", "-T", str(data), *extra, "-w", "%{http_code}", f"{url}/upload/{name}.bin"],
            capture_output=True,
            timeout=30,
            check=False,
        )
        assert done.stdout.decode().endswith("201"), done.stderr.decode()[-2000:]
        assert b"HTTP/1.1 100 Continue" in done.stderr
    stored = {p.name: p.read_bytes() for node in web for p in (node.www / "upload").iterdir()}
    assert stored == {"plain.bin": data.read_bytes(), "chunked.bin": data.read_bytes()}


def test_malformed_oversized_and_slow_requests(pacslb: PacslbFactory, web: list[NginxNode]) -> None:
    _, url = start(pacslb, web, http={"limits": {"max_head_size": 4096}, "timeouts": {"request_head": "500ms"}})
    port = port_of(url)
    assert raw(port, b"GARBAGE\r\n\r\n").startswith(b"HTTP/1.1 400 ")
    smuggle = b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    assert raw(port, smuggle).startswith(b"HTTP/1.1 400 ")
    assert raw(port, b"GET / HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 400 ")  # HTTP/1.1 needs Host
    big = b"GET / HTTP/1.1\r\nHost: a\r\nCookie: " + b"x" * 5000 + b"\r\n\r\n"
    assert raw(port, big).startswith(b"HTTP/1.1 431 ")
    assert raw(port, b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n").startswith(b"HTTP/1.1 405 ")
    # A head that trickles in too slowly: 408, then closed; meanwhile another client is served at once.
    with socket.create_connection(("127.0.0.1", port), timeout=5) as slow:
        slow.sendall(b"GET /whoami HTTP/1.1\r\nHost: a\r\n")
        started = time.monotonic()
        assert httpx.get(f"{url}/whoami", timeout=2).status_code == 200
        answer = slow.recv(4096)
        assert answer.startswith(b"HTTP/1.1 408 "), answer
        assert 0.4 < time.monotonic() - started < 3
    # An idle connection (no byte sent) is closed quietly, without a 408.
    with socket.create_connection(("127.0.0.1", port), timeout=5) as idle:
        assert idle.recv(4096) == b""


def test_the_balancers_own_answer_is_logged_before_its_linger(pacslb: PacslbFactory) -> None:
    """After its own final answer (here 503: the only node is gone) pacslb lingers up to a second before
    closing, so as not to reset a client still sending; the log line is written when the answer goes, so its
    duration is the exchange's own. The client here keeps its connection open through the whole linger."""
    port = peers.free_port()
    gone = {"gone": f"127.0.0.1:{peers.free_port()}"}
    lb = pacslb(peers.http_config({"web": peers.service(port, gone, mode="http", check={"type": "none"}, retries=0)}))
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"GET /viewer HTTP/1.1\r\nHost: pacs\r\n\r\n")
        assert sock.recv(4096).startswith(b"HTTP/1.1 503 ")
        assert sock.recv(4096) == b""  # the linger ends with a close
    line = lb.wait_event("request", timeout=5)
    assert (line.get("status"), line.get("end")) == ("503", "no_server")
    assert float(line.get("duration") or "nan") < 1.0  # 1 s: the linger, which the client sat through
    assert int(line.get("bytes_down") or 0) > 0


class _ThreadedNode:
    """A node on a loopback port, in threads: what it does with each connection is up to a subclass."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.conns: list[socket.socket] = []  # closed with the node
        self.accepted = 0
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.sock.getsockname()[1]}"

    def _run(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = self.sock.accept()
                self.accepted += 1
                self._accepted(conn)

    def _accepted(self, conn: socket.socket) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self.sock.close()
        for conn in self.conns:
            with contextlib.suppress(OSError):
                conn.close()


class _BadNode(_ThreadedNode):
    """A node that accepts and then misbehaves: ``silent`` never answers, otherwise it closes at once."""

    def __init__(self, silent: bool) -> None:
        self.silent = silent
        super().__init__()

    def _accepted(self, conn: socket.socket) -> None:
        if self.silent:
            self.conns.append(conn)
        else:
            conn.recv(65536)
            conn.close()


class _OneRequestNode(_ThreadedNode):
    """A node that answers one request per connection and closes the connection when the next request
    arrives, without answering it: what a node does that closes an idle keep-alive connection just as a
    request is on its way."""

    def _accepted(self, conn: socket.socket) -> None:
        threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    @staticmethod
    def _serve(conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            data = b""
            while b"\r\n\r\n" not in data:
                data += conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            conn.recv(65536)  # the next request: closed unanswered


def test_a_reused_connection_closed_under_a_request_is_retried_on_a_new_one(pacslb: PacslbFactory) -> None:
    node = _OneRequestNode()
    try:
        port = peers.free_port()
        spec = peers.service(port, {"one": node.address}, mode="http", check={"type": "none"})
        lb = pacslb(peers.http_config({"web": spec}))
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=5) as client:
            assert [client.get(f"/{n}").text for n in range(3)] == ["ok"] * 3
        lines = lb.wait_events("request", 3, timeout=5)
        assert [(e.get("status"), e.get("end"), e.get("reused")) for e in lines] == [("200", "ok", "0")] * 3
        assert node.accepted == 3  # each later request found its pooled connection closed, and retried
    finally:
        node.close()


def test_node_errors_become_502_and_504(pacslb: PacslbFactory) -> None:
    closing, silent = _BadNode(silent=False), _BadNode(silent=True)
    try:
        port = peers.free_port()
        spec = peers.service(
            port,
            {"closing": closing.address, "silent": silent.address},
            mode="http",
            balance="roundrobin",
            check={"type": "none"},
            http={"timeouts": {"server": "1s"}},
        )
        lb = pacslb(peers.http_config({"web": spec}))
        statuses = sorted(httpx.get(f"http://127.0.0.1:{port}/x", timeout=5).status_code for _ in range(2))
        assert statuses == [502, 504]
        answer = httpx.get(f"http://127.0.0.1:{port}/x", timeout=5)
        assert answer.status_code in (502, 504) and "PACS node" in answer.text
        lines = lb.wait_events("request", 3, timeout=5)
        ends = {e.get("server"): e.get("end") for e in lines}
        assert ends == {"closing": "server_closed", "silent": "server_timeout"}
        assert all(e.level == "warning" for e in lines)
    finally:
        closing.close()
        silent.close()


def test_no_node_gives_503_with_the_maintenance_page(pacslb: PacslbFactory, tmp_path: Path) -> None:
    page = tmp_path / "maintenance.html"
    page.write_text("<h1>PACS maintenance until 22:00</h1>")
    port = peers.free_port()
    spec = peers.service(
        port,
        {"gone": f"127.0.0.1:{peers.free_port()}"},
        mode="http",
        check={"type": "none"},
        retries=0,
        http={"maintenance_page": str(page), "retry_after": "2m"},
    )
    lb = pacslb(peers.http_config({"web": spec}))
    answer = httpx.get(f"http://127.0.0.1:{port}/viewer")
    assert answer.status_code == 503
    assert answer.headers["retry-after"] == "120"
    assert answer.headers["content-type"].startswith("text/html")
    assert "PACS maintenance" in answer.text
    line = lb.wait_event("request", timeout=5)
    assert (line.get("status"), line.get("end")) == ("503", "no_server")


def test_fallback_server_when_no_node_can_serve(pacslb: PacslbFactory, web: list[NginxNode]) -> None:
    port = peers.free_port()
    spec = peers.service(
        port,
        {"gone": f"127.0.0.1:{peers.free_port()}"},
        mode="http",
        check={"type": "none"},
        retries=0,
        persistence={"type": "cookie"},
        http={"fallback": web[1].address},
    )
    lb = pacslb(peers.http_config({"web": spec}))
    answer = httpx.get(f"http://127.0.0.1:{port}/whoami")
    assert answer.status_code == 200 and echo(answer.text)["node"] == "web2"
    assert "set-cookie" not in answer.headers  # the fallback is no node to stick to
    line = lb.wait_event("request", timeout=5, status="200")
    assert (line.get("server"), line.get("rule")) == ("fallback", "fallback")


def test_clock_skew_of_a_node_is_reported(pacslb: PacslbFactory) -> None:
    """A node whose Date header is 2 minutes ahead: the http check logs a clock_skew warning (once), and
    the node stays up."""
    import email.utils

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)

    def serve() -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = listener.accept()
                with conn:
                    conn.recv(65536)
                    date = email.utils.formatdate(time.time() + 120, usegmt=True).encode()
                    conn.sendall(b"HTTP/1.1 200 OK\r\nDate: %s\r\nContent-Length: 2\r\n\r\nok" % date)

    threading.Thread(target=serve, daemon=True).start()
    try:
        port = peers.free_port()
        node = f"127.0.0.1:{listener.getsockname()[1]}"
        check = {**peers.HTTP_CHECK, "path": "/", "max_clock_skew": "10s"}
        spec = peers.service(port, {"drifting": node}, mode="http", check=check)
        lb = pacslb(peers.http_config({"web": spec}))
        warning = lb.wait_event("clock_skew", timeout=5, address=node)
        assert warning.level == "warning" and 115 < float(warning.get("skew")) < 125
        time.sleep(1.2)  # a few more checks: no more warnings, and the node is still up
        assert len(lb.events("clock_skew")) == 1
        assert not lb.events("health")
    finally:
        listener.close()


class _ScriptedNode(_ThreadedNode):
    """A keep-alive node whose answer depends on the path: ``/small``, ``/big`` (2 MiB), ``/slow`` (after
    0.3 s), ``/hold`` (after 5 s), ``/hints`` (103 Early Hints, then 200), ``/flood`` (thousands of 103s
    before its 200), ``/bad`` (not HTTP) and ``/never`` (no answer)."""

    BIG = 2 * 1024 * 1024

    def _accepted(self, conn: socket.socket) -> None:
        self.conns.append(conn)
        threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        data = b""
        with contextlib.suppress(OSError):
            while True:
                while b"\r\n\r\n" not in data:
                    more = conn.recv(65536)
                    if not more:
                        return
                    data += more
                head, _, data = data.partition(b"\r\n\r\n")
                path = head.split(b" ", 2)[1]
                if path == b"/never":
                    continue  # holds the connection, answers nothing
                if path == b"/bad":
                    conn.sendall(b"this is not HTTP\r\n\r\n")
                    return
                if path == b"/slow":
                    time.sleep(0.3)
                if path == b"/hold":
                    time.sleep(5)
                if path == b"/hints":
                    conn.sendall(b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n")
                if path == b"/flood":
                    conn.sendall(b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n" * 5000)
                body = b"b" * self.BIG if path == b"/big" else b"ok " + path
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))


def test_unusual_responses_on_pooled_connections(pacslb: PacslbFactory) -> None:
    """Requests that find a pooled connection are served without waking the client's task, until their
    response is unusual (large, slow, interim, malformed, missing): each must still be answered as usual."""
    node = _ScriptedNode()
    try:
        port = peers.free_port()
        spec = peers.service(
            port, {"n": node.address}, mode="http", check={"type": "none"}, http={"timeouts": {"server": "1s"}}
        )
        lb = pacslb(peers.http_config({"web": spec}))
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=5) as client:
            assert client.get("/small").text == "ok /small"
            assert client.get("/small").text == "ok /small"
            big = client.get("/big")
            assert big.status_code == 200 and big.content == b"b" * node.BIG
            assert client.get("/slow").text == "ok /slow"
            hints = client.get("/hints")
            assert (hints.status_code, hints.text) == (200, "ok /hints")
            assert client.get("/small").text == "ok /small"
            assert client.get("/bad").status_code == 502
            assert client.get("/small").text == "ok /small"
            assert client.get("/small").text == "ok /small"
            assert client.get("/never").status_code == 504
            assert client.get("/small").text == "ok /small"
            assert client.get("/flood").status_code == 502  # a node that would never stop sending interims
            assert client.get("/small").text == "ok /small"
        lines = lb.wait_events("request", 13, timeout=5)
        # (an answer of the balancer's own is logged after its linger, so the lines are not in request order)
        got = sorted((e.get("path"), e.get("status"), e.get("end"), e.get("reused")) for e in lines)
        assert got == sorted(
            [
                ("/small", "200", "ok", "0"),
                ("/small", "200", "ok", "1"),
                ("/big", "200", "ok", "1"),
                ("/slow", "200", "ok", "1"),
                ("/hints", "200", "ok", "1"),
                ("/small", "200", "ok", "1"),
                ("/bad", "502", "bad_response", "1"),  # its node connection is closed: a new one after
                ("/small", "200", "ok", "0"),
                ("/small", "200", "ok", "1"),
                ("/never", "504", "server_timeout", "1"),
                ("/small", "200", "ok", "0"),
                ("/flood", "502", "bad_response", "1"),
                ("/small", "200", "ok", "0"),
            ]
        )
    finally:
        node.close()


def test_keep_alive_and_head_timeouts_after_requests(pacslb: PacslbFactory, web: list[NginxNode]) -> None:
    """The keep-alive timeout counts from the end of the last exchange (however it was served), and a head
    that starts on an old keep-alive connection gets the head timeout from its first byte."""
    _, url = start(pacslb, web, http={"timeouts": {"keep_alive": "600ms", "request_head": "600ms"}})
    request = b"GET /whoami HTTP/1.1\r\nHost: a\r\n\r\n"

    def exchange(sock: socket.socket) -> bytes:
        sock.sendall(request)
        answer = b""
        while b"\r\n\r\n" not in answer:
            more = sock.recv(65536)
            assert more, answer
            answer += more
        head, _, body = answer.partition(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
        while len(body) < length:
            more = sock.recv(65536)
            assert more, answer
            body += more
        return head

    with socket.create_connection(("127.0.0.1", port_of(url)), timeout=5) as sock:
        for _ in range(3):
            assert exchange(sock).startswith(b"HTTP/1.1 200 ")
            time.sleep(0.4)  # under the keep-alive timeout each time, though longer than it in all
        assert sock.recv(4096) == b""  # then closed quietly once idle for the timeout
    with socket.create_connection(("127.0.0.1", port_of(url)), timeout=5) as sock:
        assert exchange(sock).startswith(b"HTTP/1.1 200 ")
        time.sleep(0.4)
        sock.sendall(b"GET /whoami HTTP/1.1\r\n")  # a head begins, and never ends
        assert sock.recv(4096).startswith(b"HTTP/1.1 408 ")


@pytest.mark.parametrize("workers", [1, 2])
def test_a_halt_cuts_requests_in_progress_after_its_grace_and_counters_follow(
    pacslb: PacslbFactory, tmp_path: Path, workers: int
) -> None:
    """With ``workers: 2`` the main process and a web worker take turns at the connections: the first (two
    requests) is the worker's, the one cut by the halt the main process's, the refused one the worker's."""
    node = _ScriptedNode()
    token_file = tmp_path / "token"
    token_file.write_text("http-halt-token-0123456789abcdef\n")
    try:
        port, admin = peers.free_port(), peers.free_port()
        spec = peers.service(
            port, {"n": node.address}, mode="http", check={"type": "none"}, http={"timeouts": {"server": "10s"}}
        )
        lb = pacslb(
            peers.http_config(
                {"web": spec}, workers=workers, admin=peers.admin_section(admin, token_file), halt_grace="500ms"
            )
        )
        url = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=url, timeout=5) as client:
            assert [client.get("/small").text for _ in range(2)] == ["ok /small"] * 2
        held: list[int] = []
        waiting = threading.Thread(target=lambda: held.append(httpx.get(f"{url}/hold", timeout=10).status_code))
        waiting.start()
        time.sleep(0.3)  # the request is with the node
        halted = peers.admin_api(
            admin, "POST", "/api/v1/services/web/servers/n/halt", token="http-halt-token-0123456789abcdef"
        )
        assert halted.status_code == 200, halted.text
        waiting.join(10)
        assert held == [502]  # cut after the grace, long before the node would have answered
        assert httpx.get(f"{url}/small", timeout=5).status_code == 503  # nothing left to serve
        cut = lb.wait_event("request", timeout=5, path="/hold")
        assert (cut.get("status"), cut.get("end"), cut.level) == ("502", "halted", "warning")
        assert lb.wait_event("halt_closed", timeout=5).get("connections") == "1"
        deadline = time.monotonic() + 5  # a web worker reports its counters every quarter second
        while True:
            status = peers.admin_api(admin, "GET", "/api/v1/status").json()
            service = next(s for s in status["services"] if s["name"] == "web")
            if (service["rejections"] and service["servers"][0]["bytes_down"]) or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert service["rejections"] == {"no_server": 1}
        server = service["servers"][0]
        assert server["bytes_down"] >= 2 * len(b"ok /small") and server["bytes_up"] == 0
        assert server["active"] == 0
    finally:
        node.close()


def test_round_robin_spreads_requests_without_persistence(pacslb: PacslbFactory, web: list[NginxNode]) -> None:
    """Requests on one keep-alive connection, without persistence, go to every node in turn (whether or not
    a pooled connection to the node is there yet)."""
    _, url = start(pacslb, web, balance="roundrobin", persistence={"type": "none"})
    with httpx.Client(base_url=url, timeout=5) as client:
        nodes = [echo(client.get("/whoami").text)["node"] for _ in range(8)]
    assert sorted(set(nodes)) == sorted(n.name for n in web)
    assert all(a != b for a, b in itertools.pairwise(nodes)), nodes  # strictly alternating
