"""Hosts on one machine, for the failover tests: network namespaces joined by a bridge that lives in a
namespace of its own, so that nothing of the host's network is touched (and everything is deleted after).

A :class:`Lab` makes the switch namespace and its bridge; :meth:`Lab.host` adds a host: a namespace with
loopback up and one interface, ``eth0``, plugged into the bridge, with the addresses given. Processes run in
a host with :meth:`Host.popen` / :meth:`Host.run` (``ip netns exec``). Names carry the lab's tag, so two
runs (or a leftover from a killed one) never collide; :meth:`Lab.close` kills what the lab started and
deletes its namespaces, and :func:`sweep` removes leftovers of earlier runs. :func:`isolated` is a lone
namespace with loopback only, for a test that needs a network setting of its own.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

#: Every namespace of a lab is called pacslb-ha-<pid>-<n>-<name>.
PREFIX = "pacslb-ha-"
IP = "/usr/sbin/ip" if os.path.exists("/usr/sbin/ip") else "ip"


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run([IP, *args], capture_output=True, text=True, timeout=30, check=check)


def available() -> str | None:
    """Why the failover tests cannot run here, or None when they can (root, iproute2, namespaces)."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    try:
        probe = f"{PREFIX}probe-{os.getpid()}"
        _ip("netns", "add", probe)
        _ip("netns", "del", probe)
    except (OSError, subprocess.CalledProcessError) as exc:
        return f"cannot make a network namespace: {exc}"
    return None


def sweep() -> None:
    """Delete the namespaces of labs whose process died before cleaning up (their processes go with them).
    A lab's namespaces carry the PID of the process that made it: those of a living one are left alone."""
    listing = _ip("netns", "list", check=False).stdout
    for line in listing.splitlines():
        name = line.split()[0] if line.split() else ""
        if not name.startswith(PREFIX):
            continue
        owner = name[len(PREFIX) :].split("-")[0]
        if owner.isdigit() and _alive(int(owner)):
            continue
        _kill_namespace_processes(name)
        _ip("netns", "del", name, check=False)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_labs = 0


def _kill_namespace_processes(namespace: str) -> None:
    pids = _ip("netns", "pids", namespace, check=False).stdout.split()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)


@contextlib.contextmanager
def isolated(name: str) -> Iterator[str]:
    """A namespace on its own, with only loopback (up), for a test that needs a network setting of its own
    (e.g. a sysctl under /proc/sys/net). Named like a lab's, so :func:`sweep` finds what a killed run left;
    at the end what runs in it is killed and it is deleted."""
    namespace = f"{PREFIX}{os.getpid()}-{name}"
    _ip("netns", "add", namespace)
    try:
        _ip("-n", namespace, "link", "set", "lo", "up")
        yield namespace
    finally:
        _kill_namespace_processes(namespace)
        _ip("netns", "del", namespace, check=False)


@dataclass
class Host:
    """One namespace with ``eth0`` on the lab's bridge."""

    lab: Lab
    name: str
    addresses: list[str]
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def namespace(self) -> str:
        return f"{self.lab.prefix}{self.name}"

    @property
    def address(self) -> str:
        """The host's first address, without its prefix length."""
        return self.addresses[0].split("/")[0]

    def command(self, args: list[str]) -> list[str]:
        return [IP, "netns", "exec", self.namespace, *args]

    def popen(self, args: list[str], log: Path, **kwargs: object) -> subprocess.Popen[bytes]:
        """Start ``args`` in this host, its output to ``log``; stopped with the lab."""
        handle = open(log, "ab")  # noqa: SIM115 (closed by the child's end; the parent's copy right after)
        try:
            proc = subprocess.Popen(
                self.command(args), stdout=handle, stderr=subprocess.STDOUT, start_new_session=True, **kwargs
            )  # type: ignore[call-overload]
        finally:
            handle.close()
        self.procs.append(proc)
        return proc

    def run(self, args: list[str], timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.command(args), capture_output=True, text=True, timeout=timeout, check=False)

    def link(self, up: bool) -> None:
        """Plug or unplug this host's cable (its side of the veth pair)."""
        _ip("-n", self.namespace, "link", "set", "eth0", "up" if up else "down")

    def has_address(self, address: str) -> bool:
        return f"inet {address}/" in _ip("-n", self.namespace, "addr", "show", "dev", "eth0").stdout


class Lab:
    """A switch namespace with a bridge, and the hosts plugged into it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        global _labs
        _labs += 1
        # Namespaces: pacslb-ha-<pid>-<n>-<host>; interfaces (15 characters at most): a short tag.
        self.prefix = f"{PREFIX}{os.getpid()}-{_labs}-"
        self.tag = f"{os.getpid() % 10000:04d}{_labs % 100:02d}"
        self.hosts: list[Host] = []
        self.switch = f"{self.prefix}sw"
        _ip("netns", "add", self.switch)
        _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.switch, "link", "set", "br0", "up")

    def host(self, name: str, addresses: list[str]) -> Host:
        host = Host(self, name, addresses)
        _ip("netns", "add", host.namespace)
        index = len(self.hosts)
        outside, inside = f"v{self.tag}{index}", f"h{self.tag}{index}"
        # The pair is made in the switch's namespace, so the host's own network never sees either end.
        _ip("-n", self.switch, "link", "add", outside, "type", "veth", "peer", "name", inside)
        _ip("-n", self.switch, "link", "set", inside, "netns", host.namespace)
        _ip("-n", self.switch, "link", "set", outside, "master", "br0", "up")
        _ip("-n", host.namespace, "link", "set", inside, "name", "eth0")
        for address in addresses:
            _ip("-n", host.namespace, "addr", "add", address, "dev", "eth0")
        _ip("-n", host.namespace, "link", "set", "eth0", "up")
        _ip("-n", host.namespace, "link", "set", "lo", "up")
        self.hosts.append(host)
        return host

    def close(self) -> None:
        for host in self.hosts:
            for proc in host.procs:
                if proc.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=10)
            _kill_namespace_processes(host.namespace)
            _ip("netns", "del", host.namespace, check=False)
        _ip("netns", "del", self.switch, check=False)
