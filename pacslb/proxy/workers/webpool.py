"""HTTP served in worker processes too: the main process's side (pacslb/proxy/workers/webworker.py is the workers').

Theory of operation. In http mode each request costs the balancer tens of microseconds of Python (parsing,
both heads, the decision, the bookkeeping), so one process saturates a core long before the network
does. With ``workers: N`` (N > 1) the main process starts N - 1 web workers besides its relay workers.
The main process still accepts every connection of an http service, and serves some of them itself; the
others it hands to the web worker serving the fewest (a connection is the unit: its requests stay in one
process, in order). A handed connection carries its *lease*: the client's source-IP persistence entry,
looked up in the main process's table (or chosen by the scheduler for a new client, and entered), and
held there for as long as the connection is open, as tcp mode holds it. The worker decides each request
as the main process would (a valid cookie, then the lease, then the scheduler) and tells the main process
when a request moves the client to another node, so the one table stays exact: clients of one address
stay together whatever process serves them.

The main process stays the one place that knows: it pushes the nodes' health, admin state and weight to
the workers whenever they may have changed (and every :data:`SYNC_INTERVAL` besides), the config on
reload, a halt's cut when its grace is over, and the stop. The workers send back, every
:data:`COUNT_INTERVAL`, what their requests added to the nodes' counters (connections open, requests,
bytes), so the dashboard, the metrics and leastconn see every process's traffic. Each worker writes its
own access-log lines (they say ``worker=N``).

The messages, one class per kind, are in messages.py beside this module:
    main -> worker  Configure, State (the nodes), Conn (+ the client socket), Abort, Cut (a halt), Stop
    worker -> main  Ended, Bind (the client moved to another node), Counts, CutDone, ConnectFailed
A worker exits when its control socket closes, once its connections have ended (the main process closes
it after its own shutdown grace, and kills a worker that takes longer than :data:`STOP_TIMEOUT`).
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from pacslb.balance.decision import choose
from pacslb.balance.persistence import source_ip_key
from pacslb.proxy.outcome import End
from pacslb.proxy.workers import messages as msg
from pacslb.proxy.workers.control import Channel

if TYPE_CHECKING:
    from pacslb.balance.server import ServerState
    from pacslb.config.model import Config
    from pacslb.proxy.http import HttpService

log = logging.getLogger("pacslb.workers")

#: Largest message, in bytes (a config is the largest by far).
MAX_MESSAGE = 4 << 20
#: How often the main process pushes the nodes' state even when nothing told it of a change.
SYNC_INTERVAL = 0.5
#: How often a worker reports what its requests added to the counters.
COUNT_INTERVAL = 0.25
#: How long a stopping worker may take after its control socket closed before it is killed.
STOP_TIMEOUT = 5.0
#: The main process also accepts, checks and decides: each connection it serves counts this many times
#: when choosing the process that serves a new one.
MAIN_WEIGHT = 1


def server_states(servers: list[ServerState]) -> list[msg.NodeState]:
    """What a worker needs of each node's state (the message :class:`msg.State`)."""
    return [msg.NodeState.of(s) for s in servers]


class _Handed:
    """A connection a worker serves, as the main process's service counts it (in ``service.conns``)."""

    __slots__ = ("conn_id", "key", "node", "pool", "service", "worker")

    def __init__(
        self, pool: WebPool, worker: _Worker, service: HttpService, conn_id: int, key: str | None, node: str | None
    ) -> None:
        self.pool = pool
        self.worker = worker
        self.service = service
        self.conn_id = conn_id
        self.key = key
        self.node = node  # the node the client's entry names, held while the connection is open

    def cancel(self, end: End) -> None:
        """The shutdown grace is over (``end``): the worker closes it, and reports its end as usual."""
        self.pool._send(self.worker, msg.Abort(self.conn_id))

    def rebind(self, node: str | None, now: float) -> None:
        table = self.service.table
        if table is None or self.key is None:
            self.node = node
            return
        if self.node is not None:
            table.release(self.key, self.node, now)
        if node is None:
            table.forget(self.key)
        else:
            table.acquire(self.key, node, now)
        self.node = node

    def release(self, now: float) -> None:
        table = self.service.table
        if table is not None and self.key is not None and self.node is not None:
            table.release(self.key, self.node, now)
        self.node = None


