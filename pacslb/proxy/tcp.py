"""A virtual service in tcp mode: accept, decide, connect (with retries), relay, log.

Theory of operation. For each accepted connection the service asks the decision code for a server
(persistence first, then the scheduler), connects to it within ``timeouts.connect``, and on failure asks
again excluding the servers already tried, at most ``retries`` more times, so a node that died a second
ago (before its health check noticed) costs the client nothing. Once connected, the two sockets go to the
relay, and the service only waits for its result to write the connection log line.

A service object lives across reloads: ``apply()`` swaps its spec, servers and scheduler in place, and
connections already relaying keep the server objects they were given.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Protocol

from pacslb.balance.decision import Decision, choose
from pacslb.balance.persistence import PersistenceTable, source_ip_key
from pacslb.balance.scheduler import Scheduler, make_scheduler
from pacslb.balance.server import ServerState
from pacslb.config.model import ServiceSpec
from pacslb.errors import ConnectFailed
from pacslb.logs import log_event
from pacslb.proxy.listener import Listener
from pacslb.proxy.outcome import End
from pacslb.proxy.relay import RelayResult, relay

log = logging.getLogger("pacslb.conn")


class Relayer(Protocol):
    """relay() itself, or a relay pool's: relays two connected sockets until both directions are done."""

    def __call__(
        self, client: socket.socket, server: socket.socket, *, idle_timeout: float, timeout_end: End
    ) -> Awaitable[RelayResult]: ...


def _tune(sock: socket.socket) -> None:
    # Small DICOM PDUs and HTTP heads must not wait for Nagle; keepalive finds peers that vanished
    # during the hours an association may sit idle.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)


async def connect_to(server: ServerState, timeout: float) -> socket.socket:
    """A connected non-blocking socket to ``server``.

    Raises:
        ConnectFailed: refused, unreachable, or no answer within ``timeout`` seconds.
    """
    loop = asyncio.get_running_loop()
    family = socket.AF_INET6 if ":" in server.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        async with asyncio.timeout(timeout):  # no extra task per connect, unlike wait_for
            await loop.sock_connect(sock, (server.host, server.port))
    except TimeoutError as exc:
        sock.close()
        raise ConnectFailed(server.name, f"no answer within {timeout:g}s") from exc
    except OSError as exc:
        sock.close()
        raise ConnectFailed(server.name, exc.strerror or str(exc)) from exc
    except BaseException:
        sock.close()
        raise
    _tune(sock)
    return sock


