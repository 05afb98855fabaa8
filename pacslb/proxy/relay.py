"""The relay: moves bytes between a client socket and a server socket until both are done.

Theory of operation. The rest of pacslb hands this module a pair of connected sockets and gets back,
when the connection is over, how many bytes went each way and how it ended. Nothing else touches the
bytes, so this module alone decides how they move. Two ways, same behaviour:

- splice (Linux, the default): per direction, splice(2) moves bytes from the source socket into a pipe
  and from the pipe into the destination socket, in the kernel, never copied into Python. Readiness comes
  from the event loop's add_reader/add_writer. Backpressure: when the destination cannot take more, the
  direction stops reading its source and waits for the destination to become writable. The pipes are
  made on a direction's first data, so idle connections hold no pipe.
- buffered (elsewhere, or ``PACSLB_RELAY=buffered``): one asyncio Protocol per side on the loop's own
  transports (C code under uvloop); when the transport writing to one side has too much buffered, the
  other side stops reading until it drains.

Half-close: an EOF from one side is passed on as a write shutdown to the other (after the bytes already
read), and the connection stays open in the other direction until that side is done too. An error on
either side (reset) closes both. Idle timeout: a timer ticks a few times per timeout period and closes
the connection if no byte moved in either direction for the whole period.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, cast

from pacslb.proxy.outcome import End

#: The idle timer looks this many times per period, so a connection closes within 1.25x its timeout.
IDLE_TICKS_PER_PERIOD = 4
#: Pipe capacity per direction for splice. Measured on this kind of machine: 64 KiB (the kernel default)
#: costs a wakeup per 64 KiB; 1 MiB moves bulk data with far fewer, and pages are only used while data sits
#: in the pipe. Unprivileged users have a soft limit on pipe pages; F_SETPIPE_SZ failing is not an error.
PIPE_SIZE = 1024 * 1024
#: Empty pipes kept for the next connections (a pipe costs three system calls to make and two to close:
#: as much as the rest of a short connection's relay). Each holds no memory while empty.
IDLE_PIPES = 64
_idle_pipes: list[tuple[int, int]] = []


def close_idle_pipes() -> None:
    """Close the pipes kept for reuse (at shutdown, or to count descriptors)."""
    while _idle_pipes:
        r, w = _idle_pipes.pop()
        os.close(r)
        os.close(w)


#: Most bytes asked of one splice call.
SPLICE_CHUNK = PIPE_SIZE
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
_SPLICE_FLAGS = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)
SPLICE_AVAILABLE = hasattr(os, "splice")
#: Which relay new connections use: "splice" where the platform has it, else "buffered".
DEFAULT_METHOD = (
    os.environ.get("PACSLB_RELAY", "splice" if SPLICE_AVAILABLE else "buffered")
    if os.environ.get("PACSLB_RELAY") in (None, "splice", "buffered")
    else "buffered"
)
if DEFAULT_METHOD == "splice" and not SPLICE_AVAILABLE:
    DEFAULT_METHOD = "buffered"


@dataclass(frozen=True, slots=True)
class RelayResult:
    bytes_up: int  # client -> server
    bytes_down: int  # server -> client
    end: End


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


class _Engine(Protocol):
    """What a relay needs of either way of moving bytes."""

    def activity(self) -> tuple[int, ...]: ...
    def abort(self) -> None: ...
    def counts(self) -> tuple[int, int]: ...
    def server_first(self) -> bool: ...


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


class _Pump:
    """One direction of the splice relay: source socket -> pipe -> destination socket."""

    __slots__ = (
        "dst",
        "eof",
        "failed",
        "finished",
        "in_pipe",
        "loop",
        "moved",
        "owner",
        "pipe_r",
        "pipe_w",
        "reading",
        "src",
        "writing",
    )

    def __init__(self, owner: _SpliceRelay, src: socket.socket, dst: socket.socket) -> None:
        self.owner = owner
        self.loop = owner.loop
        self.src = src
        self.dst = dst
        self.pipe_r = -1
        self.pipe_w = -1
        self.in_pipe = 0  # bytes read from src and not yet written to dst
        self.moved = 0  # bytes written to dst
        self.reading = False
        self.writing = False
        self.eof = False
        self.finished = False
        self.failed = False

    def start(self) -> None:
        self.loop.add_reader(self.src.fileno(), self.on_readable)
        self.reading = True

    def _pipe(self) -> None:
        if _idle_pipes:
            self.pipe_r, self.pipe_w = _idle_pipes.pop()
            return
        self.pipe_r, self.pipe_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            fcntl.fcntl(self.pipe_w, _F_SETPIPE_SZ, PIPE_SIZE)
        except OSError:
            pass  # over the user's pipe page limit: the default size still works, only slower

    def on_readable(self) -> None:
        if self.pipe_w < 0:
            self._pipe()
        try:
            n = os.splice(self.src.fileno(), self.pipe_w, SPLICE_CHUNK, flags=_SPLICE_FLAGS)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.owner.failed(self, reading=True)
            return
        if n == 0:
            self.eof = True
            self._stop_reading()
            if self.in_pipe == 0:
                self.owner.pump_finished(self)
            return
        self.in_pipe += n
        self.flush()

    def flush(self) -> None:
        dst = self.dst.fileno()
        while self.in_pipe:
            try:
                n = os.splice(self.pipe_r, dst, self.in_pipe, flags=_SPLICE_FLAGS)
            except (BlockingIOError, InterruptedError):
                # The destination is full: stop reading the source until it drains.
                self._stop_reading()
                if not self.writing:
                    self.loop.add_writer(dst, self.flush)
                    self.writing = True
                return
            except OSError:
                self.owner.failed(self, reading=False)
                return
            self.in_pipe -= n
            self.moved += n
        if self.writing:
            self.loop.remove_writer(dst)
            self.writing = False
        if self.eof:
            self.owner.pump_finished(self)
        elif not self.reading and not self.finished:
            self.loop.add_reader(self.src.fileno(), self.on_readable)
            self.reading = True

    def _stop_reading(self) -> None:
        if self.reading:
            self.loop.remove_reader(self.src.fileno())
            self.reading = False

    def stop(self) -> None:
        """Unregister from the loop and close the pipe (the sockets belong to the relay)."""
        self.finished = True
        self._stop_reading()
        if self.writing:
            self.loop.remove_writer(self.dst.fileno())
            self.writing = False
        if self.pipe_r >= 0:
            if self.in_pipe == 0 and len(_idle_pipes) < IDLE_PIPES:
                _idle_pipes.append((self.pipe_r, self.pipe_w))  # empty: the next connection can use it
            else:
                os.close(self.pipe_r)
                os.close(self.pipe_w)
            self.pipe_r = self.pipe_w = -1


class _SpliceRelay:
    """The zero-copy relay: two pumps over the same pair of sockets."""

    __slots__ = ("client", "closed", "down", "first", "loop", "on_close", "server", "up")

    def __init__(self, loop: asyncio.AbstractEventLoop, client: socket.socket, server: socket.socket) -> None:
        self.loop = loop
        self.on_close: Callable[[], None] | None = None  # told once, when both sockets are closed
        self.client = client
        self.server = server
        self.up = _Pump(self, client, server)
        self.down = _Pump(self, server, client)
        self.first: _Pump | None = None
        self.closed = False

    def start(self) -> None:
        self.up.start()
        self.down.start()

    def pump_finished(self, pump: _Pump) -> None:
        if self.first is None:
            self.first = pump
        pump.stop()
        try:
            pump.dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the peer is already gone; the other direction will find out
        other = self.down if pump is self.up else self.up
        if other.finished:
            self._close()

    def failed(self, pump: _Pump, reading: bool) -> None:
        """A reset, or writing to a side that is gone: the connection is over in both directions. The side
        that ended it is the pump's source if reading failed, its destination if writing did."""
        if self.first is None:
            self.first = pump if reading else (self.down if pump is self.up else self.up)
        self._close()

    def _close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.up.stop()
        self.down.stop()
        self.client.close()
        self.server.close()
        on_close, self.on_close = self.on_close, None
        if on_close is not None:
            on_close()

    def abort(self) -> None:
        self._close()

    def counts(self) -> tuple[int, int]:
        return self.up.moved, self.down.moved

    def server_first(self) -> bool:
        return self.first is self.down

    def activity(self) -> tuple[int, ...]:
        return (self.up.moved, self.down.moved, self.up.in_pipe, self.down.in_pipe)