class _Worker(Channel):
    """The main process's handle on one web worker."""

    def __init__(self, pool: WebPool, loop: asyncio.AbstractEventLoop, index: int) -> None:
        super().__init__(
            loop,
            index,
            "pacslb.proxy.workers.webworker",
            lambda: pool._on_message(self),
            lambda: pool._worker_lost(self),
        )
        self.conns: dict[int, _Handed] = {}
        # What its reports added to each node's open connections, taken back if it dies.
        self.active: dict[tuple[str, str], int] = {}


class WebPool:
    """Starts the web workers, hands them connections, and keeps them and the main process in step."""

    def __init__(
        self,
        processes: int,
        services: Callable[[], dict[str, Any]],
        on_cut: Callable[[str, str, int], None],
        on_connect_failed: Callable[[str, ServerState], None],
    ) -> None:
        self.processes = processes
        self.services = services  # the engine's services now (by name)
        self.on_cut = on_cut
        self.on_connect_failed = on_connect_failed
        self.workers: list[_Worker] = []
        self._started: list[_Worker] = []
        self._next_id = 0
        self._turn = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._synced: dict[str, list[msg.NodeState]] = {}
        self._syncer: asyncio.TimerHandle | None = None

    def start(self, config: Config) -> None:
        """Start ``processes - 1`` web workers (the main process serves too) with ``config``."""
        self._loop = asyncio.get_running_loop()
        for index in range(1, self.processes):
            worker = _Worker(self, self._loop, index)
            self._started.append(worker)
            self.workers.append(worker)
        self.configure(config)
        self._syncer = self._loop.call_later(SYNC_INTERVAL, self._tick)

    # -- main -> workers -----------------------------------------------------------------------------------

    def configure(self, config: Config) -> None:
        """The services a worker serves (at start and on reload); the nodes' state follows."""
        for worker in self.workers:
            self._send(worker, msg.Configure(config))
        self._synced = {}
        self.sync()

    def sync(self) -> None:
        """Push the nodes' state of every http service where it changed since the last push."""
        changed: dict[str, list[msg.NodeState]] = {}
        current: dict[str, list[msg.NodeState]] = {}
        for name, service in self.services().items():
            if service.spec.mode != "http":
                continue
            states = server_states(service.servers)
            current[name] = states
            if self._synced.get(name) != states:
                changed[name] = states
        self._synced = current
        if changed:
            for worker in self.workers:
                self._send(worker, msg.State(changed))

    def _tick(self) -> None:
        self.sync()
        assert self._loop is not None
        self._syncer = self._loop.call_later(SYNC_INTERVAL, self._tick)

    def take(self, service: HttpService, sock: socket.socket, peer: tuple[str, int]) -> bool:
        """Hand a newly accepted connection of ``service`` to a worker, or (False) leave it to the main
        process: the least busy takes it (the main process's connections of this service, times
        :data:`MAIN_WEIGHT`, against each worker's connections), and among equals the next in turn, so
        that even one connection at a time is spread."""
        self._turn += 1
        candidates = [None, *self.workers]
        worker: _Worker | None = None
        least = -1
        for i in range(len(candidates)):
            candidate = candidates[(self._turn + i) % len(candidates)]
            load = MAIN_WEIGHT * len(service.tasks) if candidate is None else len(candidate.conns)
            if least < 0 or load < least:
                worker, least = candidate, load
        if worker is None or worker.proc.poll() is not None:
            return False
        assert self._loop is not None
        now = self._loop.time()
        table = service.table if service.settings.use_table else None
        key: str | None = None
        node: str | None = None
        fresh = False
        if table is not None:
            persistence = service.spec.persistence
            key = source_ip_key(peer[0], persistence.netmask, persistence.netmask6)
            decision = choose(service.servers, service.scheduler, table, key, now)
            if decision is not None:
                node, fresh = decision.server.name, decision.rule == "balance"
                table.acquire(key, node, now)
        self._next_id += 1
        conn = _Handed(self, worker, service, self._next_id, key, node)
        worker.conns[conn.conn_id] = conn
        service.conns.add(conn)  # counted, cancelled and drained as a connection
        service._admitted(conn)  # its end releases what the per-client limits admitted
        try:
            self._send(worker, msg.Conn(conn.conn_id, service.name, peer, node, fresh), [sock.fileno()])
        finally:
            sock.close()  # the worker has its own copy now
        return True

    def cut(self, service: HttpService, server: ServerState) -> None:
        for worker in self.workers:
            self._send(worker, msg.Cut(service.name, server.name))

    def stop_service(self, service: HttpService) -> None:
        for worker in self.workers:
            self._send(worker, msg.Stop(service.name))

    def _send(self, worker: _Worker, message: msg.ToWorker, fds: Sequence[int] = ()) -> None:
        data = msg.encode(message)
        if len(data) > MAX_MESSAGE:
            log.error("web worker message too large (%d bytes): %s not sent", len(data), type(message).__name__)
            return
        worker.send(data, fds)

    # -- workers -> main -----------------------------------------------------------------------------------

    def _on_message(self, worker: _Worker) -> None:
        while (data := worker.receive()) is not None:
            if not data:
                self._worker_lost(worker)
                return
            try:
                self._handle(worker, msg.decode_to_main(data))
            except msg.BadMessage as exc:
                log.error("web worker %d: %s", worker.index, exc)
            except Exception:
                log.exception("bad message from web worker %d", worker.index)

    def _handle(self, worker: _Worker, message: object) -> None:
        assert self._loop is not None
        match message:
            case msg.Ended(conn_id):
                conn = worker.conns.pop(conn_id, None)
                if conn is not None:
                    conn.release(self._loop.time())
                    conn.service._conn_finished(conn)
            case msg.Bind(conn_id, node):
                conn = worker.conns.get(conn_id)
                if conn is not None:
                    conn.rebind(node, self._loop.time())
            case msg.Counts(nodes, rejections):
                self._add_counts(worker, nodes, rejections)
            case msg.CutDone(service, node, cut):
                if cut:
                    self.on_cut(service, node, cut)
            case msg.ConnectFailed(service, node):
                server = self._server(service, node)
                if server is not None:
                    self.on_connect_failed(service, server)

    def _server(self, service_name: str, node: str) -> ServerState | None:
        service = self.services().get(service_name)
        if service is None:
            return None
        return next((s for s in service.servers if s.name == node), None)

    def _add_counts(
        self, worker: _Worker, nodes: dict[str, dict[str, tuple[int, int, int, int]]], rejections: dict[str, Any]
    ) -> None:
        for service_name, deltas in nodes.items():
            for node, (active, total, up, down) in deltas.items():
                key = (service_name, node)
                worker.active[key] = worker.active.get(key, 0) + active
                server = self._server(service_name, node)
                if server is None:
                    continue
                server.active += active
                server.total += total
                server.bytes_up += up
                server.bytes_down += down
        for service_name, counts in rejections.items():
            service = self.services().get(service_name)
            if service is not None:
                service.rejections.update(counts)

    def _worker_lost(self, worker: _Worker, expected: bool = False) -> None:
        assert self._loop is not None
        if worker not in self.workers:
            return
        self.workers.remove(worker)
        worker.close()
        for (service_name, node), active in worker.active.items():  # what it held is no longer open
            server = self._server(service_name, node)
            if server is not None:
                server.active -= active
        worker.active.clear()
        now = self._loop.time()
        lost = list(worker.conns.values())
        worker.conns.clear()
        for conn in lost:
            conn.release(now)
            conn.service._conn_finished(conn)
        if expected:
            return
        if worker.proc.poll() is None:
            log.error("web worker %d stopped answering; its %d connection(s) are lost", worker.index, len(lost))
        else:
            code = worker.proc.returncode
            log.error("web worker %d exited (%s); its %d connection(s) are lost", worker.index, code, len(lost))

    async def stop(self) -> None:
        """Close the control sockets (each worker then closes what it still serves and exits) and reap."""
        if self._syncer is not None:
            self._syncer.cancel()
            self._syncer = None
        for worker in list(self.workers):
            self._worker_lost(worker, expected=True)
        await asyncio.get_running_loop().run_in_executor(None, self._reap)

    def _reap(self) -> None:
        for worker in self._started:
            worker.reap(STOP_TIMEOUT)
