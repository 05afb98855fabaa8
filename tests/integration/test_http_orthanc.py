"""mode http in front of Orthanc's web interface (a real PACS viewer back end): a browser-like client
loads Orthanc Explorer and the files it refers to, and every request of that page load reaches one node;
the http check uses GET (Orthanc answers 404 to every HEAD)."""

from __future__ import annotations

import re
from collections.abc import Callable

import httpx
import peers
import pytest
from peers import OrthancNode, PacslbProcess

pytestmark = pytest.mark.peers

NodesFactory = Callable[[int], list[OrthancNode]]
PacslbFactory = Callable[[str], PacslbProcess]


def test_orthanc_explorer_page_load_stays_on_one_node(orthanc_nodes: NodesFactory, pacslb: PacslbFactory) -> None:
    nodes = orthanc_nodes(2)
    port = peers.free_port()
    check = {**peers.HTTP_CHECK, "path": "/system", "expect_status": [200]}
    lb = pacslb(peers.http_config({"web": peers.http_service(port, nodes, check=check)}))
    url = f"http://127.0.0.1:{port}"
    with httpx.Client(base_url=url, timeout=10) as browser:
        page = browser.get("/app/explorer.html")
        assert page.status_code == 200 and "SERVERID=" in page.headers["set-cookie"]
        assets = sorted(set(re.findall(r'(?:src|href)="([^"#:?]+\.(?:js|css))"', page.text)))
        assert len(assets) >= 3, page.text[:500]
        for asset in assets:
            assert browser.get(f"/app/{asset}").status_code == 200, asset
        name = browser.get("/system").json()["Name"]
    lines = lb.wait_events("request", len(assets) + 2, timeout=5)
    assert {e.get("server") for e in lines} == {name}, [e.line for e in lines]
    assert [e.get("rule") for e in lines][1:] == ["cookie"] * (len(assets) + 1)
