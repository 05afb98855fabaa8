"""What keepalived runs against a real pacslb (a child process): ``pacslb health CONFIG`` (its track_script)
and ``pacslb role CONFIG ROLE`` (its notify hooks), and where the role shows: ``pacslb status``, the status
JSON, the metrics and the log. Also the process name keepalived's track_process watches.
"""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import peers
from peers import PacslbProcess

PacslbFactory = Callable[[str], PacslbProcess]
TOKEN = "role-token-0123456789abcdef"
#: `pacslb health --timeout` in these tests; the command must end within it plus its own start-up.
HEALTH_TIMEOUT = 1.0
#: Start-up of the command on a loaded two-core machine (it imports pacslb's config models).
START_UP = 10.0


def _cluster_config(admin: dict[str, object], **vrrp: object) -> str:
    dead = peers.free_port()
    services = {"dicom": peers.service(peers.free_port(), {"pacs1": f"127.0.0.1:{dead}"}, check={"type": "none"})}
    cluster = {
        "node": "lb-a",
        "vrrp": {"interface": "eth0", "router_id": 51, "virtual_ips": ["192.0.2.100/24"], **vrrp},
    }
    return peers.config_text(services, admin=admin, cluster=cluster, workers=1, shutdown_grace="1s")


def _metric_roles(port: int) -> dict[str, float]:
    text = peers.admin_api(port, "GET", "/metrics").text
    values = {}
    for line in text.splitlines():
        if line.startswith("pacslb_cluster_role{"):
            labels, value = line.rsplit(" ", 1)
            values[labels.split('role="', 1)[1].split('"', 1)[0]] = float(value)
    return values


