"""mode http with web workers (``workers: 2``): the main process and a web worker both serve connections,
and the main process stays the one that knows. The persistence table is one (a client stays on its node
whichever process serves it, and its entry is held while a connection is open); the nodes' counters add
up what every process served; a drain, a halt and a reload reach the worker. Real peers: nginx nodes,
httpx and curl clients, the admin API."""

from __future__ import annotations

import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import peers
import pytest
from peers import NginxNode, PacslbProcess

pytestmark = pytest.mark.peers

PacslbFactory = Callable[[str], PacslbProcess]
TOKEN = "web-workers-token-0123456789abcdef"
#: The workers report their counters every quarter second: how long the tests give them to arrive.
SETTLE = 5.0


@pytest.fixture
def web(tmp_path: Path) -> Iterator[list[NginxNode]]:
    nodes = peers.start_nginx(tmp_path / "nginx", 3)
    yield nodes
    for node in nodes:
        node.stop()


def config(nodes: list[NginxNode], port: int, admin: int, token_file: Path, cookie: str = "SERVERID") -> str:
    persistence = {"type": "cookie+source_ip", "timeout": "5m", "cookie": cookie}
    spec = peers.http_service(port, nodes, persistence=persistence, balance="roundrobin")
    return peers.http_config({"web": spec}, workers=2, admin=peers.admin_section(admin, token_file), halt_grace="300ms")


def start(pacslb: PacslbFactory, nodes: list[NginxNode], tmp_path: Path) -> tuple[PacslbProcess, str, int]:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    port, admin = peers.free_port(), peers.free_port()
    lb = pacslb(config(nodes, port, admin, token_file))
    return lb, f"http://127.0.0.1:{port}", admin


def curl(url: str, ip: str, cookie: str | None = None) -> tuple[str, str | None]:
    """One request on a connection of its own from ``ip``: the node that served it, and the cookie set."""
    argv = ["curl", "-s", "-D", "-", "-o", "/dev/null", "--interface", ip, "--max-time", "5", f"{url}/whoami"]
    if cookie is not None:
        argv += ["--cookie", cookie]
    head = subprocess.run(argv, capture_output=True, timeout=10, check=True).stdout.decode()
    fields = {}
    for line in head.splitlines()[1:]:
        name, _, value = line.partition(":")
        fields.setdefault(name.strip().lower(), value.strip())
    assert head.startswith("HTTP/1.1 200 "), head
    set_cookie = fields.get("set-cookie")
    return fields["x-node"], set_cookie.split(";")[0] if set_cookie else None


def web_status(admin: int) -> dict[str, Any]:
    status = peers.admin_api(admin, "GET", "/api/v1/status").json()
    return next(s for s in status["services"] if s["name"] == "web")


