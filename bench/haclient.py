"""The client host of the failover bench (bench/ha.py): one long-lived process started inside the client's
network namespace (``ip netns exec NS python -m bench.haclient``), driven by JSON lines on standard input,
answering one JSON line per command on standard output.

Owns two client behaviours, and the clock they are timed with (``time.monotonic``: CLOCK_MONOTONIC is one
clock for the whole machine, whatever the network namespace, so the bench compares it with its own):

- ``fetch``: one HTTP/1.0 GET to the virtual IP from each of the given source addresses, at once; answers
  which node each reached (the body's last line, the node's name) or "" when nothing answered in time.
- ``probe``: from one source address, a new connection and GET every ``interval`` (10 ms) without waiting
  for the ones before (a SYN sent to the old master's hardware address is lost, and the kernel would only
  retry it after a second: each attempt is a fresh connection, so the first to get through is timed to
  within an interval); answers the time of the first complete answer. Attempts still pending are
  cancelled. The bench cuts the link first and asks for the probe after, so no attempt can be answered
  by the master that was cut.

It must not decide anything: the bench (bench/ha.py) says what to do and computes the figures.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import sys
import time
from typing import Any

#: IP_BIND_ADDRESS_NO_PORT (Linux): choose the source address at bind, the port at connect.
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)
#: Most bytes read per recv; an answer is a few hundred bytes.
READ_SIZE = 65536


async def get(source: str, target: tuple[str, int], timeout: float) -> str:
    """GET / from ``source``: the last line of the body (the node's name). Raises OSError or TimeoutError."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
        sock.bind((source, 0))
        async with asyncio.timeout(timeout):
            await loop.sock_connect(sock, target)
            await loop.sock_sendall(sock, f"GET / HTTP/1.0\r\nHost: {target[0]}\r\n\r\n".encode())
            chunks: list[bytes] = []
            while data := await loop.sock_recv(sock, READ_SIZE):
                chunks.append(data)
    finally:
        sock.close()
    answer = b"".join(chunks)
    head, _, body = answer.partition(b"\r\n\r\n")
    if not head.startswith((b"HTTP/1.1 200", b"HTTP/1.0 200")):
        raise OSError(f"answer {head[:40]!r}")
    lines = body.decode(errors="replace").strip().splitlines()
    return lines[-1] if lines else ""


async def fetch(sources: list[str], target: tuple[str, int], timeout: float) -> dict[str, str]:
    async def one(source: str) -> str:
        try:
            return await get(source, target, timeout)
        except (OSError, TimeoutError):
            return ""

    nodes = await asyncio.gather(*(one(source) for source in sources))
    return dict(zip(sources, nodes, strict=True))


async def probe(
    source: str, target: tuple[str, int], interval: float, attempt_timeout: float, give_up: float
) -> dict[str, Any]:
    started = time.monotonic()
    done: asyncio.Future[tuple[float, str]] = asyncio.get_running_loop().create_future()
    attempts: set[asyncio.Task[None]] = set()
    count = 0

    async def attempt() -> None:
        with contextlib.suppress(OSError, TimeoutError):
            node = await get(source, target, attempt_timeout)
            if not done.done():
                done.set_result((time.monotonic(), node))

    try:
        while not done.done() and time.monotonic() - started < give_up:
            task = asyncio.create_task(attempt())
            attempts.add(task)
            task.add_done_callback(attempts.discard)
            count += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(done), interval)
    finally:
        for task in list(attempts):
            task.cancel()
        if attempts:
            await asyncio.wait(list(attempts), timeout=5)
    if not done.done():
        return {"started": started, "first": None, "node": "", "attempts": count}
    first, node = done.result()
    return {"started": started, "first": first, "node": node, "attempts": count}


async def serve() -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    print(json.dumps({"ready": time.monotonic()}), flush=True)
    while line := await reader.readline():
        command = json.loads(line)
        target = (command["host"], int(command["port"]))
        if command["op"] == "fetch":
            reply: dict[str, Any] = {"nodes": await fetch(command["sources"], target, command["timeout"])}
        elif command["op"] == "probe":
            reply = await probe(
                command["source"], target, command["interval"], command["attempt_timeout"], command["give_up"]
            )
        else:
            reply = {"error": f"unknown op {command['op']!r}"}
        print(json.dumps(reply), flush=True)


def main() -> None:
    asyncio.run(serve())


if __name__ == "__main__":
    main()
