"""The operations commands of the ``pacslb`` CLI against a running pacslb (a child process), and its
notifications to systemd (``$NOTIFY_SOCKET``): what an operator types and what systemd is told.
"""

from __future__ import annotations

import json
import signal
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import peers
import pytest
from peers import PacslbProcess

PacslbFactory = Callable[[str], PacslbProcess]
TOKEN = "cli-token-0123456789abcdef"


@pytest.fixture
def lb_with_token(pacslb: PacslbFactory, tmp_path: Path) -> Iterator[tuple[PacslbProcess, int, Path]]:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    admin = peers.free_port()
    dead = peers.free_port()  # nothing listens there: with check none the servers still count as up
    services = {
        "dicom": peers.service(peers.free_port(), {"pacs1": f"127.0.0.1:{dead}", "pacs2": f"127.0.0.1:{dead}"},
                               check={"type": "none"}),
        "web": peers.service(peers.free_port(), {"pacs1": f"127.0.0.1:{dead}"}, check={"type": "none"}),
    }  # fmt: skip
    yield (
        pacslb(peers.config_text(services, admin=peers.admin_section(admin, token_file), workers=1)),
        admin,
        token_file,
    )


def test_status_drain_halt_online_with_the_token(
    lb_with_token: tuple[PacslbProcess, int, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    lb, admin, token_file = lb_with_token
    url = f"http://127.0.0.1:{admin}"

    # With a token, reads need it too: the status names node addresses, and the API clients and AE titles.
    refused = peers.run_pacslb_cli("status", "--admin", url)
    assert refused.returncode == 1 and "needs its token" in refused.output, refused
    status = peers.run_pacslb_cli("status", "--admin", url, "--token-file", str(token_file))
    assert status.ok, status
    lines = status.output.splitlines()
    assert lines[0].startswith("pacslb ") and "pacslb.yaml" in lines[0]
    assert lines[1].split() == [
        "SERVICE",
        "NODE",
        "ADDRESS",
        "HEALTH",
        "ADMIN",
        "WEIGHT",
        "ACTIVE/TOTAL",
        "LAST",
        "CHECK",
    ]
    rows = [line.split()[:6] for line in lines[2:]]
    assert [r[:2] for r in rows] == [["dicom", "pacs1"], ["dicom", "pacs2"], ["web", "pacs1"]]
    assert all(r[3:5] == ["up", "online"] for r in rows)

    refused = peers.run_pacslb_cli("drain", "pacs1", "--admin", url)
    assert refused.returncode == 1 and "needs its token" in refused.output, refused

    drained = peers.run_pacslb_cli("drain", "pacs1", "--admin", url, "--token-file", str(token_file))
    assert drained.ok and "pacs1: drain in dicom, web" in drained.output, drained

    # The environment instead of options, as a script on the balancer would use it.
    monkeypatch.setenv("PACSLB_ADMIN", url)
    monkeypatch.setenv("PACSLB_TOKEN", TOKEN)
    halted = peers.run_pacslb_cli("halt", "pacs2", "--service", "dicom")
    assert halted.ok and "pacs2: halt in dicom" in halted.output, halted
    unknown = peers.run_pacslb_cli("online", "pacs9")
    assert unknown.returncode == 1 and "no node named 'pacs9'" in unknown.output, unknown
    weight = peers.run_pacslb_cli("weight", "pacs1", "3", "--service", "web")
    assert weight.ok and "pacs1: weight 3 in web" in weight.output, weight

    as_json = peers.run_pacslb_cli("status", "--json")
    assert as_json.ok, as_json
    document = json.loads(as_json.output)
    admin_states = {(s["name"], v["name"]): v["admin"] for s in document["services"] for v in s["servers"]}
    assert admin_states == {("dicom", "pacs1"): "drain", ("dicom", "pacs2"): "halt", ("web", "pacs1"): "drain"}
    lb.wait_event("admin", 5.0, service="dicom", server="pacs2", new="halt", by="api")

    back = peers.run_pacslb_cli("online", "pacs1")
    assert back.ok, back
    assert peers.admin_server(admin, "web", "pacs1")["admin"] == "online"


def test_status_drain_halt_online_without_a_token(pacslb: PacslbFactory) -> None:
    admin = peers.free_port()
    dead = peers.free_port()
    services = {"dicom": peers.service(peers.free_port(), {"pacs1": f"127.0.0.1:{dead}"}, check={"type": "none"})}
    lb = pacslb(peers.config_text(services, admin=peers.admin_section(admin), workers=1))
    assert lb.wait_event("admin_no_token", 5.0).level == "warning"  # the start says that anyone may
    url = f"http://127.0.0.1:{admin}"
    status = peers.run_pacslb_cli("status", "--admin", url)
    assert status.ok and "pacs1" in status.output, status
    for action in ("drain", "halt", "online"):
        done = peers.run_pacslb_cli(action, "pacs1", "--admin", url)
        assert done.ok and f"pacs1: {action} in dicom" in done.output, done
        assert peers.admin_server(admin, "dicom", "pacs1")["admin"] == action
    weight = peers.run_pacslb_cli("weight", "pacs1", "2", "--admin", url)
    assert weight.ok, weight


def test_cli_says_when_the_admin_api_cannot_be_reached() -> None:
    result = peers.run_pacslb_cli("status", "--admin", f"http://127.0.0.1:{peers.free_port()}")
    assert result.returncode == 1
    assert "cannot reach the admin API" in result.output and "admin:" in result.output


def test_systemd_is_told_ready_reloading_and_stopping(
    pacslb: PacslbFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(10.0)
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        services = {"svc": peers.service(peers.free_port(), {"n1": "127.0.0.1:9"}, check={"type": "none"})}
        lb = pacslb(peers.config_text(services, workers=1, shutdown_grace="1s"))

        def next_message() -> dict[str, str]:
            lines = sock.recv(4096).decode().splitlines()
            return dict(line.split("=", 1) for line in lines)

        ready = next_message()
        assert ready["READY"] == "1" and "1 services" in ready["STATUS"]
        lb.send(signal.SIGHUP)
        reloading = next_message()
        assert reloading["RELOADING"] == "1" and int(reloading["MONOTONIC_USEC"]) > 0
        assert next_message()["READY"] == "1"
        lb.send(signal.SIGTERM)
        assert next_message()["STOPPING"] == "1"
        assert lb.wait_exit(10.0) == 0
