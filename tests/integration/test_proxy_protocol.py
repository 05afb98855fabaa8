"""``proxy_protocol: v2``: a node behind pacslb learns its client's address from a PROXY protocol v2 header.

nginx with ``listen ... proxy_protocol`` is the node (it refuses a connection without the header, and
answers with the address the header gave); the client connects from its own loopback address. Its health
check sends the LOCAL command, which nginx accepts without a broken-header error.
"""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import peers
import pytest
from peers import PacslbProcess

pytestmark = pytest.mark.peers

PacslbFactory = Callable[[str], PacslbProcess]
CLIENT = "127.0.0.7"

NGINX = """
worker_processes 1;
master_process off;
daemon off;
user root;
pid {root}/nginx.pid;
error_log {root}/error.log info;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {root}/tmp;
    proxy_temp_path {root}/tmp;
    fastcgi_temp_path {root}/tmp;
    uwsgi_temp_path {root}/tmp;
    scgi_temp_path {root}/tmp;
    server {{
        listen 127.0.0.1:{port} proxy_protocol;
        location / {{
            default_type text/plain;
            return 200 "client=$proxy_protocol_addr:$proxy_protocol_port peer=$remote_addr\\n";
        }}
    }}
}}
"""


@pytest.fixture
def nginx(tmp_path: Path) -> Iterator[int]:
    """nginx that requires the PROXY header on its port; yields the port."""
    port = peers.free_port()
    (tmp_path / "tmp").mkdir()
    conf = tmp_path / "nginx.conf"
    conf.write_text(NGINX.format(root=tmp_path, port=port))
    proc = peers._popen([str(peers.NGINX_BIN), "-c", str(conf), "-p", str(tmp_path)], tmp_path / "nginx.out")
    try:
        peers.wait_for(lambda: not peers.tcp_connect_refused(port), 10.0, "nginx")
        yield port
    finally:
        peers._stop_process(proc, 10.0)
    errors = (tmp_path / "error.log").read_text()
    assert "broken header" not in errors, errors  # neither the checks nor the clients sent a bad one


def test_nginx_behind_a_tcp_service_sees_the_clients_address(pacslb: PacslbFactory, nginx: int) -> None:
    port, admin = peers.free_port(), peers.free_port()
    spec = peers.service(port, {"web1": f"127.0.0.1:{nginx}"}, proxy_protocol="v2",
                         check={"type": "tcp", "interval": "500ms", "timeout": "500ms"})  # fmt: skip
    lb = pacslb(peers.config_text({"web": spec}, admin={"listen": f"127.0.0.1:{admin}"}))
    transport = httpx.HTTPTransport(local_address=CLIENT)
    with httpx.Client(transport=transport, timeout=10.0) as client:
        answer = client.get(f"http://127.0.0.1:{port}/")
    assert answer.status_code == 200, answer.text
    address, _, rest = answer.text.partition(" ")
    assert address.startswith(f"client={CLIENT}:") and rest.strip() == "peer=127.0.0.1", answer.text
    conn = lb.wait_event("conn", 5.0)
    assert conn.get("client") == address.removeprefix("client="), conn.line  # the same client, port and all
    # The checks (every 500 ms) send the LOCAL header: nginx takes them without a broken-header error
    # (the fixture reads its log), and the node stays up.
    first = peers.admin_server(admin, "web", "web1")["check"]["at"]
    peers.wait_for(lambda: peers.admin_server(admin, "web", "web1")["check"]["at"] != first, 10.0, "another check")
    server = peers.admin_server(admin, "web", "web1")
    assert (server["health"], server["check"]["reason"]) == ("up", "connected"), server
    assert not lb.events("health")


def test_a_dicom_service_sends_the_header_before_the_a_associate_rq(pacslb: PacslbFactory) -> None:
    """No DICOM node reads the PROXY protocol that we know of; a raw node shows the bytes a node gets."""
    received: list[bytes] = []
    listener = socket.create_server(("127.0.0.1", 0))
    node_port = listener.getsockname()[1]

    def node() -> None:
        listener.settimeout(20.0)
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(10.0)
            data = b""
            while len(data) < 16 + 12 + 6 or len(data) < 28 + 6 + struct.unpack(">I", data[30:34])[0]:
                more = conn.recv(65536)
                if not more:
                    break
                data += more
            received.append(data)
            conn.sendall(peers.associate_rj_pdu(1, 1, 1))

    thread = threading.Thread(target=node, daemon=True)
    thread.start()
    try:
        port = peers.free_port()
        spec = peers.dicom_service(port, {"raw": f"127.0.0.1:{node_port}"}, proxy_protocol="v2")
        pacslb(peers.config_text({"dicom": spec}))
        rq = peers.associate_rq_pdu(calling="CT01")
        with socket.create_connection(("127.0.0.1", port), source_address=(CLIENT, 0), timeout=10.0) as sock:
            client_port = sock.getsockname()[1]
            sock.sendall(rq)
            assert sock.recv(10) == peers.associate_rj_pdu(1, 1, 1)
        thread.join(10.0)
    finally:
        listener.close()
    (data,) = received
    header, forwarded = data[:28], data[28:]
    assert header[:12] == b"\r\n\r\n\x00\r\nQUIT\n" and header[12:16] == bytes([0x21, 0x11, 0, 12]), header
    assert socket.inet_ntoa(header[16:20]) == CLIENT and socket.inet_ntoa(header[20:24]) == "127.0.0.1"
    assert struct.unpack(">HH", header[24:28]) == (client_port, port)
    assert forwarded == rq, "then the client's A-ASSOCIATE-RQ, unchanged"
