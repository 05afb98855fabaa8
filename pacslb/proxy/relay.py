"""The relay: moves bytes between a client socket and a server socket until both are done.

Theory of operation. The rest of pacslb hands this module a pair of connected sockets and gets back,
when the connection is over, how many bytes went each way and how it ended. Nothing else touches the
bytes, so this module alone decides how they move. Two ways, same behaviour:

- splice (Linux, the default): per direction, splice(2) moves bytes from the source socket into a pipe
  and from the pipe into the destination socket, in the kernel, never copied into Python. Readiness comes
  from the event loop's add_reader/add_writer. Backpressure: when the destination cannot take more, the
  direction stops reading its source and waits for the destination to become writable. A direction
  takes a pipe when it reads and gives it back (to a small shared stock) once it is drained, so an idle
  connection holds no pipe and a busy one only while its destination lags: two descriptors per
  connection, not six.
- buffered (elsewhere, or ``PACSLB_RELAY=buffered``): one asyncio Protocol per side on the loop's own
  transports (C code under uvloop); when the transport writing to one side has too much buffered, the
  other side stops reading until it drains.

Half-close: an EOF from one side is passed on as a write shutdown to the other (after the bytes already
read), and the connection stays open in the other direction until that side is done too (then closing
both passes on that last EOF). An error on either side (reset) closes both. Idle timeout: a timer ticks a
few times per timeout period and closes the connection if no byte moved in either direction for the whole
period.

The splice relay itself lives in pacslb/proxy/pumps.py, which runs on any loop with readers, writers and
timers (a relay worker runs it without asyncio); this module adds the buffered relay and the asyncio
entry points: :func:`start_relay` (told the result by a callback, no task held) and :func:`relay` (a
coroutine).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol, cast

from pacslb.proxy.eventloop import hosted
from pacslb.proxy.outcome import End
from pacslb.proxy.pumps import (
    DEFAULT_METHOD,
    IDLE_PIPES,
    PIPE_SIZE,
    SPLICE_AVAILABLE,
    RelayHandle,
    RelayResult,
    close_idle_pipes,
    start_splice,
)

if TYPE_CHECKING:
    from pacslb.proxy.pumps import Abortable

__all__ = [
    "DEFAULT_METHOD",
    "IDLE_PIPES",
    "PIPE_SIZE",
    "SPLICE_AVAILABLE",
    "RelayCancelled",
    "RelayHandle",
    "RelayResult",
    "Side",
    "close_idle_pipes",
    "relay",
    "relay_transports",
    "start_relay",
    "start_transport_relay",
]


#: How long a cancelled :func:`relay` waits for the aborted relay's count of what it moved.
ABORT_REPORT_TIMEOUT = 1.0


class RelayCancelled(asyncio.CancelledError):
    """A relay coroutine was cancelled (a halt, the shutdown): the cancellation goes on, carrying what the
    relay had moved until then, so the connection's log line and counters still say it."""

    def __init__(self, result: RelayResult) -> None:
        super().__init__()
        self.result = result


async def cancelled_relay(handle: Abortable, done: asyncio.Future[RelayResult]) -> RelayCancelled:
    """Abort a relay whose coroutine was cancelled and wait (bounded, shielded from further cancellation)
    for its report; what to raise in place of the cancellation."""
    if not done.done():
        handle.abort()
        with contextlib.suppress(TimeoutError, asyncio.CancelledError):
            async with asyncio.timeout(ABORT_REPORT_TIMEOUT):
                await asyncio.shield(done)
    result = done.result() if done.done() and not done.cancelled() else RelayResult(0, 0, End.SHUTDOWN)
    return RelayCancelled(result)


