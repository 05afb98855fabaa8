"""A small asyncio (uvloop) load generator, run by the bench as its own process: ``python -m bench.loadgen``.

Owns three client behaviours and nothing else:

- ``http10``: short connections. Connect, send one HTTP/1.0 request, read the answer to EOF, close; the
  answer is checked (status 200 and the expected body), so a wrong or cut answer is an error, not a success.
- ``echo``: short DICOM associations. A-ASSOCIATE-RQ, C-ECHO-RQ, A-RELEASE-RQ, each answer checked (an
  A-ASSOCIATE-AC, a C-ECHO-RSP with status 0000, an A-RELEASE-RP), close.
- ``idle``: open N connections, print how many are open, then hold them without a byte until standard
  input closes (or a bounded time passes), and close them.
- ``paced``: latency at a given load. ``--concurrency`` keep-alive connections send HTTP/1.1 GETs at a
  fixed total ``--rate`` (open loop: request i is due at start + i / rate, whatever the answers before it
  did), each answer checked as in ``http10``. A request's latency counts from when it was sent, or from
  when it was due if it went late because the previous answer on its connection came late (a server that
  falls behind is charged for the wait). Prints p50, p99 and p99.9 in milliseconds.

``http10`` and ``echo`` run ``--concurrency`` loops for ``--duration`` seconds and print one JSON line:
completed operations, errors by kind, elapsed time and rate. Clients spread over ``--sources`` loopback
source addresses (127.0.0.2, 127.0.0.3, ...), as many clients would, which also multiplies the ephemeral
ports available. Every wait is bounded: after the duration, a short grace, then unfinished loops are
cancelled and counted as errors. A Python client costs CPU per connection; the bench measures it against
a direct connection so its ceiling is visible next to the balancers' figures.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import socket
import sys
import time
from collections.abc import Awaitable, Callable

from bench import dicomwire

#: IP_BIND_ADDRESS_NO_PORT (Linux): bind to a source address but let connect() pick the port, so ports
#: are shared across destinations instead of reserved at bind time.
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)
#: After the measured duration, how long unfinished operations may take before they are cancelled.
GRACE = 5.0
#: Most bytes read per recv.
READ_SIZE = 65536
#: How many idle connections are opened at once (bounded by the servers' accept backlog).
IDLE_BATCH = 256


class OpError(Exception):
    """An operation got a wrong answer; the message is the error kind."""


def source_addresses(count: int) -> list[str]:
    return [f"127.0.0.{2 + i}" for i in range(max(1, count))]


def new_socket(source: str) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
        sock.bind((source, 0))
    except OSError:
        sock.close()
        raise
    return sock


class Reader:
    """Buffered reads of whole DICOM PDUs from a non-blocking socket."""

    __slots__ = ("buf", "loop", "sock")

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
        self.loop = loop
        self.sock = sock
        self.buf = b""

    async def pdu(self) -> bytes:
        while True:
            if len(self.buf) >= dicomwire.HEADER.size:
                _, length = dicomwire.HEADER.unpack_from(self.buf)
                end = dicomwire.HEADER.size + length
                if len(self.buf) >= end:
                    pdu, self.buf = self.buf[:end], self.buf[end:]
                    return pdu
            data = await self.loop.sock_recv(self.sock, READ_SIZE)
            if not data:
                raise OpError("closed_early")
            self.buf += data


Op = Callable[[str, tuple[str, int]], Awaitable[None]]


def http10_op(loop: asyncio.AbstractEventLoop, request: bytes, expect: tuple[bytes, ...]) -> Op:
    async def op(source: str, dest: tuple[str, int]) -> None:
        sock = new_socket(source)
        try:
            await loop.sock_connect(sock, dest)
            await loop.sock_sendall(sock, request)
            chunks: list[bytes] = []
            while True:
                data = await loop.sock_recv(sock, READ_SIZE)
                if not data:
                    break
                chunks.append(data)
        finally:
            sock.close()
        answer = b"".join(chunks)
        if not answer.startswith(b"HTTP/1.1 200") and not answer.startswith(b"HTTP/1.0 200"):
            raise OpError("bad_status" if answer else "empty_answer")
        if not answer.endswith(expect):
            raise OpError("bad_body")

    return op


def echo_op(loop: asyncio.AbstractEventLoop, calling: str, called: str) -> Op:
    rq = dicomwire.associate_rq(calling, called)
    echo = dicomwire.c_echo_rq()
    release = dicomwire.release_rq()

    async def op(source: str, dest: tuple[str, int]) -> None:
        sock = new_socket(source)
        try:
            await loop.sock_connect(sock, dest)
            reader = Reader(loop, sock)
            await loop.sock_sendall(sock, rq)
            pdu = await reader.pdu()
            if pdu[0] != dicomwire.A_ASSOCIATE_AC:
                raise OpError("rejected" if pdu[0] == dicomwire.A_ASSOCIATE_RJ else f"pdu_{pdu[0]:02x}_not_ac")
            await loop.sock_sendall(sock, echo)
            pdu = await reader.pdu()
            if pdu[0] != dicomwire.P_DATA_TF or dicomwire.echo_status(pdu) != 0:
                raise OpError("echo_failed")
            await loop.sock_sendall(sock, release)
            pdu = await reader.pdu()
            if pdu[0] != dicomwire.A_RELEASE_RP:
                raise OpError("release_failed")
        finally:
            sock.close()

    return op


async def run_loops(
    op: Op, concurrency: int, duration: float, sources: list[str], dests: list[tuple[str, int]]
) -> dict[str, object]:
    ok = 0
    errors: collections.Counter[str] = collections.Counter()
    start = time.monotonic()
    end = start + duration
    finished_at = [start]

    async def loop_(index: int) -> None:
        nonlocal ok
        n = index
        while time.monotonic() < end:
            source = sources[n % len(sources)]
            dest = dests[n % len(dests)]
            n += concurrency
            try:
                await op(source, dest)
            except OpError as exc:
                errors[str(exc)] += 1
            except OSError as exc:
                errors[type(exc).__name__] += 1
            else:
                ok += 1
        finished_at[0] = max(finished_at[0], time.monotonic())

    tasks = [asyncio.ensure_future(loop_(i)) for i in range(concurrency)]
    _, pending = await asyncio.wait(tasks, timeout=duration + GRACE)
    for task in pending:
        task.cancel()
        errors["timeout"] += 1
    if pending:
        await asyncio.wait(pending, timeout=GRACE)
    elapsed = max(finished_at[0], end) - start if not pending else duration + GRACE
    return {"ok": ok, "errors": dict(errors), "elapsed": elapsed, "rate": ok / elapsed if elapsed else 0.0}


async def read_response(loop: asyncio.AbstractEventLoop, sock: socket.socket, buf: bytes) -> tuple[bytes, bytes]:
    """One HTTP/1.1 response with a Content-Length body from a keep-alive connection: (response, what
    followed it)."""
    while b"\r\n\r\n" not in buf:
        data = await loop.sock_recv(sock, READ_SIZE)
        if not data:
            raise OpError("closed_early")
        buf += data
    head, _, rest = buf.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(rest) < length:
        data = await loop.sock_recv(sock, READ_SIZE)
        if not data:
            raise OpError("closed_early")
        rest += data
    return head + b"\r\n\r\n" + rest[:length], rest[length:]


async def paced(
    dests: list[tuple[str, int]], rate: float, concurrency: int, duration: float, sources: list[str], host: str
) -> dict[str, object]:
    loop = asyncio.get_running_loop()
    request = f"GET / HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
    latencies: list[float] = []
    errors: collections.Counter[str] = collections.Counter()
    total = int(rate * duration)
    start = time.monotonic() + 0.5  # every connection is open by then

    async def conn_loop(index: int) -> None:
        sock = new_socket(sources[index % len(sources)])
        try:
            await loop.sock_connect(sock, dests[index % len(dests)])
            buf = b""
            ready = 0.0  # when the previous answer was in
            for i in range(index, total, concurrency):
                due = start + i / rate
                delay = due - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                # Late because the previous answer was: the server's wait, counted from when this one was
                # due; late because our own timer woke us late (it has millisecond resolution): ours, not
                # counted.
                sent = time.monotonic() if ready <= due else due
                await loop.sock_sendall(sock, request)
                answer, buf = await read_response(loop, sock, buf)
                ready = time.monotonic()
                if not answer.startswith(b"HTTP/1.1 200"):
                    errors["bad_status"] += 1
                    continue
                latencies.append(ready - sent)
        except OpError as exc:
            errors[str(exc)] += 1
        except OSError as exc:
            errors[type(exc).__name__] += 1
        finally:
            sock.close()

    tasks = [asyncio.ensure_future(conn_loop(i)) for i in range(concurrency)]
    _, pending = await asyncio.wait(tasks, timeout=duration + 0.5 + GRACE)
    for task in pending:
        task.cancel()
        errors["timeout"] += 1
    if pending:
        await asyncio.wait(pending, timeout=GRACE)
    latencies.sort()

    def pct(q: float) -> float:
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000 if latencies else 0.0

    return {
        "ok": len(latencies),
        "errors": dict(errors),
        "rate": rate,
        "p50": pct(0.50),
        "p99": pct(0.99),
        "p999": pct(0.999),
    }


async def hold_idle(dests: list[tuple[str, int]], count: int, sources: list[str], hold: float) -> None:
    loop = asyncio.get_running_loop()
    socks: list[socket.socket] = []
    failed: collections.Counter[str] = collections.Counter()

    async def open_one(i: int) -> None:
        sock = new_socket(sources[i % len(sources)])
        try:
            await asyncio.wait_for(loop.sock_connect(sock, dests[i % len(dests)]), 10)
        except (OSError, TimeoutError) as exc:
            sock.close()
            failed[type(exc).__name__] += 1
        else:
            socks.append(sock)

    for first in range(0, count, IDLE_BATCH):
        await asyncio.gather(*(open_one(i) for i in range(first, min(count, first + IDLE_BATCH))))
    print(json.dumps({"open": len(socks), "failed": dict(failed)}), flush=True)
    # Hold until the bench closes our standard input, or the bound passes.
    stdin_closed = loop.create_future()

    def on_stdin() -> None:
        if not os.read(sys.stdin.fileno(), 4096) and not stdin_closed.done():
            stdin_closed.set_result(None)

    loop.add_reader(sys.stdin.fileno(), on_stdin)
    try:
        await asyncio.wait_for(stdin_closed, hold)
    except TimeoutError:
        pass
    finally:
        loop.remove_reader(sys.stdin.fileno())
        for sock in socks:
            sock.close()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.loadgen", description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=["http10", "echo", "idle", "paced"])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, action="append", required=True, help="repeat to spread over several")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--sources", type=int, default=16, help="how many 127.0.0.x source addresses")
    parser.add_argument(
        "--expect", action="append", default=[], help="(http10) a body an answer may end with (repeatable)"
    )
    parser.add_argument("--calling-ae", default="BENCH")
    parser.add_argument("--called-ae", default="ANY-SCP")
    parser.add_argument("--count", type=int, default=10_000, help="(idle) connections to hold")
    parser.add_argument("--hold", type=float, default=120.0, help="(idle) longest time to hold them")
    parser.add_argument("--rate", type=float, default=1000.0, help="(paced) requests per second in all")
    return parser.parse_args(argv)


async def amain(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    dests = [(args.host, port) for port in args.port]
    sources = source_addresses(args.sources)
    if args.mode == "idle":
        await hold_idle(dests, args.count, sources, args.hold)
        return
    if args.mode == "paced":
        stats = await paced(dests, args.rate, args.concurrency, args.duration, sources, args.host)
        print(json.dumps(stats), flush=True)
        return
    op: Op
    if args.mode == "http10":
        request = f"GET / HTTP/1.0\r\nHost: {args.host}\r\n\r\n".encode()
        op = http10_op(loop, request, tuple(e.encode() for e in args.expect))
    else:
        op = echo_op(loop, args.calling_ae, args.called_ae)
    result = await run_loops(op, args.concurrency, args.duration, sources, dests)
    print(json.dumps(result), flush=True)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        import uvloop
    except ImportError:
        asyncio.run(amain(args))
        return
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(amain(args))


if __name__ == "__main__":
    main()
