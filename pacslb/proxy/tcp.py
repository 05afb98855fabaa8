"""A virtual service in tcp mode: accept, decide, connect (with retries), relay, log.

Theory of operation. For each accepted connection the service asks the decision code for a server
(persistence first, then the scheduler), connects to it within ``timeouts.connect``, and on failure asks
again excluding the servers already tried, at most ``retries`` more times, so a node that died a second
ago (before its health check noticed) costs the client nothing. Once connected, the two sockets go to the
relay, and the service only waits for its result to write the connection log line.

A tcp-mode connection is driven by callbacks (:class:`_TcpConn`): the event loop tells it when its
connect completes or times out, and the relay tells it how the connection ended. It holds no task and no
coroutine, which matters at thousands of new connections a second and at tens of thousands of idle ones.
The modes that read the client first (dicom, http) run a task per connection instead (``_handle``).

A service object lives across reloads: ``apply()`` swaps its spec, servers and scheduler in place, and
connections already relaying keep the server objects they were given.

Per-client limits (``limits``, decided by pacslb/balance/limits.py) are applied here, at accept, for every
mode: a connection over a limit never reaches the mode's handler. tcp mode closes it at once; dicom and
http mode tell it why first when they can (:class:`_Answer`: an A-ASSOCIATE-RJ, a 429), within a bounded
number of sockets held for that. The connection admitted is released when it ends, however it ends
(``client_of`` maps it to its client). Refusals are logged rate-limited (``client_limited`` lines).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any, Protocol

from pacslb.balance.claim import Claim, Claims
from pacslb.balance.decision import Attempts, Decision, choose
from pacslb.balance.limits import ClientLimits, Limit, RefusalLog, client_key, retry_after
from pacslb.balance.persistence import PersistenceTable, source_ip_key
from pacslb.balance.scheduler import Scheduler, make_scheduler
from pacslb.balance.server import ServerState
from pacslb.config.model import LimitsSpec, ServiceSpec
from pacslb.config.values import format_rate
from pacslb.descriptors import EXHAUSTION, LOCAL_ERRNOS, in_reserve
from pacslb.errors import ConnectFailed
from pacslb.logs import log_event
from pacslb.protocols.proxy import proxy_header
from pacslb.proxy.listener import Listener
from pacslb.proxy.outcome import End
from pacslb.proxy.relay import RelayCancelled, RelayResult, relay, start_relay

if TYPE_CHECKING:
    from pacslb.proxy.pumps import Abortable

log = logging.getLogger("pacslb.conn")
limits_log = logging.getLogger("pacslb.limits")

#: A client over a limit that is told so: how long pacslb waits for its first bytes (dicom: the
#: A-ASSOCIATE-RQ the rejection answers; a modality sends it within milliseconds of connecting), then how
#: long it lets the client read the answer and close before closing itself (PS3.8's ARTIM, http's linger:
#: closing with the client's bytes unread would reset the connection before the answer is read).
ANSWER_WAIT = 1.0
ANSWER_LINGER = 1.0
#: Persistence types that make an entry per calling AE title (whose count per client ``limits`` bounds).
AE_PERSISTENCE = frozenset({"calling_ae", "calling_ae+source_ip"})

#: How a :class:`ConnectFailed` reason starts when the failure was pacslb's own (out of descriptors or
#: socket memory), not the node's: such a failure neither wakes the node's check nor is logged per
#: connection (it is counted, and logged rate-limited, by pacslb/descriptors.py).
LOCAL_FAILURE = "local: "


class Relayer(Protocol):
    """relay() itself, or a relay pool's: relays two connected sockets until both directions are done."""

    def __call__(
        self, client: socket.socket, server: socket.socket, *, idle_timeout: float, timeout_end: End
    ) -> Awaitable[RelayResult]: ...


class RelayStarter(Protocol):
    """start_relay() itself, or a relay pool's: the same as a :class:`Relayer`, told by a callback."""

    def __call__(
        self,
        client: socket.socket,
        server: socket.socket,
        *,
        idle_timeout: float,
        timeout_end: End,
        on_done: Callable[[RelayResult], None],
    ) -> Abortable: ...