class _Half(asyncio.Protocol):
    """One side of the relay: what it reads, the other side writes."""

    __slots__ = ("early", "eof", "is_client", "lost", "peer", "received", "relay", "transport")

    def __init__(self, relay: _Relay, is_client: bool) -> None:
        self.relay = relay
        self.is_client = is_client
        self.transport: asyncio.Transport | None = None
        self.peer: _Half | None = None
        self.received = 0
        self.eof = False
        self.lost = False
        # Bytes that arrived before the other side's transport existed (the event loop may deliver a
        # first read right after connection_made, before pause_reading takes effect).
        self.early: list[bytes] | None = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        transport = self.transport
        transport.pause_reading()  # until the other side exists too

    def data_received(self, data: bytes) -> None:
        self.received += len(data)
        if self.early is None:
            self.peer.transport.write(data)  # type: ignore[union-attr]
        else:
            self.early.append(data)

    def eof_received(self) -> bool:
        self.eof = True
        if self.early is None:
            self.relay.side_finished(self)
        return True  # keep the transport open: the other direction may still be sending

    def pause_writing(self) -> None:
        # This side's outgoing buffer is full: stop reading what would be written to it.
        peer = self.peer
        if peer is not None and peer.transport is not None and not peer.lost:
            peer.transport.pause_reading()

    def resume_writing(self) -> None:
        peer = self.peer
        if peer is not None and peer.transport is not None and not peer.lost and not peer.eof:
            peer.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.relay.side_lost(self)


class _Relay:
    """The buffered relay."""

    __slots__ = ("client", "done", "first", "loop", "server")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.done: asyncio.Future[None] = loop.create_future()
        self.client = _Half(self, True)
        self.server = _Half(self, False)
        self.client.peer, self.server.peer = self.server, self.client
        self.first: _Half | None = None  # the side that finished first

    def side_finished(self, half: _Half) -> None:
        if self.first is None:
            self.first = half
        peer = half.peer
        assert peer is not None and peer.transport is not None
        if self.done.done():
            return
        if peer.eof or peer.lost:
            self.close()
        elif peer.transport.can_write_eof():
            peer.transport.write_eof()
        else:
            self.close()

    def start(self) -> None:
        """Both transports exist: pass on what arrived early, then let bytes flow."""
        for half in (self.client, self.server):
            early, half.early = half.early, None
            peer = half.peer
            assert peer is not None and peer.transport is not None and half.transport is not None
            if early and not peer.lost:
                peer.transport.write(b"".join(early))
        for half in (self.client, self.server):
            if half.lost:
                self.side_lost(half)
            elif half.eof:
                self.side_finished(half)
        for half in (self.client, self.server):
            if not half.lost and not half.eof and half.transport is not None:
                half.transport.resume_reading()

    def side_lost(self, half: _Half) -> None:
        if self.first is None:
            self.first = half
        peer = half.peer
        assert peer is not None
        if half.early is not None:
            return  # still setting up: relay() finds the loss in start()
        if peer.lost:
            if not self.done.done():
                self.done.set_result(None)
        elif peer.transport is not None:
            peer.transport.close()

    def close(self) -> None:
        for half in (self.client, self.server):
            if half.transport is not None and not half.lost:
                half.transport.close()

    def abort(self) -> None:
        for half in (self.client, self.server):
            if half.transport is not None and not half.lost:
                half.transport.abort()

    def counts(self) -> tuple[int, int]:
        return self.client.received, self.server.received

    def server_first(self) -> bool:
        return self.first is self.server

    def activity(self) -> tuple[int, ...]:
        """Changes whenever a byte moves: bytes read each way and bytes still waiting to be written."""
        c, s = self.client, self.server
        return (
            c.received,
            s.received,
            c.transport.get_write_buffer_size() if c.transport is not None and not c.lost else 0,
            s.transport.get_write_buffer_size() if s.transport is not None and not s.lost else 0,
        )


async def _buffered(client: socket.socket, server: socket.socket) -> _Relay:
    loop = asyncio.get_running_loop()
    state = _Relay(loop)
    try:
        await loop.connect_accepted_socket(lambda: state.client, sock=client)
    except BaseException:
        client.close()
        server.close()
        raise
    try:
        await loop.create_connection(lambda: state.server, sock=server)
    except BaseException:
        server.close()
        state.abort()
        raise
    state.start()
    return state


