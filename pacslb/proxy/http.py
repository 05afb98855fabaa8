"""A virtual service in http mode: an HTTP/1.1 reverse proxy that chooses a node for every request.

Theory of operation.
- Each client connection is served by one :class:`~pacslb.proxy.exchange.Exchange`, the state machine in
  proxy/exchange.py that holds one exchange's life top to bottom (decision, node connection and pool,
  request and response, timeouts, backpressure). It does no I/O of its own: this module is its driver.
  :class:`HttpService` is its :class:`~pacslb.proxy.exchange.Host`: it accepts the connection (with the
  TLS handshake), connects to nodes when the machine asks, writes the ``request`` log line, and ends the
  connection as the machine says: closed, refused with the balancer's answer (then lingering, so the
  client reads it), or turned into a tunnel on ``101 Switching Protocols``.
- A connection has one task, which runs the handshake, then only waits until its machine is over, and
  does what is left: the refusal's linger or the tunnel. The exchanges themselves run from the protocol
  callbacks, with no task woken per request. Cancelling the task (the shutdown) ends the machine.
- ``Upgrade`` (WebSocket): on 101 the two connections leave HTTP and are handed to the relay (plain) or
  pumped between the transports (TLS).
- One ``request`` log line per request (see docs/configuration.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import socket
import ssl
from collections.abc import Callable
from typing import Final

from pacslb.balance.limits import retry_after
from pacslb.balance.persistence import PersistenceTable
from pacslb.balance.server import ServerState
from pacslb.config.model import HttpSpec, ServiceSpec
from pacslb.descriptors import stream_socket
from pacslb.errors import ConnectFailed
from pacslb.logs import log_event
from pacslb.protocols.http1 import (
    Headers,
    HttpProtocolError,
    RequestHead,
    RequestReader,
    ResponseHead,
    Upgrade,
    end_to_end,
    serialize_head,
    simple_response,
    target_path,
)
from pacslb.proxy.exchange import (
    ABORT,
    REFUSE,
    TUNNEL,
    Client,
    Exchange,
    NodeConn,
    Record,
    Settings,
    Side,
    Upstream,
    quiet,
)
from pacslb.proxy.listener import Listener, bind_listener
from pacslb.proxy.outcome import End
from pacslb.proxy.relay import RelayCancelled, relay_transports
from pacslb.proxy.service import Service, addr_text, connect_to

log: Final = logging.getLogger("pacslb.http")

#: A TLS handshake must complete within this (a client that connects and stays silent holds a socket).
TLS_HANDSHAKE_TIMEOUT = 10.0
#: After the balancer answered with an error and Connection: close, how long the socket may linger so the
#: client reads the answer before the close (closing with unread input would reset the connection).
LINGER = 1.0


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


class HttpService(Service):
    """One http-mode virtual service: the driver of its connections' exchanges."""

    def __init__(
        self,
        name: str,
        spec: ServiceSpec,
        servers: list[ServerState],
        table: PersistenceTable | None,
    ) -> None:
        super().__init__(name, spec, servers, table)
        self.loop = self._loop
        self.upstream = Upstream(self.loop, self, name, spec, servers, self.scheduler, table, self.claims)
        self.tls: ssl.SSLContext | None = make_tls_context(self.settings.http) if spec.http and spec.http.tls else None
        self.redirect: Listener | None = None
        self.worker: int | None = None  # in an HTTP worker process: its number (its log lines say it)

    @property
    def settings(self) -> Settings:
        return self.upstream.settings

    @property
    def stopping(self) -> bool:
        return self.upstream.stopping

    # -- configuration -----------------------------------------------------------------------------------

    def apply(self, spec: ServiceSpec, servers: list[ServerState], table: PersistenceTable | None) -> None:
        old_redirect = self._redirect_address()
        super().apply(spec, servers, table)
        self.upstream.apply(spec, servers, self.scheduler, table)
        self.tls = make_tls_context(self.settings.http) if self.settings.http.tls is not None else None
        if self._redirect_address() != old_redirect and self.listener is not None:
            self._open_redirect()

    def attach(self, listener: Listener) -> None:
        super().attach(listener)
        if self.redirect is None:
            self._open_redirect()

    def stop_accepting(self) -> None:
        super().stop_accepting()
        if self.redirect is not None:
            self.redirect.close()
            self.redirect = None
        self.upstream.stop()

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
        if self.tls is not None:
            return None
        retry = b"%d" % retry_after(self.spec.limits)
        return simple_response(429, b"429 Too Many Requests\n", extra=[(b"Retry-After", retry)]), False

    def _start(self, sock: socket.socket, peer: tuple[str, int]) -> None:
        self._spawn(self._handle(sock, peer))

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
        """One client connection: the handshake, its machine, and what the machine leaves to a task."""
        loop = self.loop
        settings = self.settings
        tls = self.tls
        try:
            client = Client(loop, RequestReader(settings.max_head_size, settings.max_headers), peer, addr_text(peer))
            client.lease = lease
            try:
                await loop.connect_accepted_socket(
                    lambda: client,
                    sock=client_sock,
                    ssl=tls,
                    ssl_handshake_timeout=TLS_HANDSHAKE_TIMEOUT if tls is not None else None,
                )
            except (OSError, ssl.SSLError, TimeoutError) as exc:
                log_event(
                    log, "tls_failed" if tls else "accept_failed", logging.WARNING,
                    service=self.name, client=addr_text(peer), reason=str(exc) or type(exc).__name__,
                )  # fmt: skip
                client_sock.close()
                return
        except BaseException:
            client_sock.close()
            raise
        exchange = Exchange(self.upstream, client)
        over: asyncio.Future[None] = loop.create_future()
        exchange.waiter = over
        try:
            exchange.start()
            await over
            how = exchange.how
            if how == REFUSE:
                assert exchange.refusal is not None and exchange.record is not None
                await self._refuse(client, exchange.refusal, exchange.record)
            elif how == TUNNEL:
                await self._tunnel(exchange)
            elif how == ABORT:
                client.abort()
        except asyncio.CancelledError:
            exchange.abandon(End.SHUTDOWN, "the service stopped during the exchange")
            client.abort()
            raise
        except Exception:
            log.exception("http connection failed on service %s", self.name)
            exchange.abandon(End.ERROR, "failed in the balancer")
            client.abort()
        finally:
            if not client.lost:
                client.close()

    # -- the machine's host ---------------------------------------------------------------------------------

    def connect(self, exchange: Exchange, server: ServerState) -> None:
        task = self.loop.create_task(self._connect(server))
        exchange.connecting = task
        task.add_done_callback(functools.partial(self._connected, exchange))

    def _connected(self, exchange: Exchange, task: asyncio.Task[NodeConn]) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if exc is None:
            exchange.connected(task.result())
        elif isinstance(exc, ConnectFailed):
            exchange.connect_failed(exc.reason)
        else:  # a bug: the exchange cannot go on
            log.error("connect failed on service %s", self.name, exc_info=exc)
            exchange.abandon(End.ERROR, "failed in the balancer")

    async def _connect(self, server: ServerState) -> NodeConn:
        sock = await connect_to(server, self.spec.timeouts.connect, self.spec.source)
        conn = NodeConn(self.loop, server)
        try:
            await self.loop.create_connection(lambda: conn, sock=sock)
        except OSError as exc:
            sock.close()
            raise ConnectFailed(server.name, exc.strerror or str(exc)) from exc
        return conn

    def ended(self, exchange: Exchange) -> None:
        connecting = exchange.connecting
        if isinstance(connecting, asyncio.Task):
            exchange.connecting = None
            connecting.cancel()
        waiter = exchange.waiter
        if isinstance(waiter, asyncio.Future) and not waiter.done():
            waiter.set_result(None)

    def close_server_connections(self, server: ServerState) -> int:
        """A halt's grace is over: cut the exchanges still in progress with ``server`` (a request waiting
        for its response gets 502, a response or tunnel in progress is cut off) and close its pooled
        connections. Returns how many exchanges were cut."""
        cut = self.claims.cut(server)
        self.upstream.close_pool(server)
        return cut

    async def _refuse(self, client: Side, response: bytes, record: Record) -> None:
        """Send the balancer's own final answer and log ``record``, then close without resetting what the
        client may still be sending (a reset could destroy the answer before the client reads it). The log
        line is written before that linger, so its duration is the exchange's, not the linger's."""
        record.bytes_down += len(response)
        client.write(response)
        self.log(record)
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

    # -- Upgrade ---------------------------------------------------------------------------------------------

    async def _tunnel(self, exchange: Exchange) -> None:
        """The machine ended on a 101: run the tunnel, then give the claim back and log."""
        client, conn, response, record = exchange.client, exchange.conn, exchange.response, exchange.record
        claim = exchange.take_claim()
        assert conn is not None and response is not None and record is not None and claim is not None
        extra = self.upstream.with_cookie([], claim.server, exchange.rule, exchange.offered)
        try:
            await self._run_tunnel(client, conn, response, record, extra)
        except BaseException:
            conn.abort()  # whatever state it is in, it cannot serve another request
            raise
        finally:
            claim.release(self.loop.time(), record.bytes_up, record.bytes_down)
        self.log(record)

    async def _run_tunnel(
        self, client: Side, conn: NodeConn, response: ResponseHead, record: Record, extra: Headers
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
            if self.tls is None:  # the sockets leave their transports: nothing may stay behind
                await client.flush(self.settings.client_timeout)
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
            if self.tls is None:
                # Plain: take the sockets back from the transports (a duplicate descriptor each, then the
                # transports let go) and hand them to the relay, which splices without Python in the path.
                client_sock = _take_socket(client_transport)
                node_sock = _take_socket(node_transport)
                record.bytes_up += len(to_node)  # (sent here; the relay counts what it moves)
                record.bytes_down += len(to_client)
                try:
                    for sock, data in ((node_sock, to_node), (client_sock, to_client)):
                        if data:
                            async with asyncio.timeout(self.settings.client_timeout):
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
    def _hold(side: Side) -> None:
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
        client = Side(loop, RequestReader(settings.http.limits.max_head_size, settings.http.limits.max_headers))
        try:
            await loop.connect_accepted_socket(lambda: client, sock=sock)
        except OSError:
            sock.close()
            return
        record = Record(addr_text(peer), rule="redirect", started=loop.time())
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

    def log(self, record: Record) -> None:
        """The ``request`` log line of one exchange (also :class:`~pacslb.proxy.exchange.Host`'s)."""
        if quiet(record):
            return
        status = record.status
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


def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()


def _take_socket(transport: asyncio.Transport) -> socket.socket:
    """A socket of its own for what ``transport`` carries; the transport is closed without touching the
    connection (the duplicate keeps it open)."""
    raw = transport.get_extra_info("socket")
    fd = os.dup(raw.fileno())
    sock = stream_socket(fd)
    transport.abort()
    return sock
