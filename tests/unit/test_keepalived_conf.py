"""The keepalived.conf that ``pacslb keepalived`` writes (pacslb/cluster/keepalived.py), read back as keepalived
reads it: blocks of keyword lines. tests/integration/test_cluster_keepalived.py gives the same text to the real
``keepalived --config-test``.
"""

from __future__ import annotations

import shlex
import textwrap
from dataclasses import dataclass, field
from typing import Any

import pytest

from pacslb.cluster.keepalived import (
    HEALTH_RISE,
    HEALTH_SCRIPT,
    INSTANCE,
    TRACKED_PROCESS,
    KeepalivedError,
    render,
    timers,
)
from pacslb.cluster.process import PROCESS_NAME
from pacslb.config import Config, load_config_text

COMMAND = ["/usr/bin/python3", "-m", "pacslb"]
CONFIG_PATH = "/etc/pacslb/pacslb.yaml"


@dataclass
class Block:
    """A ``name { ... }`` block: its keyword lines (words, quotes removed) and the blocks inside."""

    lines: list[list[str]] = field(default_factory=list)
    blocks: dict[str, Block] = field(default_factory=dict)

    def values(self, keyword: str) -> list[list[str]]:
        return [line[1:] for line in self.lines if line[0] == keyword]

    def value(self, keyword: str) -> str:
        found = self.values(keyword)
        assert len(found) == 1, f"{keyword}: {found}"
        return " ".join(found[0])

    def has(self, keyword: str) -> bool:
        return any(line[0] == keyword for line in self.lines)

    def words(self, name: str) -> list[str]:
        """The entries of a list block (``unicast_peer { ... }``), one line each."""
        return [" ".join(line) for line in self.blocks[name].lines]


def parse(text: str) -> Block:
    """keepalived.conf as nested blocks (keepalived's syntax: '#' and '!' start comments, '{' opens a block)."""
    root = Block()
    stack = [root]
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line[0] in "#!":
            continue
        words = shlex.split(line)
        if words[-1] == "{":
            block = Block()
            stack[-1].blocks[" ".join(words[:-1])] = block
            stack.append(block)
        elif words == ["}"]:
            stack.pop()
        else:
            stack[-1].lines.append(words)
    assert len(stack) == 1, "unbalanced braces"
    return root


def config(vrrp: str, admin: str = "admin: {}", node: str = "lb1") -> Config:
    return load_config_text(
        textwrap.dedent(
            f"""\
            services:
              dicom: {{listen: "0.0.0.0:104", servers: {{pacs1: "10.0.0.11:104"}}}}
            {admin}
            cluster:
              node: {node}
              vrrp: {vrrp}
            """
        )
    )


def generated(vrrp: str, **kwargs: Any) -> Block:
    return parse(render(config(vrrp, **kwargs), CONFIG_PATH, COMMAND))


@pytest.mark.parametrize(
    ("vrrp", "announced", "moved", "peers"),
    [
        pytest.param(
            "{interface: eth0, router_id: 51, priority: 150, virtual_ips: [10.0.0.100/24], peers: [10.0.0.2]}",
            ["10.0.0.100/24 dev eth0"], [], ["10.0.0.2"], id="unicast",
        ),
        pytest.param(
            "{interface: eth0, router_id: 51, virtual_ips: [10.0.0.100/24]}",
            ["10.0.0.100/24 dev eth0"], [], None, id="multicast",
        ),
        pytest.param(
            "{interface: bond0, router_id: 9, virtual_ips: [10.0.0.100/24, 10.0.1.100/24, 10.0.2.7], "
            "peers: [10.0.0.2, 10.0.0.3]}",
            ["10.0.0.100/24 dev bond0", "10.0.1.100/24 dev bond0", "10.0.2.7/32 dev bond0"], [],
            ["10.0.0.2", "10.0.0.3"], id="several-vips-two-peers",
        ),
        pytest.param(
            "{interface: eth0, router_id: 51, virtual_ips: ['fd00::100/64'], peers: ['fd00::2']}",
            ["fd00::100/64 dev eth0"], [], ["fd00::2"], id="ipv6-unicast",
        ),
        pytest.param(
            "{interface: eth0, router_id: 51, virtual_ips: [10.0.0.100/24, 'fd00::100/64'], peers: [10.0.0.2]}",
            ["10.0.0.100/24 dev eth0"], ["fd00::100/64 dev eth0"], ["10.0.0.2"], id="ipv6-vip-moved-with-ipv4",
        ),
        pytest.param(
            "{interface: eth0, router_id: 51, virtual_ips: ['fd00::100/64', 10.0.0.100/24]}",
            ["fd00::100/64 dev eth0"], ["10.0.0.100/24 dev eth0"], None, id="ipv6-multicast-first-vip-decides",
        ),
    ],
)  # fmt: skip
def test_addresses_and_peers(vrrp: str, announced: list[str], moved: list[str], peers: list[str] | None) -> None:
    conf = generated(vrrp)
    instance = conf.blocks[f"vrrp_instance {INSTANCE}"]
    assert instance.words("virtual_ipaddress") == announced
    if moved:
        assert instance.words("virtual_ipaddress_excluded") == moved
    else:
        assert "virtual_ipaddress_excluded" not in instance.blocks
    if peers is None:
        assert "unicast_peer" not in instance.blocks  # multicast: keepalived's default
    else:
        assert instance.words("unicast_peer") == peers


