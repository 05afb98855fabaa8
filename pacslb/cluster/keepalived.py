"""The keepalived.conf of one balancer of a pair (``pacslb keepalived CONFIG``).

What this module owns: turning the config's ``cluster.vrrp`` and ``admin`` sections into the text of a
keepalived.conf that keepalived 2.2 accepts, and the timers that text implies (for its comments and for
docs/high-availability.md). It is pure: no file, process or network access. The CLI gives it the command
that runs pacslb (absolute paths) and the config's absolute path. It must not speak VRRP or start keepalived:
keepalived moves the address, pacslb only tells it whether it serves.

Theory of operation (docs/high-availability.md has the deployment):
- one ``vrrp_instance``, VRRPv3 (sub-second adverts need it), state BACKUP on both balancers: a balancer
  that starts listens for a master before it claims the address; ``nopreempt`` unless ``preempt: true``.
- the virtual IPs of the instance's family (the peers', else the first virtual IP's) go in
  ``virtual_ipaddress``; those of the other family in ``virtual_ipaddress_excluded`` (moved with the
  others, not announced: one VRRP instance speaks one family).
- ``vrrp_script`` runs ``pacslb health CONFIG`` every ``check_interval``: the admin API's /healthz must
  answer 200 in time, so a balancer whose loop hangs or is stopped (SIGSTOP) loses the address
  ``check_fall`` checks later; ``init_fail``: a balancer that has not answered yet never takes it.
- ``vrrp_track_process`` watches the main process by its name (process.py): when it exits, a ``kill -9``
  too, keepalived hears it from the kernel at once, without waiting for the health check.
- ``notify_master`` / ``notify_backup`` / ``notify_fault`` / ``notify_stop`` run ``pacslb role CONFIG
  ROLE``, so that the status, dashboard and metrics say which balancer holds the address.
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

from pacslb import __version__
from pacslb.cluster.process import PROCESS_NAME
from pacslb.config import Config
from pacslb.config.model import VrrpSpec
from pacslb.errors import PacslbError

#: Names inside the generated file (keepalived's own identifiers, seen in its log lines).
INSTANCE = "pacslb"
HEALTH_SCRIPT = "pacslb_health"
TRACKED_PROCESS = "pacslb_process"
#: Successful health checks in a row before a balancer that failed may hold the address again: one answer
#: could come from a loop that is about to stall again; two, a check interval apart, show it serves.
HEALTH_RISE = 2
#: ``pacslb health`` waits this share of the check interval for /healthz: it answers in milliseconds from
#: a loop that runs, and the command must end (with its own message) before keepalived's timeout kills it.
HEALTH_TIMEOUT_SHARE = 0.5
#: keepalived's VRRPv3 advert interval has a resolution of 10 ms (centiseconds on the wire).
ADVERT_RESOLUTION = 0.01
#: keepalived reads script and argument words itself: a path with one of these cannot be written safely
#: (quotes and backslashes are its escapes; '#' and '!' start comments; control characters end lines).
_UNSAFE = re.compile(r"[\"'\\#!\x00-\x1f\x7f]")

#: What each keepalived transition tells pacslb (``pacslb role CONFIG ROLE``).
NOTIFY_ROLES: tuple[tuple[str, str], ...] = (
    ("notify_master", "master"),
    ("notify_backup", "backup"),
    ("notify_fault", "fault"),
    ("notify_stop", "stopped"),
)


class KeepalivedError(PacslbError):
    """The config cannot give a keepalived.conf (no ``cluster.vrrp``, no ``admin``, ...); the message says why."""


@dataclass(frozen=True, slots=True)
class Timers:
    """What the ``vrrp`` section's durations become in keepalived, in seconds."""

    advert: float  # advert_int: the master announces itself this often
    skew: float  # (256 - priority) / 256 adverts: a lower priority waits longer before it takes over
    master_down: float  # 3 adverts + skew: how long this balancer, as backup, waits for a silent master
    check_interval: int  # vrrp_script interval: keepalived counts it in whole seconds (rounded up)
    check_timeout: int  # vrrp_script timeout: whole seconds too; keepalived kills the script past it
    health_timeout: float  # pacslb health --timeout: its own wait for /healthz, well within the interval
    check_fall: int
    check_rise: int

    @property
    def health_fails_after(self) -> float:
        """Longest time from a hung pacslb to the address leaving this balancer (fault), in seconds."""
        return self.check_fall * self.check_interval + self.health_timeout