class _IdleWatch:
    """Closes a relay through which no byte moved for ``timeout`` seconds. One timer handle per connection,
    re-armed a few times per period: no task, no future, nothing per byte."""

    __slots__ = ("handle", "last_active", "last_seen", "loop", "period", "state", "timed_out", "timeout")

    def __init__(self, loop: asyncio.AbstractEventLoop, state: _Engine, timeout: float) -> None:
        self.loop = loop
        self.state = state
        self.timeout = timeout
        self.period = max(timeout / IDLE_TICKS_PER_PERIOD, 0.01)
        self.last_seen = state.activity()
        self.last_active = loop.time()
        self.timed_out = False
        self.handle: asyncio.TimerHandle | None = loop.call_later(self.period, self.tick)

    def tick(self) -> None:
        now_seen = self.state.activity()
        now = self.loop.time()
        if now_seen != self.last_seen:
            self.last_seen, self.last_active = now_seen, now
        elif now - self.last_active >= self.timeout:
            self.timed_out = True
            self.handle = None
            self.state.abort()
            return
        self.handle = self.loop.call_later(self.period, self.tick)

    def cancel(self) -> None:
        if self.handle is not None:
            self.handle.cancel()
            self.handle = None


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


class RelayHandle:
    """A running relay: :meth:`abort` closes both sides at once; ``on_done`` is told the result once."""

    __slots__ = ("loop", "on_done", "state", "task", "timeout_end", "watch")

    def __init__(
        self, loop: asyncio.AbstractEventLoop, timeout_end: End, on_done: Callable[[RelayResult], None]
    ) -> None:
        self.loop = loop
        self.timeout_end = timeout_end
        self.on_done: Callable[[RelayResult], None] | None = on_done
        self.state: _Engine | None = None
        self.watch: _IdleWatch | None = None
        self.task: asyncio.Task[None] | None = None  # the buffered relay's setup, while it runs

    def running(self, state: _Engine, idle_timeout: float) -> None:
        self.state = state
        self.watch = _IdleWatch(self.loop, state, idle_timeout)

    def finished(self) -> None:
        """Both sides are closed: report how it went."""
        state, watch = self.state, self.watch
        assert state is not None and watch is not None
        watch.cancel()
        up, down = state.counts()
        if watch.timed_out:
            end = self.timeout_end
        elif state.server_first():
            end = End.SERVER_CLOSED
        else:
            end = End.CLIENT_CLOSED
        self.report(RelayResult(up, down, end))

    def report(self, result: RelayResult) -> None:
        on_done, self.on_done = self.on_done, None
        if on_done is not None:
            on_done(result)

    def abort(self) -> None:
        """Close both sides now (the result is reported as the relay stands)."""
        if self.state is not None:
            self.state.abort()
        elif self.task is not None:
            self.task.cancel()


def start_relay(
    client: socket.socket,
    server: socket.socket,
    *,
    idle_timeout: float,
    timeout_end: End,
    on_done: Callable[[RelayResult], None],
    method: str | None = None,
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
    """
    loop = asyncio.get_running_loop()
    handle = RelayHandle(loop, timeout_end, on_done)
    if (method or DEFAULT_METHOD) == "splice":
        state = _SpliceRelay(loop, client, server)
        state.on_close = handle.finished
        handle.running(state, idle_timeout)
        state.start()
    else:
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


async def relay(
    client: socket.socket,
    server: socket.socket,
    *,
    idle_timeout: float,
    timeout_end: End = End.CLIENT_TIMEOUT,
    method: str | None = None,
) -> RelayResult:
    """:func:`start_relay` as a coroutine: the result once both directions are done. When cancelled, it
    aborts both sides and re-raises."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[RelayResult] = loop.create_future()

    def finished(result: RelayResult) -> None:
        if not done.done():
            done.set_result(result)

    handle = start_relay(
        client, server, idle_timeout=idle_timeout, timeout_end=timeout_end, on_done=finished, method=method
    )
    try:
        return await done
    except asyncio.CancelledError:
        handle.abort()
        raise
