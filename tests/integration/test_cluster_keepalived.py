"""``pacslb keepalived CONFIG`` judged by the real keepalived: ``keepalived --config-test -f FILE`` on what it
prints. keepalived is never started here (no VRRP on the host's network); the failover itself is tested in
network namespaces (tests/ha).

``--config-test`` exits 5 on an error, naming the line, and checks more than syntax: the interface must
exist, and with ``enable_script_security`` every script must exist and be writable by root alone. It
exits 0 for a file that does not exist, so each test checks the file is there first.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import peers
import pytest
import yaml

KEEPALIVED = shutil.which("keepalived") or "/usr/sbin/keepalived"
INSTALL_HINT = "keepalived is not installed: run tests/ha/install.sh as root (it installs it with apt)"
#: keepalived parses a file in milliseconds; bounded so that a stuck run fails the test instead of hanging it.
CONFIG_TEST_TIMEOUT = 30.0


def _interface() -> str:
    """A network interface that exists here and can carry VRRP (keepalived refuses ``lo``)."""
    names = sorted(n for n in os.listdir("/sys/class/net") if n != "lo")
    if not names:
        pytest.skip("no network interface other than lo: keepalived --config-test needs one that exists")
    return next((n for n in names if n.startswith(("eth", "en"))), names[0])


@pytest.fixture
def keepalived() -> str:
    if not Path(KEEPALIVED).exists():  # make test installs it (tests/ha/install.sh): missing is a failure
        pytest.fail(INSTALL_HINT, pytrace=False)
    return KEEPALIVED


def _write_config(tmp_path: Path, vrrp: dict[str, object], admin: dict[str, object] | None = None) -> Path:
    services = {"dicom": peers.service(peers.free_port(), {"pacs1": "10.0.0.11:104"}, check={"type": "none"})}
    path = tmp_path / "pacslb.yaml"
    top: dict[str, object] = {"cluster": {"node": "lb1", "vrrp": vrrp}}
    if admin is not None:
        top["admin"] = admin
    path.write_text(peers.config_text(services, **top))
    return path


def _generate(config: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(peers.REPO_ROOT), env.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, "-m", "pacslb", "keepalived", str(config)],
        capture_output=True, text=True, timeout=60, env=env, stdin=subprocess.DEVNULL, check=False,
    )  # fmt: skip


def _config_test(keepalived: str, conf: Path) -> subprocess.CompletedProcess[str]:
    assert conf.is_file(), conf  # keepalived --config-test says 0 for a file that is not there
    return subprocess.run(
        [keepalived, "--config-test", "-f", str(conf)],
        capture_output=True, text=True, timeout=CONFIG_TEST_TIMEOUT, stdin=subprocess.DEVNULL, check=False,
    )  # fmt: skip


VARIANTS = {
    "unicast-nopreempt": {"priority": 150, "virtual_ips": ["192.0.2.100/24"], "peers": ["192.0.2.2"]},
    "multicast-preempt": {"virtual_ips": ["192.0.2.100/24"], "preempt": True, "advert_interval": "1s"},
    "several-vips": {
        "virtual_ips": ["192.0.2.100/24", "198.51.100.7/24", "203.0.113.9"],
        "peers": ["192.0.2.2", "192.0.2.3"],
        "advert_interval": "50ms",
        "check_interval": "2s",
        "check_fall": 3,
    },
    "ipv6-unicast": {"virtual_ips": ["2001:db8::100/64"], "peers": ["2001:db8::2"]},
    "ipv6-moved-with-ipv4": {"virtual_ips": ["192.0.2.100/24", "2001:db8::100/64"], "peers": ["192.0.2.2"]},
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_keepalived_accepts_the_generated_config(keepalived: str, tmp_path: Path, variant: str) -> None:
    vrrp = {"interface": _interface(), "router_id": 51, **VARIANTS[variant]}
    config = _write_config(tmp_path, vrrp, admin={"listen": f"127.0.0.1:{peers.free_port()}"})
    generated = _generate(config)
    assert generated.returncode == 0, generated.stderr
    conf = tmp_path / "keepalived.conf"
    conf.write_text(generated.stdout)

    checked = _config_test(keepalived, conf)
    assert checked.returncode == 0, f"exit {checked.returncode}:\n{checked.stderr}\n{conf.read_text()}"
    assert checked.stderr.strip() == "", checked.stderr  # not even a warning
    assert str(config.resolve()) in generated.stdout  # the scripts name the config by its absolute path


def test_keepalived_would_say_so_if_a_script_were_unsafe(keepalived: str, tmp_path: Path) -> None:
    """The oracle can fail: the same text with its interpreter copied into a folder anyone may write to is
    refused (enable_script_security), as is one that does not exist."""
    config = _write_config(tmp_path, {"interface": _interface(), "router_id": 51, "virtual_ips": ["192.0.2.100/24"]},
                           admin={})  # fmt: skip
    generated = _generate(config)
    assert generated.returncode == 0, generated.stderr
    python = generated.stdout.split('script "', 1)[1].split()[0]
    unsafe = tmp_path / "anyone"
    unsafe.mkdir()
    unsafe.chmod(0o777)  # without the sticky bit: anyone may replace the file
    shutil.copy(python, unsafe / "python")
    for replacement in (str(unsafe / "python"), str(tmp_path / "missing" / "python")):
        conf = tmp_path / "keepalived.conf"
        conf.write_text(generated.stdout.replace(python, replacement))
        checked = _config_test(keepalived, conf)
        assert checked.returncode == 5, checked
        assert "pacslb_health" in checked.stderr, checked.stderr


@pytest.mark.parametrize(
    ("vrrp", "admin", "message"),
    [
        (None, {}, "no cluster.vrrp section"),
        ({"interface": "eth0", "router_id": 51, "virtual_ips": ["192.0.2.100/24"]}, None, "no admin section"),
    ],
)
def test_without_vrrp_or_admin_there_is_no_keepalived_config(
    tmp_path: Path, vrrp: dict[str, object] | None, admin: dict[str, object] | None, message: str
) -> None:
    config = _write_config(tmp_path, vrrp or {}, admin=admin)
    if vrrp is None:  # a cluster section without vrrp
        text = yaml.safe_load(config.read_text())
        del text["cluster"]["vrrp"]
        config.write_text(yaml.safe_dump(text))
    generated = _generate(config)
    assert generated.returncode == 1
    assert generated.stdout == ""
    assert message in generated.stderr and generated.stderr.startswith("pacslb keepalived: "), generated.stderr


def test_an_invalid_config_lists_its_errors(tmp_path: Path) -> None:
    config = _write_config(tmp_path, {"interface": "eth0", "router_id": 300, "virtual_ips": ["192.0.2.100/24"]},
                           admin={})  # fmt: skip
    generated = _generate(config)
    assert generated.returncode == 1 and generated.stdout == ""
    assert "cluster.vrrp.router_id" in generated.stderr, generated.stderr
