"""Machine instructions per proxied HTTP request (or per new TCP connection), counted by callgrind in a
running pacslb.

``python -m bench.instructions [--requests N] [--connections C]``
``python -m bench.instructions --new-connections [--requests N]``

Timings on this machine vary by 10-30% from one minute to the next; a count of instructions does not (about
±1% between runs), so it is the measure of a change to the per-request path (docs/performance.md, "HTTP").
The run: one nginx node; pacslb (``mode: http``, cookie+source_ip persistence, one process, no checks, no
log lines) under ``valgrind --tool=callgrind``; a warm-up of a few hundred requests; then callgrind's
counters are zeroed, N requests are sent one at a time over C keep-alive connections (a browser's way:
the persistence cookie sent back), and the counters dumped. An idle window as long as the requests took
is counted the same way and taken off, so timers and the event loop's own work are not charged to the
requests. Prints instructions per request.

``--new-connections``: pacslb in ``mode: tcp`` (source_ip persistence, one process) instead, and each of the
N requests on a connection of its own (``Connection: close``, the answer read to the node's close), as the
bench's case (c) does: instructions per connection accepted, decided, connected, relayed and closed. What
the kernel does for those connections (the handshakes, the splices) is not counted: callgrind sees user
space only.

``--floor``: bench/floor.py (``http``, or ``tcp`` with ``--new-connections``) in pacslb's place, the same way:
what the stack itself costs per request or connection, with no balancing work (docs/performance.md, "The
floor of this stack").

The pacslb counted is the one the bench measures: installed with ``pip install .`` into bench/.cache
(``BENCH_PACSLB=checkout``: the checkout, with the extensions ``make`` built).
"""

from __future__ import annotations

import argparse
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import peers
from bench.cases.common import FLOOR
from bench.peers import Node
from bench.procs import BenchError, Ports, Processes

VALGRIND = shutil.which("valgrind") or "/usr/bin/valgrind"
CALLGRIND_CONTROL = shutil.which("callgrind_control") or "/usr/bin/callgrind_control"
#: Starting Python and pacslb under callgrind takes a minute or two (about fifty times slower than native).
START_TIMEOUT = 600.0
WARM_UP = 300
_TOTALS = re.compile(r"^(?:totals|summary):\s+(\d+)", re.M)


