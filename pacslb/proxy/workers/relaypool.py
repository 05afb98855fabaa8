"""The relay pool: the main process's side of the relay workers (pacslb/proxy/workers/relayworker.py has the theory
of operation, the messages, and the workers' side)."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable

from pacslb.descriptors import EXHAUSTION
from pacslb.proxy.outcome import End
from pacslb.proxy.relay import RelayHandle, RelayResult, cancelled_relay, start_relay
from pacslb.proxy.workers.control import Channel
from pacslb.proxy.workers.relayworker import ABORT_MSG, DONE_MSG, END_CODE, ENDS, RELAY_MSG, WORKER_STOP_TIMEOUT

log = logging.getLogger("pacslb.workers")

#: The main process accepts, decides and connects for every connection: each connection it also relays
#: counts this many times when choosing where a connection is relayed, so it keeps cycles for that work
#: and the workers do most of the relaying. (1 balanced the counts; measured with short connections on 2
#: cores: 2,500 connections/s at 1, 2,700 at 3, 2,530 with every connection handed to the worker. Measured
#: again once the hand-over cost less (docs/performance.md, 2026-12-07): 1, 3 and 100 within the noise.)
MAIN_RELAY_WEIGHT = 3
#: A worker that had no descriptors for a connection is given none for this long (the others, or the main
#: process, take them); then it is tried again.
WORKER_FULL_PAUSE = 1.0


class _Worker(Channel):
    """The main process's handle on one relay worker."""

    def __init__(self, pool: RelayPool, loop: asyncio.AbstractEventLoop, index: int) -> None:
        super().__init__(
            loop,
            index,
            "pacslb.proxy.workers.relayworker",
            lambda: pool._on_message(self),
            lambda: pool._worker_lost(self),
        )
        self.pending: dict[int, Callable[[RelayResult], None]] = {}  # told how each connection ended
        self.full_until = 0.0  # out of descriptors: given no connection before this (loop time)


class _Remote:
    """A connection relayed by a worker, as its owner sees it: it can be aborted."""

    __slots__ = ("conn_id", "pool", "worker")

    def __init__(self, pool: RelayPool, worker: _Worker, conn_id: int) -> None:
        self.pool = pool
        self.worker = worker
        self.conn_id = conn_id

    def abort(self) -> None:
        """Ask the worker to close it (its report follows, as for any end)."""
        if self.conn_id in self.worker.pending:
            self.worker.send(ABORT_MSG.pack(b"A", self.conn_id))


class RelayPool:
    """Hands established connections to relay workers (or relays them here), balancing by load."""

    def __init__(self, processes: int) -> None:
        self.processes = processes
        self.workers: list[_Worker] = []
        self.local_active = 0
        self._next_id = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._started: list[_Worker] = []

    def start(self) -> None:
        """Start ``processes - 1`` workers (the main process is the first relay)."""
        self._loop = asyncio.get_running_loop()
        for index in range(1, self.processes):
            worker = _Worker(self, self._loop, index)
            self._started.append(worker)
            self.workers.append(worker)

    def start_relay(
        self,
        client: socket.socket,
        server: socket.socket,
        *,
        idle_timeout: float,
        timeout_end: End,
        on_done: Callable[[RelayResult], None],
    ) -> RelayHandle | _Remote:
        """Relay one connection in the least busy process; ``on_done`` is told the result (once, never
        from within this call). Owns both sockets from the call on."""
        loop = self._loop
        assert loop is not None
        now = loop.time()
        worker = min((w for w in self.workers if w.full_until <= now), key=lambda w: len(w.pending), default=None)
        if worker is not None and len(worker.pending) < MAIN_RELAY_WEIGHT * self.local_active:
            self._next_id += 1
            conn_id = self._next_id
            message = RELAY_MSG.pack(b"R", conn_id, idle_timeout, END_CODE[timeout_end])
            try:
                worker.send(message, [client.fileno(), server.fileno()])
            except OSError as exc:  # no descriptor to keep a copy while the worker is busy
                client.close()
                server.close()
                EXHAUSTION.note("handover", (exc.strerror or str(exc)).lower(), loop)
                loop.call_soon(on_done, RelayResult(0, 0, End.NO_DESCRIPTORS))
                return _Remote(self, worker, conn_id)
            # A worker that died is noticed here (the send found its socket closed: _worker_lost ran) or as
            # its control socket's end of file; until then its messages fail. The connection then stays here.
            if not worker.closed:
                worker.pending[conn_id] = on_done
                client.close()  # the worker has its own copies now
                server.close()
                return _Remote(self, worker, conn_id)
        self.local_active += 1

        def done_here(result: RelayResult) -> None:
            self.local_active -= 1
            on_done(result)

        return start_relay(
            client, server, idle_timeout=idle_timeout, timeout_end=timeout_end, on_done=done_here, loop=loop
        )

    async def relay(
        self, client: socket.socket, server: socket.socket, *, idle_timeout: float, timeout_end: End
    ) -> RelayResult:
        """:meth:`start_relay` as a coroutine. When cancelled, the relay is aborted and its report awaited for a
        moment; the cancellation goes on as :class:`~pacslb.proxy.relay.RelayCancelled`, with what was moved."""
        assert self._loop is not None
        done: asyncio.Future[RelayResult] = self._loop.create_future()

        def finished(result: RelayResult) -> None:
            if not done.done():
                done.set_result(result)

        handle = self.start_relay(client, server, idle_timeout=idle_timeout, timeout_end=timeout_end, on_done=finished)
        try:
            return await asyncio.shield(done)
        except asyncio.CancelledError:
            raise await cancelled_relay(handle, done) from None

    def _on_message(self, worker: _Worker) -> None:
        while (data := worker.receive()) is not None:
            if not data:
                self._worker_lost(worker)
                return
            for offset in range(0, len(data) - DONE_MSG.size + 1, DONE_MSG.size):  # (reports, one after another)
                _, conn_id, up, down, code = DONE_MSG.unpack_from(data, offset)
                end = ENDS[code]
                if end is End.NO_DESCRIPTORS:  # the worker is out of descriptors: counted and logged here
                    assert self._loop is not None
                    worker.full_until = self._loop.time() + WORKER_FULL_PAUSE
                    EXHAUSTION.note("worker", "too many open files in a relay worker", self._loop)
                on_done = worker.pending.pop(conn_id, None)
                if on_done is not None:
                    on_done(RelayResult(up, down, end))

    def _worker_lost(self, worker: _Worker, expected: bool = False) -> None:
        if worker not in self.workers:
            return
        self.workers.remove(worker)
        worker.close()
        lost = list(worker.pending.values())
        worker.pending.clear()
        for on_done in lost:
            on_done(RelayResult(0, 0, End.ERROR))
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
        for worker in self._started:
            worker.reap(WORKER_STOP_TIMEOUT)
