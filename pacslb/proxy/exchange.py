"""One client connection's HTTP exchanges, start to end: a state machine that does no I/O of its own.

Theory of operation.
- :class:`Exchange` serves the requests of one client connection, one after another: it waits for a
  request head, decides, takes a node connection (from the pool, or asks its :class:`Host` to connect,
  retrying on other nodes), sends the rewritten head and streams the request body, waits for the response
  head (forwarding interim 1xx), streams the response back, and starts over. Requests are answered strictly
  in order, so pipelined requests need nothing special: the ones behind wait, parsed, in the reader.
- Events in: bytes, end of input, loss and drain of either side (through :class:`Side`, the asyncio
  protocol that feeds each side's sans-IO reader from protocols/http1.py), the one timer, and the result of
  a connect. Commands out: writes and pauses on the sides' transports, and to the :class:`Host`: connect,
  log, and "this connection is over" (closed, refused with an answer, or become a tunnel). The machine
  never awaits; every wait is a state plus a deadline on its one timer, so an exchange costs no task and no
  coroutine, and the tests drive it with fake transports, a fake clock and a fake host.
- States: ``IDLE`` (waiting for a request head: the keep-alive timeout until its first byte, then the
  head timeout), ``CONNECTING`` (the host opens a node connection), ``BODY`` (the request body goes to the
  node), ``RESPONSE`` (waiting for the response head), ``STREAM`` (the response body goes to the client),
  ``ENDED`` (the host was told how the connection ends).
- Decision per request (balance/cookie.py): a valid persistence cookie naming a node that honours
  persistence, then the source-IP table, then the scheduler; a node that fails to connect is excluded and
  the decision taken again (:class:`~pacslb.balance.decision.Attempts`). When nothing is left: the
  fallback server, or 503 with the maintenance page.
- Once its node is chosen an exchange holds a :class:`~pacslb.balance.claim.Claim`: it counts the exchange
  on the node, holds the client's persistence entry, and is what a halt of the node cuts
  (:meth:`Record.cut_short` aborts the node connection; the machine then ends the exchange).
- Backpressure: a side stops reading while its reader holds more than :data:`HIGH_WATER` body bytes (or
  :data:`MAX_QUEUED_EVENTS` events); the machine stops taking from one side while the other's write buffer
  is above its high mark, and waits for it: a body of any size passes through a fixed amount of memory.
  A peer that reads slowly but reads is waited for; one that takes nothing for its timeout is cut.
- Node connections are pooled per node by :class:`Upstream` (LIFO; each closed after
  ``http.timeouts.pool_idle``; a sweep a few times per ``pool_idle`` closes those beyond
  ``http.pool_size`` that went unused since the last sweep, so the connections of one burst serve the
  next). A connection goes back to the pool only when its response was read to the end, the node allows
  keep-alive and it sent nothing extra. A request without a body that fails on a reused connection before
  any response byte (the node closed it while idle) is sent once more on a fresh connection.
- ``Expect: 100-continue`` is answered by the balancer once the node's connection is ready, and the
  expectation is not forwarded (as nginx does): the body then streams straight to the node.
- ``Upgrade`` (WebSocket): the request goes to the node with its Upgrade fields; on 101 the machine ends
  and the host turns the two connections into a tunnel.

(The classes made per connection or per request are written out rather than dataclasses: compiled with
mypyc, a dataclass's generated ``__init__`` runs as interpreted Python.)
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import struct
import termios
from collections.abc import Callable, Sequence
from typing import Final, Protocol, cast

from pacslb.balance.claim import Claim, Claims
from pacslb.balance.cookie import CookieCodec, choose_with_cookie
from pacslb.balance.decision import Attempts, Decision
from pacslb.balance.persistence import PersistenceTable, source_ip_key
from pacslb.balance.scheduler import Scheduler
from pacslb.balance.server import ServerState
from pacslb.config.model import HttpSpec, ServiceSpec
from pacslb.logs import log_event
from pacslb.protocols.http1 import (
    CookieAttributes,
    CookieMemo,
    EndOfMessage,
    Event,
    Forwarding,
    Framing,
    Headers,
    HttpProtocolError,
    RequestHead,
    RequestReader,
    RequestRewrite,
    ResponseHead,
    ResponseReader,
    chunk,
    last_chunk,
    make_private,
    proxy_request_head,
    proxy_response_head,
    request_cookie_values,
    serialize_head,
    set_cookie,
    simple_response,
)
from pacslb.proxy.outcome import End

log: Final = logging.getLogger("pacslb.http")

#: A side stops reading while its reader holds this many body bytes not yet forwarded: enough for the
#: kernel to keep a gigabit link busy between two wakeups, small enough that 4096 clients cannot make
#: pacslb hold much (256 KiB each at most, per direction).
HIGH_WATER: Final = 256 * 1024
#: ... and reads again once the machine has taken it below this.
LOW_WATER = 64 * 1024
#: A side also stops reading while this many parsed events wait: a client pipelining thousands of tiny
#: requests without reading the answers cannot make the queue grow.
MAX_QUEUED_EVENTS: Final = 64
#: Most interim (1xx) responses a node may send before its final one: a node that streams them for ever
#: would otherwise hold the exchange open without end. (Real ones send one or two: 100, 103.)
MAX_INTERIM = 100
#: Write buffer limits of each transport (asyncio's default high mark is 64 KiB): past the high mark the
#: machine waits for the peer to read; a larger buffer means fewer wakeups for bulk bodies.
WRITE_HIGH = 512 * 1024
WRITE_LOW = 128 * 1024
#: Body data gathered into one write when several events are ready at once.
GATHER_BYTES: Final = 256 * 1024
#: How an exchange that was served ends (read per request: a constant, not the enum's attribute).
_OK: Final = End.OK
#: How often a flush looks at a transport's write buffer when the transport does not say it is empty.
FLUSH_POLL = 0.01
#: The pools are swept for connections idle past ``pool_idle`` this many times per ``pool_idle``.
POOL_SWEEPS = 4
#: A wait whose deadline is this close when its timer fires times out (the loop's timers have millisecond
#: resolution: re-arming for less would only spin).
TIMER_SLACK: Final = 0.001
#: Longest maintenance page served (it is held in memory and sent with every 503).
MAX_PAGE_SIZE = 1024 * 1024
#: Interim response written to a client that sent Expect: 100-continue.
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"

# The machine's states (see the module's docstring).
IDLE: Final = 0
CONNECTING: Final = 1
BODY: Final = 2
RESPONSE: Final = 3
STREAM: Final = 4
ENDED: Final = 5

# What the machine waits for, in BODY, RESPONSE and STREAM (its deadline belongs to that wait).
_NOTHING: Final = 0
_CLIENT_READ: Final = 1  # more of the request body (``timeouts.client`` from the last byte)
_NODE_READ: Final = 2  # the node's response (``timeouts.server`` from the last byte)
_CLIENT_DRAIN: Final = 3  # the client to take what was written to it (``timeouts.client`` without progress)
_NODE_DRAIN: Final = 4  # the node to take the request body (``timeouts.server`` without progress)

# How a connection ends (Exchange.how), for the host.
CLOSE: Final = 0  # closed (after the last answer)
ABORT: Final = 1  # reset: an answer was cut short, or the service stopped
REFUSE: Final = 2  # the balancer's own answer (Exchange.refusal), then closed
TUNNEL: Final = 3  # a 101 response (Exchange.response): the connections become a tunnel

_ERROR_BODIES = {
    400: "400 Bad Request: the request is not valid HTTP/1.1.\n",
    408: "408 Request Timeout: the request did not arrive in time.\n",
    431: "431 Request Header Fields Too Large.\n",
    502: "502 Bad Gateway: the PACS node did not answer properly.\n",
    503: "503 Service Unavailable: no PACS node can serve this request now; please retry shortly.\n",
    504: "504 Gateway Timeout: the PACS node did not answer in time.\n",
}


def error_response(status: int, *, extra: Sequence[tuple[bytes, bytes]] = (), head_only: bool = False) -> bytes:
    """The balancer's own answer with ``status``."""
    body = _ERROR_BODIES.get(status, "").encode()
    return simple_response(status, body, extra=list(extra), head_only=head_only)