class TcpService:
    """One tcp-mode virtual service."""

    def __init__(
        self,
        name: str,
        spec: ServiceSpec,
        servers: list[ServerState],
        table: PersistenceTable | None,
    ) -> None:
        self.name = name
        self.spec = spec
        self.servers = servers
        self.table = table
        self.scheduler: Scheduler = make_scheduler(spec.balance)
        self.listener: Listener | None = None
        self.active = 0
        self.total = 0
        self.tasks: set[asyncio.Task[None]] = set()
        # Connections relaying to each server (their handler tasks), so that a halt can close them.
        self.by_server: dict[ServerState, set[asyncio.Task[None]]] = {}
        self.halting: set[asyncio.Task[None]] = set()  # tasks being closed by a halt (logged end=halted)
        # Connections refused by the balancer itself, by the reason the log gives (metrics read it).
        self.rejections: Counter[str] = Counter()
        # Set by the engine: told when connecting to a server failed, to check it at once.
        self.on_connect_failed: Callable[[str, ServerState], None] | None = None
        # Set by the engine: what moves the bytes (here, or in a relay worker process).
        self.relayer: Relayer = relay
        self._loop = asyncio.get_running_loop()

    # -- configuration -------------------------------------------------------------------------------

    def apply(self, spec: ServiceSpec, servers: list[ServerState], table: PersistenceTable | None) -> None:
        """Take a new spec (on reload). Open connections are not touched."""
        if spec.balance != self.spec.balance:
            self.scheduler = make_scheduler(spec.balance)
        self.spec = spec
        self.servers = servers
        self.table = table
        self._update_accepting()

    def attach(self, listener: Listener) -> None:
        if self.listener is not None and self.listener is not listener:
            self.listener.close()
        self.listener = listener
        self._update_accepting()

    def stop_accepting(self) -> None:
        if self.listener is not None:
            self.listener.close()
            self.listener = None

    @property
    def accept_limit(self) -> int:
        """Connections held at once before the listener pauses (tcp: exactly maxconn)."""
        return self.spec.maxconn

    def _update_accepting(self) -> None:
        if self.listener is None:
            return
        if self.active >= self.accept_limit:
            self.listener.pause()
        else:
            self.listener.resume()

    # -- connections ---------------------------------------------------------------------------------

    def accept(self, sock: socket.socket, peer: tuple[str, int]) -> None:
        """Called by the listener for each new connection."""
        self.active += 1
        self.total += 1
        if self.active >= self.accept_limit and self.listener is not None:
            self.listener.pause()
        task = self._loop.create_task(self._handle(sock, peer))
        self.tasks.add(task)
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        self.active -= 1
        if self.listener is not None and self.active < self.accept_limit:
            self.listener.resume()

    async def _handle(self, client: socket.socket, peer: tuple[str, int]) -> None:
        loop = self._loop
        started = loop.time()
        spec = self.spec
        table = self.table
        key = source_ip_key(peer[0], spec.persistence.netmask, spec.persistence.netmask6) if table is not None else None
        tried: list[ServerState] = []
        server_sock: socket.socket | None = None
        decision: Decision | None = None
        try:
            _tune(client)
            while server_sock is None:
                decision = choose(self.servers, self.scheduler, table, key, loop.time(), tried)
                if decision is None:
                    client.close()
                    end = End.REFUSED if tried else End.NO_SERVER
                    self._log(peer, None, None, started, 0, 0, end, len(tried))
                    return
                server = decision.server
                server.active += 1
                try:
                    server_sock = await connect_to(server, spec.timeouts.connect)
                except ConnectFailed as exc:
                    server.active -= 1
                    tried.append(server)
                    self.connect_failed(peer, server, exc.reason, len(tried))
                    if len(tried) > spec.retries:
                        client.close()
                        self._log(peer, None, None, started, 0, 0, End.REFUSED, len(tried))
                        return
        except BaseException:
            client.close()
            raise
        assert decision is not None
        server = decision.server
        up = down = 0
        end = End.ERROR
        try:
            up, down, end = await self.relay(client, server_sock, server, key)
        except asyncio.CancelledError:
            end = self.cancelled_end()
            raise
        finally:
            self._log(peer, server, decision.rule, started, up, down, end, len(tried))

    def cancelled_end(self) -> End:
        """How a connection whose task was cancelled ended: by a halt of its node, or by the shutdown."""
        task = asyncio.current_task()
        return End.HALTED if task is not None and task in self.halting else End.SHUTDOWN

    def close_server_connections(self, server: ServerState) -> int:
        """Close every connection relaying to ``server`` (a halt's grace is over); returns how many."""
        tasks = self.by_server.get(server, set())
        for task in tasks:
            self.halting.add(task)
            task.add_done_callback(self.halting.discard)
            task.cancel()
        return len(tasks)

    def connect_failed(self, peer: tuple[str, int], server: ServerState, reason: str, attempt: int) -> None:
        """Log a failed attempt and have the server checked at once."""
        if self.on_connect_failed is not None:
            self.on_connect_failed(self.name, server)
        log_event(
            log, "connect_failed", logging.WARNING,
            service=self.name, client=addr_text(peer), server=server.name, address=server.address,
            reason=reason, attempt=attempt,
        )  # fmt: skip

    async def relay(
        self, client: socket.socket, server_sock: socket.socket, server: ServerState, key: str | None
    ) -> tuple[int, int, End]:
        """Relay a connection whose server was chosen and connected (``server.active`` already counts it),
        keeping the persistence entry and the server's counters. Returns bytes up, bytes down, the end."""
        loop = self._loop
        table = self.table
        server.total += 1
        if table is not None and key is not None:
            table.acquire(key, server.name, loop.time())
        timeouts = self.spec.timeouts
        idle = min(timeouts.client_idle, timeouts.server_idle)
        timeout_end = End.CLIENT_TIMEOUT if timeouts.client_idle <= timeouts.server_idle else End.SERVER_TIMEOUT
        up = down = 0
        end = End.ERROR
        task = asyncio.current_task()
        relaying = self.by_server.get(server)
        if relaying is None:
            relaying = self.by_server[server] = set()
        if task is not None:
            relaying.add(task)
        try:
            result = await self.relayer(client, server_sock, idle_timeout=idle, timeout_end=timeout_end)
            up, down, end = result.bytes_up, result.bytes_down, result.end
        except Exception:
            log.exception("relay failed on service %s", self.name)
        finally:
            server.active -= 1
            server.bytes_up += up
            server.bytes_down += down
            relaying.discard(task)
            if not relaying and self.by_server.get(server) is relaying:
                del self.by_server[server]
            if table is not None and key is not None:
                table.release(key, server.name, loop.time())
        return up, down, end

    def _log(
        self,
        peer: tuple[str, int],
        server: ServerState | None,
        rule: str | None,
        started: float,
        up: int,
        down: int,
        end: End,
        retries: int,
    ) -> None:
        level = logging.INFO if server is not None else logging.WARNING
        if server is None:
            self.rejections[end.value] += 1
        log_event(
            log, "conn", level,
            service=self.name, client=addr_text(peer),
            server=server.name if server is not None else "-",
            address=server.address if server is not None else "-",
            rule=rule or "-", duration=self._loop.time() - started,
            bytes_up=up, bytes_down=down, end=end.value, retries=retries,
        )  # fmt: skip


def addr_text(peer: tuple[str, int]) -> str:
    host, port = peer[0], peer[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