def _tune(sock: socket.socket) -> None:
    # Small DICOM PDUs and HTTP heads must not wait for Nagle; keepalive finds peers that vanished
    # during the hours an association may sit idle.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)


def bind_source(sock: socket.socket, source: str | None) -> None:
    """Make ``sock``'s connection come from ``source`` (the service's ``source`` address), on any port.
    IP_FREEBIND: a virtual IP that moves between balancers need not be on this host when the service
    starts. Raises OSError."""
    if source is not None:
        if hasattr(socket, "IP_FREEBIND"):
            sock.setsockopt(socket.SOL_IP, socket.IP_FREEBIND, 1)
        sock.bind((source, 0))


async def connect_to(server: ServerState, timeout: float, source: str | None = None) -> socket.socket:
    """A connected non-blocking socket to ``server`` (from ``source``, when given).

    Raises:
        ConnectFailed: refused, unreachable, or no answer within ``timeout`` seconds.
    """
    loop = asyncio.get_running_loop()
    family = socket.AF_INET6 if ":" in server.host else socket.AF_INET
    try:
        sock = socket.socket(family, socket.SOCK_STREAM)
    except OSError as exc:
        raise _local_failure(server, "connect", exc, loop) from exc
    if in_reserve(sock.fileno()):
        sock.close()
        raise _local_failure(server, "reserve", None, loop)
    sock.setblocking(False)
    try:
        bind_source(sock, source)
    except OSError as exc:
        sock.close()
        raise ConnectFailed(server.name, f"cannot connect from {source}: {exc.strerror or exc}") from exc
    try:
        async with asyncio.timeout(timeout):  # no extra task per connect, unlike wait_for
            await loop.sock_connect(sock, (server.host, server.port))
    except TimeoutError as exc:
        sock.close()
        raise ConnectFailed(server.name, f"no answer within {timeout:g}s") from exc
    except OSError as exc:
        sock.close()
        if exc.errno in LOCAL_ERRNOS:
            raise _local_failure(server, "connect", exc, loop) from exc
        raise ConnectFailed(server.name, exc.strerror or str(exc)) from exc
    except BaseException:
        sock.close()
        raise
    _tune(sock)
    return sock


