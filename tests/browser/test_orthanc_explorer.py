"""Orthanc Explorer (Orthanc's own web interface, a real PACS web front end) through pacslb's mode http, in
Debian's Chromium: every request of the page load reaches one node. The first response sets the
persistence cookie and every later request sends it back (``rule=cookie`` in the access log). A second
browser context, with an empty cookie jar but the same source address, stays on that node through the
source-IP table (``rule=source_ip``) and is given the same cookie again, as docs/configuration.md says: "the
source-IP entry is refreshed by every request, whichever rule chose the node, so a client that loses its
cookies stays where it was". The check uses GET /system because Orthanc answers 404 to every HEAD.

A screenshot of the loaded page is left under /tmp (its path is printed).
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import peers
import pytest
from peers import LogEvent, OrthancNode, PacslbProcess

pytestmark = [pytest.mark.peers, pytest.mark.browser]

NodesFactory = Callable[[int], list[OrthancNode]]
PacslbFactory = Callable[[str], PacslbProcess]
COOKIE = "SERVERID"
#: Orthanc Explorer loads in well under a second from loopback; the bound allows for a loaded machine.
PAGE_TIMEOUT_MS = 15_000
#: pacslb writes a request's line when its response has been sent; the page is idle by then.
LOG_TIMEOUT = 5.0
#: Orthanc Explorer's page load: the HTML, its scripts, style sheets, images and first REST calls.
MIN_REQUESTS = 10
VIEWPORT = {"width": 1400, "height": 1000}  # as conftest's ``page``


@dataclass(frozen=True)
class Exchange:
    """One request of a page load as the browser saw it."""

    method: str
    url: str
    status: int | None  # None: no response
    cookie: str  # the Cookie field the browser sent
    set_cookie: str  # the Set-Cookie field(s) of the response


class PageLoad:
    """Every request a browser page made and every one that failed; :meth:`exchanges` reads them while the
    page is still open (Playwright forgets them with their context)."""

    def __init__(self, page: Any) -> None:
        self.requests: list[Any] = []
        self.failed: list[str] = []
        page.on("request", lambda request: self.requests.append(request))
        page.on("requestfailed", lambda request: self.failed.append(f"{request.method} {request.url}"))

    def exchanges(self) -> list[Exchange]:
        found = []
        for request in self.requests:
            response = request.response()
            found.append(
                Exchange(
                    request.method,
                    request.url,
                    None if response is None else response.status,
                    request.header_value("cookie") or "",
                    "" if response is None else response.header_value("set-cookie") or "",
                )
            )
        return found


def open_explorer(context: Any, url: str) -> tuple[Any, PageLoad]:
    page = context.new_page()
    load = PageLoad(page)
    page.set_default_timeout(PAGE_TIMEOUT_MS)
    page.goto(url + "/app/explorer.html", wait_until="networkidle", timeout=PAGE_TIMEOUT_MS)
    # Orthanc Explorer's start page (jQuery Mobile): "Lookup studies", headed by the node's name from GET /system.
    page.locator("#lookup").wait_for(state="visible")
    page.locator("#lookup h1", has_text="Lookup studies").wait_for(state="visible")
    assert page.title() == "Orthanc Explorer", page.title()
    return page, load


def node_shown(page: Any) -> str:
    """The Orthanc name in the start page's heading, "pacs1 » Lookup studies"."""
    heading = page.locator("#lookup h1", has_text="Lookup studies").inner_text()
    name, _, rest = heading.partition("»")
    assert rest.strip() == "Lookup studies", heading
    return name.strip()


def request_lines(lb: PacslbProcess, load: list[Exchange], since: int) -> list[LogEvent]:
    """pacslb's ``request`` lines since ``since``, once every request the page made has one."""
    wanted = {(x.method, urlsplit(x.url).path) for x in load}
    deadline = time.monotonic() + LOG_TIMEOUT
    while True:
        lines = lb.events("request", since, service="web")
        missing = wanted - {(e.get("method"), e.get("path")) for e in lines}
        if not missing:
            return lines
        if time.monotonic() >= deadline:
            pytest.fail(f"no request line for {sorted(missing)}; pacslb's log:\n{lb.log()}", pytrace=False)
        time.sleep(0.05)


def check_statuses(load: list[Exchange], failed: list[str], node: OrthancNode) -> None:
    """Every response is a success, or what the node itself answers to the same request."""
    assert not failed, f"requests failed in the browser: {failed}"
    for x in load:
        assert x.status is not None, f"no response to {x.method} {x.url}"
        if x.status >= 400:
            parts = urlsplit(x.url)
            direct = httpx.request(x.method, f"{node.url}{parts.path}?{parts.query}", timeout=10.0)
            assert direct.status_code == x.status, (x.url, x.status, direct.status_code)