def _control(*args: str) -> None:
    done = subprocess.run([CALLGRIND_CONTROL, *args], capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        raise BenchError(f"callgrind_control {' '.join(args)} failed: {done.stdout}{done.stderr}")


def _dumped(outdir: Path, before: set[Path]) -> int:
    """Instructions in the dump callgrind wrote since ``before`` was listed."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        new = sorted(set(outdir.glob("callgrind.out*")) - before)
        for path in new:
            match = _TOTALS.search(path.read_text(errors="replace"))
            if match:
                return int(match.group(1))
        time.sleep(0.2)
    raise BenchError("callgrind wrote no dump")


class _Browser:
    """Keep-alive connections sending one request at a time, the persistence cookie sent back."""

    def __init__(self, port: int, connections: int) -> None:
        self.socks = [socket.create_connection(("127.0.0.1", port), timeout=120) for _ in range(connections)]
        self.cookies: list[bytes] = [b""] * connections
        self.bufs: list[bytes] = [b""] * connections

    def request(self, index: int) -> None:
        sock = self.socks[index]
        cookie = self.cookies[index]
        sock.sendall(b"GET / HTTP/1.1\r\nHost: pacs.example\r\n" + cookie + b"\r\n")
        buf = self.bufs[index]
        while b"\r\n\r\n" not in buf:
            buf += self._read(sock)
        head, _, rest = buf.partition(b"\r\n\r\n")
        length = int(re.search(rb"(?im)^content-length:\s*(\d+)", head).group(1))  # type: ignore[union-attr]
        while len(rest) < length:
            rest += self._read(sock)
        self.bufs[index] = rest[length:]
        if not head.startswith(b"HTTP/1.1 200"):
            raise BenchError(f"unexpected response: {head[:200]!r}")
        if not cookie and (match := re.search(rb"(?im)^set-cookie:\s*([^;\r\n]+)", head)):
            self.cookies[index] = b"Cookie: " + match.group(1) + b"\r\n"

    @staticmethod
    def _read(sock: socket.socket) -> bytes:
        data = sock.recv(65536)
        if not data:
            raise BenchError("pacslb closed the connection")
        return data

    def run(self, count: int) -> float:
        started = time.monotonic()
        for i in range(count):
            self.request(i % len(self.socks))
        return time.monotonic() - started

    def close(self) -> None:
        for sock in self.socks:
            sock.close()


class _Dialer:
    """A new connection for every request: ``Connection: close``, the answer read until the node closes."""

    def __init__(self, port: int) -> None:
        self.port = port

    def run(self, count: int) -> float:
        started = time.monotonic()
        for _ in range(count):
            with socket.create_connection(("127.0.0.1", self.port), timeout=120) as sock:
                sock.sendall(b"GET / HTTP/1.1\r\nHost: pacs.example\r\nConnection: close\r\n\r\n")
                answer = b""
                while data := sock.recv(65536):
                    answer += data
            if not answer.startswith(b"HTTP/1.1 200"):
                raise BenchError(f"unexpected answer: {answer[:200]!r}")
        return time.monotonic() - started

    def close(self) -> None:
        pass


def count(requests: int, connections: int, new_connections: bool = False, floor: bool = False) -> float:
    workdir = Path(tempfile.mkdtemp(prefix="pacslb-instructions-"))
    ports = Ports()
    node = Node("n1", ports.take())
    port = ports.take()
    if new_connections:
        config = peers.pacslb_config(port, [node], mode="tcp", workers=1)
    else:
        config = peers.pacslb_config(port, [node], mode="http", persistence={"type": "cookie+source_ip"}, workers=1)
    path = workdir / "pacslb.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    outdir = workdir / "callgrind"
    outdir.mkdir()
    try:
        with Processes(workdir / "logs") as procs:
            peers.start_nginx(procs, node, workdir)
            if floor:
                mode = "tcp" if new_connections else "http"
                subject = [peers.pacslb_python(), str(FLOOR), mode, str(port), str(node.port)]
            else:
                subject = [peers.pacslb_python(), "-m", "pacslb", "run", str(path)]
            argv = [VALGRIND, "--tool=callgrind", f"--callgrind-out-file={outdir}/callgrind.out.%p", *subject]
            proc = procs.start("pacslb", argv, env=peers.pacslb_env(), cwd=peers.pacslb_cwd(workdir))
            procs.wait_listening(proc, port, timeout=START_TIMEOUT)
            pid = str(proc.pid)
            browser: _Browser | _Dialer = _Dialer(port) if new_connections else _Browser(port, connections)
            browser.run(WARM_UP)
            totals = []
            for window in ("requests", "idle"):
                _control("-z", pid)
                before = set(outdir.glob("callgrind.out*"))
                if window == "requests":
                    took = browser.run(requests)
                else:
                    time.sleep(took)
                _control("-d", pid)
                totals.append(_dumped(outdir, before))
            browser.close()
        busy, idle = totals
        return (busy - idle) / requests
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.instructions", description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--connections", type=int, default=10)
    parser.add_argument("--new-connections", action="store_true", help="tcp mode, a connection per request")
    parser.add_argument("--floor", action="store_true", help="bench/floor.py in pacslb's place")
    args = parser.parse_args(argv)
    print(f"pacslb: {peers.pacslb_version()}", file=sys.stderr)
    per_request = count(args.requests, args.connections, args.new_connections, args.floor)
    what = "new connection" if args.new_connections else "request"
    who = "floor: " if args.floor else ""
    print(f"{who}{per_request / 1000:.1f}k instructions per {what} ({args.requests} requests)")


if __name__ == "__main__":
    main()
