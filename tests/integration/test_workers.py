"""Relay workers: connections relayed in other processes behave as in the main one, and nothing leaks.

The engine runs in-process with ``workers: 3`` (the main process plus two relay workers) in front of small
asyncio echo backends that first greet with their name.
"""

from __future__ import annotations

import asyncio
import gc
import hashlib
import os
import signal
import socket

from inproc import echo_server, free_port, run, tcp_pair

from pacslb.config import load_config_text
from pacslb.engine import Engine
from pacslb.proxy.outcome import End
from pacslb.proxy.relay import IDLE_PIPES, close_idle_pipes
from pacslb.proxy.workers.relaypool import RelayPool


def config(port: int, backend: int, workers: int = 3) -> str:
    return (
        f"workers: {workers}\nshutdown_grace: 300ms\nservices:\n  svc:\n    listen: 127.0.0.1:{port}\n"
        f"    check: {{type: none}}\n    servers: {{a: 127.0.0.1:{backend}}}\n"
        # Thousands of connections from one address: the per-client limits (test_client_limits.py) are off.
        "    limits: {client_maxconn: none, client_rate: none}\n"
    )


async def round_trip(port: int, payload: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(payload)
    await writer.drain()
    writer.write_eof()
    data = await reader.read()
    writer.close()
    return data


def fds() -> int:
    close_idle_pipes()  # pipes kept for reuse are a bounded cache, not a leak
    gc.collect()  # sockets other tests dropped without closing close here, not in the middle of a count
    return len(os.listdir("/proc/self/fd"))


def test_connections_relayed_by_workers_arrive_intact_and_nothing_leaks() -> None:
    payloads = [os.urandom(n) for n in (1, 1000, 300_000, 3_000_000) * 6]

    async def scenario() -> tuple[list[bool], int, int, list[int], list[int | None]]:
        backend, bport = await echo_server()
        port = free_port()
        engine = Engine(load_config_text(config(port, bport)))
        before = fds()
        await engine.start()
        assert engine.pool is not None
        procs = [w.proc for w in engine.pool.workers]
        results = await asyncio.gather(*(round_trip(port, p) for p in payloads))
        intact = [
            hashlib.sha256(r).digest() == hashlib.sha256(p).digest() for r, p in zip(results, payloads, strict=True)
        ]
        used = [len(w.pending) for w in engine.pool.workers]  # all finished: nothing pending
        await engine.shutdown(grace=1)
        await asyncio.sleep(0.1)
        after = fds()
        backend.close()
        await backend.wait_closed()
        return intact, before, after, used, [p.poll() for p in procs]

    intact, before, after, pending, exit_codes = run(scenario)
    assert all(intact)
    assert pending == [0, 0]
    assert exit_codes == [0, 0]  # both workers exited by themselves when the engine stopped
    assert after <= before  # more would be a leak; fewer is the garbage collector closing what others left


def test_shutdown_grace_ends_connections_held_in_workers() -> None:
    async def scenario() -> list[bytes]:
        backend, bport = await echo_server()
        port = free_port()
        engine = Engine(load_config_text(config(port, bport)))
        await engine.start()
        streams = [await asyncio.open_connection("127.0.0.1", port) for _ in range(4)]
        for reader, writer in streams:  # each connection is established and relayed somewhere
            writer.write(b"x")
            assert await asyncio.wait_for(reader.readexactly(1), 5) == b"x"
        await engine.shutdown(grace=0.3)
        rests = []
        for reader, writer in streams:
            try:
                rests.append(await asyncio.wait_for(reader.read(), 5))
            except ConnectionError:
                rests.append(b"")
            writer.close()
        backend.close()
        return rests

    assert run(scenario) == [b""] * 4


def test_a_dead_worker_loses_only_its_connections() -> None:
    async def scenario() -> tuple[End, bytes]:
        pool = RelayPool(2)
        pool.start()
        loop = asyncio.get_running_loop()

        client_out, client_in = await tcp_pair()
        server_out, server_in = await tcp_pair()
        pool.local_active = 1  # make the worker the less busy relay for this connection
        task = loop.create_task(pool.relay(client_in, server_in, idle_timeout=30, timeout_end=End.CLIENT_TIMEOUT))
        await asyncio.sleep(0.5)
        pool.workers[0].proc.send_signal(signal.SIGKILL)
        result = await asyncio.wait_for(task, 10)
        pool.local_active = 0
        # The pool still relays (here, in the main process) after losing its worker.
        b_out, b_in = await tcp_pair()
        c_out, c_in = await tcp_pair()
        again = loop.create_task(pool.relay(c_in, b_in, idle_timeout=30, timeout_end=End.CLIENT_TIMEOUT))
        await loop.sock_sendall(c_out, b"still relaying")
        got = await asyncio.wait_for(loop.sock_recv(b_out, 100), 5)
        for sock in (client_out, server_out, b_out, c_out):
            sock.close()
        await asyncio.wait_for(again, 5)
        await pool.stop()
        return result.end, got

    end, got = run(scenario)
    assert end == End.ERROR
    assert got == b"still relaying"


def test_a_connection_handed_to_a_worker_that_died_unnoticed_is_relayed_here() -> None:
    """The worker exits and the loop has not yet read the end of its control socket: the hand-over finds
    the socket closed, the worker is dropped, and this connection is relayed by the main process."""

    async def scenario() -> tuple[bytes, int]:
        pool = RelayPool(2)
        pool.start()
        loop = asyncio.get_running_loop()
        worker = pool.workers[0]
        worker.proc.send_signal(signal.SIGKILL)
        worker.proc.wait(10)  # blocking: the loop does not run, so nothing has noticed yet
        assert pool.workers == [worker]
        client_out, client_in = await tcp_pair()
        server_out, server_in = await tcp_pair()
        relayed = loop.create_task(pool.relay(client_in, server_in, idle_timeout=30, timeout_end=End.CLIENT_TIMEOUT))
        await loop.sock_sendall(client_out, b"not lost")
        got = await asyncio.wait_for(loop.sock_recv(server_out, 100), 5)
        client_out.close()
        server_out.close()
        await asyncio.wait_for(relayed, 5)
        left = len(pool.workers)
        await pool.stop()
        return got, left

    got, left = run(scenario)
    assert got == b"not lost"
    assert left == 0


def test_ten_thousand_connections_leak_no_descriptor_in_any_process() -> None:
    """10,000 short connections through the engine (tcp mode, relayed by the main process and a worker):
    every echo intact, and afterwards no more descriptors open in either process than before (beyond the
    worker's bounded cache of empty pipes)."""
    connections, concurrency = 10_000, 50

    async def one(port: int, n: int) -> bool:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        payload = b"%d" % n
        writer.write(payload)
        writer.write_eof()
        data = await reader.read()
        writer.close()
        return data == payload

    async def scenario() -> tuple[int, int, int, int, list[bool]]:
        backend, bport = await echo_server()
        port = free_port()
        engine = Engine(load_config_text(config(port, bport, workers=2)))
        await engine.start()
        assert engine.pool is not None
        worker = engine.pool.workers[0].proc.pid
        await asyncio.gather(*(one(port, n) for n in range(200)))  # warm up both processes
        await asyncio.sleep(0.2)
        before, worker_before = fds(), len(os.listdir(f"/proc/{worker}/fd"))
        results: list[bool] = []
        for first in range(0, connections, concurrency):
            results += await asyncio.gather(*(one(port, n) for n in range(first, first + concurrency)))
        await asyncio.sleep(0.2)
        after, worker_after = fds(), len(os.listdir(f"/proc/{worker}/fd"))
        used = engine.services["svc"].total
        await engine.shutdown(grace=1)
        backend.close()
        await backend.wait_closed()
        assert used == connections + 200
        return before, after, worker_before, worker_after, results

    before, after, worker_before, worker_after, results = run(scenario)
    assert len(results) == connections and all(results)
    assert after <= before
    assert worker_after <= worker_before + 2 * IDLE_PIPES


def test_a_worker_s_reports_wait_while_the_main_process_is_behind_and_none_is_lost() -> None:
    """Reports of connections that ended go together; when the main process's socket is full they wait, in
    order, and go once it reads again."""
    from pacslb.proxy.eventloop import EpollLoop
    from pacslb.proxy.pumps import RelayResult
    from pacslb.proxy.workers.relayworker import DONE_MSG, ENDS, _Serving

    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ours.setblocking(False)
    theirs.setblocking(False)
    loop = EpollLoop()
    serving = _Serving(loop, theirs, lambda *args: None, loop.stop)
    filler = 0
    try:
        while True:  # the main process reads nothing for a while: its socket fills up
            theirs.send(b"x" * 4096)
            filler += 1
    except BlockingIOError:
        pass
    count = 3000
    for conn_id in range(1, count + 1):
        serving.report(conn_id, RelayResult(conn_id, 2 * conn_id, End.CLIENT_CLOSED))
    got: list[tuple[int, int, int, End]] = []
    messages = 0

    def readable() -> None:
        nonlocal filler, messages
        while True:
            try:
                data = ours.recv(1 << 20)
            except BlockingIOError:
                return
            if data.startswith(b"x"):
                filler -= 1
                continue
            messages += 1
            for offset in range(0, len(data), DONE_MSG.size):
                _, conn_id, up, down, code = DONE_MSG.unpack_from(data, offset)
                got.append((conn_id, up, down, ENDS[code]))
            if len(got) >= count:
                loop.stop()

    loop.add_reader(ours.fileno(), readable)
    loop.call_later(60, loop.stop)  # a bound, should the reports never come
    loop.run()
    loop.close()
    ours.close()
    theirs.close()
    assert filler == 0
    assert got == [(i, i, 2 * i, End.CLIENT_CLOSED) for i in range(1, count + 1)]
    assert messages < count / 10  # together, not one message each