def timers(vrrp: VrrpSpec) -> Timers:
    """The timers keepalived will run with for ``vrrp`` (RFC 5798 6.1 for the skew and master down)."""
    advert = max(ADVERT_RESOLUTION, round(vrrp.advert_interval / ADVERT_RESOLUTION) * ADVERT_RESOLUTION)
    skew = (256 - vrrp.priority) * advert / 256
    interval = max(1, math.ceil(vrrp.check_interval - 1e-9))
    return Timers(
        advert=advert,
        skew=skew,
        master_down=3 * advert + skew,
        check_interval=interval,
        check_timeout=interval,
        health_timeout=round(interval * HEALTH_TIMEOUT_SHARE, 2),
        check_fall=vrrp.check_fall,
        check_rise=HEALTH_RISE,
    )


def _seconds(value: float) -> str:
    """A duration as keepalived reads it: ``0.2``, ``1``, ``0.05``."""
    return f"{round(value, 2):g}"


def _word(arg: str) -> str:
    """One argument of a script line as keepalived splits it: single quotes around one with a space."""
    if _UNSAFE.search(arg):
        raise KeepalivedError(
            f"cannot write {arg!r} in a keepalived script line (quotes, backslashes, '#', '!' and control "
            "characters are keepalived's own syntax): install pacslb and its config under a plainer path"
        )
    return f"'{arg}'" if re.search(r"\s", arg) else arg


def _script(command: Sequence[str], *args: str) -> str:
    return '"' + " ".join(_word(a) for a in (*command, *args)) + '"'


def _families(vrrp: VrrpSpec) -> tuple[list[str], list[str], int]:
    """The virtual IPs the instance announces, those it only moves, and the instance's IP version."""
    peer_versions = {ipaddress.ip_address(p).version for p in vrrp.peers}
    if len(peer_versions) > 1:
        raise KeepalivedError(
            "cluster.vrrp.peers: one VRRP instance speaks IPv4 or IPv6, not both: give the peers' addresses "
            "of one family"
        )
    vips = [(ipaddress.ip_interface(v).version, v) for v in vrrp.virtual_ips]
    version = peer_versions.pop() if peer_versions else vips[0][0]
    announced = [v for ver, v in vips if ver == version]
    moved = [v for ver, v in vips if ver != version]
    if not announced:
        raise KeepalivedError(
            f"cluster.vrrp.virtual_ips: the peers are IPv{version}, so at least one virtual IP must be IPv{version} "
            "(the others are moved with it)"
        )
    return announced, moved, version


