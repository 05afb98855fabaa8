"""mode http with TLS termination: pacslb speaks HTTPS to clients (with the Secure cookie attribute and
X-Forwarded-Proto https) and plain HTTP to the nodes, and a plain listener redirects to HTTPS. The
certificate is a self-signed one made with the openssl command for each test."""

from __future__ import annotations

import ssl
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import peers
import pytest
from peers import NginxNode, PacslbProcess
from websockets.sync.client import connect

pytestmark = pytest.mark.peers

PacslbFactory = Callable[[str], PacslbProcess]


@pytest.fixture
def web(tmp_path: Path) -> Iterator[list[NginxNode]]:
    nodes = peers.start_nginx(tmp_path / "nginx", 2)
    yield nodes
    for node in nodes:
        node.stop()


@pytest.fixture
def certificate(tmp_path: Path) -> tuple[Path, Path]:
    cert, key = tmp_path / "web.pem", tmp_path / "web.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True, timeout=30,
    )  # fmt: skip
    return cert, key


@pytest.mark.parametrize("workers", [1, 2])  # with 2, the handshakes happen in whichever process serves
def test_https_termination_and_redirect(
    pacslb: PacslbFactory, web: list[NginxNode], certificate: tuple[Path, Path], workers: int
) -> None:
    cert, key = certificate
    port, plain = peers.free_port(), peers.free_port()
    tls = {"certificate": str(cert), "key": str(key), "redirect_from": f"127.0.0.1:{plain}", "min_version": "1.3"}
    lb = pacslb(peers.http_config({"web": peers.http_service(port, web, http={"tls": tls})}, workers=workers))
    with httpx.Client(verify=ssl.create_default_context(cafile=str(cert)), base_url=f"https://127.0.0.1:{port}") as c:
        first = c.get("/whoami")
        assert first.status_code == 200
        assert "proto=https" in first.text
        cookie = first.headers["set-cookie"]
        assert "Secure" in cookie and "HttpOnly" in cookie
        home = first.headers["x-node"]
        assert all(c.get("/whoami").headers["x-node"] == home for _ in range(3))
    # Versions below min_version are refused.
    old = ssl.create_default_context(cafile=str(cert))
    old.maximum_version = ssl.TLSVersion.TLSv1_2
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"https://127.0.0.1:{port}/whoami", verify=old)
    lb.wait_event("tls_failed", timeout=5)
    # The plain listener sends every request to the same URL over HTTPS.
    answer = httpx.get(f"http://127.0.0.1:{plain}/app/explorer.html?x=1")
    assert answer.status_code == 308
    assert answer.headers["location"] == f"https://127.0.0.1:{port}/app/explorer.html?x=1"


def test_websocket_over_tls(pacslb: PacslbFactory, certificate: tuple[Path, Path]) -> None:
    from test_http_upgrade import EchoServer

    cert, key = certificate
    with EchoServer("ws1") as server:
        port = peers.free_port()
        spec = peers.service(
            port,
            {"ws1": f"127.0.0.1:{server.port}"},
            mode="http",
            check={"type": "none"},
            http={"tls": {"certificate": str(cert), "key": str(key)}},
        )
        pacslb(peers.http_config({"web": spec}))
        context = ssl.create_default_context(cafile=str(cert))
        with connect(f"wss://127.0.0.1:{port}/socket", ssl=context, open_timeout=5) as ws:
            ws.send("over tls")
            assert ws.recv(timeout=5) == "ws1:over tls"


def test_a_halt_closes_a_websocket_over_tls_after_its_grace_counting_what_it_moved(
    pacslb: PacslbFactory, certificate: tuple[Path, Path], tmp_path: Path
) -> None:
    from test_http_upgrade import EchoServer
    from websockets.exceptions import ConnectionClosed

    cert, key = certificate
    token = "wss-halt-token-0123456789abcdef"
    token_file = tmp_path / "token"
    token_file.write_text(token + "\n")
    with EchoServer("ws1") as server:
        port, admin = peers.free_port(), peers.free_port()
        spec = peers.service(
            port, {"ws1": f"127.0.0.1:{server.port}"}, mode="http", check={"type": "none"},
            http={"tls": {"certificate": str(cert), "key": str(key)}},
        )  # fmt: skip
        lb = pacslb(peers.http_config({"web": spec}, admin=peers.admin_section(admin, token_file), halt_grace="300ms"))
        context = ssl.create_default_context(cafile=str(cert))
        message = "x" * 20000
        with connect(f"wss://127.0.0.1:{port}/socket", ssl=context, open_timeout=5, compression=None) as ws:
            ws.send(message)
            assert ws.recv(timeout=5) == "ws1:" + message
            halted = peers.admin_api(admin, "POST", "/api/v1/services/web/servers/ws1/halt", token=token)
            assert halted.status_code == 200, halted.text
            with pytest.raises(ConnectionClosed):
                ws.recv(timeout=10)  # the tunnel is closed once the grace is over
    line = lb.wait_event("request", timeout=5)
    assert (line.get("status"), line.get("end"), line.level) == ("101", "halted", "warning"), line.line
    assert int(line.get("bytes_up") or 0) > len(message) and int(line.get("bytes_down") or 0) > len(message)
