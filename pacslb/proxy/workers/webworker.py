"""A web worker process: serves the http-mode connections the main process hands it.

The theory of operation and the messages are in pacslb/proxy/workers/webpool.py (the main process's side). A
worker runs the same :class:`~pacslb.proxy.http.HttpService` as the main process, one per http service of
the config it was sent, with no listener and no persistence table of its own: each connection decides
with its lease. The nodes' state is what the main process last pushed; the counters its requests change
go back as deltas. It ignores SIGINT and SIGTERM: the main process decides when connections end, and
closes the control socket when it stops; the worker then closes what idles, lets what is in progress
finish, and exits when nothing is left.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import sys
from collections import Counter
from typing import TYPE_CHECKING

from pacslb.balance.persistence import Lease
from pacslb.balance.server import ServerState
from pacslb.descriptors import stream_socket
from pacslb.logs import setup_logging
from pacslb.proxy.workers import messages as msg
from pacslb.proxy.workers.control import next_size
from pacslb.proxy.workers.webpool import COUNT_INTERVAL

if TYPE_CHECKING:
    from pacslb.config.model import Config
    from pacslb.proxy.http import HttpService

log = logging.getLogger("pacslb.workers")


class _Worker:
    """The services of one web worker, driven by its control socket."""

    def __init__(self, control: socket.socket, index: int) -> None:
        self.control = control
        self.index = index
        self.loop = asyncio.get_running_loop()
        self.services: dict[str, HttpService] = {}
        self.retired: list[HttpService] = []
        self.conns: dict[int, tuple[HttpService, asyncio.Task[None]]] = {}
        # Each node's counters as last reported (by object: a reload may replace a node's state).
        self.reported: dict[ServerState, tuple[int, int, int, int]] = {}
        self.rejections: dict[str, Counter[str]] = {}
        self.closed = asyncio.Event()
        self.outbox: list[bytes] = []

    # -- main -> worker ------------------------------------------------------------------------------------

    def on_readable(self) -> None:
        while True:
            size = next_size(self.control)
            if size is None:
                return
            try:
                data, fds, _flags, _addr = socket.recv_fds(self.control, max(size, 1), 1)
            except OSError:
                data, fds = b"", []
            if not data:
                for fd in fds:
                    socket.socket(fileno=fd).close()
                self.loop.remove_reader(self.control.fileno())
                self.closed.set()
                return
            try:
                self.handle(msg.decode_to_worker(data), fds)
            except msg.BadMessage as exc:
                log.error("web worker %d: %s", self.index, exc)
                for fd in fds:
                    socket.socket(fileno=fd).close()
            except Exception:
                log.exception("web worker %d: a message failed", self.index)
                for fd in fds:
                    socket.socket(fileno=fd).close()

    def handle(self, message: object, fds: list[int]) -> None:
        match message:
            case msg.Conn(conn_id, name, peer, node, fresh):
                sock = stream_socket(fds[0])
                service = self.services.get(name)
                if service is None:  # the main process handed it just before a reload removed the service
                    sock.close()
                    self.send(msg.Ended(conn_id))
                    return
                lease = Lease(node, fresh, lambda new: self.send(msg.Bind(conn_id, new)))
                service.active += 1
                service.total += 1
                task = service.adopt(sock, (peer[0], peer[1]), lease, lambda: self.ended(conn_id))
                self.conns[conn_id] = (service, task)
            case msg.Abort(conn_id):
                entry = self.conns.get(conn_id)
                if entry is not None:
                    entry[1].cancel()
            case msg.State(by_service):
                for name, states in by_service.items():
                    service = self.services.get(name)
                    if service is None:
                        continue
                    by_name = {s.name: s for s in service.servers}
                    for state in states:
                        server = by_name.get(state.name)
                        if server is not None:
                            server.health, server.admin, server.weight = state.health, state.admin, state.weight
                            server.down_elsewhere = state.down_elsewhere
            case msg.Cut(name, node):
                # In the service of that name, and in one a reload retired that still has exchanges.
                cut = 0
                for service in [*self.retired, *self.services.values()]:
                    if service.name == name:
                        server = next((s for s in service.servers if s.name == node), None)
                        if server is not None:
                            cut += service.close_server_connections(server)
                self.send(msg.CutDone(name, node, cut))
            case msg.Stop(name):
                service = self.services.get(name)
                if service is not None:
                    service.stop_accepting()
            case msg.Configure(config):
                self.configure(config)

    def configure(self, config: Config) -> None:
        from pacslb.proxy.http import HttpService

        setup_logging(config.log.format, config.log.level)
        old = self.services
        services: dict[str, HttpService] = {}
        for name, spec in config.services.items():
            if spec.mode != "http":
                continue
            previous = old.get(name)
            kept = {s.name: s for s in previous.servers} if previous is not None else {}
            servers = []
            for node, server_spec in spec.servers.items():
                address = server_spec.address
                server = kept.get(node)
                if server is None or (server.host, server.port) != (address.host, address.port):
                    server = ServerState(node, address.host, address.port, server_spec.weight)
                servers.append(server)
            if previous is not None and not previous.stopping:
                previous.apply(spec, servers, None)
                services[name] = previous
            else:
                service = HttpService(name, spec, servers, None)
                service.worker = self.index
                service.on_connect_failed = self.connect_failed
                services[name] = service
        for name, service in old.items():
            if services.get(name) is not service:
                service.stop_accepting()
                self.retired.append(service)
        self.services = services

    # -- worker -> main ------------------------------------------------------------------------------------

    def send(self, message: msg.ToMain) -> None:
        data = msg.encode(message)
        if self.outbox:  # behind what waits already: the main process reads them in order
            self.outbox.append(data)
            return
        try:
            self.control.send(data)
        except BlockingIOError:
            # Rare (the main process is busy and its buffer full): sent with the next counts.
            self.outbox.append(data)
        except OSError:
            pass  # the main process is gone: this worker is stopping anyway

    def ended(self, conn_id: int) -> None:
        self.conns.pop(conn_id, None)
        self.send(msg.Ended(conn_id))

    def connect_failed(self, service: str, server: ServerState) -> None:
        self.send(msg.ConnectFailed(service, server.name))

    def report(self) -> None:
        """Send what the requests added to the counters since the last report."""
        while self.outbox:
            try:
                self.control.send(self.outbox[0])
            except BlockingIOError:
                break
            except OSError:
                self.outbox.clear()
                return
            self.outbox.pop(0)
        nodes: dict[str, dict[str, tuple[int, int, int, int]]] = {}
        rejections: dict[str, dict[str, int]] = {}
        current: set[ServerState] = set()
        for service in [*self.services.values(), *self.retired]:
            for server in service.servers:
                current.add(server)
                now = (server.active, server.total, server.bytes_up, server.bytes_down)
                before = self.reported.get(server, (0, 0, 0, 0))
                if now != before:
                    deltas = nodes.setdefault(service.name, {})
                    old = deltas.get(server.name, (0, 0, 0, 0))
                    deltas[server.name] = (
                        old[0] + now[0] - before[0], old[1] + now[1] - before[1],
                        old[2] + now[2] - before[2], old[3] + now[3] - before[3],
                    )  # fmt: skip
                    self.reported[server] = now
            if service.rejections:
                rejections[service.name] = dict(service.rejections)
                service.rejections.clear()
        if nodes or rejections:
            self.send(msg.Counts(nodes, rejections))
        self.retired = [s for s in self.retired if s.connections]
        for gone in [server for server in self.reported if server not in current]:
            del self.reported[gone]  # reported to the end above: no longer in any service

    async def run(self) -> None:
        self.control.setblocking(False)
        self.loop.add_reader(self.control.fileno(), self.on_readable)
        while not self.closed.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(COUNT_INTERVAL):
                    await self.closed.wait()
            self.report()
        # The main process stopped: no new requests; what is in progress ends (the main process closed
        # its side after its own grace, and the connections with it when it aborted them).
        services = [*self.services.values(), *self.retired]
        for service in services:
            service.stop_accepting()
        for service in services:
            if not await service.wait_drained(1.0):
                service.abort_all()
                await service.wait_drained(1.0)


def worker_main(fd: int, index: int) -> None:
    """Entry point of a web worker process."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    control = socket.socket(fileno=fd)

    async def main() -> None:
        await _Worker(control, index).run()

    try:
        import uvloop

        uvloop.run(main())
    except ImportError:  # pragma: no cover - uvloop is a dependency where pacslb runs
        asyncio.run(main())


if __name__ == "__main__":
    worker_main(int(sys.argv[1]), int(sys.argv[2]))
