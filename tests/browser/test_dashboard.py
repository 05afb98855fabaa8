"""The dashboard as an administrator uses it, in Debian's Chromium: a PACS node that is killed shows as down
within seconds, without reloading the page; clicking Drain asks for confirmation, then the node is
drained. A balancer with a token shows nothing until the page is given it (a wrong one is asked for
again); one without a token never asks. The page loads nothing from anywhere but pacslb itself.
Screenshots are left under /tmp (their paths are printed) for a person to look at.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import peers
import pytest
from peers import OrthancNode, PacslbProcess

pytestmark = [pytest.mark.peers, pytest.mark.browser]

NodesFactory = Callable[[int], list[OrthancNode]]
PacslbFactory = Callable[[str], PacslbProcess]
TOKEN = "dashboard-token-0123456789"
#: The page polls every 2 s and the checks run every 500 ms with fall 1: a killed node shows within a few
#: seconds. The bound is generous for a loaded machine; the point is that nobody has to reload the page.
SHOWS_DOWN_WITHIN = 10.0
#: Any other wait on the page: the dashboard answers in milliseconds.
PAGE_TIMEOUT_MS = 10_000


def test_dashboard_shows_a_killed_node_and_drains_one_with_confirmation(
    orthanc_nodes: NodesFactory, pacslb: PacslbFactory, page: Any, tmp_path: Path
) -> None:
    pacs1, pacs2 = orthanc_nodes(2)
    dicom_port, web_port, admin = peers.free_port(), peers.free_port(), peers.free_port()
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    services = {
        "dicom": peers.dicom_service(dicom_port, [pacs1, pacs2], check=peers.DICOM_ECHO_CHECK),
        "web": peers.service(
            web_port, {n.name: f"127.0.0.1:{n.http_port}" for n in (pacs1, pacs2)},
            check={"type": "tcp", "interval": "500ms", "timeout": "500ms", "rise": 1, "fall": 1},
        ),
    }  # fmt: skip
    lb = pacslb(peers.config_text(services, admin=peers.admin_section(admin, token_file), shutdown_grace="1s"))
    for _ in range(4):  # some traffic for the counters
        assert peers.echoscu(dicom_port).ok

    url = f"http://127.0.0.1:{admin}"
    requested: list[str] = []
    page.on("request", lambda request: requested.append(request.url))
    page.set_default_timeout(PAGE_TIMEOUT_MS)
    page.goto(url + "/")
    # With a token, every read needs it too: the page asks before it shows anything; a wrong token is
    # asked for again.
    token_dialog = page.locator("#token-dialog")
    token_dialog.wait_for(state="visible")
    assert page.locator("#nodes tbody tr").count() == 0
    page.locator("#token-input").fill("not-the-token-0123456789")
    page.locator("#token-ok").click()
    page.wait_for_function("() => document.querySelector('#token-dialog').open")
    assert page.locator("#token-input").input_value() == "not-the-token-0123456789"
    page.locator("#token-input").fill(TOKEN)
    page.locator("#token-ok").click()
    health = page.get_by_test_id("node-health-pacs2")
    health.wait_for()
    assert health.inner_text() == "up"
    assert page.get_by_test_id("service-state-dicom").inner_text() == "up"
    shots = Path(tempfile.mkdtemp(prefix="pacslb-dashboard-"))
    page.screenshot(path=str(shots / "1-all-up.png"), full_page=True)

    # A node dies: the page shows it down by itself, in the node list and in each service.
    killed_at = time.monotonic()
    pacs2.kill()
    page.wait_for_function(
        "() => document.querySelector('[data-testid=\"node-health-pacs2\"]')?.textContent === 'down'",
        timeout=SHOWS_DOWN_WITHIN * 1000,
    )
    shown_after = time.monotonic() - killed_at
    assert page.get_by_test_id("health-dicom-pacs2").inner_text() == "down"
    page.wait_for_function("() => document.querySelector('#events')?.textContent.includes('pacs2 is down in dicom')")
    page.screenshot(path=str(shots / "2-pacs2-down.png"), full_page=True)

    # Drain pacs1: Cancel first (nothing happens), then confirm; the token given at the start is used.
    drain = page.locator('[data-testid="node-pacs1"] button[data-action="drain"]')
    drain.click()
    dialog = page.locator("#confirm")
    assert dialog.is_visible()
    assert page.locator("#confirm-title").inner_text() == "Drain pacs1 in every service?"
    # pacs2 is down: draining pacs1 would leave both services without a server for new clients.
    assert "dicom, web would be left with no server" in page.locator("#confirm-text").inner_text()
    page.screenshot(path=str(shots / "3-confirm.png"))
    page.locator("#confirm-cancel").click()
    assert not dialog.is_visible()
    assert peers.admin_server(admin, "dicom", "pacs1")["admin"] == "online"

    drain.click()
    page.locator("#confirm-ok").click()
    admin_pill = page.get_by_test_id("node-admin-pacs1")
    page.wait_for_function(
        "() => document.querySelector('[data-testid=\"node-admin-pacs1\"]')?.textContent === 'drain'"
    )
    assert admin_pill.inner_text() == "drain"
    assert page.get_by_test_id("admin-dicom-pacs1").inner_text() == "drain"
    assert peers.admin_server(admin, "dicom", "pacs1")["admin"] == "drain"
    assert peers.admin_server(admin, "web", "pacs1")["admin"] == "drain"
    lb.wait_event("admin", 5.0, service="dicom", server="pacs1", new="drain", by="api")
    page.screenshot(path=str(shots / "4-pacs1-drained.png"), full_page=True)

    assert not token_dialog.is_visible()  # asked for once
    assert requested and all(r.startswith(url + "/") for r in requested), "the page loads nothing from elsewhere"
    print(f"\ndashboard screenshots in {shots}; pacs2 shown down {shown_after:.1f} s after it was killed")


def test_dashboard_without_a_token_never_asks_for_one(pacslb: PacslbFactory, page: Any) -> None:
    admin, dead = peers.free_port(), peers.free_port()
    services = {"dicom": peers.service(peers.free_port(), {"pacs1": f"127.0.0.1:{dead}"}, check={"type": "none"})}
    pacslb(peers.config_text(services, admin=peers.admin_section(admin), shutdown_grace="1s", workers=1))
    page.set_default_timeout(PAGE_TIMEOUT_MS)
    page.goto(f"http://127.0.0.1:{admin}/")
    page.get_by_test_id("node-admin-pacs1").wait_for()
    page.locator('[data-testid="node-pacs1"] button[data-action="halt"]').click()
    page.locator("#confirm-ok").click()
    page.wait_for_function("() => document.querySelector('[data-testid=\"node-admin-pacs1\"]')?.textContent === 'halt'")
    assert peers.admin_server(admin, "dicom", "pacs1")["admin"] == "halt"
    assert not page.locator("#token-dialog").is_visible()
