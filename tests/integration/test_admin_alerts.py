"""Alerts from a running pacslb to a real SMTP server (aiosmtpd, with a login) and a webhook: a node that
dies is reported by mail (with the service left without a usable server), the rate limit holds back the
next message, and an unreachable channel is logged without disturbing anything else.
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Callable, Iterator
from email import message_from_bytes
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import peers
import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, Envelope, LoginPassword, Session
from peers import PacslbProcess

PacslbFactory = Callable[[str], PacslbProcess]
#: From a node dying to its mail: a check interval or two, the batch, and the SMTP exchange.
MAIL_TIMEOUT = 15.0


class Mailbox:
    """aiosmtpd handler: keeps every message delivered, accepts one user's login."""

    def __init__(self) -> None:
        self.messages: list[Message] = []
        self.logins: list[str] = []

    async def handle_DATA(self, server: Any, session: Session, envelope: Envelope) -> str:
        self.messages.append(message_from_bytes(envelope.content))  # type: ignore[arg-type]
        return "250 OK"

    def authenticate(self, server: Any, session: Session, envelope: Envelope, mechanism: str, data: Any) -> AuthResult:
        ok = isinstance(data, LoginPassword) and (data.login, data.password) == (b"pacslb", b"mail-secret")
        if ok:
            self.logins.append(data.login.decode())
        return AuthResult(success=ok)


@pytest.fixture
def smtp() -> Iterator[tuple[Mailbox, int]]:
    box = Mailbox()
    port = peers.free_port()
    controller = Controller(
        box, hostname="127.0.0.1", port=port, authenticator=box.authenticate, auth_require_tls=False
    )  # fmt: skip
    controller.start()
    try:
        yield box, port
    finally:
        controller.stop()


@pytest.fixture
def webhook() -> Iterator[tuple[list[dict[str, Any]], int]]:
    received: list[dict[str, Any]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", "0"))
            received.append(json.loads(self.rfile.read(length)))
            self.send_response(204)
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield received, server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_a_dying_node_is_mailed_and_the_rate_limit_holds_back_the_rest(
    pacslb: PacslbFactory, smtp: tuple[Mailbox, int], webhook: tuple[list[dict[str, Any]], int], tmp_path: Path
) -> None:
    box, smtp_port = smtp
    hooks, hook_port = webhook
    password = tmp_path / "smtp-password"
    password.write_text("mail-secret\n")
    node = socket.socket()
    node.bind(("127.0.0.1", 0))
    node.listen(8)
    check = {"type": "tcp", "interval": "200ms", "timeout": "200ms", "rise": 1, "fall": 1}
    services = {"dicom": peers.service(peers.free_port(), {"pacs1": f"127.0.0.1:{node.getsockname()[1]}"}, check=check)}
    alerts = {
        "email": {
            "server": f"127.0.0.1:{smtp_port}",
            "username": "pacslb",
            "password_file": str(password),
            "sender": "pacslb@hospital.example",
            "recipients": ["pacs-admins@hospital.example", "oncall@hospital.example"],
        },
        "webhook": {"url": f"http://127.0.0.1:{hook_port}/alerts"},
        "batch": "300ms",
        "max_per_hour": 1,
    }
    lb = pacslb(peers.config_text(services, alerts=alerts, workers=1))
    mark = lb.mark()
    node.close()  # the node dies

    peers.wait_for(lambda: box.messages, MAIL_TIMEOUT, "the alert mail")
    mail = box.messages[0]
    assert box.logins == ["pacslb"]
    assert mail["To"] == "pacs-admins@hospital.example, oncall@hospital.example"
    assert mail["From"] == "pacslb@hospital.example"
    assert "PROBLEM" in mail["Subject"]
    body = mail.get_payload(decode=True).decode()  # type: ignore[union-attr]
    assert "pacs1 is down in dicom (connection refused)" in body
    assert "service dicom has no usable server (pacs1 down)" in body
    lb.wait_event("alert_sent", 5.0, since=mark, channel="email")

    peers.wait_for(lambda: hooks, MAIL_TIMEOUT, "the webhook call")
    assert hooks[0]["source"] == "pacslb"
    assert any("pacs1 is down in dicom" in e["message"] for e in hooks[0]["events"])

    # The node comes back: one message an hour is the limit, so this one waits (and says so in the log).
    back = socket.socket()
    back.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    back.bind(("127.0.0.1", int(services["dicom"]["servers"]["pacs1"].rsplit(":", 1)[1])))
    back.listen(8)
    try:
        lb.wait_event("health", 5.0, since=mark, server="pacs1", new="up")
        lb.wait_event("alert_delayed", 5.0, since=mark, channel="email")
        assert len(box.messages) == 1
    finally:
        back.close()


def test_an_unreachable_alert_channel_is_logged_and_harms_nothing(pacslb: PacslbFactory) -> None:
    dead_smtp, dead_hook = peers.free_port(), peers.free_port()
    node = socket.socket()
    node.bind(("127.0.0.1", 0))
    node.listen(8)
    check = {"type": "tcp", "interval": "200ms", "timeout": "200ms", "rise": 1, "fall": 1}
    services = {
        "a": peers.service(peers.free_port(), {"pacs1": f"127.0.0.1:{node.getsockname()[1]}"}, check=check),
    }
    alerts = {
        "email": {"server": f"127.0.0.1:{dead_smtp}", "sender": "pacslb@x.example", "recipients": ["a@x.example"],
                  "timeout": "2s"},
        "webhook": {"url": f"http://127.0.0.1:{dead_hook}/", "timeout": "2s"},
        "batch": "0s",
        "events": ["health", "service", "admin"],
    }  # fmt: skip
    lb = pacslb(peers.config_text(services, alerts=alerts, workers=1))
    node.close()
    lb.wait_event("alert_failed", MAIL_TIMEOUT, channel="email")
    lb.wait_event("alert_failed", MAIL_TIMEOUT, channel="webhook")
    assert lb.running()
    assert peers.tcp_connect_refused(int(services["a"]["listen"].rsplit(":", 1)[1])) is False