def settled(admin: int, done: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    """The service's status once ``done`` holds (the workers' counters arrive within a second)."""
    deadline = time.monotonic() + SETTLE
    while True:
        service = web_status(admin)
        if done(service) or time.monotonic() > deadline:
            return service
        time.sleep(0.1)


def until_with_the_node(node: Any, requests: int) -> None:
    """Wait (at most 5 s) until ``requests`` connections reached the scripted node: their requests are there."""
    deadline = time.monotonic() + 5
    while len(node.conns) < requests and time.monotonic() < deadline:
        time.sleep(0.01)


def admin_post(admin: int, path: str) -> None:
    answer = peers.admin_api(admin, "POST", path, token=TOKEN)
    assert answer.status_code == 200, answer.text


def test_one_table_and_every_process_counted(pacslb: PacslbFactory, web: list[NginxNode], tmp_path: Path) -> None:
    lb, url, admin = start(pacslb, web, tmp_path)
    # Keep-alive connections from one address, open together: both processes serve them, and every request
    # reaches the node the first one was given.
    clients = [httpx.Client(base_url=url, transport=httpx.HTTPTransport(local_address="127.0.0.5")) for _ in range(4)]
    try:
        served = {client.get("/whoami", headers={"Cookie": ""}).headers["x-node"] for client in clients}
        served |= {c.get("/whoami").headers["x-node"] for c in clients for _ in range(4)}
        assert len(served) == 1, served
        home = served.pop()
        # While they are open, the client's entry in the main process's table is held by each connection a
        # worker serves (the processes took turns: two of the four), as tcp mode holds it per connection.
        entries = peers.admin_api(admin, "GET", "/api/v1/services/web/persistence").json()["entries"]
        assert [(e["key"], e["server"], e["active"]) for e in entries] == [("127.0.0.5", home, 2)]
    finally:
        for client in clients:
            client.close()
    lines = lb.wait_events("request", 20, timeout=5)
    assert {line.get("worker") for line in lines} == {"", "1"}  # both processes served
    assert {line.get("server") for line in lines} == {home}
    # The node's counters add up every process's requests; nothing stays open.
    service = settled(admin, lambda s: sum(n["total"] for n in s["servers"]) >= 20 and s["active"] == 0)
    by_node = {n["name"]: n for n in service["servers"]}
    assert by_node[home]["total"] == 20 and sum(n["total"] for n in service["servers"]) == 20
    assert all(n["active"] == 0 for n in service["servers"])
    assert by_node[home]["bytes_down"] > 20 * len(b"node=")
    entries = peers.admin_api(admin, "GET", "/api/v1/services/web/persistence").json()["entries"]
    assert [(e["key"], e["server"], e["active"]) for e in entries] == [("127.0.0.5", home, 0)]


def test_a_drain_and_a_halt_reach_the_worker(pacslb: PacslbFactory, web: list[NginxNode], tmp_path: Path) -> None:
    lb, url, admin = start(pacslb, web, tmp_path)
    node, cookie = curl(url, "127.0.0.2")
    assert cookie is not None
    admin_post(admin, f"/api/v1/services/web/servers/{node}/drain")
    # Drained: the client with its cookie stays (in either process); new clients go elsewhere.
    for _ in range(4):
        assert curl(url, "127.0.0.2", cookie) == (node, None)
    assert all(curl(url, f"127.0.0.{i}")[0] != node for i in range(10, 14))
    admin_post(admin, f"/api/v1/services/web/servers/{node}/halt")
    # Halted: the same cookie is re-balanced at once and replaced, whichever process serves it.
    moved = [curl(url, "127.0.0.2", cookie) for _ in range(4)]
    assert all(served != node and new is not None for served, new in moved), moved
    assert len({served for served, _ in moved}) == 1  # the client's new home holds across the processes
    lines = lb.wait_events("request", 13, timeout=5)
    assert {line.get("worker") for line in lines} == {"", "1"}
    assert all(line.get("status") == "200" for line in lines)


def test_a_reload_reaches_the_worker(pacslb: PacslbFactory, web: list[NginxNode], tmp_path: Path) -> None:
    lb, url, admin = start(pacslb, web, tmp_path)
    assert curl(url, "127.0.0.2")[1].startswith("SERVERID=")  # type: ignore[union-attr]
    port = int(url.rsplit(":", 1)[1])
    lb.reload(config(web, port, admin, tmp_path / "token", cookie="PACSNODE"))
    lb.wait_event("reloaded", timeout=10)
    cookies = [curl(url, f"127.0.0.{i}")[1] for i in range(20, 26)]
    assert all(c is not None and c.startswith("PACSNODE=") for c in cookies), cookies
    lines = lb.wait_events("request", 7, timeout=5)
    assert {line.get("worker") for line in lines[1:]} == {"", "1"}


def test_a_stop_lets_requests_in_progress_in_every_process_finish(pacslb: PacslbFactory, tmp_path: Path) -> None:
    """SIGTERM during two slow requests, one in the main process and one in the web worker: both are
    answered within the shutdown grace, then every process exits."""
    from test_http_proxy import _ScriptedNode  # a node answering /slow after 0.3 s

    node = _ScriptedNode()
    try:
        port = peers.free_port()
        spec = peers.service(port, {"n": node.address}, mode="http", check={"type": "none"})
        lb = pacslb(peers.http_config({"web": spec}, workers=2, shutdown_grace="3s"))
        answers: list[tuple[int, str]] = []

        def slow() -> None:
            answer = httpx.get(f"http://127.0.0.1:{port}/slow", timeout=5)
            answers.append((answer.status_code, answer.text))

        clients = [threading.Thread(target=slow) for _ in range(2)]
        for client in clients:
            client.start()
        until_with_the_node(node, 2)
        lb.send(signal.SIGTERM)
        for client in clients:
            client.join(10)
        assert answers == [(200, "ok /slow")] * 2
        assert lb.wait_exit(10) == 0
        lines = lb.events("request")
        assert sorted(line.get("worker") for line in lines) == ["", "1"]
        assert all(line.get("end") == "ok" for line in lines)
    finally:
        node.close()


def test_a_halt_cuts_only_its_own_service_in_the_worker(pacslb: PacslbFactory, tmp_path: Path) -> None:
    """One node in two services, halted in one: requests in progress in the other service, in the main
    process and in the web worker, are not cut when the halt's grace is over."""
    from test_http_proxy import _ScriptedNode  # a node answering /hold after 5 s

    node = _ScriptedNode()
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    try:
        ports = {name: peers.free_port() for name in ("a", "b")}
        services = {
            name: peers.service(port, {"n": node.address}, mode="http", check={"type": "none"})
            for name, port in ports.items()
        }
        admin = peers.free_port()
        lb = pacslb(
            peers.http_config(services, workers=2, admin=peers.admin_section(admin, token_file), halt_grace="300ms")
        )
        answers: list[int] = []

        def hold() -> None:
            answers.append(httpx.get(f"http://127.0.0.1:{ports['b']}/hold", timeout=10).status_code)

        clients = [threading.Thread(target=hold) for _ in range(2)]
        for client in clients:
            client.start()
        until_with_the_node(node, 2)
        admin_post(admin, "/api/v1/services/a/servers/n/halt")
        for client in clients:
            client.join(15)
        assert answers == [200, 200]
        lines = lb.wait_events("request", 2, timeout=5, service="b")  # (a line follows its answer)
        assert sorted(line.get("worker") for line in lines) == ["", "1"]
        assert all(line.get("end") == "ok" for line in lines)
        assert not lb.events("halt_closed")
    finally:
        node.close()