def _complete(events: list[Event]) -> bool:
    """Whether the message whose head was just taken from a reader ends among its queued ``events``."""
    return any(type(event) is EndOfMessage for event in events)


def quiet(record: Record) -> bool:
    """Whether the log line of ``record`` would be dropped: the usual exchange, and no info lines wanted."""
    return 0 < record.status < 500 and record.end is _OK and not record.halted and not log.isEnabledFor(logging.INFO)


class Host(Protocol):
    """What the machine asks of the service that runs it (the commands that are I/O)."""

    def connect(self, exchange: Exchange, server: ServerState) -> None:
        """Open a connection to ``server``, then tell ``exchange``: :meth:`Exchange.connected` or
        :meth:`Exchange.connect_failed`. (Not called again before one of them.)"""

    def connect_failed(self, peer: tuple[str, int], server: ServerState, reason: str, attempt: int) -> None:
        """A node could not be connected to (for the log and the node's failure count)."""

    def log(self, record: Record) -> None:
        """Write the ``request`` log line of one exchange."""

    def ended(self, exchange: Exchange) -> None:
        """The machine is over: end the connection as ``exchange.how`` says."""


class Side(asyncio.Protocol):
    """One connection (to a client or to a node): its transport, its reader, and who to tell of events.

    While an :class:`Exchange` runs the connection, it is told of every event. Otherwise (a pooled node
    connection, a tunnel being set up, a refusal lingering) a coroutine may wait on the side (:meth:`wait`).
    """

    __slots__ = (
        "deadline",
        "eof",
        "error",
        "exchange",
        "held",
        "loop",
        "lost",
        "paused",
        "reader",
        "timer",
        "timer_at",
        "transport",
        "waiter",
        "write_paused",
    )

    def __init__(self, loop: asyncio.AbstractEventLoop, reader: RequestReader | ResponseReader | None) -> None:
        self.loop = loop
        self.reader = reader
        self.transport: asyncio.Transport | None = None
        self.waiter: asyncio.Future[None] | None = None
        self.error: HttpProtocolError | None = None
        self.eof = False
        self.lost = False
        self.paused = False
        self.write_paused = False
        self.held: bytearray | None = None  # leaving HTTP for a tunnel: what arrives is kept for the tunnel
        self.exchange: Exchange | None = None  # the machine told of events on this side
        # The timeout of a coroutine's wait (see wait()): one timer per side, re-armed only when it fires
        # early or a wait needs it sooner.
        self.deadline = 0.0
        self.timer: asyncio.TimerHandle | None = None
        self.timer_at = 0.0

    # -- protocol callbacks --------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(WRITE_HIGH, WRITE_LOW)

    def data_received(self, data: bytes) -> None:
        if self.held is not None:
            self.held += data
            return
        reader = self.reader
        if reader is None or self.error is not None:
            self.unexpected(data)
            return
        try:
            reader.feed(data)
        except HttpProtocolError as exc:
            self.error = exc
            self.pause()
        else:
            if reader.body_bytes > HIGH_WATER or len(reader.events) > MAX_QUEUED_EVENTS:
                self.pause()
        self.changed(True)

    def unexpected(self, data: bytes) -> None:
        """Bytes when none were expected (a pooled node connection): the connection is unusable."""
        self.close()

    def eof_received(self) -> bool:
        self.eof = True
        self.changed(True)
        return True  # keep the transport: the other direction may still be needed (half-close)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.eof = True
        if self.timer is not None:  # a coroutine still waiting wakes up, sees ``lost`` and leaves
            self.timer.cancel()
            self.timer = None
        self.changed(True)

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        self.changed(False)

    def changed(self, read: bool) -> None:
        """Something happened on this side (``read``: it sent something, or closed)."""
        exchange = self.exchange
        if exchange is not None:
            exchange.event(self, read)
        else:
            self.wake()

    # -- for the machine -------------------------------------------------------------------------------------

    def pause(self) -> None:
        if not self.paused and self.transport is not None and not self.lost:
            self.paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if self.paused and self.transport is not None and not self.lost:
            self.paused = False
            self.transport.resume_reading()

    def take(self) -> Event | None:
        """The next parsed event, reading more when the reader's queue has room again."""
        reader = self.reader
        assert reader is not None
        event = reader.take()
        if self.paused:
            self.take_resume()
        return event

    def take_resume(self) -> None:
        """Read again if the reader's queue has room (once events were taken from it)."""
        reader = self.reader
        if (
            self.paused
            and self.error is None
            and reader is not None
            and reader.body_bytes < LOW_WATER
            and len(reader.events) < 8
        ):
            self.resume()

    def write(self, data: bytes) -> None:
        transport = self.transport
        if transport is not None and not self.lost and not transport.is_closing():
            transport.write(data)

    def unsent(self) -> int:
        """Bytes written that the peer has not taken yet: the transport's buffer, plus the kernel's send
        queue (which a slow reader drains long before the kernel takes more from the transport)."""
        transport = self.transport
        if transport is None:
            return 0
        size = transport.get_write_buffer_size()
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError, ValueError):
                size += struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0"))[0]
        return size

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None and not self.lost:
            self.transport.abort()

    # -- for a coroutine (no exchange running the side) --------------------------------------------------

    def wake(self) -> None:
        waiter = self.waiter
        if waiter is not None:
            self.waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def wait(self, timeout: float) -> asyncio.Future[None]:
        """Something to await until something happens on this side; it raises TimeoutError after ``timeout``
        seconds."""
        loop = self.loop
        deadline = self.deadline = loop.time() + timeout
        if self.timer is None or self.timer_at > deadline:
            if self.timer is not None:
                self.timer.cancel()
            self.timer = loop.call_at(deadline, self._tick)
            self.timer_at = deadline
        waiter = self.waiter = loop.create_future()
        return waiter

    def _tick(self) -> None:
        """The timer: the current wait times out if its deadline has come, else the timer waits for it."""
        self.timer = None
        waiter = self.waiter
        if waiter is None or waiter.done():
            return  # nobody is waiting: the next wait arms the timer again
        if self.deadline - self.loop.time() <= TIMER_SLACK:
            self.waiter = None
            waiter.set_exception(TimeoutError())
        else:
            self.timer = self.loop.call_at(self.deadline, self._tick)
            self.timer_at = self.deadline

    async def next_event(self, timeout: float) -> Event | None:
        """The next event; None when the peer closed.

        Raises:
            HttpProtocolError: the peer sent something malformed or too large.
            TimeoutError: nothing within ``timeout`` seconds.
        """
        while True:
            event = self.take()
            if event is not None:
                return event
            if self.error is not None:
                raise self.error
            if self.eof:
                return None
            await self.wait(timeout)

    async def flush(self, timeout: float) -> None:
        """Until everything written reached the kernel (before the socket leaves its transport).

        Raises:
            TimeoutError: the peer read nothing for ``timeout`` seconds.
        """
        transport = self.transport
        if transport is None or self.lost:
            return
        # With a high mark of 0 the transport tells us (resume_writing) as soon as its buffer is empty; the
        # short polls cover a transport that does not.
        transport.set_write_buffer_limits(0, 0)
        deadline = self.loop.time() + timeout
        while not self.lost and transport.get_write_buffer_size() > 0:
            remaining = deadline - self.loop.time()
            if remaining <= 0:
                raise TimeoutError
            with contextlib.suppress(TimeoutError):
                await self.wait(min(remaining, FLUSH_POLL))


