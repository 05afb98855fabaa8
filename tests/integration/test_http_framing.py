"""Request smuggling and response splitting, tested differentially (the idea of HTTP Garden, without Docker).

Every hostile request goes through pacslb to three real servers of different families: nginx, Orthanc's
embedded web server (CivetWeb) and a Python h11 server. What each of them says it received is compared
with what pacslb says it forwarded: the same requests, in the same order, with the same bodies. A
request pacslb refused (4xx) must reach no server; a request it forwarded must reach every server as one
request, never as two, never glued to the next client's. After each hostile connection a second client
(the "victim", with its own session cookie) sends a plain request: it must arrive as itself, on whatever
pooled node connection the attack left behind, and nobody's path may carry the victim's cookie.

The responses are tested the same way the other way round: a scripted node sends hostile responses, and
two client parsers (h11 and curl) must agree with pacslb on where each response ends; a response whose
framing pacslb would change is a 502, and bytes a node sends past its response never reach a client.
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import h11
import peers
import pytest
from peers import OrthancNode, PacslbProcess

pytestmark = pytest.mark.peers

PacslbFactory = Callable[[str], PacslbProcess]

#: How long one hostile connection may take to be answered and closed, and a log line to appear.
WITHIN = 15.0
HOST = b"Host: pacs\r\n"


def _smuggled(p: str) -> bytes:
    """A request hidden in a body: whatever reads it as a request logs ``p/smuggled``. It ends without its
    blank line, so that a node reading it as a request glues the next bytes (the victim's) to it."""
    return f"GET {p}/smuggled HTTP/1.1\r\nHost: pacs\r\nX-Glue: ".encode()


def _cl(p: str, head: bytes, body: bytes) -> bytes:
    return f"POST {p}/a HTTP/1.1\r\n".encode() + HOST + head + b"Content-Length: %d\r\n\r\n" % len(body) + body


def _chunked(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n0\r\n\r\n" % (len(data), data)


#: Hostile requests: a name, and the bytes sent on one connection, made from the case's path prefix.
REQUESTS: dict[str, Callable[[str], bytes]] = {
    # The defect found in the field: Content-Length removed as a Connection option, body forwarded.
    "connection_names_content_length": lambda p: _cl(p, b"Connection: keep-alive, Content-Length\r\n", _smuggled(p)),
    "connection_names_content_length_in_a_second_field": lambda p: _cl(
        p, b"Connection: keep-alive\r\nConnection: content-length\r\n", _smuggled(p)
    ),
    "connection_names_host": lambda p: f"GET {p}/a HTTP/1.1\r\nHost: pacs\r\nConnection: Host\r\n\r\n".encode(),
    # Transfer codings.
    "gzip_then_chunked": lambda p: (
        f"POST {p}/a HTTP/1.1\r\n".encode()
        + HOST
        + b"Transfer-Encoding: gzip, chunked\r\n\r\n"
        + _chunked(_smuggled(p))
    ),
    "chunked_twice": lambda p: (
        f"POST {p}/a HTTP/1.1\r\n".encode()
        + HOST
        + b"Transfer-Encoding: chunked, chunked\r\n\r\n"
        + _chunked(_smuggled(p))
    ),
    "chunked_in_http10": lambda p: (
        f"POST {p}/a HTTP/1.0\r\n".encode() + HOST + b"Transfer-Encoding: chunked\r\n\r\n" + _chunked(b"x")
    ),
    "xchunked_and_length": lambda p: _cl(p, b"Transfer-Encoding: xchunked\r\n", _chunked(_smuggled(p))),
    "cl_te": lambda p: _cl(p, b"Transfer-Encoding: chunked\r\n", b"0\r\n\r\n" + _smuggled(p)),
    "te_cl": lambda p: (
        f"POST {p}/a HTTP/1.1\r\n".encode()
        + HOST
        + b"Transfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n"
        + _chunked(_smuggled(p))
    ),
    "te_with_space_before_colon": lambda p: _cl(p, b"Transfer-Encoding : chunked\r\n", b"0\r\n\r\n" + _smuggled(p)),
    "te_folded": lambda p: _cl(p, b"Transfer-Encoding:\r\n chunked\r\n", b"0\r\n\r\n" + _smuggled(p)),
    "te_vertical_tab": lambda p: _cl(p, b"Transfer-Encoding: \x0bchunked\r\n", b"0\r\n\r\n" + _smuggled(p)),
    "two_lengths": lambda p: _cl(p, b"Content-Length: 0\r\n", _smuggled(p)),
    "length_with_space_before_colon": lambda p: (
        f"POST {p}/a HTTP/1.1\r\n".encode() + HOST + b"Content-Length : %d\r\n\r\n" % len(_smuggled(p)) + _smuggled(p)
    ),
    "length_with_plus_sign": lambda p: (
        f"POST {p}/a HTTP/1.1\r\n".encode() + HOST + b"Content-Length: +%d\r\n\r\n" % len(_smuggled(p)) + _smuggled(p)
    ),
    "chunk_size_with_bare_lf": lambda p: (
        f"POST {p}/a HTTP/1.1\r\n".encode()
        + HOST
        + b"Transfer-Encoding: chunked\r\n\r\n3\nabc\r\n0\r\n\r\n"
        + _smuggled(p)
    ),
    "chunk_data_longer_than_its_size": lambda p: (
        f"POST {p}/a HTTP/1.1\r\n".encode() + HOST + b"Transfer-Encoding: chunked\r\n\r\n3\r\nabcdef\r\n0\r\n\r\n"
    ),
    "length_in_the_trailer": lambda p: (
        f"POST {p}/a HTTP/1.1\r\n".encode()
        + HOST
        + b"Transfer-Encoding: chunked\r\n\r\n0\r\nContent-Length: 50\r\n\r\n"
        + _smuggled(p)
    ),
    "bare_lf_head": lambda p: f"GET {p}/a HTTP/1.1\nHost: pacs\n\n".encode(),
    "nul_in_a_field": lambda p: f"GET {p}/a HTTP/1.1\r\nHost: pacs\r\nX: a\x00b\r\n\r\n".encode(),
    "two_hosts": lambda p: f"GET {p}/a HTTP/1.1\r\nHost: pacs\r\nHost: other\r\n\r\n".encode(),
    "host_with_a_path": lambda p: f"GET {p}/a HTTP/1.1\r\nHost: pacs/x\r\n\r\n".encode(),
    "upgrade_with_a_body": lambda p: _cl(p, b"Connection: Upgrade\r\nUpgrade: websocket\r\n", _smuggled(p)),
    # Well-formed, though unusual: every party must read them alike (and forward them).
    "get_with_a_body": lambda p: (
        f"GET {p}/a HTTP/1.1\r\n".encode() + HOST + b"Content-Length: %d\r\n\r\n" % len(_smuggled(p)) + _smuggled(p)
    ),
    "chunked_with_extensions_and_trailer": lambda p: (
        f"POST {p}/a HTTP/1.1\r\n".encode()
        + HOST
        + b"Transfer-Encoding: chunked\r\n\r\n5;name=value\r\nhello\r\n0\r\nX-Trailer: 1\r\n\r\n"
    ),
    "length_with_leading_zeros": lambda p: (
        f"POST {p}/a HTTP/1.1\r\n".encode() + HOST + b"Content-Length: 005\r\n\r\nhello"
    ),
    "pipelined_with_bodies": lambda p: (
        _cl(p, b"", b"one")
        + f"POST {p}/b HTTP/1.1\r\n".encode()
        + HOST
        + b"Transfer-Encoding: chunked\r\n\r\n"
        + _chunked(b"two")
        + f"GET {p}/c HTTP/1.1\r\nHost: pacs\r\n\r\n".encode()
    ),
    "connection_names_an_end_to_end_field": lambda p: (
        f"GET {p}/a HTTP/1.1\r\n".encode() + HOST + b"Connection: X-Drop\r\nX-Drop: 1\r\n\r\n"
    ),
    "expect_continue": lambda p: (
        f"POST {p}/a HTTP/1.1\r\n".encode() + HOST + b"Expect: 100-continue\r\nContent-Length: 5\r\n\r\nhello"
    ),
}


@dataclass
class Seen:
    """One request as a server (or pacslb) read it."""

    path: str
    body: int | None = None  # body length, where the party reports it


# -------------------------------------------------------------------------------------------- the servers


class H11Node:
    """A keep-alive HTTP/1.1 server built on h11, in threads: it records every request head it reads (path,
    whether its body ended, cookie) and answers 200 with the path; a request h11 finds malformed is
    answered 400 and its connection closed."""

    def __init__(self) -> None:
        self.name = "h11"
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.seen: list[list[str | bool | bytes | None]] = []  # [path, complete, cookie]
        self.lock = threading.Lock()
        threading.Thread(target=self._run, daemon=True).start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.sock.getsockname()[1]}"

    def _run(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = self.sock.accept()
                threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        http = h11.Connection(h11.SERVER)
        entry: list[str | bool | bytes | None] = []
        with contextlib.closing(conn), contextlib.suppress(OSError, h11.LocalProtocolError):
            while True:
                try:
                    event = http.next_event()
                except h11.RemoteProtocolError:
                    with self.lock:
                        self.seen.append(["!malformed", False, None])
                    conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                    return
                if event is h11.NEED_DATA:
                    data = conn.recv(65536)
                    http.receive_data(data)
                    if not data and http.their_state is not h11.SEND_BODY:
                        return
                elif isinstance(event, h11.Request):
                    path = event.target.decode("latin-1").partition("?")[0]
                    entry = [path, False, dict(event.headers).get(b"cookie")]
                    with self.lock:
                        self.seen.append(entry)
                elif isinstance(event, h11.EndOfMessage):
                    entry[1] = True
                    answer = str(entry[0]).encode()
                    response = h11.Response(status_code=200, headers=[("Content-Length", str(len(answer)))])
                    conn.sendall(http.send(response) + http.send(h11.Data(data=answer)) + http.send(h11.EndOfMessage()))
                    if http.our_state is h11.MUST_CLOSE:
                        return
                    http.start_next_cycle()
                elif isinstance(event, h11.ConnectionClosed):
                    return

    def paths(self, prefix: str) -> list[Seen]:
        with self.lock:
            return [Seen(str(path)) for path, _, _ in self.seen if str(path).startswith(prefix)]

    def complete(self, prefix: str) -> list[str]:
        """The paths of the requests whose body ended (the others were cut by the connection's close)."""
        with self.lock:
            return [str(path) for path, done, _ in self.seen if done and str(path).startswith(prefix)]

    def cookies(self, prefix: str) -> dict[str, object]:
        with self.lock:
            return {str(path): cookie for path, _, cookie in self.seen if str(path).startswith(prefix)}

    def stop(self) -> None:
        self.sock.close()


_NGINX_DIFF_CONF = """
worker_processes 1;
master_process off;
daemon off;
user root;
pid {root}/nginx.pid;
error_log {root}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    log_format framing '$request_method $request_uri $request_length';
    access_log {root}/access.log framing;
    client_body_temp_path {root}/tmp;
    keepalive_requests 100000;
    server {{
        listen 127.0.0.1:{port};
        client_max_body_size 1m;
        location / {{
            default_type text/plain;
            return 200 "$request_uri";
        }}
    }}
}}
"""


class NginxDiffNode:
    """nginx answering every request with its target, logging method, target and request length."""

    def __init__(self, root: Path) -> None:
        self.name = "nginx"
        self.root = root
        self.port = peers.free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> NginxDiffNode:
        (self.root / "tmp").mkdir(parents=True, exist_ok=True)
        conf = self.root / "nginx.conf"
        conf.write_text(_NGINX_DIFF_CONF.format(root=self.root, port=self.port))
        self.proc = peers._popen([str(peers.NGINX_BIN), "-c", str(conf), "-p", str(self.root)], self.root / "out")
        peers.wait_for(lambda: not peers.tcp_connect_refused(self.port), WITHIN, "nginx to listen")
        return self

    def paths(self, prefix: str) -> list[Seen]:
        log = self.root / "access.log"
        lines = log.read_text(errors="replace").splitlines() if log.exists() else []
        out = []
        for line in lines:
            fields = line.split(" ")
            if len(fields) == 3 and fields[1].partition("?")[0].startswith(prefix):
                out.append(Seen(fields[1].partition("?")[0]))
        return out

    def stop(self) -> None:
        if self.proc is not None:
            peers._stop_process(self.proc, 10.0)
            self.proc = None


class OrthancDiffNode:
    """Orthanc with --verbose, which logs every request it reads: ``(http) GET /path``."""

    _LINE = re.compile(r"\(http\) ([A-Z]+) (\S+)")

    def __init__(self, root: Path) -> None:
        self.name = "orthanc"
        self.node = OrthancNode("orthanc", peers.free_port(), peers.free_port(), root, root / "worklists")

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.node.http_port}"

    def start(self) -> OrthancDiffNode:
        node = self.node
        node.root.mkdir(parents=True, exist_ok=True)
        node.worklists.mkdir(parents=True, exist_ok=True)
        config = node.root / "orthanc.json"
        settings = node.config()
        settings.pop("Plugins")
        settings.pop("Worklists")
        config.write_text(json.dumps(settings))
        node.proc = peers._popen([str(peers.ORTHANC_BIN), "--verbose", str(config)], node.log_path, cwd=node.root)
        peers.wait_for(lambda: not peers.tcp_connect_refused(node.http_port), WITHIN * 2, "Orthanc to listen")
        return self

    def paths(self, prefix: str) -> list[Seen]:
        text = self.node.log_path.read_bytes().decode("latin-1") if self.node.log_path.exists() else ""
        return [Seen(m.group(2)) for m in self._LINE.finditer(text) if m.group(2).startswith(prefix)]

    def stop(self) -> None:
        self.node.stop()


Node = H11Node | NginxDiffNode | OrthancDiffNode


@pytest.fixture
def nodes(tmp_path: Path) -> Iterator[list[Node]]:
    started: list[Node] = []
    try:
        started.append(H11Node())
        started.append(NginxDiffNode(tmp_path / "nginx").start())
        started.append(OrthancDiffNode(tmp_path / "orthanc").start())
        yield started
    finally:
        for node in started:
            node.stop()


def _forwarded(lb: PacslbProcess, service: str, prefix: str, whole: bool = False) -> list[Seen]:
    """What pacslb says it forwarded: its request lines that name a node (with ``whole``, only those it
    forwarded to their end: a body found malformed once its head was sent is cut, with the connection)."""
    return [
        Seen(e.get("path"))
        for e in lb.events("request", service=service)
        if e.get("path").startswith(prefix) and e.get("server") not in ("", "-") and (not whole or e.get("end") == "ok")
    ]


def _logged(path: str, seen: Callable[[], list[Seen]]) -> Callable[[], bool]:
    return lambda: any(s.path == path for s in seen())


def _answers(port: int, payload: bytes) -> bytes:
    """Send ``payload`` on one connection, half-close it, and read until pacslb closes (bounded)."""
    data = b""
    with socket.create_connection(("127.0.0.1", port), timeout=WITHIN) as sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        with contextlib.suppress(ConnectionResetError, TimeoutError):
            while chunk := sock.recv(65536):
                data += chunk
    return data


def _victim(port: int, path: str) -> bytes:
    """A plain request with its own session cookie, on a connection of its own; returns the answer."""
    request = f"GET {path} HTTP/1.1\r\nHost: pacs\r\nCookie: session=victim\r\nConnection: close\r\n\r\n"
    return _answers(port, request.encode())


def test_every_server_reads_what_pacslb_forwarded_and_nothing_else(pacslb: PacslbFactory, nodes: list[Node]) -> None:
    ports = {node.name: peers.free_port() for node in nodes}
    services = {
        node.name: peers.service(
            ports[node.name],
            {node.name: node.address},
            mode="http",
            persistence={"type": "none"},
            check={"type": "none"},
        )
        for node in nodes
    }
    lb = pacslb(peers.http_config(services))
    disagreements: list[str] = []
    for number, (case, build) in enumerate(REQUESTS.items()):
        prefix = f"/c{number:02d}"
        for node in nodes:
            port = ports[node.name]
            answer = _answers(port, build(prefix))
            victim = f"{prefix}/victim"
            victim_answer = _victim(port, victim)
            # (Orthanc knows no such path: 404, from Orthanc itself.)
            assert re.match(rb"HTTP/1\.1 (200|404) ", victim_answer), f"{case} via {node.name}: {victim_answer[:200]!r}"
            # The victim's request is the last one of the case: once pacslb and the node have logged it,
            # everything of the case is in both logs.
            logged = _logged(victim, lambda: _forwarded(lb, node.name, prefix))  # noqa: B023
            peers.wait_for(logged, WITHIN, "pacslb's request line")
            peers.wait_for(_logged(victim, lambda: node.paths(prefix)), WITHIN, f"{node.name}'s log")  # noqa: B023
            forwarded = [s.path for s in _forwarded(lb, node.name, prefix)]
            seen = [s.path for s in node.paths(prefix)]
            if forwarded != seen:
                disagreements.append(f"{case} via {node.name}: pacslb forwarded {forwarded}, the node read {seen}")
            status = answer.split(b"\r\n", 1)[0]
            if forwarded == [victim] and not re.match(rb"HTTP/1\.1 (4\d\d|501) ", status):
                disagreements.append(f"{case} via {node.name}: forwarded nothing, answered {status!r}")
            if isinstance(node, H11Node):
                whole = [s.path for s in _forwarded(lb, node.name, prefix, whole=True)]
                if whole != node.complete(prefix):
                    disagreements.append(f"{case}: pacslb forwarded {whole} whole, h11 read {node.complete(prefix)}")
                cookies = node.cookies(prefix)
                hijacked = [path for path, cookie in cookies.items() if cookie and path != victim]
                if hijacked or cookies.get(victim) != b"session=victim":
                    disagreements.append(f"{case}: the victim's cookie went with {hijacked or 'nothing'}")
    assert not disagreements, "\n".join(disagreements)


def test_the_smuggling_cases_are_refused_with_their_status(pacslb: PacslbFactory) -> None:
    """The cases a lenient proxy forwards changed get the status RFC 9110/9112 gives them; nothing reaches
    the node (a node that records what it reads)."""
    node = H11Node()
    try:
        port = peers.free_port()
        spec = peers.service(port, {"h11": node.address}, mode="http", check={"type": "none"})
        lb = pacslb(peers.http_config({"web": spec}))
        expected = {
            "connection_names_content_length": 400,
            "connection_names_host": 400,
            "gzip_then_chunked": 501,
            "chunked_in_http10": 400,
            "two_hosts": 400,
            "host_with_a_path": 400,
            "cl_te": 400,
            "te_cl": 400,
        }
        for number, (case, status) in enumerate(expected.items()):
            prefix = f"/s{number:02d}"
            mark = lb.mark()
            answer = _answers(port, REQUESTS[case](prefix))
            assert answer.startswith(b"HTTP/1.1 %d " % status), f"{case}: {answer[:200]!r}"
            assert b"Connection: close" in answer.partition(b"\r\n\r\n")[0], case
            line = lb.wait_event("request", WITHIN, since=mark, service="web")
            assert line.get("status") == str(status) and line.get("end") == "bad_request", str(line)
            assert line.get("server") == "-", str(line)
        assert not node.paths("/s")
    finally:
        node.stop()


# ----------------------------------------------------------------------------------------------- responses

#: Hostile responses: a name, the bytes the node sends for the first request, and what a client must get:
#: a status from pacslb (502), or the body the node meant.
RESPONSES: dict[str, tuple[bytes, int | bytes]] = {
    "connection_names_content_length": (
        b"HTTP/1.1 200 OK\r\nConnection: content-length\r\nContent-Length: 5\r\n\r\nhello",
        502,
    ),
    "gzip_then_chunked": (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n", 502),
    "gzip_alone": (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nhello", 502),
    "chunked_and_length": (b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 502),
    "two_lengths": (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!", 502),
    "chunked_in_http10": (b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n", 502),
    "folded_field": (b"HTTP/1.1 200 OK\r\nX: a\r\n b\r\nContent-Length: 5\r\n\r\nhello", 502),
    "bare_lf": (b"HTTP/1.1 200 OK\nContent-Length: 5\n\nhello", 502),
    "chunked": (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhe\r\n3;x=y\r\nllo\r\n0\r\n\r\n", b"hello"),
    "length": (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", b"hello"),
    # Bytes past the response: a second response a lenient proxy would hand to the next request.
    "a_second_response_glued_on": (
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhelloHTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nsmuggled",
        b"hello",
    ),
    "a_body_on_a_204": (b"HTTP/1.1 204 No Content\r\nContent-Length: 8\r\n\r\nsmuggled", b""),
    "interim_with_a_length": (
        b"HTTP/1.1 100 Continue\r\nContent-Length: 8\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
        b"hello",
    ),
}


class _ResponseNode(H11Node):
    """Answers ``/r/<case>/first`` with the case's bytes (and keeps the connection), anything else with a
    plain ``ok <path>``: what a client reads for its second request shows whether a first response leaked."""

    def _serve(self, conn: socket.socket) -> None:
        data = b""
        with contextlib.closing(conn), contextlib.suppress(OSError):
            while True:
                while b"\r\n\r\n" not in data:
                    more = conn.recv(65536)
                    if not more:
                        return
                    data += more
                head, _, data = data.partition(b"\r\n\r\n")
                path = head.split(b" ", 2)[1].decode()
                with self.lock:
                    self.seen.append([path, True, None])
                parts = path.split("/")
                if len(parts) == 4 and parts[3] == "first":
                    conn.sendall(RESPONSES[parts[2]][0])
                else:
                    body = b"ok " + path.encode()
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))


def _h11_client(port: int, paths: list[str]) -> list[tuple[int, bytes]]:
    """Each path requested in turn, on one keep-alive connection while pacslb keeps it (a new one after it
    closes), read by h11: (status, body) of every response."""
    out: list[tuple[int, bytes]] = []
    sock: socket.socket | None = None
    http = h11.Connection(h11.CLIENT)
    for path in paths:
        if sock is None or http.our_state is not h11.IDLE:
            if sock is not None:
                sock.close()
            sock = socket.create_connection(("127.0.0.1", port), timeout=WITHIN)
            http = h11.Connection(h11.CLIENT)
        sock.sendall(http.send(h11.Request(method="GET", target=path, headers=[("Host", "pacs")])))
        sock.sendall(http.send(h11.EndOfMessage()))
        status, body = 0, b""
        while True:
            event = http.next_event()
            if event is h11.NEED_DATA:
                http.receive_data(sock.recv(65536))
            elif isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                break
        out.append((status, body))
        if http.our_state is h11.DONE and http.their_state is h11.DONE:
            http.start_next_cycle()
    if sock is not None:
        sock.close()
    return out


def _curl(port: int, paths: list[str]) -> list[tuple[int, bytes]]:
    """The same with curl: one command, both URLs (it reuses the connection while it may)."""
    args = ["curl", "-sS", "--max-time", str(WITHIN)]
    for path in paths:
        args += [f"http://127.0.0.1:{port}{path}", "-o", "-", "-w", "\n@@%{http_code}@@\n"]
    done = subprocess.run(args, capture_output=True, timeout=WITHIN * 2, check=False)
    out = []
    for match in re.finditer(rb"(.*?)\n@@(\d+)@@\n", done.stdout, re.S):
        out.append((int(match.group(2)), match.group(1)))
    return out


def test_clients_and_pacslb_agree_on_where_each_response_ends(pacslb: PacslbFactory) -> None:
    node = _ResponseNode()
    try:
        port = peers.free_port()
        spec = peers.service(port, {"scripted": node.address}, mode="http", check={"type": "none"})
        pacslb(peers.http_config({"web": spec}))
        disagreements: list[str] = []
        for case, (_, expected) in RESPONSES.items():
            for client in (_h11_client, _curl):
                paths = [f"/r/{case}/first", f"/r/{case}/next"]
                got = client(port, paths)
                want_first = (expected, None) if isinstance(expected, int) else (200 if expected else 204, expected)
                first_ok = got[:1] and got[0][0] == want_first[0] and (want_first[1] is None or got[0][1] == expected)
                second_ok = got[1:2] == [(200, b"ok /r/" + case.encode() + b"/next")]
                if not (first_ok and second_ok and len(got) == 2):
                    disagreements.append(f"{case} read by {client.__name__}: {got}")
        assert not disagreements, "\n".join(disagreements)
    finally:
        node.stop()


def test_a_refused_response_is_logged_as_the_nodes_fault(pacslb: PacslbFactory) -> None:
    node = _ResponseNode()
    try:
        port = peers.free_port()
        spec = peers.service(port, {"scripted": node.address}, mode="http", check={"type": "none"})
        lb = pacslb(peers.http_config({"web": spec}))
        assert _h11_client(port, ["/r/connection_names_content_length/first"])[0][0] == 502
        line = lb.wait_event("request", WITHIN, service="web", path="/r/connection_names_content_length/first")
        assert line.get("status") == "502" and line.get("server") == "scripted", str(line)
        assert line.get("end") != "ok", str(line)
    finally:
        node.stop()
