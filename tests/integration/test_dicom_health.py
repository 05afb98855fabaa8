"""The ``dicom_echo`` health check with the service's AE titles: a node that refuses them is taken out.

A node whose port answers but whose DICOM service refuses pacslb's association is no use to modalities.
The C-ECHO check uses the configured ``calling_ae`` / ``called_ae``, so a node that rejects them goes down,
and the ``health`` line says which rejection it was. The nodes are in-process pynetdicom SCPs that check
AE titles the way PACS nodes do.
"""

from __future__ import annotations

from collections.abc import Callable

import peers
import pytest
from peers import PacslbProcess

pytestmark = pytest.mark.peers

PacslbFactory = Callable[[str], PacslbProcess]


def test_a_node_rejecting_the_check_ae_titles_goes_down_and_the_log_says_why(pacslb: PacslbFactory) -> None:
    check = {**peers.DICOM_ECHO_CHECK, "calling_ae": "PACSLB", "called_ae": "ANY-SCP"}
    with (
        peers.EchoSCP("STRICT", require_called_aet=True) as wrong_called,
        peers.EchoSCP("ANY-SCP", require_calling_aet=["MODALITY"]) as wrong_calling,
        peers.EchoSCP("ANY-SCP", require_called_aet=True, require_calling_aet=["PACSLB", "CT01"]) as good,
    ):
        port = peers.free_port()
        servers = {"wrongcalled": wrong_called.address, "wrongcalling": wrong_calling.address, "good": good.address}
        lb = pacslb(peers.config_text({"dicom": peers.dicom_service(port, servers, check=check)}))

        called = lb.wait_event("health", timeout=5.0, server="wrongcalled", new="down")
        calling = lb.wait_event("health", timeout=5.0, server="wrongcalling", new="down")
        # Both are down at their first check; the good node, checked with the same titles, stays up.
        peers.wait_for(lambda: good.accepted.count("PACSLB") >= 3, 5.0, "three C-ECHO checks of the good node")
        traffic = [peers.echoscu(port, calling="CT01") for _ in range(4)]
        good_down = lb.events("health", server="good", new="down")  # before the nodes are shut down
        # pacslb stops first: a check connecting while a node shuts down would be aborted by pynetdicom before
        # its A-ASSOCIATE-RQ, which pynetdicom's own thread reports as an error (Evt15 in Sta2).
        lb.stop()

    assert called.level == "warning" and called.get("old") == "up", called.line
    assert "1, 1, 7" in called.get("reason") and "called ae" in called.get("reason").lower(), called.line
    assert "1, 1, 3" in calling.get("reason") and "calling ae" in calling.get("reason").lower(), calling.line
    assert not good_down, lb.log()
    for result in traffic:
        assert result.ok, result
    lines = lb.wait_events("assoc", 4, timeout=5.0)
    assert {(e.get("server"), e.get("outcome"), e.get("retries")) for e in lines} == {("good", "accepted", "0")}
    assert not lb.events("assoc_retry"), "down nodes are not tried"