class Client(Side):
    """A client connection: a :class:`Side` with what its requests share."""

    __slots__ = ("cookies", "idle_from", "key", "key_spec", "lease", "peer", "served", "text")

    def __init__(
        self, loop: asyncio.AbstractEventLoop, reader: RequestReader, peer: tuple[str, int], text: str
    ) -> None:
        super().__init__(loop, reader)
        self.peer = peer
        self.text = text  # its address as the log shows it
        self.key: str | None = None  # its source-IP persistence key...
        self.key_spec: ServiceSpec | None = None  # ... as worked out for this spec (a reload may change it)
        self.idle_from = loop.time()  # when it last had nothing to do (its keep-alive timeout counts from here)
        self.served = 0  # requests taken from it
        # In an HTTP worker process: its view of the persistence table (see balance/persistence.py, Lease).
        self.lease: PersistenceTable | None = None
        self.cookies = CookieMemo()  # its last Cookie field, read once


class NodeConn(Side):
    """A keep-alive connection to a node: a :class:`Side` that can rest in the pool."""

    __slots__ = ("idle_since", "pool", "responses", "server", "uses")

    def __init__(self, loop: asyncio.AbstractEventLoop, server: ServerState) -> None:
        super().__init__(loop, None)
        self.server = server
        self.pool: Pool | None = None  # the pool it rests in, while idle
        self.idle_since = 0.0  # when it went into the pool
        self.responses: ResponseReader | None = None  # its reader, kept for the next request while pooled
        self.uses = 0

    def unexpected(self, data: bytes) -> None:
        self.leave_pool()
        self.close()

    def eof_received(self) -> bool:
        if self.pool is not None:  # the node closed an idle connection: forget it
            self.leave_pool()
            self.close()
        return super().eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self.leave_pool()
        super().connection_lost(exc)

    def leave_pool(self) -> None:
        pool = self.pool
        if pool is not None:
            with contextlib.suppress(ValueError):
                pool.conns.remove(self)
            pool.low = min(pool.low, len(pool.conns))
            self.pool = None


class Pool:
    """The idle connections to one node, least recently used first (a request takes the last one)."""

    __slots__ = ("conns", "low")

    def __init__(self) -> None:
        self.conns: list[NodeConn] = []
        #: The fewest connections it held since the last sweep: so many at its start went unused all along.
        self.low = 0


class Record:
    """What the ``request`` log line of one exchange will say (and how to cut the exchange short)."""

    def __init__(
        self,
        client: str,
        method: str = "-",
        target: bytes = b"",
        server: str = "-",
        rule: str = "-",
        started: float = 0.0,
    ) -> None:
        self.client = client
        self.method = method
        self.target = target  # the request target; the log shows its path (target_path)
        self.server = server
        self.rule = rule
        self.status = 0
        self.bytes_up = 0
        self.bytes_down = 0
        self.reused = False
        self.retries = 0
        self.started = started
        self.connected = 0.0
        self.responded = 0.0
        self.end: End = _OK
        self.detail = ""
        self.conn: NodeConn | None = None  # the node connection in use, aborted when the exchange is cut
        self.cut: Callable[[], None] | None = None  # ends a tunnel (else cutting aborts ``conn``)
        self.halted = False  # cut by a halt of its node (logged as end=halted)

    def cut_short(self) -> None:
        """A halt's grace is over: end the exchange now."""
        self.halted = True
        if self.cut is not None:
            self.cut()
        elif self.conn is not None:
            self.conn.abort()


class Settings:
    """What a spec means for the exchanges, worked out once per config (not per request)."""

    def __init__(self, name: str, spec: ServiceSpec) -> None:
        http = spec.http or HttpSpec()
        self.http = http
        # The values read on every request, as plain attributes: reading them through the config's models
        # costs a Python-level attribute hook each time.
        timeouts = http.timeouts
        self.server_timeout = timeouts.server
        self.client_timeout = timeouts.client
        self.keep_alive = timeouts.keep_alive
        self.request_head = timeouts.request_head
        self.pool_idle = timeouts.pool_idle
        self.pool_size = http.pool_size
        self.max_head_size = http.limits.max_head_size
        self.max_headers = http.limits.max_headers
        self.nocache = http.cookie.nocache
        self.indirect = http.cookie.indirect
        self.retries = spec.retries
        persistence = spec.persistence
        self.cookie_name = persistence.cookie if persistence.type in ("cookie", "cookie+source_ip") else None
        self.cookie_bytes = self.cookie_name.encode() if self.cookie_name else b""
        self.use_table = persistence.type in ("source_ip", "cookie+source_ip")
        self.codec = CookieCodec(name, spec.servers, http.cookie.secret)
        cookie = http.cookie
        tls = http.tls is not None
        self.cookie_attributes = CookieAttributes(
            path=cookie.path,
            domain=cookie.domain,
            max_age=int(cookie.max_age) if cookie.max_age is not None else None,
            httponly=cookie.httponly,
            secure=cookie.secure == "always" or (cookie.secure == "auto" and tls),
            samesite=cookie.samesite,
        )
        forward = http.forward
        self.forwarding = Forwarding(
            forward.x_forwarded_for, forward.x_forwarded_proto, forward.x_forwarded_host, forward.forwarded
        )
        self.proto = "https" if tls else "http"
        self.rewrite = RequestRewrite(
            self.forwarding, self.proto, self.cookie_bytes if self.cookie_name and cookie.indirect else None
        )
        # Per node: its cookie value as a client sends it back, and the Set-Cookie field that gives it.
        self.cookies: dict[str, tuple[bytes, tuple[bytes, bytes]]] = {}
        if self.cookie_name is not None:
            for node, value in self.codec.by_node.items():
                field = (b"Set-Cookie", set_cookie(self.cookie_name, value, self.cookie_attributes))
                self.cookies[node] = (value.encode(), field)
        self.page: bytes | None = None
        if http.maintenance_page is not None:
            try:
                with open(http.maintenance_page, "rb") as f:
                    self.page = f.read(MAX_PAGE_SIZE)
            except OSError as exc:
                log_event(
                    log, "maintenance_page_error", logging.ERROR,
                    service=name, file=http.maintenance_page, reason=exc.strerror or str(exc),
                )  # fmt: skip
        self.fallback = (
            ServerState("fallback", http.fallback.host, http.fallback.port) if http.fallback is not None else None
        )