def render(config: Config, config_path: str, command: Sequence[str]) -> str:
    """The keepalived.conf of this balancer.

    Args:
        config: the loaded config; its ``cluster.vrrp`` and ``admin`` sections are used.
        config_path: the config file's absolute path, given to ``pacslb health`` and ``pacslb role``.
        command: the absolute command that runs pacslb, e.g. ``["/usr/bin/python3", "-m", "pacslb"]``.

    Raises:
        KeepalivedError: no ``cluster.vrrp`` or no ``admin`` section, peers of two families, or a path
            keepalived cannot be given.
    """
    vrrp = config.cluster.vrrp
    if vrrp is None:
        raise KeepalivedError("the config has no cluster.vrrp section: nothing for keepalived to do")
    if config.admin is None:
        raise KeepalivedError(
            "the config has no admin section: keepalived checks this balancer's health through the admin API "
            "(/healthz) and reports its role there; add `admin: {}` (127.0.0.1:9900)"
        )
    announced, moved, version = _families(vrrp)
    t = timers(vrrp)
    dev = vrrp.interface
    health = _script(command, "health", config_path, "--timeout", _seconds(t.health_timeout))
    out = [
        f"# keepalived.conf of pacslb node {config.cluster.node}, written by pacslb {__version__} from",
        f"# {config_path} (`pacslb keepalived`). Change cluster.vrrp there and write it again.",
        "# docs/high-availability.md explains every line.",
        "",
        "global_defs {",
        f"    router_id {config.cluster.node}",
        "    # Scripts run as root (they read admin.token_file); keepalived checks that no one else can change them.",
        "    enable_script_security",
        "    script_user root",
        "    # VRRPv3: adverts more often than once a second.",
        "    vrrp_version 3",
        "}",
        "",
        f"# pacslb's admin API must answer /healthz within {_seconds(t.health_timeout)} s. {t.check_fall} failure(s)",
        f"# in a row (within {_seconds(t.health_fails_after)} s of a hang) put this balancer in FAULT.",
        f"vrrp_script {HEALTH_SCRIPT} {{",
        f"    script {health}",
        f"    interval {t.check_interval}",
        f"    timeout {t.check_timeout}",
        f"    fall {t.check_fall}",
        f"    rise {t.check_rise}",
        "    weight 0",
        "    init_fail",
        "}",
        "",
    ]
    if vrrp.track_process:
        out += [
            f"# The main process of `pacslb run` is named {PROCESS_NAME}: when it exits (kill -9 included) the",
            "# kernel tells keepalived at once.",
            f"vrrp_track_process {TRACKED_PROCESS} {{",
            f"    process {PROCESS_NAME}",
            "    quorum 1",
            "    weight 0",
            "}",
            "",
        ]
    else:
        out += [
            "# cluster.vrrp.track_process is false: a dead pacslb is noticed by the health check alone.",
            "",
        ]
    out += [
        f"vrrp_instance {INSTANCE} {{",
        "    state BACKUP",
        f"    interface {dev}",
        f"    virtual_router_id {vrrp.router_id}",
        f"    priority {vrrp.priority}",
        f"    # The master advertises every {_seconds(t.advert)} s; as backup this balancer takes over "
        f"{t.master_down:.2f} s after the last advert",
        f"    # (3 x {_seconds(t.advert)} s + skew {t.skew:.3f} s).",
        f"    advert_int {_seconds(t.advert)}",
    ]
    if not vrrp.preempt:
        out += ["    # A balancer coming back does not take the address from one that serves.", "    nopreempt"]
    if vrrp.peers:
        out += ["    unicast_peer {", *(f"        {peer}" for peer in vrrp.peers), "    }"]
    else:
        group = "224.0.0.18" if version == 4 else "ff02::12"
        out.append(f"    # No peers given: adverts go to the VRRP multicast group {group} on {dev}.")
    out += ["    virtual_ipaddress {", *(f"        {vip} dev {dev}" for vip in announced), "    }"]
    if moved:
        out += [
            f"    # Not IPv{version}: moved with the others, not announced (one instance speaks one family).",
            "    virtual_ipaddress_excluded {",
            *(f"        {vip} dev {dev}" for vip in moved),
            "    }",
        ]
    out += [
        "    track_script {",
        f"        {HEALTH_SCRIPT}",
        "    }",
        *(["    track_process {", f"        {TRACKED_PROCESS}", "    }"] if vrrp.track_process else []),
        "    # pacslb shows its role in `pacslb status`, the dashboard and the metrics.",
        *(f"    {hook} {_script(command, 'role', config_path, role)}" for hook, role in NOTIFY_ROLES),
        "}",
        "",
    ]
    return "\n".join(out)
