"""Zero-drop reload: while clients keep opening DICOM associations (through a dicom-mode and a tcp-mode
service) and HTTP requests (http mode) to Orthanc nodes, the config is reloaded 20 times, through the
admin API and by SIGHUP, changing weights, checks and servers, and moving one service's listener. Not one
association or request may fail, and an association open across all the reloads keeps working.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
import peers
import pytest
from peers import OrthancNode, PacslbProcess

pytestmark = pytest.mark.peers

NodesFactory = Callable[[int], list[OrthancNode]]
PacslbFactory = Callable[[str], PacslbProcess]
RELOADS = 20
#: Each client thread stops after this long whatever happens, so the test is bounded.
CLIENT_DEADLINE = 90.0


class Load:
    """Client threads that keep opening associations / requests until told to stop, counting failures."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.done: dict[str, int] = {}
        self.failures: list[str] = []
        self.threads: list[threading.Thread] = []
        self.lock = threading.Lock()

    def run(self, name: str, once: Callable[[], None]) -> None:
        def loop() -> None:
            deadline = time.monotonic() + CLIENT_DEADLINE
            while not self.stop.is_set() and time.monotonic() < deadline:
                try:
                    once()
                except Exception as exc:  # any failure counts, whatever its kind
                    with self.lock:
                        self.failures.append(f"{name}: {type(exc).__name__}: {exc}")
                else:
                    with self.lock:
                        self.done[name] = self.done.get(name, 0) + 1

        thread = threading.Thread(target=loop, name=f"load-{name}", daemon=True)
        self.threads.append(thread)
        thread.start()

    def finish(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(CLIENT_DEADLINE)


def test_twenty_reloads_under_load_drop_nothing(orthanc_nodes: NodesFactory, pacslb: PacslbFactory) -> None:
    pacs1, pacs2 = orthanc_nodes(2)
    dicom_port, tcp_port, web_port, admin = (peers.free_port() for _ in range(4))
    moving_ports = [peers.free_port() for _ in range(2)]
    quick = {"type": "tcp", "interval": "300ms", "timeout": "300ms", "rise": 1, "fall": 2}

    def config(i: int) -> str:
        weight = 1 + i % 3
        services: dict[str, Any] = {
            "dicom": peers.dicom_service(
                dicom_port, {"pacs1": pacs1.address, "pacs2": {"address": pacs2.address, "weight": weight}},
                check={**quick, "interval": f"{300 + 10 * (i % 4)}ms"},
            ),
            "store": peers.service(
                tcp_port,
                {"pacs1": pacs1.address, **({"pacs2": pacs2.address} if i % 2 == 0 else {})},
                balance="leastconn" if i % 2 else "roundrobin", persistence={"type": "source_ip"}, check=quick,
            ),
            "web": peers.http_service(web_port, [pacs1, pacs2], check={**peers.HTTP_CHECK, "path": "/system"},
                                      persistence={"type": "none"}),
            # A service whose listener moves on every reload: new address bound, old one closed.
            "extra": peers.service(moving_ports[i % 2], {"pacs1": pacs1.address}, check={"type": "none"}),
        }  # fmt: skip
        return peers.config_text(services, admin=peers.admin_section(admin), shutdown_grace="2s")

    lb = pacslb(config(0))
    load = Load()
    with peers.DicomClient(dicom_port, "127.0.0.9") as held:
        load.run("dicom", lambda: _echo(dicom_port, "127.0.0.2"))
        load.run("tcp", lambda: _echo(tcp_port, "127.0.0.3"))
        web = httpx.Client(base_url=f"http://127.0.0.1:{web_port}", timeout=10.0, trust_env=False)
        load.run("web", lambda: _get(web))
        try:
            time.sleep(0.5)
            for i in range(1, RELOADS + 1):
                mark = lb.mark()
                if i % 2:
                    lb.config_path.write_text(config(i))
                    response = peers.admin_api(admin, "POST", "/api/v1/reload")
                    assert response.status_code == 200, response.text
                else:
                    lb.reload(config(i))
                    lb.wait_event("reloaded", 10.0, since=mark)
                time.sleep(0.15)
                assert held.echo() == 0, f"the open association failed after reload {i}"
        finally:
            load.finish()
            web.close()
    reloaded = lb.events("reloaded")
    assert len(reloaded) == RELOADS, lb.log()
    assert not load.failures, "\n".join(load.failures[:20])
    assert all(load.done.get(k, 0) >= RELOADS for k in ("dicom", "tcp", "web")), load.done
    assert not lb.events("conn", end="refused") and not lb.events("conn", end="no_server")
    assert not lb.events("reload_refused")


def _echo(port: int, source: str) -> None:
    attempt = peers.attempt_association(port, source)
    if not attempt.established or attempt.echo_status != 0:
        raise AssertionError(f"association through port {port}: {attempt}")


def _get(client: httpx.Client) -> None:
    response = client.get("/system")
    if response.status_code != 200:
        raise AssertionError(f"GET /system: HTTP {response.status_code}")