class Upstream:
    """What the exchanges of one service share: its settings, its nodes (servers, scheduler, persistence
    table, claims), the pools of idle node connections, and the host that does their I/O."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        host: Host,
        name: str,
        spec: ServiceSpec,
        servers: list[ServerState],
        scheduler: Scheduler,
        table: PersistenceTable | None,
        claims: Claims,
    ) -> None:
        self.loop = loop
        self.host = host
        self.name = name
        self.claims = claims
        self.pools: dict[ServerState, Pool] = {}
        self.stopping = False
        self.exchanges: set[Exchange] = set()  # of the connections open (on stop, the idle ones close at once)
        self.sweeper: asyncio.TimerHandle | None = None  # closes idle pooled connections (see sweep)
        self.spec = spec
        self.servers = servers
        self.scheduler = scheduler
        self.table = table
        self.settings = Settings(name, spec)

    def apply(
        self, spec: ServiceSpec, servers: list[ServerState], scheduler: Scheduler, table: PersistenceTable | None
    ) -> None:
        """A reload: the exchanges from now on follow ``spec``; the pools of nodes taken out are closed."""
        self.spec, self.servers, self.scheduler, self.table = spec, servers, scheduler, table
        self.settings = Settings(self.name, spec)
        for server in [s for s in self.pools if s not in servers]:
            self.close_pool(server)

    def stop(self) -> None:
        """The service stops: idle clients are let go, pooled connections closed, and no more pooled."""
        self.stopping = True
        for exchange in list(self.exchanges):
            exchange.advance()
        for server in list(self.pools):
            self.close_pool(server)
        if self.sweeper is not None:
            self.sweeper.cancel()
            self.sweeper = None

    def close_pool(self, server: ServerState) -> None:
        pool = self.pools.pop(server, None)
        for conn in list(pool.conns) if pool is not None else []:
            conn.leave_pool()
            conn.close()

    def pooled(self, server: ServerState, now: float) -> NodeConn | None:
        """The most recently used idle connection to ``server`` (it is the least likely to have been closed
        by the node), or None. One idle for ``pool_idle`` or longer is never used (nor any older)."""
        pool = self.pools.get(server)
        if pool is None or not pool.conns:
            return None
        conns = pool.conns
        fresh_since = now - self.settings.pool_idle
        while conns:
            conn = conns.pop()
            conn.pool = None
            if len(conns) < pool.low:
                pool.low = len(conns)
            if (
                conn.idle_since > fresh_since
                and not conn.eof
                and not conn.lost
                and conn.transport is not None
                and not conn.transport.is_closing()
            ):
                return conn
            conn.close()
        return None

    def release(self, conn: NodeConn, reusable: bool, now: float) -> None:
        """Back to the pool when it can serve another request, closed otherwise."""
        conn.reader = None
        conn.exchange = None
        server = conn.server
        pool_size = self.settings.pool_size
        if not reusable or self.stopping or conn.eof or conn.lost or pool_size == 0 or server not in self.servers:
            conn.close()
            return
        pool = self.pools.get(server)
        if pool is None:
            pool = self.pools[server] = Pool()
        conn.resume()
        conn.pool = pool
        conn.idle_since = now
        pool.conns.append(conn)  # so every pool is ordered by idle_since, oldest first
        if self.sweeper is None:
            self.sweeper = self.loop.call_later(self.settings.pool_idle / POOL_SWEEPS, self.sweep)

    def sweep(self) -> None:
        """Close the pooled connections idle for ``pool_idle`` or longer, and those beyond ``pool_size`` that
        no request needed since the last sweep; again later while any is left.

        One timer for every pool, not one per connection (that would be a timer made and cancelled per
        request). A connection is closed within ``(1 + 1/POOL_SWEEPS) * pool_idle``; :meth:`pooled` never
        uses one older than ``pool_idle``. Connections beyond ``pool_size`` are closed here rather than as
        they come back, and only those a whole sweep period did not use (as HAProxy's idle connection
        purge): a busy node's connections come back in bursts (every response of one loop iteration at
        once), and closing the surplus of each burst made the next one open as many anew, at a cost far
        above that of a request.
        """
        self.sweeper = None
        settings = self.settings
        pool_idle = settings.pool_idle
        fresh_since = self.loop.time() - pool_idle
        left = False
        for pool in self.pools.values():
            conns = pool.conns
            unused = min(len(conns) - settings.pool_size, pool.low)  # beyond pool_size, and idle all period
            while conns and (unused > 0 or conns[0].idle_since <= fresh_since):
                oldest = conns.pop(0)  # the least recently used: the likeliest to be closed by the node
                oldest.pool = None
                oldest.close()
                unused -= 1
            pool.low = len(conns)
            left = left or bool(conns)
        if left and not self.stopping:
            self.sweeper = self.loop.call_later(pool_idle / POOL_SWEEPS, self.sweep)

    def client_key(self, client: Client) -> str | None:
        """The client's source-IP persistence key (None when the service keeps no table)."""
        spec = self.spec
        if client.key_spec is not spec:
            client.key_spec = spec
            if self.settings.use_table:
                persistence = spec.persistence
                client.key = source_ip_key(client.peer[0], persistence.netmask, persistence.netmask6)
            else:
                client.key = None
        return client.key

    def unavailable(self, head: RequestHead) -> bytes:
        """The 503 when no node can serve. The request body (if any) is not read: the connection closes."""
        settings = self.settings
        extra: Headers = [(b"Retry-After", str(int(settings.http.retry_after)).encode())]
        head_only = head.method == b"HEAD"
        if settings.page is not None:
            return simple_response(
                503, settings.page, content_type=b"text/html; charset=utf-8", extra=extra, head_only=head_only
            )
        return error_response(503, extra=extra, head_only=head_only)

    def cookie_field(self, server: ServerState, rule: str, offered: list[bytes]) -> tuple[bytes, bytes] | None:
        """The Set-Cookie field a response gets, when the client should get the persistence cookie: always
        (not indirect), or when the cookie it sent does not name the node that served it."""
        settings = self.settings
        if settings.cookie_name is None or rule == "fallback":
            return None
        cookie = settings.cookies.get(server.name)
        if cookie is None:  # a reload took the node out of the service during this exchange
            return None
        value, field = cookie
        if settings.indirect and value in offered:
            return None
        return field

    def with_cookie(self, headers: Headers, server: ServerState, rule: str, offered: list[bytes]) -> Headers:
        """``headers`` of a response plus the persistence cookie when the client should get it (see
        :meth:`cookie_field`), made uncacheable with ``nocache``."""
        cookie = self.cookie_field(server, rule, offered)
        if cookie is None:
            return headers
        headers.append(cookie)
        return make_private(headers) if self.settings.nocache else headers


