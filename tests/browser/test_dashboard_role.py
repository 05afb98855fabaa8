"""The dashboard's cluster role card: absent on a balancer on its own, and following what keepalived
reports (``pacslb role CONFIG ROLE``) on one of a pair."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import peers
from peers import PacslbProcess

PacslbFactory = Callable[[str], PacslbProcess]
#: The page polls the status every 2 s; a change shows within one poll on a quiet machine.
PAGE_TIMEOUT_MS = 15_000


def _services() -> dict[str, Any]:
    dead = peers.free_port()
    return {"dicom": peers.service(peers.free_port(), {"pacs1": f"127.0.0.1:{dead}"}, check={"type": "none"})}


def test_role_card_follows_keepalived(pacslb: PacslbFactory, page: Any) -> None:
    admin = peers.free_port()
    vrrp = {"interface": "eth0", "router_id": 51, "virtual_ips": ["192.0.2.100/24"]}
    lb = pacslb(
        peers.config_text(_services(), admin=peers.admin_section(admin), cluster={"node": "lb-a", "vrrp": vrrp},
                          shutdown_grace="1s", workers=1)
    )  # fmt: skip
    page.set_default_timeout(PAGE_TIMEOUT_MS)
    page.goto(f"http://127.0.0.1:{admin}/")
    card = page.get_by_test_id("summary-role")
    card.wait_for()
    assert card.locator(".value").text_content() == "unknown"

    assert peers.run_pacslb_cli("role", str(lb.config_path), "master").ok
    page.wait_for_function(
        "() => document.querySelector('[data-testid=\"summary-role\"] .value')?.textContent === 'master'"
    )
    assert "holds the virtual IP" in (card.locator(".detail").text_content() or "")
    assert "bad" not in (card.get_attribute("class") or "")

    assert peers.run_pacslb_cli("role", str(lb.config_path), "fault").ok
    page.wait_for_function("() => document.querySelector('[data-testid=\"summary-role\"]')?.classList.contains('bad')")
    assert card.locator(".value").text_content() == "fault"


def test_no_role_card_on_a_balancer_on_its_own(pacslb: PacslbFactory, page: Any) -> None:
    admin = peers.free_port()
    pacslb(peers.config_text(_services(), admin=peers.admin_section(admin), shutdown_grace="1s", workers=1))
    page.set_default_timeout(PAGE_TIMEOUT_MS)
    page.goto(f"http://127.0.0.1:{admin}/")
    page.get_by_test_id("summary-services").wait_for()
    assert page.get_by_test_id("summary-role").count() == 0