def _local_failure(
    server: ServerState, place: str, exc: OSError | None, loop: asyncio.AbstractEventLoop
) -> ConnectFailed:
    """Count running out of descriptors on the way to ``server``; the error to raise (see :data:`LOCAL_FAILURE`)."""
    reason = (exc.strerror or str(exc)).lower() if exc is not None else "descriptor reserve reached"
    EXHAUSTION.note(place, reason, loop)
    return ConnectFailed(server.name, LOCAL_FAILURE + reason)


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
        self.tasks: set[asyncio.Task[None]] = set()  # connections with a task of their own (dicom, http)
        self.conns: set[_TcpConn] = set()  # tcp-mode connections (callbacks, no task)
        # Every connection's hold on its node, by node: a halt cuts them (pacslb/balance/claim.py).
        self.claims = Claims()
        self.halting: set[asyncio.Task[None]] = set()  # tasks being closed by a halt (logged end=halted)
        self._drained: asyncio.Future[None] | None = None  # see wait_drained()
        # Connections refused by the balancer itself, by the reason the log gives (metrics read it).
        self.rejections: Counter[str] = Counter()
        # Set by the engine: told when connecting to a server failed, to check it at once.
        self.on_connect_failed: Callable[[str, ServerState], None] | None = None
        # Set by the engine: what moves the bytes (here, or in a relay worker process).
        self.relayer: Relayer = relay
        self.starter: RelayStarter = start_relay
        # Set by the engine where other processes serve this mode too (http's web workers): gives a new
        # connection, admitted here, to one of them (True), or leaves it to this process (False).
        self.hand_over: Callable[[socket.socket, tuple[str, int]], bool] | None = None
        self._loop = asyncio.get_running_loop()
        # Per-client limits: the counts (kept across reloads), each admitted connection's client, the
        # client of the connection being started (see _admitted), and the rate-limited log of refusals.
        self.limits = ClientLimits(spec.limits, *_title_bounds(spec))
        self.client_of: dict[object, str] = {}
        self._admitting: str | None = None
        self.refusals = RefusalLog()
        self._refusal_timer: asyncio.TimerHandle | None = None

    # -- configuration -------------------------------------------------------------------------------

    def apply(self, spec: ServiceSpec, servers: list[ServerState], table: PersistenceTable | None) -> None:
        """Take a new spec (on reload). Open connections are not touched."""
        if spec.balance != self.spec.balance:
            self.scheduler = make_scheduler(spec.balance)
        self.spec = spec
        self.servers = servers
        self.table = table
        self.limits.configure(spec.limits, *_title_bounds(spec))
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
        limits = self.spec.limits
        if limits.client_maxconn is not None or limits.client_rate is not None:
            key = client_key(peer[0], limits)
            limit = self.limits.admit(key, self._loop.time())
            if limit is not None:
                self._over_limit(sock, key, limit)
                return
            self._admitting = key
        self.active += 1
        self.total += 1
        if self.active >= self.accept_limit and self.listener is not None:
            self.listener.pause()
        try:
            if self.hand_over is None or not self.hand_over(sock, peer):
                self._start(sock, peer)
        finally:
            if self._admitting is not None:  # no connection took it (a bug): let it go at once
                self.limits.release(self._admitting, self._loop.time())
                self._admitting = None

    def _admitted(self, item: object) -> None:
        """``item`` (a task, a tcp-mode connection, a connection handed to a web worker) is the connection
        being accepted: its end releases what the limits admitted."""
        key = self._admitting
        if key is not None:
            self._admitting = None
            self.client_of[item] = key

    def _release_client(self, item: object) -> None:
        if self.client_of:
            key = self.client_of.pop(item, None)
            if key is not None:
                self.limits.release(key, self._loop.time())

    # -- per-client limits -------------------------------------------------------------------------------

    def limit_answer(self) -> tuple[bytes, bool] | None:
        """What a client over a limit is told before its connection closes, and whether its first bytes are
        awaited first; None: closed at once (tcp mode has nothing to say; http over TLS cannot say it
        without a handshake)."""
        if self.spec.mode == "http" and (self.spec.http is None or self.spec.http.tls is None):
            return _http_too_many(retry_after(self.spec.limits)), False
        return None

    def _over_limit(self, sock: socket.socket, key: str, limit: Limit) -> None:
        """A new connection of client ``key`` is over ``limit``: answer it (bounded) or close it."""
        self.rejections["limit_" + limit.value] += 1
        answer = self.limit_answer()
        now = self._loop.time()
        self.refused(key, limit)
        if answer is None or not self.limits.answering(key, now):
            sock.close()
            return
        _Answer(self, sock, key, answer[0], answer[1]).start()

    def refused(self, who: str, limit: Limit) -> None:
        """Log a refusal, rate-limited: the first of ``who`` (a client, or for calling_ae_maxconn a calling
        AE title) for ``limit`` now, the next ones as counts (see :class:`RefusalLog`)."""
        now = self._loop.time()
        if self.refusals.note(who, limit, now):
            self._log_refused(who, limit, 1)
        elif self._refusal_timer is None:
            delay = self.refusals.next_due(now)
            if delay is not None:
                self._refusal_timer = self._loop.call_later(delay, self._flush_refused)

    def _flush_refused(self) -> None:
        self._refusal_timer = None
        now = self._loop.time()
        for who, limit, count in self.refusals.due(now):
            self._log_refused(who, limit, count)
        delay = self.refusals.next_due(now)
        if delay is not None:
            self._refusal_timer = self._loop.call_later(delay, self._flush_refused)

    def _log_refused(self, who: str, limit: Limit, count: int) -> None:
        limits = self.spec.limits
        fields: dict[str, object] = {"service": self.name}
        if limit is Limit.CALLING_AE_MAXCONN:
            fields["calling"] = who
        else:
            fields["client"] = _client_text(who, limits)
        answer = self.limit_answer()
        said = "closed" if answer is None else ("429" if self.spec.mode == "http" else "A-ASSOCIATE-RJ")
        fields.update(limit=limit.value, max=_limit_value(limits, limit), count=count, answer=said)
        log_event(limits_log, "client_limited", logging.WARNING, **fields)

    def _start(self, sock: socket.socket, peer: tuple[str, int]) -> None:
        conn = _TcpConn(self, sock, peer)
        self.conns.add(conn)
        self._admitted(conn)
        try:
            conn.start()
        except Exception:  # a bug: this client is lost, the service goes on
            log.exception("connection failed on service %s", self.name)
            conn.cancel(End.ERROR)

    def _spawn(self, handler: Coroutine[Any, Any, None]) -> None:
        """A task of its own for a connection's ``handler`` (the modes that read from the client before
        connecting)."""
        task = self._loop.create_task(handler)
        self.tasks.add(task)
        self._admitted(task)
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        self._release_client(task)
        self._left()

    def _conn_finished(self, conn: _TcpConn) -> None:
        if conn in self.conns:  # once per connection, whatever ended it
            self.conns.remove(conn)
            self._release_client(conn)
            self._left()

    def _left(self) -> None:
        self.active -= 1
        if self.listener is not None and self.active < self.accept_limit:
            self.listener.resume()
        self._check_drained()

    def _side_task_done(self, task: asyncio.Task[None]) -> None:
        """A task that is no connection of its own (an http redirect answer) ended."""
        self.tasks.discard(task)
        self._check_drained()

    def _check_drained(self) -> None:
        if self._drained is not None and not self.tasks and not self.conns and not self._drained.done():
            self._drained.set_result(None)

    @property
    def connections(self) -> int:
        """Connections open now (tasks and tcp-mode connections)."""
        return len(self.tasks) + len(self.conns)

    async def wait_drained(self, timeout: float) -> bool:
        """Wait until no connection is left, at most ``timeout`` seconds; whether none is left."""
        if not self.tasks and not self.conns:
            return True
        if self._drained is None or self._drained.done():
            self._drained = self._loop.create_future()
        try:
            async with asyncio.timeout(timeout):
                await asyncio.shield(self._drained)
        except TimeoutError:
            return False
        return True

    def abort_all(self) -> None:
        """The shutdown grace is over: close every connection still open."""
        for task in list(self.tasks):
            task.cancel()
        for conn in list(self.conns):
            conn.cancel(End.SHUTDOWN)

    def cancelled_end(self) -> End:
        """How a connection whose task was cancelled ended: by a halt of its node, or by the shutdown."""
        task = asyncio.current_task()
        return End.HALTED if task is not None and task in self.halting else End.SHUTDOWN

    def close_server_connections(self, server: ServerState) -> int:
        """Close every connection relaying to ``server`` (a halt's grace is over); returns how many."""
        return self.claims.cut(server)

    def connect_failed(self, peer: tuple[str, int], server: ServerState, reason: str, attempt: int) -> None:
        """Log a failed attempt and have the server checked at once (unless the failure was pacslb's own)."""
        if reason.startswith(LOCAL_FAILURE):
            return
        if self.on_connect_failed is not None:
            self.on_connect_failed(self.name, server)
        log_event(
            log, "connect_failed", logging.WARNING,
            service=self.name, client=addr_text(peer), server=server.name, address=server.address,
            reason=reason, attempt=attempt,
        )  # fmt: skip

    async def relay(
        self, client: socket.socket, server_sock: socket.socket, claim: Claim, key: str | None
    ) -> tuple[int, int, End]:
        """Relay a connection whose server was chosen (``claim``) and connected, binding the claim (the
        persistence entry of ``key``, the node's counters, a halt's cut) and releasing it at the end.
        Returns bytes up, bytes down, the end."""
        return await self.relay_with(
            lambda idle, end: self.relayer(client, server_sock, idle_timeout=idle, timeout_end=end), claim, key
        )

    async def relay_with(
        self, run: Callable[[float, End], Awaitable[RelayResult]], claim: Claim, key: str | None
    ) -> tuple[int, int, End]:
        """:meth:`relay`, with the relay that ``run(idle_timeout, timeout_end)`` runs (mode dicom's TLS
        associations: the buffered relay over their transports)."""
        loop = self._loop
        task = asyncio.current_task()
        claim.bind(self.table, key, loop.time(), _TaskCut(task, self.halting) if task is not None else None)
        timeouts = self.spec.timeouts
        idle = min(timeouts.client_idle, timeouts.server_idle)
        timeout_end = End.CLIENT_TIMEOUT if timeouts.client_idle <= timeouts.server_idle else End.SERVER_TIMEOUT
        up = down = 0
        end = End.ERROR
        try:
            result = await run(idle, timeout_end)
            up, down, end = result.bytes_up, result.bytes_down, result.end
        except RelayCancelled as exc:  # a halt or the shutdown: what was moved still counts
            up, down = exc.result.bytes_up, exc.result.bytes_down
            raise
        except Exception:
            log.exception("relay failed on service %s", self.name)
        finally:
            claim.release(loop.time(), up, down)
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