@dataclass(frozen=True)
class Visit:
    """One page load of Orthanc Explorer in its own browser context."""

    shown: str  # the node name Orthanc Explorer shows
    exchanges: list[Exchange]
    failed: list[str]
    lines: list[LogEvent]  # pacslb's request lines of the visit
    cookies: dict[str, dict[str, Any]]  # the browser context's cookie jar at the end


def visit(browser: Any, lb: PacslbProcess, url: str, screenshot: Path | None = None) -> Visit:
    """Open Orthanc Explorer in a new browser context (an empty cookie jar) and read what happened."""
    context = browser.new_context(viewport=VIEWPORT)
    try:
        since = lb.mark()
        page, load = open_explorer(context, url)
        if screenshot is not None:
            page.screenshot(path=str(screenshot), full_page=True)
        shown = node_shown(page)  # the name the page got from GET /system through pacslb
        exchanges = load.exchanges()
        lines = request_lines(lb, exchanges, since)
        cookies = {c["name"]: c for c in context.cookies()}
        return Visit(shown, exchanges, load.failed, lines, cookies)
    finally:
        context.close()


def check_one_node(seen: Visit, url: str, by_name: dict[str, OrthancNode], first_rule: str) -> str:
    """Every request of the visit went to the node the page shows; returns the cookie value it holds."""
    exchanges, lines = seen.exchanges, seen.lines
    assert all(x.url.startswith(url + "/") for x in exchanges), "the page loads nothing from elsewhere"
    assert exchanges[0].url == url + "/app/explorer.html", exchanges[0]
    assert len(exchanges) >= MIN_REQUESTS, [x.url for x in exchanges]
    assert seen.shown in by_name, seen.shown
    check_statuses(exchanges, seen.failed, by_name[seen.shown])
    assert {e.get("server") for e in lines} == {seen.shown}, [e.line for e in lines]
    assert all(e.get("end") == "ok" for e in lines), [e.line for e in lines if e.get("end") != "ok"]
    # The page itself was placed by ``first_rule``; every later request followed the cookie it was given.
    page_line = [e for e in lines if e.get("path") == "/app/explorer.html"]
    assert [e.get("rule") for e in page_line] == [first_rule], [e.line for e in page_line]
    others = [e for e in lines if e is not page_line[0]]
    assert {e.get("rule") for e in others} == {"cookie"}, [e.line for e in others]

    assert COOKIE in seen.cookies, seen.cookies
    cookie = seen.cookies[COOKIE]
    assert cookie["httpOnly"] and cookie["sameSite"] == "Lax" and cookie["path"] == "/", cookie
    value = str(cookie["value"])
    # Set on the first response only: an indirect cookie is not set again while the client's one names the
    # node that served it. The first request had no cookie; every later one sent it back.
    assert exchanges[0].set_cookie.startswith(f"{COOKIE}={value};"), exchanges[0]
    assert not [x for x in exchanges[1:] if COOKIE in x.set_cookie], exchanges
    assert not exchanges[0].cookie, exchanges[0]
    assert all(f"{COOKIE}={value}" in x.cookie for x in exchanges[1:]), [x for x in exchanges if not x.cookie]
    return value


def test_orthanc_explorer_page_load_stays_on_one_node(
    orthanc_nodes: NodesFactory, pacslb: PacslbFactory, browser: Any
) -> None:
    started = time.monotonic()
    nodes = orthanc_nodes(2)
    port = peers.free_port()
    check = {**peers.HTTP_CHECK, "path": "/system", "expect_status": [200]}  # method GET: HEAD is a 404
    service = peers.http_service(port, nodes, check=check, persistence={"type": "cookie+source_ip"})
    lb = pacslb(peers.http_config({"web": service}))
    url = f"http://127.0.0.1:{port}"
    by_name = {node.name: node for node in nodes}
    shot = Path(tempfile.mkdtemp(prefix="pacslb-explorer-")) / "explorer.png"

    # First visit from 127.0.0.1, no cookie: the scheduler places the page, its cookie keeps the rest there.
    first = visit(browser, lb, url, screenshot=shot)
    value = check_one_node(first, url, by_name, first_rule="balance")

    # Second visit: a new cookie jar, the same source address. The source-IP table keeps it on that node
    # (roundrobin alone would have sent it to the other one), and its first response gives it the same
    # cookie again: the value names the node, not the client.
    second = visit(browser, lb, url)
    assert second.shown == first.shown
    assert check_one_node(second, url, by_name, first_rule="source_ip") == value

    # Servers start up; the GET /system check kept both up throughout (a HEAD check would take them down).
    assert not lb.events("health", service="web"), [e.line for e in lb.events("health")]
    other = [n.name for n in nodes if n.name != first.shown]
    print(
        f"\nOrthanc Explorer via pacslb: {len(first.exchanges)} + {len(second.exchanges)} requests, all served by "
        f"{first.shown} (none by {', '.join(other)}); screenshot {shot}; {time.monotonic() - started:.1f} s"
    )