@pytest.mark.parametrize("preempt", [False, True])
def test_instance_preempt_and_timers(preempt: bool) -> None:
    conf = generated(
        "{interface: eth1, router_id: 42, priority: 150, virtual_ips: [10.0.0.100/24], peers: [10.0.0.2], "
        f"advert_interval: 200ms, preempt: {str(preempt).lower()}}}"
    )
    instance = conf.blocks[f"vrrp_instance {INSTANCE}"]
    # Both balancers start as backup: the one that starts listens for a master before it claims the address.
    assert instance.value("state") == "BACKUP"
    assert instance.value("interface") == "eth1"
    assert instance.value("virtual_router_id") == "42"
    assert instance.value("priority") == "150"
    assert instance.value("advert_int") == "0.2"
    assert instance.has("nopreempt") is (not preempt)
    assert conf.blocks["global_defs"].value("vrrp_version") == "3"  # sub-second adverts need VRRPv3


def test_global_defs_let_keepalived_run_the_scripts_as_root() -> None:
    defs = generated("{interface: eth0, router_id: 51, virtual_ips: [10.0.0.100/24]}", node="lb-a").blocks[
        "global_defs"
    ]
    assert defs.has("enable_script_security")
    assert defs.value("script_user") == "root"
    assert defs.value("router_id") == "lb-a"


def test_health_script_asks_pacslb_with_a_timeout_shorter_than_its_interval() -> None:
    conf = generated(
        "{interface: eth0, router_id: 51, virtual_ips: [10.0.0.100/24], check_interval: 1s, check_fall: 3}"
    )
    script = conf.blocks[f"vrrp_script {HEALTH_SCRIPT}"]
    words = script.values("script")[0]
    assert len(words) == 1  # one quoted string, which keepalived splits itself
    argv = words[0].split()
    assert argv[: len(COMMAND)] == COMMAND
    assert argv[len(COMMAND) :][:2] == ["health", CONFIG_PATH]
    own_timeout = float(argv[argv.index("--timeout") + 1])
    assert 0 < own_timeout < int(script.value("interval")) == 1
    assert int(script.value("timeout")) <= int(script.value("interval"))
    assert script.value("fall") == "3"
    assert script.value("rise") == str(HEALTH_RISE)
    assert script.value("weight") == "0"  # a failure is a FAULT, not a lower priority
    assert script.has("init_fail")  # no address before pacslb has answered
    instance = conf.blocks[f"vrrp_instance {INSTANCE}"]
    assert instance.words("track_script") == [HEALTH_SCRIPT]


def test_track_process_watches_the_named_main_process() -> None:
    conf = generated("{interface: eth0, router_id: 51, virtual_ips: [10.0.0.100/24]}")
    tracked = conf.blocks[f"vrrp_track_process {TRACKED_PROCESS}"]
    assert tracked.value("process") == PROCESS_NAME
    assert len(PROCESS_NAME) <= 15  # the kernel's comm length
    assert tracked.value("quorum") == "1"
    assert tracked.value("weight") == "0"
    assert conf.blocks[f"vrrp_instance {INSTANCE}"].words("track_process") == [TRACKED_PROCESS]


