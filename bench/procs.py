"""Processes, ports and resources for the benchmark: what it starts, it stops, by PID, with bounded waits.

Owns: the registry of started processes (``Processes``: a context manager whose exit stops every process it
started, newest first, and any child process seen under them), free loopback ports, waiting for a port to
listen (read from /proc/net/tcp, so no probe connection reaches a server), raising RLIMIT_NOFILE, and the
resident size of a process tree. It must not decide what to measure: the cases do that.
"""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

#: How long a started server may take to listen before the bench gives up on it.
LISTEN_TIMEOUT = 15.0
#: After SIGTERM, how long a process gets to exit before SIGKILL.
STOP_GRACE = 5.0
#: Ports handed out for servers: below the ephemeral range (32768-60999 here), so a client's ephemeral
#: source port can never take a port between its choice and the server's bind.
PORT_RANGE = (21000, 32000)
#: The soft and hard RLIMIT_NOFILE the bench sets for itself and its children (the memory case holds
#: 10,000 client sockets, and a balancer twice that).
NOFILE = 200_000

_TCP_LISTEN = "0A"


class BenchError(RuntimeError):
    """A peer could not be started or answered wrongly: the case is reported as failed, the run goes on."""


@dataclass
class Proc:
    """One started process."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    #: Descendants seen while it ran, by PID, with their start time (to tell a reused PID apart).
    children: dict[int, str] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self, lines: int = 15) -> str:
        """The end of the process's output, for error messages."""
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def raise_nofile(limit: int = NOFILE) -> int:
    """Raise this process's RLIMIT_NOFILE (children inherit it). Returns the soft limit in force."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    want = limit
    try:
        nr_open = int(Path("/proc/sys/fs/nr_open").read_text())
        want = min(want, nr_open)
    except (OSError, ValueError):
        pass
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, max(want, hard)))
    except (ValueError, OSError):
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def file_max() -> int:
    """The system-wide limit on open files (/proc/sys/fs/file-max)."""
    try:
        return int(Path("/proc/sys/fs/file-max").read_text())
    except (OSError, ValueError):
        return 0


class Ports:
    """Hands out free loopback TCP ports, never the same one twice in a run."""

    def __init__(self) -> None:
        self._next = PORT_RANGE[0] + (os.getpid() % 500) * 10
        self._given: set[int] = set()

    def take(self) -> int:
        for _ in range(PORT_RANGE[1] - PORT_RANGE[0]):
            port = self._next
            self._next = self._next + 1 if self._next + 1 < PORT_RANGE[1] else PORT_RANGE[0]
            if port in self._given or port in listening_ports():
                continue
            with socket.socket() as sock:
                try:
                    sock.bind(("127.0.0.1", port))
                except OSError:
                    continue
            self._given.add(port)
            return port
        raise BenchError("no free port in the bench's range")


def listening_ports() -> set[int]:
    """Ports with a listening TCP socket on this machine (IPv4 and IPv6), from /proc/net/tcp{,6}."""
    ports: set[int] = set()
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(name).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            if len(parts) > 3 and parts[3] == _TCP_LISTEN:
                ports.add(int(parts[1].rsplit(":", 1)[1], 16))
    return ports


def proc_children(pid: int) -> set[int]:
    """Every descendant of ``pid`` alive now (from /proc/*/stat)."""
    parents: dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        # The command name is in parentheses and may contain spaces: split after the last ")".
        fields = stat[stat.rfind(")") + 2 :].split()
        parents[int(entry.name)] = int(fields[1])
    found: set[int] = set()
    frontier = {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier and child not in found}
        found |= frontier
    return found


def _status_kib(pid: int, key: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def tree_rss_kib(pid: int) -> int:
    """Resident size of a process and all its descendants, summed (KiB). Shared pages count once per process."""
    return sum(_status_kib(p, "VmRSS") for p in {pid} | proc_children(pid))


def tree_fds(pid: int) -> int:
    """Open file descriptors of a process and all its descendants."""
    total = 0
    for p in {pid} | proc_children(pid):
        with contextlib.suppress(OSError):
            total += len(os.listdir(f"/proc/{p}/fd"))
    return total


def start_time(pid: int) -> str:
    """The process's start time in clock ticks since boot ("" if it is gone): with the PID, an identity."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    fields = stat[stat.rfind(")") + 2 :].split()
    return "" if fields[0] == "Z" else fields[19]


class Processes:
    """Starts processes and, on exit (even on an exception or Ctrl-C), stops every one of them by PID."""

    def __init__(self, logdir: Path) -> None:
        self.logdir = logdir
        self.procs: list[Proc] = []
        logdir.mkdir(parents=True, exist_ok=True)

    def __enter__(self) -> Processes:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop_all()

    def start(
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        stdin: int | None = subprocess.DEVNULL,
        stdout: int | None = None,
    ) -> Proc:
        """Start ``argv``; its output goes to a log file (or stdout to a pipe when asked)."""
        log = self.logdir / f"{name}.log"
        full_env = dict(os.environ)
        if env:
            full_env.update(env)
        with open(log, "ab") as out:
            popen = subprocess.Popen(
                list(argv),
                stdin=stdin,
                stdout=out if stdout is None else stdout,
                stderr=out,
                env=full_env,
                cwd=cwd,
            )
        proc = Proc(name, popen, log)
        self.procs.append(proc)
        return proc

    def wait_listening(self, proc: Proc, port: int, timeout: float = LISTEN_TIMEOUT) -> None:
        """Wait until something listens on ``port``, failing early if ``proc`` exits."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if port in listening_ports():
                return
            if not proc.alive():
                raise BenchError(f"{proc.name} exited ({proc.popen.returncode}) before listening:\n{proc.tail()}")
            time.sleep(0.02)
        raise BenchError(f"{proc.name} did not listen on port {port} within {timeout:.0f}s:\n{proc.tail()}")

    def stop(self, proc: Proc, sig: int = signal.SIGTERM) -> None:
        """Stop one process by PID (SIGTERM, then SIGKILL after a grace), then any descendant it left."""
        if proc not in self.procs:
            return
        if proc.alive():
            proc.children.update({child: start_time(child) for child in proc_children(proc.pid)})
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, sig)
            try:
                proc.popen.wait(timeout=STOP_GRACE)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.popen.wait(timeout=STOP_GRACE)
        for child, started in sorted(proc.children.items()):
            # Only PIDs seen as descendants of a process this bench started, and only while the PID still
            # names that same process (same start time): a reused PID is left alone.
            if not started or start_time(child) != started:
                continue
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(child, signal.SIGKILL)
        if proc.popen.stdout is not None:
            proc.popen.stdout.close()
        self.procs.remove(proc)

    def stop_all(self) -> None:
        for proc in reversed(list(self.procs)):
            try:
                self.stop(proc)
            except Exception as exc:  # keep stopping the others
                print(f"bench: could not stop {proc.name} (pid {proc.pid}): {exc}")


def tree_pss_kib(pid: int) -> int:
    """Proportional set size of a process tree (KiB): shared pages divided among the processes sharing them."""
    total = 0
    for p in {pid} | proc_children(pid):
        try:
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
                    break
        except (OSError, ValueError, IndexError):
            continue
    return total


def read_line(proc: Proc, timeout: float) -> str:
    """One line from ``proc``'s piped standard output, waiting at most ``timeout`` seconds."""
    import selectors

    stream = proc.popen.stdout
    if stream is None:
        raise BenchError(f"{proc.name} has no piped output")
    deadline = time.monotonic() + timeout
    buf = b""
    with selectors.DefaultSelector() as sel:
        sel.register(stream, selectors.EVENT_READ)
        while b"\n" not in buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BenchError(f"{proc.name} printed nothing within {timeout:.0f}s")
            if not sel.select(left):
                continue
            chunk = os.read(stream.fileno(), 4096)
            if not chunk:
                raise BenchError(f"{proc.name} exited without a line:\n{proc.tail()}")
            buf += chunk
    return buf.split(b"\n", 1)[0].decode()


def tree_cpu_seconds(pid: int) -> tuple[float, float]:
    """CPU time (user, system) in seconds used so far by a process and its live descendants."""
    tick = os.sysconf("SC_CLK_TCK")
    user = system = 0
    for p in {pid} | proc_children(pid):
        try:
            stat = Path(f"/proc/{p}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        user += int(fields[11])
        system += int(fields[12])
    return user / tick, system / tick
