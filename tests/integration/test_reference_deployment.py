"""The reference deployment (examples/infinitt.yaml) as it is shipped, driven end to end by real tools.

The example is loaded as a user copies it: only the addresses change (each service listens on a free
loopback port; pacs1 and pacs2 are two Orthanc nodes, their HTTP port behind the web service and their
one DICOM port behind DICOM, Query and MWL). Modes, persistence, checks, timeouts and retries stay as
written. dcmtk stores a study, queries it and fetches the worklist; a browser-like client gets the viewer
with its SERVERID cookie; then the node the modality is on hangs, and its next association is served by
the other node.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import peers
import pytest
import yaml
from peers import OrthancNode, PacslbProcess, Study

pytestmark = pytest.mark.peers

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "infinitt.yaml"
NodesFactory = Callable[[int], list[OrthancNode]]
PacslbFactory = Callable[[str], PacslbProcess]


def the_example_on_loopback(nodes: list[OrthancNode]) -> tuple[str, dict[str, int]]:
    """The example's text with loopback addresses, and the port of each service."""
    config: dict[str, Any] = yaml.safe_load(EXAMPLE.read_text())
    ports: dict[str, int] = {}
    for name, service in config["services"].items():
        ports[name] = peers.free_port()
        service["listen"] = f"127.0.0.1:{ports[name]}"
        assert set(service["servers"]) == {node.name for node in nodes}, service["servers"]
        web = service["mode"] == "http"
        service["servers"] = {node.name: f"127.0.0.1:{node.http_port}" if web else node.address for node in nodes}
    return yaml.safe_dump(config, sort_keys=False), ports


def test_the_reference_deployment_serves_store_query_worklist_and_web_in_dicom_mode(
    orthanc_nodes: NodesFactory, pacslb: PacslbFactory, study: Study
) -> None:
    nodes = orthanc_nodes(2)
    text, ports = the_example_on_loopback(nodes)
    lb = pacslb(text)
    modes = {line.get("service"): line.get("mode") for line in lb.wait_events("listen", 4, timeout=5.0)}
    assert modes == {"web": "http", "dicom": "dicom", "query": "dicom", "mwl": "dicom"}, modes

    store = peers.storescu(ports["dicom"], study.directory, called="INFINITT", calling="CT01")
    assert store.ok, store
    stored = lb.wait_event("assoc", 5.0, service="dicom")
    assert (stored.get("outcome"), stored.get("calling"), stored.get("called")) == ("accepted", "CT01", "INFINITT")
    (holder,) = [node for node in nodes if node.name == stored.get("server")]
    (other,) = [node for node in nodes if node is not holder]
    assert holder.sop_instance_uids() == set(study.sop_uids), "every instance the modality sent is stored"
    assert not other.sop_instance_uids(), "the study was split over the nodes"

    # INFINITT's nodes share one archive; these two Orthancs do not, so the other one is given the study
    # directly, as the shared archive would: the query then has an answer on whichever node it reaches.
    direct = peers.storescu(other.dicom_port, study.directory, calling="ARCHIVE")
    assert direct.ok, direct
    find = peers.findscu_study(ports["query"], study.study_uid, called="INFINITT")
    assert find.ok and peers.count_responses(find) == 1 and study.study_uid in find.output, find
    worklist = peers.findscu_worklist(ports["mwl"], called="INFINITT")
    assert worklist.ok and peers.count_responses(worklist) == 1, worklist
    assert peers.WORKLIST_PATIENT in worklist.output, worklist
    for service in ("query", "mwl"):
        line = lb.wait_event("assoc", 5.0, service=service)
        assert line.get("outcome") == "accepted", line.line

    # The web service's GET check keeps Orthanc's nodes up (Orthanc answers HEAD with 404), and the viewer
    # is served with the persistence cookie.
    with httpx.Client(base_url=f"http://127.0.0.1:{ports['web']}", timeout=10.0) as web:
        page = web.get("/app/explorer.html")
        assert page.status_code == 200 and "SERVERID" in page.headers.get("set-cookie", ""), page.headers
        system = web.get("/system")
        assert system.status_code == 200 and system.json()["DicomAet"] in {n.aet for n in nodes}
    assert not lb.events("health"), "a node's health changed while every node was serving"

    # The modality's node hangs: its next association goes to the other node after node_answer (3 s in
    # the example), well within echoscu's own wait, and the modality never sees a failure.
    assert holder.proc is not None
    holder.proc.send_signal(signal.SIGSTOP)
    try:
        echo = peers.echoscu(ports["dicom"], called="INFINITT", calling="CT01")
        assert echo.ok and "Received Echo Response (Success)" in echo.output, echo
        retry = lb.wait_event("assoc_retry", 5.0, service="dicom")
        assert (retry.get("server"), retry.get("reason")) == (holder.name, "no answer within 3s"), retry.line
        served = lb.wait_event("assoc", 5.0, service="dicom", calling="CT01", retries="1")
        assert (served.get("outcome"), served.get("server")) == ("accepted", other.name), served.line
    finally:
        holder.proc.send_signal(signal.SIGCONT)
