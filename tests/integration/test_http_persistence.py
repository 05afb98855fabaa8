"""mode http persistence: the SERVERID cookie, the source-IP fallback, and a cookie whose node is gone.

Clients are httpx clients bound to other loopback addresses (127.0.0.x) and curl --interface, so that
source-IP persistence sees several workstations. Which node served a request is what nginx says
(``node=web2`` in the /whoami answer, and the X-Node field it adds).
"""

from __future__ import annotations

import subprocess
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
    nodes = peers.start_nginx(tmp_path / "nginx", 3)
    yield nodes
    for node in nodes:
        node.stop()


def start(
    pacslb: PacslbFactory, nodes: list[NginxNode], kind: str, workers: int = 1, **http: object
) -> tuple[PacslbProcess, str]:
    port = peers.free_port()
    spec = peers.http_service(
        port, nodes, persistence={"type": kind, "timeout": "5m"}, http=http or None, balance="roundrobin"
    )
    return pacslb(peers.http_config({"web": spec}, workers=workers)), f"http://127.0.0.1:{port}"


#: One process, and two: the main process and a web worker then take turns at new connections, so a
#: client's connections are served by both, and what one decided must hold in the other.
PROCESSES = pytest.mark.parametrize("workers", [1, 2])


def client_from(ip: str, url: str) -> httpx.Client:
    return httpx.Client(base_url=url, transport=httpx.HTTPTransport(local_address=ip), timeout=5)


def node_of(response: httpx.Response) -> str:
    assert response.status_code == 200, response.text
    return response.headers["x-node"]


@PROCESSES
def test_cookie_is_set_once_and_keeps_the_browser_on_its_node(
    pacslb: PacslbFactory, web: list[NginxNode], workers: int
) -> None:
    lb, url = start(pacslb, web, "cookie", workers)
    with client_from("127.0.0.2", url) as browser:
        first = browser.get("/whoami")
        cookie = first.headers["set-cookie"]
        name_value, *attributes = [part.strip() for part in cookie.split(";")]
        assert name_value.startswith("SERVERID=")
        assert set(attributes) == {"Path=/", "HttpOnly", "SameSite=Lax"}
        value = name_value.split("=", 1)[1]
        assert all(node.name not in value and str(node.port) not in value for node in web)
        assert first.headers["cache-control"] == "private"  # nocache: no shared cache keeps it
        home = node_of(first)
        for _ in range(8):
            again = browser.get("/whoami")  # httpx sends the cookie back, as a browser does
            assert node_of(again) == home
            assert "set-cookie" not in again.headers  # indirect: not set again while valid
            assert "SERVERID" not in again.text  # indirect: the node never sees it
    # The same cookie from other addresses and connections still reaches the same node.
    for ip in ("127.0.0.3", "127.0.0.4"):
        with client_from(ip, url) as other:
            assert node_of(other.get("/whoami", headers={"Cookie": f"SERVERID={value}"})) == home
    rules = [e.get("rule") for e in lb.wait_events("request", 11, timeout=5)]
    assert rules == ["balance"] + ["cookie"] * 10


@PROCESSES
def test_cookieless_clients_stick_by_source_address_and_spread(
    pacslb: PacslbFactory, web: list[NginxNode], workers: int
) -> None:
    """cookie+source_ip: a client that refuses cookies stays on one node by its address (curl keeps no
    cookies, and opens a connection per request); different addresses are spread over the nodes."""
    lb, url = start(pacslb, web, "cookie+source_ip", workers)
    homes: dict[str, str] = {}
    for i in range(2, 8):
        ip = f"127.0.0.{i}"
        seen = set()
        for _ in range(3):
            done = subprocess.run(
                ["curl", "-sS", "--interface", ip, "-D", "-", "-o", "/dev/null", f"{url}/whoami"],
                capture_output=True,
                timeout=10,
                check=True,
            )
            head = done.stdout.decode()
            seen.add(next(line.split(":", 1)[1].strip() for line in head.splitlines() if line.startswith("X-Node")))
            assert "Set-Cookie: SERVERID=" in head  # it has none, so it is offered one every time
        assert len(seen) == 1, f"{ip} was spread over {seen}"
        homes[ip] = seen.pop()
    assert set(homes.values()) == {"web1", "web2", "web3"}, homes
    lines = lb.wait_events("request", 18, timeout=5)
    by_client: dict[str, list[str]] = {}
    for line in lines:
        by_client.setdefault(line.get("client").rsplit(":", 1)[0], []).append(line.get("rule"))
    assert all(rules == ["balance", "source_ip", "source_ip"] for rules in by_client.values()), by_client
    if workers > 1:  # both processes served (a web worker's lines say which), and the homes held across them
        assert {line.get("worker") for line in lines} == {"", "1"}


def test_source_ip_only(pacslb: PacslbFactory, web: list[NginxNode]) -> None:
    _, url = start(pacslb, web, "source_ip")
    with client_from("127.0.0.9", url) as one:
        answers = [one.get("/whoami") for _ in range(4)]
    assert len({node_of(a) for a in answers}) == 1
    assert all("set-cookie" not in a.headers for a in answers)


@PROCESSES
def test_a_cookie_for_a_dead_node_is_replaced_without_error(
    pacslb: PacslbFactory, web: list[NginxNode], workers: int
) -> None:
    lb, url = start(pacslb, web, "cookie+source_ip", workers)
    with client_from("127.0.0.2", url) as browser:
        first = browser.get("/whoami")
        home = node_of(first)
        old = browser.cookies["SERVERID"]
        dead = next(node for node in web if node.name == home)
        dead.kill()
        # The very next request, before any health check noticed: the connect fails, another node serves,
        # and the browser gets that node's cookie.
        moved = browser.get("/whoami")
        new_home = node_of(moved)
        assert new_home != home
        assert "SERVERID=" in moved.headers["set-cookie"]
        assert browser.cookies["SERVERID"] != old
        for _ in range(3):
            assert node_of(browser.get("/whoami")) == new_home
        lb.wait_event("health", timeout=5, server=home, new="down")
        # Once the node is down, a client that still has the old cookie is re-balanced at once.
    with client_from("127.0.0.3", url) as other:
        answer = other.get("/whoami", headers={"Cookie": f"SERVERID={old}"})
        assert node_of(answer) != home and "SERVERID=" in answer.headers["set-cookie"]
    assert not [e for e in lb.events("request") if e.get("status") != "200"]


def test_cookie_options(pacslb: PacslbFactory, web: list[NginxNode]) -> None:
    """A named cookie with a secret, not indirect (the node sees it), cacheable, with Max-Age and Secure."""
    _, url = start(
        pacslb,
        web,
        "cookie",
        cookie={"indirect": False, "nocache": False, "secure": "always", "max_age": "1h", "secret": "s3cret-value"},
    )
    first = httpx.get(f"{url}/whoami")
    cookie = first.headers["set-cookie"]
    assert "Max-Age=3600" in cookie and "Secure" in cookie
    assert "cache-control" not in first.headers
    value = cookie.split(";")[0].split("=", 1)[1]
    again = httpx.get(f"{url}/whoami", headers={"Cookie": f"SERVERID={value}"})
    assert f"SERVERID={value}" in again.text  # not indirect: passed on to the node
    assert again.headers["set-cookie"].startswith(f"SERVERID={value}")  # and set again
