"""Relay workers: other processes that move the bytes of established connections, to use every core.

Theory of operation. One process (the main one) accepts every connection and makes every decision:
persistence, health, admin state, DICOM negotiation, logging. Only when a connection is established and
its bytes are to be relayed untouched does it hand the two sockets to a relay worker, over a Unix
socket (SCM_RIGHTS), and wait for the worker to report how the connection ended. So persistence tables,
counters and limits stay exact (one table, one process), while the work that grows with traffic, moving
bytes, is spread over the cores. ``workers: N`` means N processes in all: the main process relays too,
and each connection goes to whichever process relays the fewest connections, the main process's own
counting :data:`MAIN_RELAY_WEIGHT` times (it does all the accepting and deciding besides).

Messages on each worker's control socket (SOCK_SEQPACKET, so each is one packet):
    main -> worker  b"R" + id, idle timeout, timeout end  (+ the client and server sockets)   relay
    main -> worker  b"A" + id                                                                 abort one
    worker -> main  b"D" + id, bytes up, bytes down, end                                      finished
A worker exits when its control socket closes (the main process stopped or died). It ignores SIGINT and
SIGTERM: the main process decides when connections end, within its shutdown grace.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import struct
import subprocess
import sys
from collections import deque

from pacslb.proxy.outcome import End
from pacslb.proxy.relay import RelayResult, relay

log = logging.getLogger("pacslb.workers")

_RELAY = struct.Struct(">cQdB")
_ABORT = struct.Struct(">cQ")
_DONE = struct.Struct(">cQQQB")
_ENDS = list(End)
_END_CODE = {end: i for i, end in enumerate(_ENDS)}
#: The main process accepts, decides and connects for every connection: each connection it also relays
#: counts this many times when choosing where a connection is relayed, so it keeps cycles for that work
#: and the workers do most of the relaying. (1 balanced the counts; measured with short connections on 2
#: cores: 2,500 connections/s at 1, 2,700 at 3, 2,530 with every connection handed to the worker.)
MAIN_RELAY_WEIGHT = 3
#: How long a stopping worker may take to exit before it is killed.
WORKER_STOP_TIMEOUT = 5.0


class _Worker:
    """The main process's handle on one relay worker."""

    def __init__(self, index: int, proc: subprocess.Popen[bytes], control: socket.socket) -> None:
        self.index = index
        self.proc = proc
        self.control = control
        self.pending: dict[int, asyncio.Future[RelayResult]] = {}
        self.outbox: deque[tuple[bytes, list[int]]] = deque()
        self.writing = False


