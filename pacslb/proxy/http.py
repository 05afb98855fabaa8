"""A virtual service in http mode: an HTTP/1.1 reverse proxy that chooses a node for every request.

Theory of operation.
- Each client connection is one task running :meth:`HttpService._handle`: read a request head, decide,
  take a keep-alive connection to the chosen node from its pool (or connect, with retries on other
  nodes), send the rewritten head, stream the request body, stream the response back, and loop for the
  next request. Requests are answered strictly in order, so pipelined requests need nothing special: the
  ones behind wait, parsed, in the connection's reader.
- Both sides are asyncio transports driven by :class:`_Side` protocols that feed every byte straight into
  a sans-IO reader (protocols/http1.py). The task waits on a side only when it has nothing to do, and
  every wait is bounded by a timeout. Backpressure: a side stops reading while its reader holds more than
  :data:`HIGH_WATER` body bytes (or :data:`MAX_QUEUED_EVENTS` events), and the task waits for a side's
  write buffer to drain before taking more, so a body of any size passes through a fixed amount of memory.
- Decision per request (balance/cookie.py): a valid persistence cookie naming a node that honours
  persistence, then the source-IP table, then the scheduler; a node that fails to connect is excluded and
  the decision taken again (:class:`~pacslb.balance.decision.Attempts`). When nothing is left: the
  fallback server, or 503 with the maintenance page.
- The fast path: the common exchange (no request body, a pooled node connection, a whole response of
  modest size) is served from the protocol callbacks without waking the task (:meth:`HttpService._fast_request`,
  :meth:`HttpService._fast_response`); anything unusual is handed to the task, which finishes it as its own.
- Once its node is chosen, an exchange is one :class:`_Exchange` whichever path serves it. Its
  :class:`~pacslb.balance.claim.Claim` counts it on the node, holds the client's persistence entry, and
  is what a halt of the node cuts (:meth:`_Record.cut_short`).
- Node connections are pooled per node (LIFO; each closed after ``http.timeouts.pool_idle``; a sweep a
  few times per ``pool_idle`` closes those beyond ``http.pool_size`` that went unused since the last
  sweep, so the connections of one burst serve the next instead of being closed and opened again). A
  connection goes back to the pool only when its response was read to the end, the node allows keep-alive
  and it sent nothing extra. A request without a body that fails on a reused connection before any
  response byte (the node closed it while idle) is retried once on a fresh connection.
- ``Upgrade`` (WebSocket): the request goes to the node with its Upgrade fields; on 101 the two
  connections leave HTTP and are handed to the relay (plain) or pumped between the transports (TLS).
- ``Expect: 100-continue`` is answered by the balancer once the node's connection is ready, and the
  expectation is not forwarded (as nginx does): the body then streams straight to the node.
- One ``request`` log line per request (see docs/configuration.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import logging
import os
import socket
import ssl
import struct
import termios
from collections.abc import Callable, Sequence
from typing import Final, cast

from pacslb.balance.claim import Claim
from pacslb.balance.cookie import CookieCodec, choose_with_cookie
from pacslb.balance.decision import Attempts, Decision
from pacslb.balance.limits import retry_after
from pacslb.balance.persistence import PersistenceTable, source_ip_key
from pacslb.balance.server import ServerState
from pacslb.config.model import HttpSpec, ServiceSpec
from pacslb.errors import ConnectFailed
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
    Upgrade,
    chunk,
    end_to_end,
    last_chunk,
    make_private,
    proxy_request_head,
    proxy_response_head,
    request_cookie_values,
    serialize_head,
    set_cookie,
    simple_response,
    target_path,
)
from pacslb.proxy.listener import Listener, bind_listener
from pacslb.proxy.outcome import End
from pacslb.proxy.relay import RelayCancelled, relay_transports
from pacslb.proxy.service import Service, addr_text, connect_to, tune

log: Final = logging.getLogger("pacslb.http")

#: A side stops reading while its reader holds this many body bytes not yet forwarded: enough for the
#: kernel to keep a gigabit link busy between two wakeups, small enough that 4096 clients cannot make
#: pacslb hold much (256 KiB each at most, per direction).
HIGH_WATER: Final = 256 * 1024
#: ... and reads again once the task has taken it below this.
LOW_WATER = 64 * 1024
#: A side also stops reading while this many parsed events wait: a client pipelining thousands of tiny
#: requests without reading the answers cannot make the queue grow.
MAX_QUEUED_EVENTS: Final = 64
#: Most interim (1xx) responses a node may send before its final one: a node that streams them for ever
#: would otherwise hold the exchange open without end. (Real ones send one or two: 100, 103.)
MAX_INTERIM = 100
#: Write buffer limits of each transport (asyncio's default high mark is 64 KiB): past the high mark the
#: task waits for the peer to read; a larger buffer means fewer wakeups for bulk bodies.
WRITE_HIGH = 512 * 1024
WRITE_LOW = 128 * 1024
#: Body data gathered into one write when several events are ready at once.
GATHER_BYTES: Final = 256 * 1024
#: How an exchange that was served ends (read per request: a constant, not the enum's attribute).
_OK: Final = End.OK
#: A TLS handshake must complete within this (a client that connects and stays silent holds a socket).
TLS_HANDSHAKE_TIMEOUT = 10.0
#: After the balancer answered with an error and Connection: close, how long the socket may linger so the
#: client reads the answer before the close (closing with unread input would reset the connection).
LINGER = 1.0
#: Longest maintenance page served (it is held in memory and sent with every 503).
MAX_PAGE_SIZE = 1024 * 1024
#: How often a flush looks at a transport's write buffer when the transport does not say it is empty.
FLUSH_POLL = 0.01
#: The pools are swept for connections idle past ``pool_idle`` this many times per ``pool_idle``.
POOL_SWEEPS = 4
#: A wait whose deadline is this close when its timer fires times out (the loop's timers have millisecond
#: resolution: re-arming for less would only spin).
TIMER_SLACK: Final = 0.001
#: Interim response written to a client that sent Expect: 100-continue.
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"

_ERROR_BODIES = {
    400: "400 Bad Request: the request is not valid HTTP/1.1.\n",
    408: "408 Request Timeout: the request did not arrive in time.\n",
    431: "431 Request Header Fields Too Large.\n",
    502: "502 Bad Gateway: the PACS node did not answer properly.\n",
    503: "503 Service Unavailable: no PACS node can serve this request now; please retry shortly.\n",
    504: "504 Gateway Timeout: the PACS node did not answer in time.\n",
}


def _complete(events: list[Event]) -> bool:
    """Whether the message whose head was just taken from a reader ends among its queued ``events``."""
    return any(type(event) is EndOfMessage for event in events)


def _error(status: int, *, extra: Sequence[tuple[bytes, bytes]] = (), head_only: bool = False) -> bytes:
    body = _ERROR_BODIES.get(status, "").encode()
    return simple_response(status, body, extra=list(extra), head_only=head_only)


class _Side(asyncio.Protocol):
    """One connection (to a client or to a node): its transport, its reader, and a wake-up for the task."""

    __slots__ = (
        "deadline",
        "eof",
        "error",
        "held",
        "hook",
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
        # The fast path (see HttpService._fast_request): told of what happens on this side before the task
        # is; when it returns True it dealt with it and the task is not woken.
        self.hook: Callable[[_Side], bool] | None = None
        # The timeout of the current wait (see wait()): one timer per side, re-armed only when it fires
        # early or a wait needs it sooner, instead of a timer made and cancelled for every wait.
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
        if self.hook is not None and self.hook(self):
            return
        self.wake()

    def unexpected(self, data: bytes) -> None:
        """Bytes when none were expected (a pooled node connection): the connection is unusable."""
        self.close()

    def eof_received(self) -> bool:
        self.eof = True
        if self.hook is None or not self.hook(self):
            self.wake()
        return True  # keep the transport: the other direction may still be needed (half-close)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.eof = True
        if self.timer is not None:  # a task still waiting wakes up, sees ``lost`` and leaves
            self.timer.cancel()
            self.timer = None
        if self.hook is None or not self.hook(self):
            self.wake()

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        self.wake()

    # -- for the task ----------------------------------------------------------------------------------------

    def wake(self) -> None:
        waiter = self.waiter
        if waiter is not None:
            self.waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def pause(self) -> None:
        if not self.paused and self.transport is not None and not self.lost:
            self.paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if self.paused and self.transport is not None and not self.lost:
            self.paused = False
            self.transport.resume_reading()

    def wait(self, timeout: float) -> asyncio.Future[None]:
        """Something to await until something happens on this side; it raises TimeoutError after ``timeout``
        seconds. (A future, not a coroutine: one object less per wait.)"""
        loop = self.loop
        deadline = self.deadline = loop.time() + timeout
        if self.timer is None or self.timer_at > deadline:
            self._arm(deadline)
        waiter = self.waiter = loop.create_future()
        return waiter

    def _arm(self, when: float) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.timer = self.loop.call_at(when, self._tick)
        self.timer_at = when

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
            self._arm(self.deadline)

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

    async def next_event(self, timeout: float) -> Event | None:
        """The next event; None when the peer closed (the reader's ``eof()`` says whether that was fine).

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

    def write(self, data: bytes) -> None:
        transport = self.transport
        if transport is not None and not self.lost and not transport.is_closing():
            transport.write(data)

    async def drain(self, timeout: float) -> None:
        """Until the write buffer is below its low mark. A peer that reads slowly but reads is waited for:
        only ``timeout`` seconds in which nothing written was taken (see :func:`_unsent`) end the wait.

        Raises:
            ConnectionError: the peer is gone.
            TimeoutError: the peer read nothing for ``timeout`` seconds.
        """
        transport = self.transport
        if transport is None:
            return
        loop = self.loop
        pending = _unsent(transport)
        deadline = loop.time() + timeout  # moved on by every byte the peer takes, and by nothing else
        while self.write_paused and not self.lost:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError
            with contextlib.suppress(TimeoutError):
                await self.wait(remaining)
            size = _unsent(transport)
            if size < pending:
                pending = size
                deadline = loop.time() + timeout
        if self.lost:
            raise ConnectionResetError("peer gone")

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

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None and not self.lost:
            self.transport.abort()


def _unsent(transport: asyncio.Transport) -> int:
    """Bytes written to ``transport`` that its peer has not taken yet: the transport's buffer, plus the
    kernel's send queue (which a slow reader drains long before the kernel takes more from the transport)."""
    size = transport.get_write_buffer_size()
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError, ValueError):
            size += struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0"))[0]
    return size