class Abort(Exception):
    """The exchange cannot go on; the client connection ends (with ``response``, if any)."""

    def __init__(self, status: int, end: End, detail: str, response: bytes | None = None) -> None:
        self.status = status
        self.end = end
        self.detail = detail
        self.response = response


class Exchange:
    """The exchanges of one client connection, one at a time (see the module's docstring)."""

    def __init__(self, up: Upstream, client: Client) -> None:
        self.up = up
        self.client = client
        reader = client.reader
        assert isinstance(reader, RequestReader)
        self.requests = reader
        self.state = IDLE
        self.how = CLOSE  # once ENDED: how the connection ends
        self.refusal: bytes | None = None  # ... with this answer (REFUSE)
        self.response: ResponseHead | None = None  # ... or this 101 (TUNNEL)
        self.busy = False  # inside advance() (an event during it is seen by the loop there)
        self.again = False
        # The one timer: what the machine waits for, until when.
        self.waiting = _NOTHING
        self.deadline = 0.0
        self.pending = 0  # while waiting for a drain: the bytes the peer had not taken at the last look
        self.timer: asyncio.TimerHandle | None = None
        self.timer_at = 0.0
        self.head_started = 0.0  # when the first byte of the request head being read came (0: none yet)
        # The current exchange (once a head is taken).
        self.head: RequestHead | None = None
        self.record: Record | None = None
        self.claim: Claim | None = None
        self.conn: NodeConn | None = None
        self.attempts: Attempts | None = None
        self.rule = "-"
        self.offered: list[bytes] = []
        self.table: PersistenceTable | None = None
        self.key: str | None = None
        self.request = b""  # the head as it goes to the node
        self.sends = 0  # how often the request was sent (twice: once more on a fresh connection)
        self.reconnecting = False  # CONNECTING for that second send
        self.body_done = True  # the whole request body reached the node
        self.parts: list[bytes] = []  # body data gathered for one write
        self.size = 0
        self.interim = 0
        self.rechunk = False
        self.keep = False  # the client connection stays open after this exchange
        self.connecting: object = None  # the host's handle on a connect in progress (see Host.connect)
        self.waiter: object = None  # the host's handle on the connection's end (see Host.ended)

    # -- events ------------------------------------------------------------------------------------------------

    def start(self) -> None:
        """The client connection is there: serve it."""
        self.client.exchange = self
        self.up.exchanges.add(self)
        self.advance()

    def event(self, side: Side, read: bool) -> None:
        """``side`` sent something, closed, or took what was written to it."""
        if read:
            waiting = self.waiting
            if (waiting == _NODE_READ and side is not self.client) or (waiting == _CLIENT_READ and side is self.client):
                self.waiting = _NOTHING  # a wait for data starts over with each arrival
        self.advance()

    def connected(self, conn: NodeConn) -> None:
        """The host connected to the node asked for."""
        self.connecting = None
        if self.state != CONNECTING:
            conn.close()
            return
        record = self.record
        assert record is not None
        record.reused = False
        now = self.up.loop.time()
        if self.reconnecting:
            self.reconnecting = False
        else:
            assert self.claim is not None
            record.connected = now
            self.claim.bind(self.table if self.rule != "fallback" else None, self.key, now, record)
        self._bind(conn)
        self._then(lambda: self._send(now))

    def connect_failed(self, reason: str) -> None:
        """The host could not connect to the node asked for."""
        self.connecting = None
        if self.state != CONNECTING:
            return
        record = self.record
        assert record is not None
        if self.reconnecting:
            self._fail(Abort(502, End.SERVER_CLOSED, reason, error_response(502)))
            return
        claim, attempts = self.claim, self.attempts
        assert claim is not None and attempts is not None
        claim.release(self.up.loop.time())
        self.claim = None
        record.retries = attempts.failed()
        if claim.server is not self.up.settings.fallback:
            self.up.host.connect_failed(self.client.peer, claim.server, reason, record.retries)
        self._then(self._next_node)

    def abandon(self, end: End, detail: str) -> None:
        """The connection must end now (the service stopped): drop the exchange in progress, if any."""
        if self.state == ENDED:
            return
        record = self.record
        if record is not None:
            record.end, record.detail = end, detail
            self._drop_node()
            self._release_claim(self.up.loop.time())
            self._log(record)
        self._end(ABORT)

    def _tick(self) -> None:
        self.timer = None
        if self.state == ENDED:
            return
        if self.deadline - self.up.loop.time() > TIMER_SLACK:
            self._arm(self.deadline)
            return
        self.advance()

    # -- the loop ----------------------------------------------------------------------------------------------

    def advance(self) -> None:
        """Go on as far as the state of both sides allows."""
        if self.busy:
            self.again = True  # (an event while the loop runs: it looks again before it stops)
            return
        self.busy = True
        try:
            while True:
                self.again = False
                state = self.state
                if state == IDLE:
                    going = self._idle()
                elif state == RESPONSE:
                    going = self._response_head()
                elif state == STREAM:
                    going = self._stream()
                elif state == BODY:
                    going = self._body()
                else:
                    going = False
                if not going and not self.again:
                    break
        except HttpProtocolError as exc:
            self._fail(Abort(exc.status, End.BAD_REQUEST, str(exc), error_response(exc.status)))
        except Abort as abort:
            self._fail(abort)
        except Exception:  # a bug: this client is lost, the service goes on
            log.exception("http exchange failed")
            self.abandon(End.ERROR, "failed in the balancer")
        finally:
            self.busy = False

    def _then(self, step: Callable[[], bool]) -> None:
        """Take ``step`` (the one an event outside the loop calls for), then the loop if there is more to do."""
        try:
            going = step()
        except Abort as abort:
            self._fail(abort)
            return
        if going:
            self.advance()

    def _sleep(self, deadline: float) -> bool:
        """Wait until something happens, or until ``deadline``. Returns False (the loop stops)."""
        self.deadline = deadline
        if self.timer is None or self.timer_at > deadline:
            self._arm(deadline)
        return False

    def _arm(self, when: float) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.timer = self.up.loop.call_at(when, self._tick)
        self.timer_at = when

    def _read_expired(self, waiting: int, timeout: float) -> bool:
        """Waiting for data (``waiting``): whether its ``timeout`` from the last arrival has passed; when
        not, the timer is set for it."""
        now = self.up.loop.time()
        if self.waiting != waiting:
            self.waiting = waiting
            self._sleep(now + timeout)
            return False
        if self.deadline - now <= TIMER_SLACK:
            return True
        self._sleep(self.deadline)
        return False

    def _drain_expired(self, side: Side, waiting: int, timeout: float) -> bool:
        """Waiting for ``side`` to take what was written to it: whether it took nothing for ``timeout``;
        when not, the timer is set for it."""
        now = self.up.loop.time()
        if self.waiting != waiting:
            self.waiting = waiting
            self.pending = side.unsent()
            self._sleep(now + timeout)
            return False
        if self.deadline - now <= TIMER_SLACK:
            unsent = side.unsent()
            if unsent >= self.pending:
                return True
            self.pending = unsent  # it reads, slowly: waited for
            self._sleep(now + timeout)
            return False
        self._sleep(self.deadline)
        return False

    # -- waiting for a request -----------------------------------------------------------------------------

    def _idle(self) -> bool:
        """Between requests: take the next head, or close when the client leaves or idles out."""
        client, up = self.client, self.up
        settings = up.settings
        if client.write_paused:
            if client.lost:
                self._end(CLOSE)
                return False
            # It is not taking its answers (a pipelining client that does not read): no more requests are
            # served until it does, so what is buffered for it stays bounded.
            if self._drain_expired(client, _CLIENT_DRAIN, settings.client_timeout):
                client.abort()
                raise Abort(0, End.CLIENT_TIMEOUT, "client stopped reading its responses")
            return False
        self.waiting = _NOTHING
        reader = self.requests
        event = client.take()
        if event is not None:
            if type(event) is not RequestHead:  # cannot happen: heads start messages
                raise HttpProtocolError("unexpected data before a request head")
            if client.error is not None and not _complete(reader.events):
                # This message is already known to be malformed further on (its body, say): it is refused
                # whole, and no node sees any of it.
                raise client.error
            return self._begin(event)
        if client.error is not None:
            raise client.error
        if client.eof:
            reader.eof()  # raises when the client closed mid-head
            self._end(CLOSE)
            return False
        if up.stopping and not reader.in_message:
            self._end(CLOSE)
            return False
        now = up.loop.time()
        if reader.in_message:
            if self.head_started == 0.0:
                self.head_started = now
            deadline = self.head_started + settings.request_head
        else:
            self.head_started = 0.0
            deadline = client.idle_from + (settings.request_head if client.served == 0 else settings.keep_alive)
        if deadline - now <= TIMER_SLACK:
            if reader.in_message:
                raise Abort(408, End.CLIENT_TIMEOUT, "request head not received in time", error_response(408))
            self._end(CLOSE)  # idle keep-alive connection: close quietly
            return False
        return self._sleep(deadline)

    def _begin(self, head: RequestHead) -> bool:
        """A request head: decide, and send it on a pooled connection or ask for one. Returns whether there
        is more to do at once."""
        up, client = self.up, self.client
        settings = up.settings
        now = up.loop.time()
        client.served += 1
        self.head = head
        self.record = Record(client.text, head.method.decode("latin-1"), head.target, started=now)
        self.sends = 0
        self.body_done = True
        self.interim = 0
        if head.method == b"CONNECT":
            raise Abort(
                405, End.BAD_REQUEST, "CONNECT is not served", simple_response(405, b"405 CONNECT is not served\n")
            )
        if head.upgrade and head.framing is not Framing.NONE:
            raise Abort(400, End.BAD_REQUEST, "Upgrade with a request body", error_response(400))
        self.key = key = up.client_key(client)
        self.offered = offered = (
            request_cookie_values(head, settings.cookie_bytes, client.cookies) if settings.cookie_name else []
        )
        self.table = table = (client.lease if client.lease is not None else up.table) if settings.use_table else None
        picked = choose_with_cookie(up.servers, up.scheduler, table, key, offered, settings.codec, now)
        first = None
        if picked is not None:
            server, rule = picked
            conn = up.pooled(server, now)
            if conn is not None:  # the usual case: no Attempts needed
                self.attempts = None
                return self._take(server, rule, conn, now)
            first = Decision(server, rule)
        self.attempts = Attempts(self._decide, settings.retries, settings.fallback, first)
        return self._next_node()

    def _decide(self, tried: list[ServerState]) -> Decision | None:
        up = self.up
        picked = choose_with_cookie(
            up.servers, up.scheduler, self.table, self.key, self.offered, up.settings.codec, up.loop.time(), tried
        )
        return None if picked is None else Decision(picked[0], picked[1])

    def _next_node(self) -> bool:
        """Take the next node to try: its pooled connection, or connect."""
        attempts, head = self.attempts, self.head
        assert attempts is not None and head is not None
        up = self.up
        decision = attempts.next()
        if decision is None:
            raise Abort(503, End.NO_SERVER, "no node can serve", up.unavailable(head))
        server = decision.server
        now = up.loop.time()
        conn = up.pooled(server, now)
        if conn is not None:
            return self._take(server, decision.rule, conn, now)
        record = self.record
        assert record is not None
        record.server, record.rule = server.name, decision.rule
        self.rule = decision.rule
        self.claim = up.claims.take(server)
        self.state = CONNECTING
        self.reconnecting = False
        up.host.connect(self, server)
        return False

    def _take(self, server: ServerState, rule: str, conn: NodeConn, now: float) -> bool:
        """Serve the request on ``conn``, a pooled connection to ``server``."""
        record = self.record
        assert record is not None
        record.server, record.rule = server.name, rule
        record.reused = True
        record.connected = now
        self.rule = rule
        self.claim = claim = self.up.claims.take(server)
        claim.bind(self.table if rule != "fallback" else None, self.key, now, record)
        self._bind(conn)
        return self._send(now)

    def _bind(self, conn: NodeConn) -> None:
        self.conn = conn
        conn.exchange = self
        record = self.record
        assert record is not None
        record.conn = conn

    # -- the request -------------------------------------------------------------------------------------------

    def _send(self, now: float) -> bool:
        """Send the request head on the node connection (and its body, when it has one). Returns whether
        there is more to do at once (a body to send); else the response is waited for."""
        conn, head, client = self.conn, self.head, self.client
        assert conn is not None and head is not None
        up = self.up
        settings = up.settings
        self.sends += 1
        first = self.sends == 1
        self._expect_response(conn, head)
        if first:
            default_host = conn.server.address.encode() if head.version == "1.0" else b""
            self.request = proxy_request_head(head, client.peer[0], settings.rewrite, default_host, client.cookies)
            if head.expect_continue and head.version == "1.1":
                client.write(CONTINUE)
        if head.framing is Framing.NONE:
            conn.write(self.request)
            # Its end is queued right behind the head (an Upgrade request's Upgrade event after that); a
            # second send has taken it already.
            if first and type(client.take()) is not EndOfMessage:
                raise Abort(400, End.BAD_REQUEST, "request without its end", error_response(400))
            self.state = RESPONSE
            # (Nothing of the response can be there yet: it is waited for without looking.)
            self.waiting = _NODE_READ
            return self._sleep(now + settings.server_timeout)
        self.parts = [self.request]  # the head goes with the body bytes already there
        self.size = 0
        self.state = BODY
        self.waiting = _NOTHING
        return True

    def _expect_response(self, conn: NodeConn, head: RequestHead) -> None:
        """Get ``conn`` ready to read the response to ``head``."""
        settings = self.up.settings
        reader = conn.responses
        if (
            reader is None
            or reader.max_head_size != settings.max_head_size
            or reader.max_headers != settings.max_headers
        ):
            reader = conn.responses = ResponseReader(
                head.method, head.upgrade, settings.max_head_size, settings.max_headers
            )
        else:
            reader.next_response(head.method, head.upgrade)
        conn.reader = reader
        conn.uses += 1

    def _body(self) -> bool:
        """Stream the request body to the node; on to the response when it is all sent, or when the node
        went away before (its response, if any, is still forwarded; the client connection then closes)."""
        client, conn, head, record = self.client, self.conn, self.head, self.record
        assert conn is not None and head is not None and record is not None
        settings = self.up.settings
        chunked = head.framing is Framing.CHUNKED
        while True:
            if self.waiting == _NODE_DRAIN:
                if conn.write_paused and not conn.lost:
                    if self._drain_expired(conn, _NODE_DRAIN, settings.server_timeout):
                        return self._body_sent(False)
                    return False
                if conn.lost:
                    return self._body_sent(False)
                self.waiting = _NOTHING
            event = client.take()
            if event is None:
                if self.parts:
                    conn.write(b"".join(self.parts))
                    self.parts, self.size = [], 0
                    if conn.lost:
                        return self._body_sent(False)
                    if conn.write_paused:
                        return self._wait_drain(conn, _NODE_DRAIN, settings.server_timeout)
                    continue
                if client.error is not None:
                    raise client.error
                if client.eof:
                    with contextlib.suppress(HttpProtocolError):
                        self.requests.eof()
                    raise Abort(400, End.CLIENT_CLOSED, "client closed during the request body")
                if self._read_expired(_CLIENT_READ, settings.client_timeout):
                    raise Abort(408, End.CLIENT_TIMEOUT, "request body stalled", error_response(408))
                return False
            self.waiting = _NOTHING
            if type(event) is bytes:
                record.bytes_up += len(event)
                self.parts.append(chunk(event) if chunked else event)
                self.size += len(event)
                if self.size >= GATHER_BYTES:
                    conn.write(b"".join(self.parts))
                    self.parts, self.size = [], 0
                continue
            if isinstance(event, EndOfMessage):
                if chunked:
                    self.parts.append(last_chunk(event.trailers))
                if self.parts:
                    conn.write(b"".join(self.parts))
                    self.parts, self.size = [], 0
                return self._body_sent(not conn.lost)
            raise HttpProtocolError("unexpected event in a request body")  # pragma: no cover

    def _body_sent(self, done: bool) -> bool:
        self.body_done = done
        self.parts, self.size = [], 0
        self.state = RESPONSE
        self.waiting = _NOTHING
        return True

    # -- the response ----------------------------------------------------------------------------------------

    def _response_head(self) -> bool:
        """Wait for the node's final response head; interim 1xx responses go to the client as they come."""
        conn, head = self.conn, self.head
        assert conn is not None and head is not None
        settings = self.up.settings
        while True:
            event = conn.take()
            if event is None:
                if conn.error is not None:
                    raise Abort(502, End.BAD_RESPONSE, str(conn.error), error_response(502))
                if conn.eof:
                    reader = conn.reader
                    assert isinstance(reader, ResponseReader)
                    if reader.head is None and not reader.in_message:
                        return self._send_again()
                    raise Abort(502, End.SERVER_CLOSED, "node closed before its response head", error_response(502))
                if self._read_expired(_NODE_READ, settings.server_timeout):
                    timeout = settings.server_timeout
                    raise Abort(504, End.SERVER_TIMEOUT, f"no response within {timeout:g}s", error_response(504))
                return False
            if type(event) is ResponseHead:
                if event.informational:
                    self.interim += 1
                    if self.interim > MAX_INTERIM:
                        detail = f"more than {MAX_INTERIM} interim responses"
                        raise Abort(502, End.BAD_RESPONSE, detail, error_response(502))
                    if head.version == "1.1" and event.status != 100:  # our own 100 was already sent
                        self.client.write(
                            serialize_head(b"HTTP/1.1 %d %s" % (event.status, event.reason), event.headers)
                        )
                    self.waiting = _NOTHING
                    continue
                return self._respond(event)
            raise Abort(502, End.BAD_RESPONSE, "response data before its head", error_response(502))  # pragma: no cover

    def _send_again(self) -> bool:
        """A reused connection the node had closed while idle: once more on a fresh connection."""
        conn, head, record = self.conn, self.head, self.record
        assert conn is not None and head is not None and record is not None
        self._drop_node(close=True)
        if record.halted:
            raise Abort(502, End.HALTED, "node halted", error_response(502))
        if not record.reused or head.framing is not Framing.NONE or self.sends > 1:
            raise Abort(502, End.SERVER_CLOSED, "node closed the connection", error_response(502))
        self.state = CONNECTING
        self.reconnecting = True
        self.up.host.connect(self, conn.server)
        return False

    def _respond(self, response: ResponseHead) -> bool:
        """The final response head is in: a tunnel (101), the whole response at once, or a stream."""
        conn, record = self.conn, self.record
        assert conn is not None and record is not None
        up = self.up
        now = up.loop.time()
        if response.status == 101:
            record.responded = now
            record.status = response.status
            self.response = response
            self._end(TUNNEL)  # (the host releases the claim when the tunnel ends)
            return False
        reader = conn.reader
        assert isinstance(reader, ResponseReader)
        data = self._response_start(response, now)
        if reader.body_bytes <= GATHER_BYTES and reader.finished and not reader.upgraded:
            # Most responses are here whole by now (a small body comes with its head): one write.
            rest = reader.take_rest()
            assert rest is not None
            parts = [data]
            rechunk = self.rechunk
            for event in rest:
                if type(event) is bytes:
                    parts.append(chunk(event) if rechunk else event)
                elif rechunk and type(event) is EndOfMessage:
                    parts.append(last_chunk(event.trailers))
            data = b"".join(parts)
            record.bytes_down += len(data)
            self.client.write(data)
            return self._finish(response.keep_alive and not reader.extra and self.body_done, now)
        self.response = response
        self.parts, self.size = [data], 0
        self.state = STREAM
        self.waiting = _NOTHING
        return True

    def _response_start(self, response: ResponseHead, now: float) -> bytes:
        """The response head the client gets; sets whether the client connection stays open after it, and
        whether the body is chunked here (a chunked or close-delimited body to an HTTP/1.1 client)."""
        head, record, claim = self.head, self.record, self.claim
        assert head is not None and record is not None and claim is not None
        up = self.up
        record.responded = now
        record.status = response.status
        client_11 = head.version == "1.1"
        keep = head.keep_alive and self.body_done and not up.stopping
        added: Headers = []
        rechunk = False
        if response.framing is Framing.CHUNKED or response.framing is Framing.CLOSE:
            if client_11:
                added.append((b"Transfer-Encoding", b"chunked"))
                rechunk = True
            else:
                keep = False  # an HTTP/1.0 client learns the end of the body from the close
        cookie = up.cookie_field(claim.server, self.rule, self.offered)
        if cookie is not None:
            added.append(cookie)
        connection = b"close" if not keep else None if client_11 else b"keep-alive"
        nocache = cookie is not None and up.settings.nocache
        self.keep, self.rechunk = keep, rechunk
        return proxy_response_head(response, added, nocache, connection)

    def _stream(self) -> bool:
        """Stream the response body to the client."""
        client, conn, record, response = self.client, self.conn, self.record, self.response
        assert conn is not None and record is not None and response is not None
        settings = self.up.settings
        reader = conn.reader
        assert isinstance(reader, ResponseReader)
        while True:
            if self.waiting == _CLIENT_DRAIN:
                if client.lost:
                    return self._cut(End.CLIENT_CLOSED, "client left during the response")
                if client.write_paused:
                    if self._drain_expired(client, _CLIENT_DRAIN, settings.client_timeout):
                        return self._cut(End.CLIENT_TIMEOUT, "client stopped reading the response")
                    return False
                self.waiting = _NOTHING
            event = conn.take()
            if event is None:
                if self.parts:
                    self._write_parts()
                if client.lost:
                    return self._cut(End.CLIENT_CLOSED, "client left during the response")
                if client.write_paused:
                    return self._wait_drain(client, _CLIENT_DRAIN, settings.client_timeout)
                if conn.error is not None:
                    return self._cut(End.BAD_RESPONSE, str(conn.error))
                if conn.eof:
                    try:
                        reader.eof()
                    except HttpProtocolError as exc:
                        return self._cut(End.SERVER_CLOSED, str(exc))
                    continue
                if self._read_expired(_NODE_READ, settings.server_timeout):
                    return self._cut(End.SERVER_TIMEOUT, "node stalled during the response")
                return False
            self.waiting = _NOTHING
            if type(event) is bytes:
                self.parts.append(chunk(event) if self.rechunk else event)
                self.size += len(event)
                if self.size >= GATHER_BYTES:
                    self._write_parts()
                    # Nothing more is written before the client took most of it: what a response holds in
                    # memory stays bounded however slowly the client reads.
                    if client.write_paused:
                        return self._wait_drain(client, _CLIENT_DRAIN, settings.client_timeout)
                continue
            if type(event) is EndOfMessage:
                if self.rechunk:
                    self.parts.append(last_chunk(event.trailers))
                if self.parts:
                    self._write_parts()
                return self._finish(response.keep_alive and not reader.extra and self.body_done, self.up.loop.time())
            return self._cut(End.BAD_RESPONSE, "unexpected event in a response body")  # pragma: no cover

    def _write_parts(self) -> None:
        record = self.record
        assert record is not None
        data = b"".join(self.parts)
        record.bytes_down += len(data)
        self.client.write(data)
        self.parts, self.size = [], 0

    def _wait_drain(self, side: Side, waiting: int, timeout: float) -> bool:
        """Start waiting for ``side`` to take what was just written to it. Returns False (the loop stops)."""
        self.waiting = _NOTHING
        self._drain_expired(side, waiting, timeout)  # (a fresh wait: never expired)
        return False

    def _cut(self, end: End, detail: str) -> bool:
        """The response was cut short (its head went out already): the client connection is reset."""
        record, response = self.record, self.response
        assert record is not None and response is not None
        record.end, record.detail = end, detail
        self._drop_node(close=True)  # (closed, not reset: what was sent to it stays sent)
        self._fail(Abort(response.status, end, detail))
        return False

    # -- ends ----------------------------------------------------------------------------------------------------

    def _finish(self, reusable: bool, now: float) -> bool:
        """The exchange was served: give the node connection and the claim back, log, and wait for the
        next request (or close)."""
        conn, record = self.conn, self.record
        assert conn is not None and record is not None
        up = self.up
        record.conn = None
        self.conn = None
        up.release(conn, reusable, now)
        self._release_claim(now)
        self._log(record)
        self.record = self.head = self.response = None
        self.attempts = None
        self.waiting = _NOTHING
        self.head_started = 0.0
        if not self.keep or up.stopping:
            self._end(CLOSE)
            return False
        client = self.client
        client.idle_from = now
        self.state = IDLE
        if self.requests.events or client.eof or client.error is not None or client.write_paused:
            return True  # the next request is there already (pipelined), or the client left
        return self._sleep(now + up.settings.keep_alive)  # (what _idle would do, without the rest of it)

    def _fail(self, abort: Abort) -> None:
        """The exchange cannot go on: the client connection ends, with the balancer's answer when there is
        one to give (else reset, when an exchange was under way)."""
        if self.state == ENDED:
            return
        up = self.up
        record = self.record
        if record is None:  # while waiting for a request head
            record = self.record = Record(self.client.text, started=self.head_started or up.loop.time())
            under_way = False
        else:
            under_way = True
        record.status = record.status or abort.status
        record.end, record.detail = abort.end, abort.detail
        self._drop_node()
        self._release_claim(up.loop.time())
        if abort.response is not None:
            self.refusal = abort.response
            self._end(REFUSE)  # (the host sends it, then logs)
            return
        self._log(record)
        self._end(ABORT if under_way else CLOSE)

    def _drop_node(self, close: bool = False) -> None:
        """Whatever state the node connection is in, it cannot serve another request."""
        conn = self.conn
        if conn is not None:
            self.conn = None
            conn.exchange = None
            if close:
                conn.close()
            else:
                conn.abort()
            if self.record is not None:
                self.record.conn = None

    def _release_claim(self, now: float) -> None:
        claim = self.claim
        if claim is not None:
            self.claim = None
            record = self.record
            assert record is not None  # (a claim is taken with its exchange's record)
            claim.release(now, record.bytes_up, record.bytes_down)

    def take_claim(self) -> Claim | None:
        """The claim of a tunnel (the host releases it when the tunnel ends)."""
        claim, self.claim = self.claim, None
        return claim

    def _log(self, record: Record) -> None:
        if not quiet(record):
            self.up.host.log(record)

    def _end(self, how: int) -> None:
        self.state = ENDED
        self.how = how
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.client.exchange = None
        if self.conn is not None:  # a tunnel's: the host takes it over
            self.conn.exchange = None
        self.up.exchanges.discard(self)
        self.up.host.ended(self)