def test_role_is_shown_in_status_metrics_and_log(pacslb: PacslbFactory, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    admin = peers.free_port()
    lb = pacslb(_cluster_config(peers.admin_section(admin, token_file)))
    config = str(lb.config_path)

    status = peers.admin_api(admin, "GET", "/api/v1/status").json()
    assert (status["role"], status["role_since"], status["vrrp"]) == ("unknown", None, True)
    assert _metric_roles(admin) == {"unknown": 1.0, "master": 0.0, "backup": 0.0, "fault": 0.0, "stopped": 0.0}

    # The token comes from the config's admin.token_file: nothing else is given, as from keepalived.
    told = peers.run_pacslb_cli("role", config, "master")
    assert told.ok and told.output.strip() == "lb-a: master", told
    status = peers.admin_api(admin, "GET", "/api/v1/status").json()
    assert status["role"] == "master" and status["role_since"] > time.time() - 60
    assert _metric_roles(admin) == {"unknown": 0.0, "master": 1.0, "backup": 0.0, "fault": 0.0, "stopped": 0.0}
    assert lb.wait_event("role", 5.0, node="lb-a", old="unknown", new="master").level == "info"

    again = peers.run_pacslb_cli("role", config, "master")
    assert again.ok and "(unchanged)" in again.output, again

    shown = peers.run_pacslb_cli("status", "--admin", f"http://127.0.0.1:{admin}", "--token-file", str(token_file))
    assert shown.ok and ", role master (since " in shown.output.splitlines()[0], shown

    for role in ("backup", "fault", "stopped"):
        assert peers.run_pacslb_cli("role", config, role).ok
        assert _metric_roles(admin)[role] == 1.0
        assert sum(_metric_roles(admin).values()) == 1.0
    assert lb.wait_event("role", 5.0, old="backup", new="fault").level == "warning"
    assert len(lb.events("role")) == 4  # one line per change, none for the repeated master

    events = peers.admin_api(admin, "GET", "/api/v1/events").json()["events"]
    assert [e["fields"]["new"] for e in events if e["kind"] == "cluster"] == ["master", "backup", "fault", "stopped"]


def test_telling_the_role_is_a_write(pacslb: PacslbFactory, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    admin = peers.free_port()
    pacslb(_cluster_config(peers.admin_section(admin, token_file)))
    path = "/api/v1/cluster/role"
    assert peers.admin_api(admin, "POST", path, token="", json={"role": "master"}).status_code == 401
    # A simple form post (no JSON, no X-Pacslb-Request) is refused before the token is even looked at.
    form = httpx.post(
        f"http://127.0.0.1:{admin}{path}", content=b"role=master", trust_env=False,
        headers={"Content-Type": "application/x-www-form-urlencoded", "Authorization": f"Bearer {TOKEN}"},
    )  # fmt: skip
    assert form.status_code == 415
    assert peers.admin_api(admin, "POST", path, json={"role": "primary"}).status_code == 422
    assert peers.admin_api(admin, "GET", "/api/v1/status").json()["role"] == "unknown"
    assert peers.admin_api(admin, "POST", path, json={"role": "backup"}).json() == {
        "node": "lb-a", "role": "backup", "changed": True,
    }  # fmt: skip


def test_health_follows_the_balancer_running_stopped_and_gone(pacslb: PacslbFactory) -> None:
    admin = peers.free_port()
    lb = pacslb(_cluster_config(peers.admin_section(admin)))
    config = str(lb.config_path)

    def health() -> peers.ToolResult:
        return peers.run_pacslb_cli("health", config, "--timeout", str(HEALTH_TIMEOUT), timeout=START_UP + 5)

    serving = health()
    assert serving.ok and serving.output == "", serving

    # SIGSTOP: the kernel still accepts the connection, nothing answers it. The timeout must say so.
    lb.send(signal.SIGSTOP)
    try:
        hung = health()
    finally:
        lb.send(signal.SIGCONT)
    assert hung.returncode == 1, hung
    assert hung.elapsed < HEALTH_TIMEOUT + START_UP, hung
    assert hung.output.count("\n") == 1 and "did not answer within 1 s" in hung.output, hung

    assert peers.wait_for(lambda: health().ok, 10.0, "pacslb health to pass again after SIGCONT")

    lb.send(signal.SIGTERM)
    lb.wait_exit(15.0)
    gone = health()
    assert gone.returncode == 1 and gone.output.count("\n") == 1, gone
    assert "/healthz" in gone.output and "refused" in gone.output.lower(), gone


def test_health_needs_only_the_admin_section(pacslb: PacslbFactory) -> None:
    """An edit that breaks another section (not reloaded yet, maybe on both balancers) must not take the
    address away from a balancer that serves with the config it loaded."""
    admin = peers.free_port()
    lb = pacslb(_cluster_config(peers.admin_section(admin)))
    lb.config_path.write_text(lb.config_path.read_text().replace("mode: tcp", "mode: nonsense"))
    assert peers.run_pacslb_cli("check", str(lb.config_path)).returncode == 1
    still = peers.run_pacslb_cli("health", str(lb.config_path))
    assert still.ok, still
    told = peers.run_pacslb_cli("role", str(lb.config_path), "backup")
    assert told.ok, told


def test_role_and_health_without_a_balancer_fail_quickly(tmp_path: Path) -> None:
    config = tmp_path / "pacslb.yaml"
    config.write_text(_cluster_config(peers.admin_section(peers.free_port())))
    told = peers.run_pacslb_cli("role", str(config), "master")
    assert told.returncode == 1 and told.output.startswith("pacslb role: cannot reach the admin API"), told
    assert told.elapsed < START_UP
    health = peers.run_pacslb_cli("health", str(config))
    assert health.returncode == 1 and health.output.startswith("pacslb health: "), health

    no_admin = tmp_path / "no-admin.yaml"
    no_admin.write_text(
        peers.config_text({"svc": peers.service(peers.free_port(), {"n1": "127.0.0.1:9"}, check={"type": "none"})})
    )
    for args in (("health", str(no_admin)), ("role", str(no_admin), "master")):
        result = peers.run_pacslb_cli(*args)
        assert result.returncode == 1 and "no admin section" in result.output, result


def test_main_process_is_named_for_keepalived_track_process(pacslb: PacslbFactory) -> None:
    lb = pacslb(_cluster_config(peers.admin_section(peers.free_port()), interface="eth0"))
    assert Path(f"/proc/{lb.pid}/comm").read_text().strip() == "pacslb-run"
    # keepalived's track_process matches the name exactly, as `pgrep -x` does.
    found = subprocess.run(["pgrep", "-x", "pacslb-run"], capture_output=True, text=True, check=False)
    assert str(lb.pid) in found.stdout.split(), found
    assert Path(f"/proc/{lb.pid}/status").read_text().splitlines()[0].split() == ["Name:", "pacslb-run"]