class _Client(_Side):
    """A client connection: a :class:`_Side` with what its requests share."""

    __slots__ = ("cookies", "decided", "flight", "idle_from", "key", "key_spec", "lease", "peer", "served", "text")

    def __init__(self, loop: asyncio.AbstractEventLoop, reader: RequestReader, peer: tuple[str, int]) -> None:
        super().__init__(loop, reader)
        self.peer = peer
        self.text = addr_text(peer)
        self.key: str | None = None  # its source-IP persistence key...
        self.key_spec: ServiceSpec | None = None  # ... as worked out for this spec (a reload may change it)
        self.flight: _Exchange | None = None  # the exchange the fast path is running for it
        # The node the fast path chose for the request it left to the task (no pooled connection to it):
        # the task uses that choice rather than asking the scheduler again, which would skip a node.
        self.decided: Decision | None = None
        self.idle_from = loop.time()  # when it last had nothing to do (its keep-alive timeout counts from here)
        self.served = 0  # requests taken from it
        # In an HTTP worker process: its view of the persistence table (see balance/persistence.py, Lease).
        self.lease: PersistenceTable | None = None
        self.cookies = CookieMemo()  # its last Cookie field, read once


class _NodeConn(_Side):
    """A keep-alive connection to a node: a :class:`_Side` that can rest in the service's pool."""

    __slots__ = ("flight", "idle_since", "pool", "responses", "server", "uses")

    def __init__(self, loop: asyncio.AbstractEventLoop, server: ServerState) -> None:
        super().__init__(loop, None)
        self.server = server
        self.pool: _Pool | None = None  # the pool it rests in, while idle
        self.idle_since = 0.0  # when it went into the pool
        self.responses: ResponseReader | None = None  # its reader, kept for the next request while pooled
        self.uses = 0
        self.flight: _Exchange | None = None  # the fast path's exchange waiting for this connection's response

    def _tick(self) -> None:
        if self.flight is None:
            super()._tick()
            return
        # The fast path waits for a response with no task: its hook is told when the deadline comes.
        self.timer = None
        if self.deadline - self.loop.time() <= TIMER_SLACK:
            assert self.hook is not None
            self.hook(self)
        else:
            self._arm(self.deadline)

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


class _Pool:
    """The idle connections to one node, least recently used first (a request takes the last one)."""

    __slots__ = ("conns", "low")

    def __init__(self) -> None:
        self.conns: list[_NodeConn] = []
        #: The fewest connections it held since the last sweep: so many at its start went unused all along.
        self.low = 0


class _Held:
    """One side of a TLS tunnel as the transport relay takes it (pacslb.proxy.relay.Side): its transport, and
    what it sent after its head, still to be passed on."""

    def __init__(self, transport: asyncio.Transport, held: bytes) -> None:
        self.transport: asyncio.Transport | None = transport
        self.held = held
        self.eof = False
        self.lost = transport.is_closing()

    def take(self) -> bytes:
        held, self.held = self.held, b""
        return held


class _Exchange:
    """One exchange once its node is chosen and its connection there: what serving it needs, whoever
    serves it. The fast path makes one when it sends a request to a pooled node connection itself (the
    exchange is then in flight: ``client.flight``, ``conn.flight``), the client's task when it connects
    (or when it finishes one the fast path handed it).

    (This class and :class:`_Record`, made for every request, are written out rather than dataclasses:
    compiled, a dataclass's generated ``__init__`` runs as interpreted Python.)"""

    def __init__(
        self,
        client: _Client,
        conn: _NodeConn,
        claim: Claim,
        head: RequestHead,
        record: _Record,
        rule: str,
        offered: list[bytes],
        deadline: float,
    ) -> None:
        self.client = client
        self.conn = conn
        self.claim = claim
        self.head = head
        self.record = record
        self.rule = rule
        self.offered = offered
        self.deadline = deadline  # for the response (``http.timeouts.server``), once the request is sent
        self.handed = False  # given to the client's task to finish (see HttpService._fast_handover)


class _Record:
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
        self.conn: _NodeConn | None = None  # the node connection in use, closed if the exchange fails
        self.cut: Callable[[], None] | None = None  # ends a tunnel (else cutting aborts ``conn``)
        self.halted = False  # cut by a halt of its node (logged as end=halted)

    def cut_short(self) -> None:
        """A halt's grace is over: end the exchange now."""
        self.halted = True
        if self.cut is not None:
            self.cut()
        elif self.conn is not None:
            self.conn.abort()