def start_relay(
    client: socket.socket,
    server: socket.socket,
    *,
    idle_timeout: float,
    timeout_end: End,
    on_done: Callable[[RelayResult], None],
    method: str | None = None,
    loop: asyncio.AbstractEventLoop | None = None,
) -> RelayHandle:
    """Relay between two connected, non-blocking sockets until both directions are done, then call
    ``on_done`` with the result (once; never from within this call). No task and no coroutine is held per
    connection with splice: only the relay's own objects and one timer.

    The relay owns both sockets from the call on and closes them before reporting.

    Args:
        client: the accepted client socket.
        server: the connected server socket.
        idle_timeout: seconds without any byte moving, after which both sides are closed.
        timeout_end: how to report an idle timeout (which side's limit it was).
        on_done: told the result.
        method: "splice" or "buffered"; default: :data:`DEFAULT_METHOD`.
        loop: the running loop, when the caller has it (asking asyncio costs a system call: getpid).
    """
    if loop is None:
        loop = asyncio.get_running_loop()
    if (method or DEFAULT_METHOD) == "splice":
        # On the asyncio loop's own epoll set for relays (pacslb/proxy/eventloop.py says why).
        return start_splice(
            hosted(loop), client, server, idle_timeout=idle_timeout, timeout_end=timeout_end, on_done=on_done
        )
    handle = RelayHandle(loop, timeout_end, on_done)
    handle.task = loop.create_task(_run_buffered(handle, client, server, idle_timeout))
    return handle


async def _run_buffered(handle: RelayHandle, client: socket.socket, server: socket.socket, idle: float) -> None:
    try:
        state = await _buffered(client, server)
    except asyncio.CancelledError:
        handle.report(RelayResult(0, 0, End.SHUTDOWN))
        return
    except OSError:
        handle.report(RelayResult(0, 0, End.ERROR))
        return
    handle.task = None
    handle.running(state, idle)
    try:
        await state.done
    except asyncio.CancelledError:
        state.abort()
    handle.finished()


class Side(Protocol):
    """A side of a connection already on a transport (a TLS one, say), as :func:`relay_transports` takes it:
    the transport, what arrived and was not read yet, and whether the peer has closed or sent its EOF."""

    transport: asyncio.Transport | None
    eof: bool
    lost: bool

    def take(self) -> bytes: ...


def start_transport_relay(
    client: Side, server: Side, *, idle_timeout: float, timeout_end: End, on_done: Callable[[RelayResult], None]
) -> RelayHandle:
    """The buffered relay between two connections already on transports (TLS cannot be spliced: the bytes
    are decrypted and encrypted in this process). The relay takes both transports over, bytes still unread
    included; otherwise as :func:`start_relay`."""
    loop = asyncio.get_running_loop()
    handle = RelayHandle(loop, timeout_end, on_done)
    state = _Relay(loop)
    for half, side in ((state.client, client), (state.server, server)):
        transport = side.transport
        assert transport is not None
        pending = side.take()
        transport.set_protocol(half)
        half.connection_made(transport)  # reading paused until both are set
        if pending:
            half.data_received(pending)
        half.eof, half.lost = side.eof, side.lost or transport.is_closing()
    state.start()
    handle.running(state, idle_timeout)
    state.done.add_done_callback(lambda _: handle.finished())
    return handle


async def _until_done(start: Callable[[Callable[[RelayResult], None]], RelayHandle]) -> RelayResult:
    """Run the relay ``start`` starts; the result once both directions are done. When cancelled, it
    aborts both sides and raises :class:`RelayCancelled`, with what was moved."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[RelayResult] = loop.create_future()

    def finished(result: RelayResult) -> None:
        if not done.done():
            done.set_result(result)

    handle = start(finished)
    try:
        return await asyncio.shield(done)
    except asyncio.CancelledError:
        raise await cancelled_relay(handle, done) from None


async def relay(
    client: socket.socket,
    server: socket.socket,
    *,
    idle_timeout: float,
    timeout_end: End = End.CLIENT_TIMEOUT,
    method: str | None = None,
) -> RelayResult:
    """:func:`start_relay` as a coroutine: the result once both directions are done. When cancelled, it
    aborts both sides and raises :class:`RelayCancelled`, with what was moved."""
    return await _until_done(
        lambda finished: start_relay(
            client, server, idle_timeout=idle_timeout, timeout_end=timeout_end, on_done=finished, method=method
        )
    )


async def relay_transports(
    client: Side, server: Side, *, idle_timeout: float, timeout_end: End = End.CLIENT_TIMEOUT
) -> RelayResult:
    """:func:`start_transport_relay` as a coroutine, as :func:`relay` is :func:`start_relay`'s."""
    return await _until_done(
        lambda finished: start_transport_relay(
            client, server, idle_timeout=idle_timeout, timeout_end=timeout_end, on_done=finished
        )
    )
