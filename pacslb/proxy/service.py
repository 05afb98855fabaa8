"""What every mode's virtual service is: a listener, its connections, their holds on the nodes, and limits.

Theory of operation. :class:`Service` is the part of a virtual service that does not depend on its mode:
it accepts from its listener up to ``maxconn`` connections (pausing the listener beyond), applies the
per-client limits (``limits``, decided by pacslb/balance/limits.py) before any mode sees a connection,
hands a connection to another process when the engine set a hand-over (http's web workers), keeps the
connections' holds on the nodes (:class:`~pacslb.balance.claim.Claims`, which a halt cuts), drains, and
aborts what is left at the end of the shutdown grace. The modes are its subclasses, siblings of each
other: tcp (pacslb/proxy/tcp.py), dicom (dicom.py) and http (http.py); each says how a connection starts
(:meth:`Service._start`).

A connection over a limit never reaches the mode: tcp mode closes it at once; dicom and http mode tell it
why first when they can (:class:`_Answer`: an A-ASSOCIATE-RJ, a 429), within a bounded number of sockets
held for that. The connection admitted is released when it ends, however it ends (``client_of`` maps it
to its client). Refusals are logged rate-limited (``client_limited`` lines).

A service object lives across reloads: ``apply()`` swaps its spec, servers and scheduler in place, and
connections already open keep the server objects they were given.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any, Protocol

from pacslb.balance.claim import Claims
from pacslb.balance.limits import ClientLimits, Limit, RefusalLog, client_key
from pacslb.balance.persistence import PersistenceTable
from pacslb.balance.scheduler import Scheduler, make_scheduler
from pacslb.balance.server import ServerState
from pacslb.config.model import LimitsSpec, ServiceSpec
from pacslb.config.values import format_rate
from pacslb.descriptors import EXHAUSTION, LOCAL_ERRNOS, in_reserve
from pacslb.errors import ConnectFailed
from pacslb.logs import log_event
from pacslb.proxy.listener import Listener, tune
from pacslb.proxy.outcome import End
from pacslb.proxy.relay import RelayResult, relay, start_relay

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


def bind_source(sock: socket.socket, source: str | None) -> None:
    """Make ``sock``'s connection come from ``source`` (the service's ``source`` address), on any port.

    IP_FREEBIND: a virtual IP that moves between balancers need not be on this host when the service
    starts. IP_BIND_ADDRESS_NO_PORT: the port is chosen by ``connect``, for the node's address and port, not
    by ``bind`` for every destination at once. Without it each connection from ``source`` holds a port of
    its own among all the nodes, and keeps it through TIME_WAIT (this side closes first whenever the client
    does, as a DICOM SCU does after A-RELEASE): the local port range (about 28,000) then bounds the
    connections a minute from ``source``, where with it each node has the whole range. Raises OSError."""
    if source is not None:
        if hasattr(socket, "IP_FREEBIND"):
            sock.setsockopt(socket.SOL_IP, socket.IP_FREEBIND, 1)
        if hasattr(socket, "IP_BIND_ADDRESS_NO_PORT"):
            sock.setsockopt(socket.SOL_IP, socket.IP_BIND_ADDRESS_NO_PORT, 1)
        sock.bind((source, 0))


async def connect_to(server: ServerState, timeout: float, source: str | None = None) -> socket.socket:
    """A connected non-blocking socket to ``server`` (from ``source``, when given).

    Raises:
        ConnectFailed: refused, unreachable, or no answer within ``timeout`` seconds.
    """
    loop = asyncio.get_running_loop()
    family = socket.AF_INET6 if ":" in server.host else socket.AF_INET
    try:
        sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)  # (no system call to set it)
    except OSError as exc:
        raise _local_failure(server, "connect", exc, loop) from exc
    if in_reserve(sock.fileno()):
        sock.close()
        raise _local_failure(server, "reserve", None, loop)
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
    tune(sock)
    return sock


def _local_failure(
    server: ServerState, place: str, exc: OSError | None, loop: asyncio.AbstractEventLoop
) -> ConnectFailed:
    """Count running out of descriptors on the way to ``server``; the error to raise (see :data:`LOCAL_FAILURE`)."""
    reason = (exc.strerror or str(exc)).lower() if exc is not None else "descriptor reserve reached"
    EXHAUSTION.note(place, reason, loop)
    return ConnectFailed(server.name, LOCAL_FAILURE + reason)


class Connection(Protocol):
    """A connection without a task of its own (tcp mode's, one handed to a web worker)."""

    def cancel(self, end: End) -> None:
        """Close it now (``end``: a halt, or the end of the shutdown grace); it then reports its end."""


class Service:
    """One virtual service, whatever its mode (see the module's docstring)."""

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
        self.conns: set[Connection] = set()  # connections without a task (tcp mode's, handed ones)
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
        self.claims.prune()
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

    #: What the log says a client over a limit was told, when :meth:`limit_answer` gives an answer.
    limit_word = "closed"

    def limit_answer(self) -> tuple[bytes, bool] | None:
        """What a client over a limit is told before its connection closes, and whether its first bytes are
        awaited first; None: closed at once (tcp mode has nothing to say)."""
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
        said = "closed" if answer is None else self.limit_word
        fields.update(limit=limit.value, max=_limit_value(limits, limit), count=count, answer=said)
        log_event(limits_log, "client_limited", logging.WARNING, **fields)

    def _start(self, sock: socket.socket, peer: tuple[str, int]) -> None:
        """Serve a connection this process accepted and admitted (the mode's part)."""
        raise NotImplementedError

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

    def _conn_finished(self, conn: Connection) -> None:
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


def _title_bounds(spec: ServiceSpec) -> tuple[float | None, int]:
    """How long a calling AE title counts for ``limits.client_ae_titles`` after its last association (the
    persistence timeout, when persistence makes an entry per AE title; else None: not counted), and the
    bound on the titles kept (the persistence table's)."""
    persistence = spec.persistence
    if spec.mode == "dicom" and persistence.type in AE_PERSISTENCE:
        return persistence.timeout, persistence.max_entries
    return None, persistence.max_entries


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

    def __init__(self, service: Service, sock: socket.socket, key: str, answer: bytes, wait: bool) -> None:
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


class TaskCut:
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