def _title_bounds(spec: ServiceSpec) -> tuple[float | None, int]:
    """How long a calling AE title counts for ``limits.client_ae_titles`` after its last association (the
    persistence timeout, when persistence makes an entry per AE title; else None: not counted), and the
    bound on the titles kept (the persistence table's)."""
    persistence = spec.persistence
    if spec.mode == "dicom" and persistence.type in AE_PERSISTENCE:
        return persistence.timeout, persistence.max_entries
    return None, persistence.max_entries


def _http_too_many(retry: int) -> bytes:
    """429 Too Many Requests (RFC 6585 section 4) with Retry-After, and the connection closes."""
    body = b"429 Too Many Requests\n"
    return (
        b"HTTP/1.1 429 Too Many Requests\r\nContent-Type: text/plain; charset=utf-8\r\n"
        b"Content-Length: %d\r\nCache-Control: no-store\r\nRetry-After: %d\r\nConnection: close\r\n\r\n%s"
        % (len(body), retry, body)
    )


def _client_text(key: str, limits: LimitsSpec) -> str:
    """A client key as the log names it: the address, or the network when several addresses share it."""
    if key == "others":
        return key
    prefix = limits.netmask6 if ":" in key else limits.netmask
    return key if prefix == (128 if ":" in key else 32) else f"{key}/{prefix}"


