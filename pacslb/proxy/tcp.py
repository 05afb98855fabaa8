"""A virtual service in tcp mode: accept, decide, connect (with retries), relay, log.

Theory of operation. For each accepted connection the service asks the decision code for a server
(persistence first, then the scheduler), connects to it within ``timeouts.connect``, and on failure asks
again excluding the servers already tried, at most ``retries`` more times (:class:`Attempts`), so a node
that died a second ago (before its health check noticed) costs the client nothing. Once connected, the two
sockets go to the relay, and the service only waits for its result to write the connection log line.

A tcp-mode connection is driven by callbacks (:class:`_TcpConn`): the event loop tells it when its
connect completes or times out, and the relay tells it how the connection ended. It holds no task and no
coroutine, which matters at thousands of new connections a second and at tens of thousands of idle ones.
The modes that read the client first (dicom, http) run a task per connection instead. What every mode
shares (the listener, maxconn, per-client limits, drain, halts) is :class:`~pacslb.proxy.service.Service`.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
from typing import TYPE_CHECKING

from pacslb.balance.claim import Claim
from pacslb.balance.decision import Attempts, Decision, choose
from pacslb.balance.persistence import source_ip_key
from pacslb.balance.server import ServerState
from pacslb.descriptors import EXHAUSTION, LOCAL_ERRNOS, in_reserve
from pacslb.logs import log_event
from pacslb.protocols.proxy import proxy_header
from pacslb.proxy.eventloop import hosted
from pacslb.proxy.listener import tune
from pacslb.proxy.outcome import End
from pacslb.proxy.relay import RelayResult
from pacslb.proxy.service import Service, addr_text, bind_source

if TYPE_CHECKING:
    from pacslb.proxy.pumps import Abortable

log = logging.getLogger("pacslb.conn")


class TcpService(Service):
    """One tcp-mode virtual service."""

    def _start(self, sock: socket.socket, peer: tuple[str, int]) -> None:
        conn = _TcpConn(self, sock, peer)
        self.conns.add(conn)
        self._admitted(conn)
        try:
            conn.start()
        except Exception:  # a bug: this client is lost, the service goes on
            log.exception("connection failed on service %s", self.name)
            conn.cancel(End.ERROR)

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
        if not log.isEnabledFor(level):
            return  # (before the fields are worked out: a line per connection, at thousands a second)
        log_event(
            log, "conn", level,
            service=self.name, client=addr_text(peer),
            server=server.name if server is not None else "-",
            address=server.address if server is not None else "-",
            rule=rule or "-", duration=self._loop.time() - started,
            bytes_up=up, bytes_down=down, end=end.value, retries=retries,
        )  # fmt: skip


class _TcpConn:
    """One tcp-mode connection: choose, connect (retrying on other servers), relay, account, log. Each
    step is a callback from the event loop or the relay."""

    __slots__ = (
        "attempts",
        "claim",
        "client",
        "ending",
        "handle",
        "key",
        "peer",
        "rule",
        "server",
        "service",
        "sock",
        "started",
        "timer",
    )

    def __init__(self, service: TcpService, client: socket.socket, peer: tuple[str, int]) -> None:
        self.service = service
        self.client = client
        self.peer = peer
        self.started = service._loop.time()
        self.key: str | None = None
        self.attempts = Attempts(self._decide, service.spec.retries)  # its ``tried``: the servers that failed
        self.server: ServerState | None = None  # the server being connected to, then relayed to
        self.claim: Claim | None = None  # its hold on that server
        self.rule = "-"
        self.sock: socket.socket | None = None  # the server socket while connecting
        self.timer: asyncio.TimerHandle | None = None  # the connect timeout
        self.handle: Abortable | None = None  # the relay, once connected
        self.ending: End | None = None  # how it is being closed (a halt, the shutdown), if it is

    def start(self) -> None:
        service = self.service
        spec = service.spec
        if service.table is not None:
            persistence = spec.persistence
            self.key = source_ip_key(self.peer[0], persistence.netmask, persistence.netmask6)
        self._next()

    def _decide(self, tried: list[ServerState]) -> Decision | None:
        service = self.service
        return choose(service.servers, service.scheduler, service.table, self.key, service._loop.time(), tried)

    def _next(self) -> None:
        """Choose a server (not one tried already) and connect to it."""
        service = self.service
        loop = service._loop
        decision = self.attempts.next()
        if decision is None:
            self._refuse(End.REFUSED if self.attempts.tried else End.NO_SERVER)
            return
        server = self.server = decision.server
        self.rule = decision.rule
        self.claim = service.claims.take(server)
        family = socket.AF_INET6 if ":" in server.host else socket.AF_INET
        try:
            sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)  # (no system call to set it)
        except OSError as exc:
            self._out_of_descriptors("connect", (exc.strerror or str(exc)).lower())
            return
        if in_reserve(sock.fileno()):
            sock.close()
            self._out_of_descriptors("reserve", "descriptor reserve reached")
            return
        self.sock = sock
        try:
            bind_source(sock, service.spec.source)
            # connect_ex: the usual answer, "in progress", as a number (an exception costs more than the call)
            err = sock.connect_ex((server.host, server.port))
        except OSError as exc:
            err = exc.errno or errno.EIO
        if err == errno.EINPROGRESS or err == errno.EAGAIN or err == errno.EINTR:
            hosted(loop).add_writer(sock.fileno(), self._connected)  # (on the relays' epoll set: see there)
            self.timer = loop.call_later(service.spec.timeouts.connect, self._timed_out)
        elif err == 0:
            self._established()
        elif err in LOCAL_ERRNOS:
            sock.close()
            self.sock = None
            self._out_of_descriptors("connect", os.strerror(err).lower())
        else:
            self._failed(os.strerror(err))

    def _out_of_descriptors(self, place: str, reason: str) -> None:
        """No socket to the node could be made: pacslb's failure, not the node's. The client is closed (which
        frees its descriptor), the node is neither marked as tried nor checked, and nothing is logged per
        connection: the count goes to the rate-limited ``descriptors_exhausted`` line and to the service's
        rejections (``no_descriptors``). Every listener stops accepting for a moment (pacslb/descriptors.py)."""
        service = self.service
        self._unclaim()
        self.client.close()
        service.rejections[End.NO_DESCRIPTORS.value] += 1
        EXHAUSTION.note(place, reason, service._loop)
        service._conn_finished(self)

    def _connected(self) -> None:
        sock = self.sock
        assert sock is not None
        self._stop_connecting()
        try:
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        except OSError as exc:
            err = exc.errno or 1
        if err:
            self._failed(os.strerror(err))
        else:
            self._established()

    def _timed_out(self) -> None:
        self.timer = None
        self._stop_connecting()
        self._failed(f"no answer within {self.service.spec.timeouts.connect:g}s")

    def _stop_connecting(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.sock is not None:
            hosted(self.service._loop).remove_writer(self.sock.fileno())

    def _unclaim(self) -> ServerState:
        """The server being connected to is not reached (or no longer wanted): give it back and return it."""
        server, claim = self.server, self.claim
        assert server is not None and claim is not None
        claim.release(self.service._loop.time())
        self.server = self.claim = None
        return server

    def _failed(self, reason: str) -> None:
        service = self.service
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        server = self._unclaim()
        service.connect_failed(self.peer, server, reason, self.attempts.failed())
        self._next()

    def _refuse(self, end: End) -> None:
        self.client.close()
        self.service._log(self.peer, None, None, self.started, 0, 0, end, len(self.attempts.tried))
        self.service._conn_finished(self)

    def _established(self) -> None:
        service = self.service
        server, sock = self.server, self.sock
        assert server is not None and sock is not None
        self.sock = None
        try:
            tune(sock)
            if service.spec.proxy_protocol == "v2":
                # A fresh socket's send buffer takes the header whole (at most 52 bytes).
                sock.send(proxy_header(self.peer, self.client.getsockname()))
        except OSError:
            pass  # the server or the client is already gone: the relay will find out
        assert self.claim is not None
        self.claim.bind(service.table, self.key, service._loop.time(), self)
        timeouts = service.spec.timeouts
        idle = min(timeouts.client_idle, timeouts.server_idle)
        timeout_end = End.CLIENT_TIMEOUT if timeouts.client_idle <= timeouts.server_idle else End.SERVER_TIMEOUT
        try:
            self.handle = service.starter(
                self.client, sock, idle_timeout=idle, timeout_end=timeout_end, on_done=self._relayed
            )
        except Exception:
            log.exception("relay failed on service %s", service.name)
            self.client.close()
            sock.close()
            self._relayed(RelayResult(0, 0, End.ERROR))

    def _relayed(self, result: RelayResult) -> None:
        service = self.service
        server, claim = self.server, self.claim
        assert server is not None and claim is not None
        self.handle = None
        claim.release(service._loop.time(), result.bytes_up, result.bytes_down)
        end = self.ending or result.end
        up, down, retries = result.bytes_up, result.bytes_down, len(self.attempts.tried)
        service._log(self.peer, server, self.rule, self.started, up, down, end, retries)
        service._conn_finished(self)

    def cut_short(self) -> None:
        self.cancel(End.HALTED)

    def cancel(self, end: End) -> None:
        """Close the connection now (a halt of its server, or the end of the shutdown grace)."""
        if self.ending is not None or self not in self.service.conns:
            return
        self.ending = end
        if self.handle is not None:
            self.handle.abort()  # the relay reports how it ended (perhaps from within this call)
            return
        if self.sock is not None:  # still connecting
            self._stop_connecting()
            self.sock.close()
            self.sock = None
            self._unclaim()
        self.client.close()
        self.service._log(self.peer, None, None, self.started, 0, 0, end, len(self.attempts.tried))
        self.service._conn_finished(self)