def test_without_track_process_only_the_health_check_watches_pacslb() -> None:
    """Process events reach only the host's initial network namespace: in a container, track_process: false."""
    conf = generated("{interface: eth0, router_id: 51, virtual_ips: [10.0.0.100/24], track_process: false}")
    assert f"vrrp_track_process {TRACKED_PROCESS}" not in conf.blocks
    instance = conf.blocks[f"vrrp_instance {INSTANCE}"]
    assert "track_process" not in instance.blocks and instance.words("track_script") == [HEALTH_SCRIPT]


def test_notify_hooks_report_each_role() -> None:
    instance = generated("{interface: eth0, router_id: 51, virtual_ips: [10.0.0.100/24]}").blocks[
        f"vrrp_instance {INSTANCE}"
    ]
    for hook, role in [
        ("notify_master", "master"), ("notify_backup", "backup"), ("notify_fault", "fault"),
        ("notify_stop", "stopped"),
    ]:  # fmt: skip
        assert instance.value(hook).split() == [*COMMAND, "role", CONFIG_PATH, role]


def test_a_path_with_a_space_is_one_quoted_word() -> None:
    text = render(
        config("{interface: eth0, router_id: 51, virtual_ips: [10.0.0.100/24]}"),
        "/etc/my pacs/pacslb.yaml",
        ["/opt/pacs lb/bin/python", "-m", "pacslb"],
    )
    instance = parse(text).blocks[f"vrrp_instance {INSTANCE}"]
    # keepalived splits the script string at unquoted spaces; single quotes keep a word whole.
    assert shlex.split(instance.value("notify_master")) == [
        "/opt/pacs lb/bin/python", "-m", "pacslb", "role", "/etc/my pacs/pacslb.yaml", "master",
    ]  # fmt: skip


@pytest.mark.parametrize("path", ['/etc/pa"cs.yaml', "/etc/pa'cs.yaml", "/etc/pacs#1.yaml", "/etc/pa\ncs.yaml"])
def test_a_path_keepalived_cannot_read_is_refused(path: str) -> None:
    with pytest.raises(KeepalivedError, match="cannot write"):
        render(config("{interface: eth0, router_id: 51, virtual_ips: [10.0.0.100/24]}"), path, COMMAND)


@pytest.mark.parametrize(
    ("text", "admin", "reason"),
    [
        ("null", "admin: {}", "no cluster.vrrp section"),
        ("{interface: eth0, router_id: 51, virtual_ips: [10.0.0.100/24]}", "", "no admin section"),
        (
            "{interface: eth0, router_id: 51, virtual_ips: [10.0.0.100/24], peers: [10.0.0.2, 'fd00::2']}",
            "admin: {}",
            "IPv4 or IPv6, not both",
        ),
        (
            "{interface: eth0, router_id: 51, virtual_ips: ['fd00::100/64'], peers: [10.0.0.2]}",
            "admin: {}",
            "at least one virtual IP must be IPv4",
        ),
    ],
)
def test_what_cannot_become_a_keepalived_conf_says_why(text: str, admin: str, reason: str) -> None:
    with pytest.raises(KeepalivedError, match=reason):
        render(config(text, admin=admin), CONFIG_PATH, COMMAND)


@pytest.mark.parametrize(
    ("vrrp", "advert", "master_down", "interval"),
    [
        # RFC 5798 6.1: skew = (256 - priority) * advert / 256; master down = 3 * advert + skew.
        ("advert_interval: 200ms, priority: 150", 0.2, 0.6 + 106 * 0.2 / 256, 1),
        ("advert_interval: 1s, priority: 100", 1.0, 3.0 + 156 / 256, 1),
        ("advert_interval: 16ms, check_interval: 1500ms", 0.02, 0.06 + 156 * 0.02 / 256, 2),
        ("check_interval: 3s", 0.2, 0.6 + 156 * 0.2 / 256, 3),
    ],
)
def test_timers(vrrp: str, advert: float, master_down: float, interval: int) -> None:
    spec = config(f"{{interface: eth0, router_id: 51, virtual_ips: [10.0.0.100/24], {vrrp}}}").cluster.vrrp
    assert spec is not None
    t = timers(spec)
    assert t.advert == pytest.approx(advert)
    assert t.master_down == pytest.approx(master_down)
    # keepalived counts script intervals in whole seconds: rounded up, never below one.
    assert t.check_interval == interval == t.check_timeout
    assert 0 < t.health_timeout < t.check_interval