def _limit_value(limits: LimitsSpec, limit: Limit) -> str:
    if limit is Limit.CLIENT_RATE:
        rate = limits.client_rate
        return f"{format_rate(rate)},burst={limits.client_burst}" if rate is not None else "-"
    value = getattr(limits, limit.value, None)
    return "-" if value is None else str(value)


class _Answer:
    """A connection over a client limit, told why (an A-ASSOCIATE-RJ, a 429) and closed, by callbacks (no
    task: a flood must cost little). When the answer waits for the client's first bytes, it goes once they
    came (within :data:`ANSWER_WAIT`; a silent client is closed unanswered); then the write side is shut and
    what the client still sends is read and dropped until it closes, at most :data:`ANSWER_LINGER`."""

    __slots__ = ("answer", "fd", "key", "service", "sock", "timer", "waiting")

    def __init__(self, service: TcpService, sock: socket.socket, key: str, answer: bytes, wait: bool) -> None:
        self.service = service
        self.sock: socket.socket | None = sock
        self.fd = sock.fileno()
        self.key = key
        self.answer = answer
        self.waiting = wait
        self.timer: asyncio.TimerHandle | None = None

    def start(self) -> None:
        loop = self.service._loop
        try:
            loop.add_reader(self.fd, self._readable)
        except Exception:
            self.close()
            raise
        if self.waiting:
            self.timer = loop.call_later(ANSWER_WAIT, self._expired)
        else:
            self._send()

    def _expired(self) -> None:
        """The wait for the client's first bytes is over. Bytes that came in time but whose callback a busy
        loop has not run yet still get the answer; a silent client is closed unanswered."""
        self.timer = None
        self._readable()
        if self.waiting:
            self.close()

    def _send(self) -> None:
        sock = self.sock
        if sock is None:
            return
        self.waiting = False
        if self.timer is not None:
            self.timer.cancel()
        try:
            sock.send(self.answer)  # a few bytes into an empty socket buffer: sent whole
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            self.close()
            return
        self.timer = self.service._loop.call_later(ANSWER_LINGER, self.close)

    def _readable(self) -> None:
        sock = self.sock
        if sock is None:
            return
        try:
            data = sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.close()
            return
        if not data:
            self.close()
        elif self.waiting:
            self._send()

    def close(self) -> None:
        sock = self.sock
        if sock is None:  # once
            return
        self.sock = None
        service = self.service
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        service._loop.remove_reader(self.fd)
        sock.close()
        service.limits.answered(self.key, service._loop.time())


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
        "tried",
    )

    def __init__(self, service: TcpService, client: socket.socket, peer: tuple[str, int]) -> None:
        self.service = service
        self.client = client
        self.peer = peer
        self.started = service._loop.time()
        self.key: str | None = None
        self.attempts = Attempts(self._decide, service.spec.retries)
        self.tried = self.attempts.tried  # the servers that failed
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
        try:
            _tune(self.client)
        except OSError:
            pass  # the client is already gone: the relay will find out
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
            self._refuse(End.REFUSED if self.tried else End.NO_SERVER)
            return
        server = self.server = decision.server
        self.rule = decision.rule
        self.claim = service.claims.take(server)
        family = socket.AF_INET6 if ":" in server.host else socket.AF_INET
        try:
            sock = socket.socket(family, socket.SOCK_STREAM)
        except OSError as exc:
            self._out_of_descriptors("connect", (exc.strerror or str(exc)).lower())
            return
        if in_reserve(sock.fileno()):
            sock.close()
            self._out_of_descriptors("reserve", "descriptor reserve reached")
            return
        sock.setblocking(False)
        self.sock = sock
        try:
            bind_source(sock, service.spec.source)
            sock.connect((server.host, server.port))
        except (BlockingIOError, InterruptedError):
            loop.add_writer(sock.fileno(), self._connected)
            self.timer = loop.call_later(service.spec.timeouts.connect, self._timed_out)
            return
        except OSError as exc:
            if exc.errno in LOCAL_ERRNOS:
                sock.close()
                self.sock = None
                self._out_of_descriptors("connect", (exc.strerror or str(exc)).lower())
                return
            self._failed(exc.strerror or str(exc))
            return
        self._established()

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
            self.service._loop.remove_writer(self.sock.fileno())

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
        self.service._log(self.peer, None, None, self.started, 0, 0, end, len(self.tried))
        self.service._conn_finished(self)

    def _established(self) -> None:
        service = self.service
        server, sock = self.server, self.sock
        assert server is not None and sock is not None
        self.sock = None
        try:
            _tune(sock)
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
        service._log(
            self.peer, server, self.rule, self.started, result.bytes_up, result.bytes_down, end, len(self.tried)
        )
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
        self.service._log(self.peer, None, None, self.started, 0, 0, end, len(self.tried))
        self.service._conn_finished(self)


class _TaskCut:
    """How a halt cuts a connection served by a task: cancelled, and logged as halted."""

    __slots__ = ("halting", "task")

    def __init__(self, task: asyncio.Task[Any], halting: set[asyncio.Task[None]]) -> None:
        self.task = task
        self.halting = halting

    def cut_short(self) -> None:
        self.halting.add(self.task)
        self.task.add_done_callback(self.halting.discard)
        self.task.cancel()


def addr_text(peer: tuple[str, int]) -> str:
    host, port = peer[0], peer[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