class _Settings:
    """What a spec means for the proxy, worked out once per config (not per request)."""

    def __init__(self, name: str, spec: ServiceSpec) -> None:
        http = spec.http or HttpSpec()
        self.http = http
        # The values read on every request, as plain attributes: reading them through the config's models
        # costs a Python-level attribute hook each time.
        self.server_timeout = http.timeouts.server
        self.pool_idle = http.timeouts.pool_idle
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
        self.tls: ssl.SSLContext | None = make_tls_context(http) if http.tls is not None else None


def make_tls_context(http: HttpSpec) -> ssl.SSLContext:
    """A server-side TLS context with secure defaults: TLS 1.2 or later (``min_version``), the system's
    default cipher policy (forward secrecy, AEAD), no compression, no renegotiation, ALPN http/1.1."""
    assert http.tls is not None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_3 if http.tls.min_version == "1.3" else ssl.TLSVersion.TLSv1_2
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    context.options |= getattr(ssl, "OP_NO_RENEGOTIATION", 0)
    context.load_cert_chain(http.tls.certificate, http.tls.key)
    context.set_alpn_protocols(["http/1.1"])
    return context


class _Abort(Exception):
    """The exchange cannot go on; the client connection is closed (after ``response``, if any)."""

    def __init__(self, status: int, end: End, detail: str, response: bytes | None = None) -> None:
        self.status = status
        self.end = end
        self.detail = detail
        self.response = response