class RelayPool:
    """Hands established connections to relay workers (or relays them here), balancing by load."""

    def __init__(self, processes: int) -> None:
        self.processes = processes
        self.workers: list[_Worker] = []
        self.local_active = 0
        self._next_id = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._procs: list[subprocess.Popen[bytes]] = []

    def start(self) -> None:
        """Start ``processes - 1`` workers (the main process is the first relay)."""
        self._loop = asyncio.get_running_loop()
        for index in range(1, self.processes):
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            proc = subprocess.Popen(
                [sys.executable, "-m", "pacslb.proxy.workers", str(theirs.fileno())],
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
            )
            theirs.close()
            self._procs.append(proc)
            ours.setblocking(False)
            worker = _Worker(index, proc, ours)
            self.workers.append(worker)
            self._loop.add_reader(ours.fileno(), self._on_message, worker)

    async def relay(
        self, client: socket.socket, server: socket.socket, *, idle_timeout: float, timeout_end: End
    ) -> RelayResult:
        """Relay one connection in the least busy process. Owns both sockets from the call on."""
        worker = min(self.workers, key=lambda w: len(w.pending), default=None)
        if (
            worker is None
            or len(worker.pending) >= MAIN_RELAY_WEIGHT * self.local_active
            or worker.proc.poll() is not None
        ):
            self.local_active += 1
            try:
                return await relay(client, server, idle_timeout=idle_timeout, timeout_end=timeout_end)
            finally:
                self.local_active -= 1
        assert self._loop is not None
        self._next_id += 1
        conn_id = self._next_id
        future: asyncio.Future[RelayResult] = self._loop.create_future()
        worker.pending[conn_id] = future
        message = _RELAY.pack(b"R", conn_id, idle_timeout, _END_CODE[timeout_end])
        try:
            self._send(worker, message, [client.fileno(), server.fileno()])
        finally:
            client.close()  # the worker has its own copies now (or the send failed: nothing to relay)
            server.close()
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            if not future.done():
                self._send(worker, _ABORT.pack(b"A", conn_id), [])
                try:
                    await asyncio.wait_for(asyncio.shield(future), 1.0)
                except (TimeoutError, asyncio.CancelledError):
                    pass
            raise

    def _send(self, worker: _Worker, message: bytes, fds: list[int]) -> None:
        if worker.outbox or not self._try_send(worker, message, fds):
            # Copies of the descriptors wait with the message; the caller closes its own.
            worker.outbox.append((message, [os.dup(fd) for fd in fds]))
            if not worker.writing:
                assert self._loop is not None
                self._loop.add_writer(worker.control.fileno(), self._flush, worker)
                worker.writing = True

    def _try_send(self, worker: _Worker, message: bytes, fds: list[int]) -> bool:
        try:
            socket.send_fds(worker.control, [message], fds) if fds else worker.control.send(message)
        except BlockingIOError:
            return False
        except OSError:
            self._worker_lost(worker)
        return True

    def _flush(self, worker: _Worker) -> None:
        while worker.outbox:
            message, fds = worker.outbox[0]
            if not self._try_send(worker, message, fds):
                return
            worker.outbox.popleft()
            for fd in fds:
                os.close(fd)
        assert self._loop is not None
        self._loop.remove_writer(worker.control.fileno())
        worker.writing = False

    def _on_message(self, worker: _Worker) -> None:
        while True:
            try:
                data = worker.control.recv(64)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                self._worker_lost(worker)
                return
            _, conn_id, up, down, end = _DONE.unpack(data)
            future = worker.pending.pop(conn_id, None)
            if future is not None and not future.done():
                future.set_result(RelayResult(up, down, _ENDS[end]))

    def _worker_lost(self, worker: _Worker, expected: bool = False) -> None:
        assert self._loop is not None
        if worker not in self.workers:
            return
        self.workers.remove(worker)
        self._loop.remove_reader(worker.control.fileno())
        if worker.writing:
            self._loop.remove_writer(worker.control.fileno())
        for future in worker.pending.values():
            if not future.done():
                future.set_result(RelayResult(0, 0, End.ERROR))
        worker.pending.clear()
        for _, fds in worker.outbox:
            for fd in fds:
                os.close(fd)
        worker.outbox.clear()
        worker.control.close()
        if expected:
            return
        if worker.proc.poll() is None:
            log.error("relay worker %d stopped answering; its connections are lost", worker.index)
        else:
            log.error("relay worker %d exited (%s); its connections are lost", worker.index, worker.proc.returncode)

    async def stop(self) -> None:
        """Close the control sockets (each worker then aborts what it still relays and exits) and reap."""
        for worker in list(self.workers):
            self._worker_lost(worker, expected=True)
        await asyncio.get_running_loop().run_in_executor(None, self._reap)

    def _reap(self) -> None:
        for proc in self._procs:
            try:
                proc.wait(WORKER_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


# -- the worker process -------------------------------------------------------------------------------------


async def _serve(control: socket.socket) -> None:
    loop = asyncio.get_running_loop()
    tasks: dict[int, asyncio.Task[None]] = {}
    closed = loop.create_future()

    async def run(conn_id: int, client: socket.socket, server: socket.socket, idle: float, end_code: int) -> None:
        try:
            result = await relay(client, server, idle_timeout=idle, timeout_end=_ENDS[end_code])
            up, down, end = result.bytes_up, result.bytes_down, result.end
        except asyncio.CancelledError:
            up, down, end = 0, 0, End.SHUTDOWN
        except Exception:
            log.exception("relay failed in a worker")
            up, down, end = 0, 0, End.ERROR
        finally:
            tasks.pop(conn_id, None)
        try:
            control.send(_DONE.pack(b"D", conn_id, up, down, _END_CODE[end]))
        except OSError:
            pass

    def on_message() -> None:
        while True:
            try:
                data, fds, _flags, _addr = socket.recv_fds(control, 64, 2)
            except BlockingIOError:
                return
            except OSError:
                data, fds = b"", []
            if not data:
                if not closed.done():
                    closed.set_result(None)
                return
            if data[:1] == b"R" and len(fds) == 2:
                _, conn_id, idle, end_code = _RELAY.unpack(data)
                client = socket.socket(fileno=fds[0])
                server = socket.socket(fileno=fds[1])
                client.setblocking(False)
                server.setblocking(False)
                tasks[conn_id] = loop.create_task(run(conn_id, client, server, idle, end_code))
            elif data[:1] == b"A":
                _, conn_id = _ABORT.unpack(data)
                task = tasks.get(conn_id)
                if task is not None:
                    task.cancel()
            else:
                for fd in fds:
                    os.close(fd)

    control.setblocking(False)
    loop.add_reader(control.fileno(), on_message)
    await closed
    for task in list(tasks.values()):
        task.cancel()
    await asyncio.gather(*tasks.values(), return_exceptions=True)


def worker_main(fd: int) -> None:
    """Entry point of a relay worker process."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    control = socket.socket(fileno=fd)
    try:
        import uvloop

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(_serve(control))
    except ImportError:  # pragma: no cover - uvloop is a dependency where pacslb runs
        asyncio.run(_serve(control))


if __name__ == "__main__":
    worker_main(int(sys.argv[1]))