class HttpService(Service):
    """One http-mode virtual service."""

    def __init__(
        self,
        name: str,
        spec: ServiceSpec,
        servers: list[ServerState],
        table: PersistenceTable | None,
    ) -> None:
        super().__init__(name, spec, servers, table)
        # What the base class keeps and every request reads, as attributes of this class too: compiled
        # (pacslb/compiled.py), reading an attribute of the base class (a Python class) is a dictionary
        # look-up, and a bound method is made anew each time it is read.
        self.loop = self._loop
        self.servers_now, self.scheduler_now, self.table_now, self.spec_now = servers, self.scheduler, table, spec
        self.request_hook: Callable[[_Side], bool] = self._fast_request
        self.response_hook: Callable[[_Side], bool] = self._fast_response
        self.settings = _Settings(name, spec)
        self.pools: dict[ServerState, _Pool] = {}
        self.redirect: Listener | None = None
        self.stopping = False
        self.idle: set[_Side] = set()  # client sides waiting between requests (closed at once on stop)
        self.claims_now = self.claims  # the exchanges' holds on their nodes (a halt cuts them)
        self.sweeper: asyncio.TimerHandle | None = None  # closes idle pooled connections (see _sweep)
        self.worker: int | None = None  # in an HTTP worker process: its number (its log lines say it)

    # -- configuration -----------------------------------------------------------------------------------

    def apply(self, spec: ServiceSpec, servers: list[ServerState], table: PersistenceTable | None) -> None:
        old_redirect = self._redirect_address()
        super().apply(spec, servers, table)
        self.servers_now, self.scheduler_now, self.table_now, self.spec_now = servers, self.scheduler, table, spec
        self.settings = _Settings(self.name, spec)
        for server in [s for s in self.pools if s not in servers]:
            for conn in list(self.pools.pop(server).conns):
                conn.leave_pool()
                conn.close()
        if self._redirect_address() != old_redirect and self.listener is not None:
            self._open_redirect()

    def attach(self, listener: Listener) -> None:
        super().attach(listener)
        if self.redirect is None:
            self._open_redirect()

    def stop_accepting(self) -> None:
        super().stop_accepting()
        self.stopping = True
        if self.redirect is not None:
            self.redirect.close()
            self.redirect = None
        for side in list(self.idle):
            side.wake()
        for pool in self.pools.values():
            for conn in list(pool.conns):
                conn.leave_pool()
                conn.close()
        if self.sweeper is not None:
            self.sweeper.cancel()
            self.sweeper = None

    def _redirect_address(self) -> str | None:
        tls = self.settings.http.tls
        return str(tls.redirect_from) if tls is not None and tls.redirect_from is not None else None

    def _open_redirect(self) -> None:
        if self.redirect is not None:
            self.redirect.close()
            self.redirect = None
        tls = self.settings.http.tls
        if tls is None or tls.redirect_from is None:
            return
        try:
            sock = bind_listener(tls.redirect_from)
        except OSError as exc:
            log_event(
                log, "redirect_listen_failed", logging.ERROR,
                service=self.name, address=str(tls.redirect_from), reason=exc.strerror or str(exc),
            )  # fmt: skip
            return
        self.redirect = Listener(f"{self.name}/redirect", sock, self._accept_redirect)
        self.redirect.resume()
        log_event(log, "listen", service=f"{self.name}/redirect", address=str(tls.redirect_from), mode="redirect")

    # -- client connections --------------------------------------------------------------------------------

    limit_word = "429"

    def limit_answer(self) -> tuple[bytes, bool] | None:
        """429 Too Many Requests (RFC 6585 section 4) with Retry-After, and the connection closes; over TLS
        nothing can be said without a handshake: closed at once."""
        if self.settings.tls is not None:
            return None
        retry = b"%d" % retry_after(self.spec.limits)
        return simple_response(429, b"429 Too Many Requests\n", extra=[(b"Retry-After", retry)]), False

    def _start(self, sock: socket.socket, peer: tuple[str, int]) -> None:
        self._spawn(self._handle(sock, peer))  # a task per connection: it reads from the client first

    def adopt(
        self, sock: socket.socket, peer: tuple[str, int], lease: PersistenceTable | None, on_end: Callable[[], None]
    ) -> asyncio.Task[None]:
        """In an HTTP worker process: serve a connection the main process accepted, deciding its requests
        with ``lease`` (the client's entry in the main process's table); ``on_end`` is told when it closed.
        (The caller counts it in ``active`` and ``total``, as :meth:`accept` does.)"""
        task = self.loop.create_task(self._handle(sock, peer, lease))
        self.tasks.add(task)

        def ended(done: asyncio.Task[None]) -> None:
            self._finished(done)
            on_end()

        task.add_done_callback(ended)
        return task

    async def _handle(
        self, client_sock: socket.socket, peer: tuple[str, int], lease: PersistenceTable | None = None
    ) -> None:
        loop = self.loop
        settings = self.settings
        try:
            tune(client_sock)
            limits = settings.http.limits
            client = _Client(loop, RequestReader(limits.max_head_size, limits.max_headers), peer)
            client.lease = lease
            try:
                await loop.connect_accepted_socket(
                    lambda: client,
                    sock=client_sock,
                    ssl=settings.tls,
                    ssl_handshake_timeout=TLS_HANDSHAKE_TIMEOUT if settings.tls is not None else None,
                )
            except (OSError, ssl.SSLError, TimeoutError) as exc:
                log_event(
                    log, "tls_failed" if settings.tls else "accept_failed", logging.WARNING,
                    service=self.name, client=addr_text(peer), reason=str(exc) or type(exc).__name__,
                )  # fmt: skip
                client_sock.close()
                return
        except BaseException:
            client_sock.close()
            raise
        try:
            await self._serve(client, peer)
        except asyncio.CancelledError:
            client.abort()
            raise
        except Exception:
            log.exception("http connection failed on service %s", self.name)
            client.abort()
        finally:
            client.hook = None
            if client.flight is not None:
                self._fast_abandon(client.flight)
            self.idle.discard(client)
            if not client.lost:
                client.close()

    async def _serve(self, client: _Client, peer: tuple[str, int]) -> None:
        """Exchanges on one client connection until it closes, errs, idles out or the service stops.

        While the task waits for a request head, the fast path (:meth:`_fast_request`) may serve requests
        in its place; the task then waits until that exchange is over, or finishes it when handed it."""
        loop = self.loop
        reader = client.reader
        assert isinstance(reader, RequestReader)
        while True:
            timeouts = self.settings.http.timeouts
            client.idle_from = loop.time()
            head_started: float | None = None  # when the first byte of a head was seen
            record = _Record(client.text)
            # Wait for a request head: the keep-alive timeout until its first byte, then the head timeout.
            head: RequestHead | None = None
            flight: _Exchange | None = None
            failed = False  # the request failed; what to answer then (None: no answer, only the log line)
            refusal: bytes | None = None
            self.idle.add(client)
            client.hook = self.request_hook
            try:
                while head is None:
                    flight = client.flight
                    if flight is not None:
                        if flight.handed:
                            break
                        with contextlib.suppress(TimeoutError):  # it ends by its own deadline and wakes us
                            await client.wait(timeouts.server + timeouts.keep_alive)
                        continue
                    if client.write_paused:
                        # It is not taking its answers (a pipelining client that does not read): no more
                        # requests are served until it does, so what is buffered for it stays bounded.
                        try:
                            await client.drain(timeouts.client)
                        except TimeoutError:
                            client.abort()
                            raise _Abort(0, End.CLIENT_TIMEOUT, "client stopped reading its responses") from None
                        except ConnectionError:
                            return
                        continue
                    event = client.take()
                    if event is not None:
                        if not isinstance(event, RequestHead):  # cannot happen: heads start messages
                            raise HttpProtocolError("unexpected data before a request head")
                        if client.error is not None and not _complete(reader.events):
                            # This message is already known to be malformed further on (its body, say):
                            # it is refused whole, and no node sees any of it.
                            raise client.error
                        head = event
                        break
                    if client.error is not None:
                        raise client.error
                    if client.eof:
                        reader.eof()  # raises when the client closed mid-head
                        return
                    if self.stopping and not reader.in_message:
                        return
                    now = loop.time()
                    if reader.in_message:
                        if head_started is None:
                            head_started = now
                        remaining = head_started + timeouts.request_head - now
                    else:
                        head_started = None
                        remaining = client.idle_from - now
                        remaining += timeouts.request_head if client.served == 0 else timeouts.keep_alive
                    if remaining <= 0:
                        if reader.in_message:
                            raise _Abort(408, End.CLIENT_TIMEOUT, "request head not received in time", _error(408))
                        return  # idle keep-alive connection: close quietly
                    try:
                        await client.wait(remaining)
                    except TimeoutError:
                        pass  # the loop decides what the time that passed means
            # No await in an except clause here or below: compiled (pacslb/compiled.py), a coroutine that
            # waits while handling an exception can leave it as the one another coroutine's except clause
            # then catches. What to answer is noted, and answered after the try.
            except HttpProtocolError as exc:
                record.started = head_started or loop.time()
                record.status = exc.status
                record.end = End.BAD_REQUEST
                record.detail = str(exc)
                failed, refusal = True, _error(exc.status)
            except _Abort as abort:  # (not ``exc``: one name, one type, for mypyc)
                record.started = head_started or loop.time()
                record.status, record.end, record.detail = abort.status, abort.end, abort.detail
                failed, refusal = True, abort.response
            finally:
                client.hook = None
                self.idle.discard(client)
            if failed:
                await self._answer_and_close(client, refusal, record)
                return
            if flight is not None:  # the fast path's exchange, to finish here
                client.flight = None
                record = flight.record
                serving = self._exchange_tail(flight, True)
            else:
                assert head is not None
                client.served += 1
                record.started = loop.time()
                record.method = head.method.decode("latin-1")
                record.target = head.target
                serving = self._exchange(client, head, self._client_key(client), record)
            try:
                keep = await serving
            except _Abort as abort:
                record.status = record.status or abort.status
                record.end, record.detail = abort.end, abort.detail
                failed, refusal = True, abort.response
            if failed:
                if refusal is None:
                    client.abort()
                await self._answer_and_close(client, refusal, record)
                return
            self._log_request(record)
            if not keep or self.stopping:
                return

    def close_server_connections(self, server: ServerState) -> int:
        """A halt's grace is over: cut the exchanges still in progress with ``server`` (a request waiting
        for its response gets 502, a response or tunnel in progress is cut off) and close its pooled
        connections. Returns how many exchanges were cut."""
        cut = self.claims_now.cut(server)
        pool = self.pools.pop(server, None)
        for conn in list(pool.conns) if pool is not None else []:
            conn.leave_pool()
            conn.close()
        return cut

    def _client_key(self, client: _Client) -> str | None:
        """The client's source-IP persistence key (None when the service keeps no table)."""
        spec = self.spec_now
        if client.key_spec is not spec:
            client.key_spec = spec
            if self.settings.use_table:
                persistence = spec.persistence
                client.key = source_ip_key(client.peer[0], persistence.netmask, persistence.netmask6)
            else:
                client.key = None
        return client.key

    async def _answer_and_close(self, client: _Side, response: bytes | None, record: _Record) -> None:
        """End a client connection whose request failed: with ``response`` (see :meth:`_refuse`), or, when
        there is none to give, only the log line."""
        if response is not None:
            await self._refuse(client, response, record)
        else:
            self._log_request(record)

    async def _refuse(self, client: _Side, response: bytes, record: _Record) -> None:
        """Send the balancer's own final answer and log ``record``, then close without resetting what the
        client may still be sending (a reset could destroy the answer before the client reads it). The log
        line is written before that linger, so its duration is the exchange's, not the linger's."""
        record.bytes_down += len(response)
        client.write(response)
        self._log_request(record)
        transport = client.transport
        if transport is None or client.lost:
            return
        if transport.can_write_eof():
            with contextlib.suppress(OSError, RuntimeError):
                transport.write_eof()
        client.reader = None  # whatever else arrives is discarded (unexpected -> close)
        deadline = self.loop.time() + LINGER
        with contextlib.suppress(TimeoutError):
            while not client.lost and (remaining := deadline - self.loop.time()) > 0:
                await client.wait(remaining)

    # -- one exchange ----------------------------------------------------------------------------------------

    async def _exchange(self, client: _Client, head: RequestHead, key: str | None, record: _Record) -> bool:
        """Serve one request (``key``: the client's source-IP persistence key). Returns whether the client
        connection stays open for the next one.

        Raises:
            _Abort: the client connection must be closed (with an answer when one can still be given).
        """
        settings = self.settings
        if head.method == b"CONNECT":
            raise _Abort(
                405, End.BAD_REQUEST, "CONNECT is not served", simple_response(405, b"405 CONNECT is not served\n")
            )
        if head.upgrade and head.framing is not Framing.NONE:
            raise _Abort(400, End.BAD_REQUEST, "Upgrade with a request body", _error(400))
        loop = self.loop
        offered = self._offered(client, head)
        table = (client.lease if client.lease is not None else self.table_now) if settings.use_table else None
        conn: _NodeConn | None = None
        claim: Claim | None = None
        rule = "-"

        def decide(tried: list[ServerState]) -> Decision | None:
            picked = choose_with_cookie(
                self.servers_now, self.scheduler_now, table, key, offered, settings.codec, loop.time(), tried
            )
            return None if picked is None else Decision(picked[0], picked[1])

        first = client.decided
        client.decided = None
        attempts = Attempts(decide, settings.retries, settings.fallback, first)
        while conn is None:
            decision = attempts.next()
            if decision is None:
                raise _Abort(503, End.NO_SERVER, "no node can serve", self._unavailable(head))
            server, rule = decision.server, decision.rule
            record.server, record.rule = server.name, rule
            claim = self.claims_now.take(server)
            try:
                conn = self._pooled(server)
                record.reused = conn is not None
                if conn is None:
                    conn = await self._connect(server)
            except ConnectFailed as exc:
                claim.release(loop.time())
                record.retries = attempts.failed()
                if server is not settings.fallback:
                    self.connect_failed(client.peer, server, exc.reason, record.retries)
            except BaseException:  # cancelled while connecting (the shutdown)
                claim.release(loop.time())
                raise
        assert claim is not None
        record.connected = now = loop.time()
        if rule == "fallback":
            table = None  # the fallback server is no persistence target
        claim.bind(table, key, now, record)
        return await self._exchange_tail(_Exchange(client, conn, claim, head, record, rule, offered, 0.0), False)

    async def _exchange_tail(self, exchange: _Exchange, sent: bool) -> bool:
        """The exchange once its node connection is there (its claim bound): proxy it, then release the
        claim. ``sent``: the request was sent already (by the fast path), and its response is due by
        ``exchange.deadline``."""
        record, claim = exchange.record, exchange.claim
        try:
            return await self._proxy(exchange, sent)
        except BaseException:
            if record.conn is not None:
                record.conn.abort()  # whatever state it is in, it cannot serve another request
            raise
        finally:
            claim.release(self.loop.time(), record.bytes_up, record.bytes_down)

    def _offered(self, client: _Client, head: RequestHead) -> list[bytes]:
        """The values of the persistence cookie the request carries (a list not to be changed)."""
        settings = self.settings
        if settings.cookie_name is None:
            return []
        return request_cookie_values(head, settings.cookie_bytes, client.cookies)

    # -- the fast path ---------------------------------------------------------------------------------------

    def _fast_request(self, side: _Side) -> bool:
        """The client side's hook while its task waits for a request head. The common exchange (a request
        without a body, a node connection in the pool, a whole response of modest size) is served right
        here, from the protocol callbacks, without waking the task: the request goes out now, and
        :meth:`_fast_response` answers when the response is in. Anything else wakes the task, which serves
        it as always. Returns True when the task need not wake."""
        client: _Client = side  # type: ignore[assignment]  # the hook of client sides only
        if client.flight is not None:
            return True  # later requests wait in the reader until this exchange is over
        reader = client.reader
        if (
            self.stopping
            or client.error is not None
            or client.eof
            or reader is None
            or client.decided is not None
            or client.write_paused  # not taking its answers: the task waits for it before serving more
        ):
            return False
        events = reader.events
        if len(events) < 2:
            return False
        head = events[0]
        if (
            type(head) is not RequestHead
            or head.framing is not Framing.NONE
            or head.upgrade
            or head.expect_continue
            or head.method == b"CONNECT"
            or type(events[1]) is not EndOfMessage
        ):
            return False
        settings = self.settings
        loop = self.loop
        key = self._client_key(client)
        offered = self._offered(client, head)
        table = (client.lease if client.lease is not None else self.table_now) if settings.use_table else None
        now = loop.time()
        picked = choose_with_cookie(self.servers_now, self.scheduler_now, table, key, offered, settings.codec, now)
        if picked is None:
            return False
        server, rule = picked
        conn = self._pooled(server, now)
        if conn is None:
            client.decided = Decision(server, rule)
            return False
        events.pop(0)  # the head and its end: no body bytes to count
        events.pop(0)
        if client.paused:
            client.take_resume()
        client.served += 1
        record = _Record(client.text, head.method.decode("latin-1"), head.target, server.name, rule)
        record.reused = True
        record.started = record.connected = now
        record.conn = conn
        claim = self.claims_now.take(server)
        claim.bind(table, key, now, record)
        self._expect_response(conn, head)
        default_host = server.address.encode() if head.version == "1.0" else b""
        conn.write(proxy_request_head(head, client.peer[0], settings.rewrite, default_host, client.cookies))
        deadline = now + settings.server_timeout
        flight = _Exchange(client, conn, claim, head, record, rule, offered, deadline)
        client.flight = conn.flight = flight
        conn.hook = self.response_hook
        conn.deadline = deadline
        if conn.timer is None or conn.timer_at > deadline:
            conn._arm(deadline)
        return True

    def _fast_response(self, side: _Side) -> bool:
        """The node side's hook during a fast exchange: answer the client once the response is whole;
        anything unusual (an interim or 101 response, a large or slow body, an error, a close, the
        deadline) goes to the client's task to finish as it would its own."""
        conn: _NodeConn = side  # type: ignore[assignment]  # the hook of node sides only
        flight = conn.flight
        reader: ResponseReader = conn.reader  # type: ignore[assignment]  # a node side's
        assert flight is not None
        if conn.error is None and reader.body_bytes <= GATHER_BYTES:
            if reader.finished and not reader.upgraded:
                response = reader.events[0]
                if type(response) is ResponseHead and response.status >= 200 and response.status != 101:
                    self._fast_finish(flight)
                    return True
            elif not conn.eof and flight.deadline - self.loop.time() > TIMER_SLACK:
                # More of it is on its way. (With the timer's slack: a timer that fires a little early counts
                # as the deadline, and nothing would call again if this waited on.)
                return True
        self._fast_handover(flight)
        return True

    def _fast_finish(self, flight: _Exchange) -> None:
        conn, client, claim, record = flight.conn, flight.client, flight.claim, flight.record
        conn.hook = None
        conn.flight = client.flight = None
        reader = conn.reader
        assert isinstance(reader, ResponseReader)
        response = reader.take()
        assert isinstance(response, ResponseHead)
        try:
            keep = self._respond_whole(flight, response)
        finally:
            claim.release(self.loop.time(), record.bytes_up, record.bytes_down)
        self._log_request(record)
        if not keep or self.stopping:
            client.close()  # its task wakes when the connection is lost, and ends
            return
        client.idle_from = self.loop.time()
        if client.reader is not None and client.reader.events and self._fast_request(client):
            return  # the next pipelined request is on its way
        if client.eof or client.error is not None or (client.reader is not None and client.reader.events):
            client.wake()

    def _fast_handover(self, flight: _Exchange) -> None:
        """Let the client's task finish a fast exchange: it waits for the response (what is left of its
        deadline), retries on a fresh connection, streams, or answers 502/504, as :meth:`_proxy` does."""
        flight.conn.hook = None
        flight.conn.flight = None
        flight.handed = True
        flight.client.wake()

    def _fast_abandon(self, flight: _Exchange) -> None:
        """The client's task ended (the service stopped) during a fast exchange: drop it."""
        conn, record = flight.conn, flight.record
        conn.hook = None
        conn.flight = None
        flight.client.flight = None
        conn.abort()
        flight.claim.release(self.loop.time(), record.bytes_up, record.bytes_down)
        record.end, record.detail = End.SHUTDOWN, "the service stopped during the exchange"
        self._log_request(record)

    def _unavailable(self, head: RequestHead) -> bytes:
        """The 503 when no node can serve. The request body (if any) is not read: the connection closes."""
        settings = self.settings
        extra: Headers = [(b"Retry-After", str(int(settings.http.retry_after)).encode())]
        if settings.page is not None:
            response = simple_response(
                503,
                settings.page,
                content_type=b"text/html; charset=utf-8",
                extra=extra,
                head_only=head.method == b"HEAD",
            )
        else:
            response = _error(503, extra=extra, head_only=head.method == b"HEAD")
        return response

    def _pooled(self, server: ServerState, now: float | None = None) -> _NodeConn | None:
        """The most recently used idle connection to ``server`` (it is the least likely to have been closed
        by the node), or None. One idle for ``pool_idle`` or longer is never used (nor any older)."""
        pool = self.pools.get(server)
        if pool is None or not pool.conns:
            return None
        conns = pool.conns
        fresh_since = (self.loop.time() if now is None else now) - self.settings.pool_idle
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

    async def _connect(self, server: ServerState) -> _NodeConn:
        sock = await connect_to(server, self.spec.timeouts.connect, self.spec.source)
        conn = _NodeConn(self.loop, server)
        try:
            await self.loop.create_connection(lambda: conn, sock=sock)
        except OSError as exc:
            sock.close()
            raise ConnectFailed(server.name, exc.strerror or str(exc)) from exc
        return conn

    def _release(self, conn: _NodeConn, reusable: bool) -> None:
        """Back to the pool when it can serve another request, closed otherwise."""
        conn.reader = None
        server = conn.server
        pool_size = self.settings.pool_size
        if not reusable or self.stopping or conn.eof or conn.lost or pool_size == 0 or server not in self.servers_now:
            conn.close()
            return
        pool = self.pools.get(server)
        if pool is None:
            pool = self.pools[server] = _Pool()
        conn.resume()
        conn.pool = pool
        conn.idle_since = self.loop.time()
        pool.conns.append(conn)  # so every pool is ordered by idle_since, oldest first
        if self.sweeper is None:
            self.sweeper = self.loop.call_later(self.settings.pool_idle / POOL_SWEEPS, self._sweep)

    def _sweep(self) -> None:
        """Close the pooled connections idle for ``pool_idle`` or longer, and those beyond ``pool_size`` that
        no request needed since the last sweep; again later while any is left.

        One timer for every pool, not one per connection (that would be a timer made and cancelled per
        request). A connection is closed within ``(1 + 1/POOL_SWEEPS) * pool_idle``; :meth:`_pooled` never
        uses one older than ``pool_idle``. Connections beyond ``pool_size`` are closed here rather than as
        they come back, and only those a whole sweep period did not use (as HAProxy's idle connection
        purge): a busy node's connections come back in bursts (every response of one loop iteration at
        once), and closing the surplus of each burst made the next one open as many anew, at a cost far
        above that of a request.
        """
        self.sweeper = None
        http = self.settings.http
        pool_idle = http.timeouts.pool_idle
        fresh_since = self.loop.time() - pool_idle
        left = False
        for pool in self.pools.values():
            conns = pool.conns
            unused = min(len(conns) - http.pool_size, pool.low)  # beyond pool_size, and idle all period
            while conns and (unused > 0 or conns[0].idle_since <= fresh_since):
                oldest = conns.pop(0)  # the least recently used: the likeliest to be closed by the node
                oldest.pool = None
                oldest.close()
                unused -= 1
            pool.low = len(conns)
            left = left or bool(conns)
        if left and not self.stopping:
            self.sweeper = self.loop.call_later(pool_idle / POOL_SWEEPS, self._sweep)

    async def _proxy(self, exchange: _Exchange, sent: bool) -> bool:
        """Send the request to the node and its response to the client. Returns whether the client
        connection stays open. ``sent``: see :meth:`_exchange_tail`."""
        client, conn, server, head = exchange.client, exchange.conn, exchange.claim.server, exchange.head
        record, rule, offered = exchange.record, exchange.rule, exchange.offered
        settings = self.settings
        loop = self.loop
        record.conn = conn
        default_host = server.address.encode() if head.version == "1.0" else b""
        request = proxy_request_head(head, client.peer[0], settings.rewrite, default_host, client.cookies)
        attempts = 0
        body_done = True
        while True:
            attempts += 1
            deadline: float | None = None
            if sent and attempts == 1:
                deadline = exchange.deadline
            else:
                self._expect_response(conn, head)
                if head.expect_continue and attempts == 1 and head.version == "1.1":
                    client.write(CONTINUE)
                if head.framing is Framing.NONE:
                    conn.write(request)
                    # Its end is queued right behind the head (an Upgrade request's Upgrade event after
                    # that); a retry has taken it already.
                    if attempts == 1 and not isinstance(client.take(), EndOfMessage):
                        raise _Abort(400, End.BAD_REQUEST, "request without its end", _error(400))
                else:
                    body_done = await self._send_body(client, conn, head, record, request)
            try:
                response = await self._response_head(client, conn, head, deadline)
                break
            except _Retry:
                pass  # (the retry below, out of the except clause: no await in one, see _serve)
            # A reused connection the node had closed while idle: once more on a fresh connection.
            conn.close()
            if record.halted:
                raise _Abort(502, End.HALTED, "node halted", _error(502))
            if not record.reused or head.framing is not Framing.NONE or attempts > 1:
                raise _Abort(502, End.SERVER_CLOSED, "node closed the connection", _error(502))
            try:
                conn = exchange.conn = record.conn = await self._connect(server)
            except ConnectFailed as exc:
                raise _Abort(502, End.SERVER_CLOSED, exc.reason, _error(502)) from None
            record.reused = False
        reader = conn.reader
        assert isinstance(reader, ResponseReader)
        if response.status == 101:
            record.responded = loop.time()
            record.status = response.status
            await self._tunnel(client, conn, response, record, self._with_cookie([], server, rule, offered))
            return False
        if reader.body_bytes <= GATHER_BYTES and reader.finished and not reader.upgraded:
            # Most responses are here whole by now (a small body comes with its head): no streaming.
            return self._respond_whole(exchange, response, body_done)
        data, keep, rechunk = self._response_start(exchange, response, body_done)
        complete = await self._send_response_body(client, conn, rechunk, record, data)
        reusable = complete and response.keep_alive and not reader.extra and body_done
        record.conn = None
        self._release(conn, reusable)
        if not complete:
            raise _Abort(response.status, record.end, record.detail)
        return keep

    def _expect_response(self, conn: _NodeConn, head: RequestHead) -> ResponseReader:
        """Get ``conn`` ready to read the response to ``head``."""
        settings = self.settings
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
        return reader

    def _response_start(self, exchange: _Exchange, response: ResponseHead, body_done: bool) -> tuple[bytes, bool, bool]:
        """The response head the client gets; whether its connection stays open after; whether the body is
        chunked here (a chunked or close-delimited body to an HTTP/1.1 client)."""
        head, record = exchange.head, exchange.record
        record.responded = self.loop.time()
        record.status = response.status
        client_11 = head.version == "1.1"
        keep = head.keep_alive and body_done and not self.stopping
        added: Headers = []
        rechunk = False
        if response.framing in (Framing.CHUNKED, Framing.CLOSE):
            if client_11:
                added.append((b"Transfer-Encoding", b"chunked"))
                rechunk = True
            else:
                keep = False  # an HTTP/1.0 client learns the end of the body from the close
        cookie = self._cookie_field(exchange.claim.server, exchange.rule, exchange.offered)
        if cookie is not None:
            added.append(cookie)
        connection = b"close" if not keep else None if client_11 else b"keep-alive"
        nocache = cookie is not None and self.settings.nocache
        return proxy_response_head(response, added, nocache, connection), keep, rechunk

    def _respond_whole(self, exchange: _Exchange, response: ResponseHead, body_done: bool = True) -> bool:
        """Answer with a response that is all there (head and body in one write) and give the node
        connection back. Returns whether the client connection stays open."""
        data, keep, rechunk = self._response_start(exchange, response, body_done)
        client, conn, record = exchange.client, exchange.conn, exchange.record
        reader = conn.reader
        assert isinstance(reader, ResponseReader)
        rest = reader.take_rest()
        assert rest is not None
        parts = [data]
        for event in rest:
            if type(event) is bytes:
                parts.append(chunk(event) if rechunk else event)
            elif rechunk and isinstance(event, EndOfMessage):
                parts.append(last_chunk(event.trailers))
        data = b"".join(parts)
        record.bytes_down += len(data)
        client.write(data)
        record.conn = None
        self._release(conn, response.keep_alive and not reader.extra and body_done)
        return keep

    def _cookie_field(self, server: ServerState, rule: str, offered: list[bytes]) -> tuple[bytes, bytes] | None:
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

    def _with_cookie(self, headers: Headers, server: ServerState, rule: str, offered: list[bytes]) -> Headers:
        """``headers`` of a response plus the persistence cookie when the client should get it (see
        :meth:`_cookie_field`), made uncacheable with ``nocache``."""
        cookie = self._cookie_field(server, rule, offered)
        if cookie is None:
            return headers
        headers.append(cookie)
        return make_private(headers) if self.settings.nocache else headers

    async def _send_body(
        self, client: _Side, conn: _NodeConn, head: RequestHead, record: _Record, request: bytes
    ) -> bool:
        """Send the request head ``request`` and stream the request body to the node. Returns False when the
        node went away before it was all sent (its response, if any, is still forwarded; the client
        connection then closes)."""
        timeouts = self.settings.http.timeouts
        chunked = head.framing is Framing.CHUNKED
        parts: list[bytes] = [request]  # the head goes with the body bytes already there
        size = 0
        while True:
            try:
                event = await client.next_event(timeouts.client) if not parts else client.take()
            except TimeoutError:
                raise _Abort(408, End.CLIENT_TIMEOUT, "request body stalled", _error(408)) from None
            except HttpProtocolError as exc:
                raise _Abort(exc.status, End.BAD_REQUEST, str(exc), _error(exc.status)) from None
            if event is None and parts:
                conn.write(b"".join(parts))
                parts, size = [], 0
                if conn.lost:
                    return False
                if conn.write_paused:
                    try:
                        await conn.drain(timeouts.server)
                    except (ConnectionError, TimeoutError):
                        return False
                continue
            if event is None:
                reader = client.reader
                assert isinstance(reader, RequestReader)
                try:
                    reader.eof()
                except HttpProtocolError:
                    raise _Abort(400, End.CLIENT_CLOSED, "client closed during the request body") from None
                raise _Abort(400, End.CLIENT_CLOSED, "client closed during the request body")
            if type(event) is bytes:
                record.bytes_up += len(event)
                parts.append(chunk(event) if chunked else event)
                size += len(event)
                if size >= GATHER_BYTES:
                    conn.write(b"".join(parts))
                    parts, size = [], 0
                continue
            if isinstance(event, EndOfMessage):
                if chunked:
                    parts.append(last_chunk(event.trailers))
                if parts:
                    conn.write(b"".join(parts))
                return not conn.lost
            raise HttpProtocolError("unexpected event in a request body")  # pragma: no cover

    async def _response_head(
        self, client: _Side, conn: _NodeConn, head: RequestHead, deadline: float | None = None
    ) -> ResponseHead:
        """The node's final response head; interim 1xx responses go to the client as they come. The first
        wait ends by ``deadline`` when given (the fast path waited already), each one after
        ``http.timeouts.server`` from when it starts.

        Raises:
            _Retry: a reused connection closed before any response byte.
            _Abort: 502 (bad or no response) or 504 (no response in time).
        """
        timeout = self.settings.http.timeouts.server
        first_wait = timeout if deadline is None else max(0.0, deadline - self.loop.time())
        reader = conn.reader
        assert isinstance(reader, ResponseReader)
        interim = 0
        while True:
            event = conn.take()
            if event is None:
                if conn.error is not None:
                    raise _Abort(502, End.BAD_RESPONSE, str(conn.error), _error(502))
                if conn.eof:
                    if reader.head is None and not reader.in_message:
                        raise _Retry
                    raise _Abort(502, End.SERVER_CLOSED, "node closed before its response head", _error(502))
                try:
                    await conn.wait(first_wait)
                except TimeoutError:
                    raise _Abort(504, End.SERVER_TIMEOUT, f"no response within {timeout:g}s", _error(504)) from None
                first_wait = timeout
                continue
            if isinstance(event, ResponseHead):
                if event.informational:
                    interim += 1
                    if interim > MAX_INTERIM:
                        detail = f"more than {MAX_INTERIM} interim responses"
                        raise _Abort(502, End.BAD_RESPONSE, detail, _error(502))
                    if head.version == "1.1" and event.status != 100:  # our own 100 was already sent
                        client.write(serialize_head(b"HTTP/1.1 %d %s" % (event.status, event.reason), event.headers))
                    continue
                return event
            raise _Abort(502, End.BAD_RESPONSE, "response data before its head", _error(502))  # pragma: no cover

    async def _send_response_body(
        self, client: _Side, conn: _NodeConn, rechunk: bool, record: _Record, response: bytes
    ) -> bool:
        """Send the response head ``response`` and stream the response body to the client. Returns whether
        the response was complete; when not, ``record`` says why."""
        timeouts = self.settings.http.timeouts
        reader = conn.reader
        assert isinstance(reader, ResponseReader)
        parts: list[bytes] = [response]  # the head goes with the body bytes already there
        size = 0
        while True:
            event = conn.take()
            if event is None:
                if parts:
                    data = b"".join(parts)
                    record.bytes_down += len(data)
                    client.write(data)
                    parts, size = [], 0
                if client.lost:
                    record.end, record.detail = End.CLIENT_CLOSED, "client left during the response"
                    return False
                if client.write_paused:
                    if not await self._drain_client(client, record):
                        return False
                    continue
                if conn.error is not None:
                    record.end, record.detail = End.BAD_RESPONSE, str(conn.error)
                    return False
                if conn.eof:
                    try:
                        reader.eof()
                    except HttpProtocolError as exc:
                        record.end, record.detail = End.SERVER_CLOSED, str(exc)
                        return False
                    continue
                try:
                    await conn.wait(timeouts.server)
                except TimeoutError:
                    record.end, record.detail = End.SERVER_TIMEOUT, "node stalled during the response"
                    return False
                continue
            if type(event) is bytes:
                parts.append(chunk(event) if rechunk else event)
                size += len(event)
                if size >= GATHER_BYTES:
                    data = b"".join(parts)
                    record.bytes_down += len(data)
                    client.write(data)
                    parts, size = [], 0
                    # Nothing more is written before the client took most of it: what a response holds in
                    # memory stays bounded however slowly the client reads.
                    if client.write_paused and not await self._drain_client(client, record):
                        return False
                continue
            if isinstance(event, EndOfMessage):
                if rechunk:
                    parts.append(last_chunk(event.trailers))
                if parts:
                    data = b"".join(parts)
                    record.bytes_down += len(data)
                    client.write(data)
                return True
            record.end, record.detail = End.BAD_RESPONSE, "unexpected event in a response body"  # pragma: no cover
            return False  # pragma: no cover

    async def _drain_client(self, client: _Side, record: _Record) -> bool:
        """Wait until the client took most of what was written to it; False (``record`` says why) when it
        left, or read nothing for ``timeouts.client``."""
        try:
            await client.drain(self.settings.http.timeouts.client)
        except TimeoutError:
            record.end, record.detail = End.CLIENT_TIMEOUT, "client stopped reading the response"
            return False
        except ConnectionError:
            record.end, record.detail = End.CLIENT_CLOSED, "client left during the response"
            return False
        return True

    # -- Upgrade ---------------------------------------------------------------------------------------------

    async def _tunnel(
        self, client: _Side, conn: _NodeConn, response: ResponseHead, record: _Record, extra: Headers
    ) -> None:
        """101: forward the answer (plus ``extra`` fields), then move bytes both ways until both sides are done."""
        out = end_to_end(response.headers) + extra
        upgrade = next((v for k, v in response.headers if k.lower() == b"upgrade"), None)
        out += [(b"Connection", b"Upgrade")]
        if upgrade is not None:
            out.append((b"Upgrade", upgrade))
        data = serialize_head(b"HTTP/1.1 101 %s" % (response.reason or b"Switching Protocols"), out)
        record.bytes_down += len(data)
        client.write(data)
        # What each side sent after its head belongs to the new protocol: kept, with whatever still
        # arrives until the tunnel runs, and passed on first.
        self._hold(client)
        self._hold(conn)
        client.pause()
        conn.pause()
        timeouts = self.spec.timeouts
        idle = min(timeouts.client_idle, timeouts.server_idle)
        try:
            if self.settings.tls is None:  # the sockets leave their transports: nothing may stay behind
                await client.flush(self.settings.http.timeouts.client)
        except TimeoutError:
            client.abort()
            conn.abort()
            record.end = End.CLIENT_TIMEOUT
            return
        if client.lost or conn.lost:
            client.abort()
            conn.abort()
            record.end = End.CLIENT_CLOSED if client.lost else End.SERVER_CLOSED
            return
        assert client.held is not None and conn.held is not None
        to_node, to_client = bytes(client.held), bytes(conn.held)
        client_transport, node_transport = client.transport, conn.transport
        assert client_transport is not None and node_transport is not None
        task = asyncio.current_task()
        if task is not None:
            record.cut = functools.partial(_cancel, task)
        try:
            if self.settings.tls is None:
                # Plain: take the sockets back from the transports (a duplicate descriptor each, then the
                # transports let go) and hand them to the relay, which splices without Python in the path.
                client_sock = _take_socket(client_transport)
                node_sock = _take_socket(node_transport)
                record.bytes_up += len(to_node)  # (sent here; the relay counts what it moves)
                record.bytes_down += len(to_client)
                try:
                    for sock, data in ((node_sock, to_node), (client_sock, to_client)):
                        if data:
                            async with asyncio.timeout(self.settings.http.timeouts.client):
                                await self.loop.sock_sendall(sock, data)
                except (OSError, TimeoutError):
                    client_sock.close()
                    node_sock.close()
                    record.end = End.CLIENT_CLOSED
                    return
                result = await self.relayer(client_sock, node_sock, idle_timeout=idle, timeout_end=End.CLIENT_TIMEOUT)
            else:
                # TLS: the bytes must pass through the TLS transports: the buffered relay over them, which
                # passes on (and counts) what each side sent after its head first.
                sides = (_Held(client_transport, to_node), _Held(node_transport, to_client))
                result = await relay_transports(*sides, idle_timeout=idle, timeout_end=End.CLIENT_TIMEOUT)
        except asyncio.CancelledError as exc:
            if isinstance(exc, RelayCancelled):  # what the tunnel moved until the halt or shutdown
                record.bytes_up += exc.result.bytes_up
                record.bytes_down += exc.result.bytes_down
            if not record.halted or task is None:
                raise
            task.uncancel()  # cut by a halt (the relay closed both sides): this exchange ends here
            record.end = End.HALTED
            return
        record.bytes_up += result.bytes_up
        record.bytes_down += result.bytes_down
        record.end = result.end

    @staticmethod
    def _hold(side: _Side) -> None:
        """Stop parsing ``side``: what its reader holds beyond the HTTP head, and all that arrives from now
        on, is kept in ``side.held`` for the tunnel."""
        held = bytearray()
        reader = side.reader
        if reader is not None:
            while reader.events:
                event = reader.events.pop(0)
                if isinstance(event, Upgrade):
                    held += event.rest
                elif type(event) is bytes:
                    held += event
            held += reader.after_upgrade
        side.reader = None
        side.held = held

    # -- the redirect listener -------------------------------------------------------------------------------

    def _accept_redirect(self, sock: socket.socket, peer: tuple[str, int]) -> None:
        task = self.loop.create_task(self._redirect_one(sock, peer))
        self.tasks.add(task)
        task.add_done_callback(self._side_task_done)

    async def _redirect_one(self, sock: socket.socket, peer: tuple[str, int]) -> None:
        """Answer one plain-HTTP request with 308 to the same URL on this service's https address."""
        loop = self.loop
        settings = self.settings
        client = _Side(loop, RequestReader(settings.http.limits.max_head_size, settings.http.limits.max_headers))
        try:
            await loop.connect_accepted_socket(lambda: client, sock=sock)
        except OSError:
            sock.close()
            return
        record = _Record(addr_text(peer), rule="redirect", started=loop.time())
        try:
            try:
                event = await client.next_event(settings.http.timeouts.request_head)
            except (TimeoutError, HttpProtocolError):
                event = None
            if not isinstance(event, RequestHead):
                client.close()
                return
            record.method, record.target = event.method.decode("latin-1"), event.target
            host = (event.header(b"host") or str(self.spec.listen.host).encode()).decode("latin-1")
            hostname = host.rsplit(":", 1)[0] if not host.endswith("]") else host
            port = self.spec.listen.port
            authority = hostname if port == 443 else f"{hostname}:{port}"
            location = f"https://{authority}{event.target.decode('latin-1')}".encode()
            record.status = 308
            await self._refuse(
                client,
                simple_response(308, b"", extra=[(b"Location", location)], head_only=event.method == b"HEAD"),
                record,
            )
        finally:
            client.close()

    # -- logging ---------------------------------------------------------------------------------------------

    def _log_request(self, record: _Record) -> None:
        status = record.status
        if 0 < status < 500 and record.end is _OK and not record.halted and not log.isEnabledFor(logging.INFO):
            return  # the usual exchange, and no info lines wanted
        # A tunnel (101) ends when either side closes it: that is its normal end, not trouble (unless a halt cut it).
        end = End.HALTED if record.halted else record.end
        if end is End.NO_SERVER:
            self.rejections[end.value] += 1
        trouble = end in _TROUBLE and (status != 101 or end is End.HALTED)
        level = logging.WARNING if not status or status >= 500 or trouble else logging.INFO
        if not log.isEnabledFor(level):
            return
        now = self.loop.time()
        started = record.started or now
        fields: dict[str, object] = {
            "service": self.name,
            "client": record.client,
            "server": record.server,
            "rule": record.rule,
            "method": record.method,
            "path": target_path(record.target) if record.target else "-",
            "status": status or "-",
            "bytes_up": record.bytes_up,
            "bytes_down": record.bytes_down,
            "connect": (record.connected - started) if record.connected else 0.0,
            "response": (record.responded - started) if record.responded else 0.0,
            "duration": now - started,
            "reused": int(record.reused),
            "retries": record.retries,
            "end": end.value,
        }
        if record.detail:
            fields["detail"] = record.detail
        if self.worker is not None:
            fields["worker"] = self.worker
        log_event(log, "request", level, **fields)


#: How an exchange can end that is the node's fault (logged as a warning).
_TROUBLE = frozenset({End.SERVER_CLOSED, End.SERVER_TIMEOUT, End.BAD_RESPONSE, End.NO_SERVER, End.HALTED})


class _Retry(Exception):
    """A reused node connection closed before answering (see _forward)."""


def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()


def _take_socket(transport: asyncio.Transport) -> socket.socket:
    """A socket of its own for what ``transport`` carries; the transport is closed without touching the
    connection (the duplicate keeps it open)."""
    raw = transport.get_extra_info("socket")
    fd = os.dup(raw.fileno())
    sock = socket.socket(fileno=fd)
    sock.setblocking(False)
    transport.abort()
    return sock
