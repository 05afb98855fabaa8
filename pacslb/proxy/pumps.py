"""The splice relay, on any event loop: the pumps, the idle watch, and how a relay reports its end.

This module imports neither asyncio nor anything heavy, so that a relay worker process
(pacslb/proxy/workers/relayworker.py) can run it on its own small epoll loop. What it needs of a loop is
:class:`Loop`: add and remove readers and writers, call later, and a clock; an asyncio loop (uvloop) is
one, pacslb/proxy/eventloop.py is another. See pacslb/proxy/relay.py for the relay as a whole.
"""

from __future__ import annotations

import fcntl
import os
import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from pacslb.descriptors import EXHAUSTION
from pacslb.proxy.outcome import End

if TYPE_CHECKING:
    from collections.abc import Callable


# What a relay needs of others (protocols, at module level: the module is compiled, pacslb/compiled.py).


class TimerLike(Protocol):
    def cancel(self) -> object: ...


class Abortable(Protocol):
    """A relay as its owner holds it: it can be cut short (it still reports how it ended)."""

    def abort(self) -> None: ...


class Loop(Protocol):
    """What the relay needs of an event loop."""

    def add_reader(self, fd: int, callback: Callable[[], object]) -> None: ...
    def remove_reader(self, fd: int) -> object: ...
    def add_writer(self, fd: int, callback: Callable[[], object]) -> None: ...
    def remove_writer(self, fd: int) -> object: ...
    def call_later(self, delay: float, callback: Callable[[], object]) -> Any: ...
    def time(self) -> float: ...


class _Engine(Protocol):
    """What a relay needs of either way of moving bytes."""

    def activity(self) -> tuple[int, ...]: ...
    def abort(self) -> None: ...
    def counts(self) -> tuple[int, int]: ...
    def server_first(self) -> bool: ...


#: The idle timer looks this many times per period, so a connection closes within 1.25x its timeout.
IDLE_TICKS_PER_PERIOD = 4
#: Pipe capacity per direction for splice. Measured on this kind of machine: 64 KiB (the kernel default)
#: costs a wakeup per 64 KiB; 1 MiB moves bulk data with far fewer, and pages are only used while data sits
#: in the pipe. Unprivileged users have a soft limit on pipe pages; F_SETPIPE_SZ failing is not an error.
PIPE_SIZE = 1024 * 1024
#: Empty pipes kept for the next reads (a pipe costs three system calls to make and two to close: as much as
#: the rest of a short connection's relay). Each holds no memory while empty. A direction takes a pipe when
#: it reads and gives it back once the pipe is drained into the destination, so pipes are held only by
#: directions whose destination is slower than their source; these are shared by everyone else.
IDLE_PIPES = 64
_idle_pipes: list[tuple[int, int]] = []


def close_idle_pipes() -> None:
    """Close the pipes kept for reuse (at shutdown, to count descriptors, or when descriptors run out)."""
    while _idle_pipes:
        r, w = _idle_pipes.pop()
        os.close(r)
        os.close(w)


# Pipes kept for later are descriptors that a connection needs now: out of descriptors, they go.
EXHAUSTION.on_exhausted(close_idle_pipes)


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


@dataclass(slots=True, init=False)
class RelayResult:
    """How a relayed connection ended. Made for every connection, so its ``__init__`` is written out: a
    generated one runs as interpreted Python even here, compiled (pacslb/compiled.py)."""

    bytes_up: int  # client -> server
    bytes_down: int  # server -> client
    end: End

    def __init__(self, bytes_up: int, bytes_down: int, end: End) -> None:
        self.bytes_up = bytes_up
        self.bytes_down = bytes_down
        self.end = end


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
            try:
                self._pipe()
            except OSError as exc:  # out of descriptors: this connection ends, the others go on
                self.owner.out_of_descriptors(exc)
                return
        try:
            n = os.splice(self.src.fileno(), self.pipe_w, SPLICE_CHUNK, flags=_SPLICE_FLAGS)
        except (BlockingIOError, InterruptedError):
            if self.in_pipe == 0:
                self._put_pipe()
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
        self._put_pipe()  # empty: whichever direction reads next takes it
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
            if self.in_pipe == 0:
                self._put_pipe()
            else:
                os.close(self.pipe_r)
                os.close(self.pipe_w)
                self.pipe_r = self.pipe_w = -1

    def _put_pipe(self) -> None:
        """Give back an empty pipe: kept for the next direction that reads (up to :data:`IDLE_PIPES`), or
        closed. A pipe is held only while bytes wait in it, so an idle connection holds its two sockets and
        no more."""
        if self.pipe_r < 0:
            return
        if len(_idle_pipes) < IDLE_PIPES:
            _idle_pipes.append((self.pipe_r, self.pipe_w))
        else:
            os.close(self.pipe_r)
            os.close(self.pipe_w)
        self.pipe_r = self.pipe_w = -1


class _SpliceRelay:
    """The zero-copy relay: two pumps over the same pair of sockets."""

    __slots__ = ("client", "closed", "down", "exhausted", "first", "loop", "on_close", "server", "up")

    def __init__(self, loop: Loop, client: socket.socket, server: socket.socket) -> None:
        self.loop = loop
        self.on_close: Callable[[], None] | None = None  # told once, when both sockets are closed
        self.client = client
        self.server = server
        self.up = _Pump(self, client, server)
        self.down = _Pump(self, server, client)
        self.first: _Pump | None = None
        self.closed = False
        self.exhausted = False  # closed because no pipe could be made

    def start(self) -> None:
        self.up.start()
        self.down.start()

    def out_of_descriptors(self, exc: OSError) -> None:
        """No pipe could be made (EMFILE, ENFILE, ENOMEM): close the connection, which frees two descriptors,
        rather than leave its reader registered (the loop would call it again at once, forever)."""
        self.exhausted = True
        EXHAUSTION.note("pipe", (exc.strerror or str(exc)).lower(), self.loop)
        self._close()

    def pump_finished(self, pump: _Pump) -> None:
        if self.first is None:
            self.first = pump
        pump.stop()
        other = self.down if pump is self.up else self.up
        if other.finished:
            # Both directions read to their end of file: closing now sends the end of file the shutdown would
            # (after what was written; nothing is left unread to turn it into a reset), one call fewer.
            self._close()
            return
        try:
            pump.dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the peer is already gone; the other direction will find out

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

    def __init__(self, loop: Loop, state: _Engine, timeout: float) -> None:
        self.loop = loop
        self.state = state
        self.timeout = timeout
        self.period = max(timeout / IDLE_TICKS_PER_PERIOD, 0.01)
        self.last_seen = state.activity()
        self.last_active = loop.time()
        self.timed_out = False
        self.handle: TimerLike | None = loop.call_later(self.period, self.tick)

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


class RelayHandle:
    """A running relay: :meth:`abort` closes both sides at once; ``on_done`` is told the result once."""

    __slots__ = ("loop", "on_done", "state", "task", "timeout_end", "watch")

    def __init__(self, loop: Loop, timeout_end: End, on_done: Callable[[RelayResult], None]) -> None:
        self.loop = loop
        self.timeout_end = timeout_end
        self.on_done: Callable[[RelayResult], None] | None = on_done
        self.state: _Engine | None = None
        self.watch: _IdleWatch | None = None
        self.task: TimerLike | None = None  # the buffered relay's setup (an asyncio task), while it runs

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
        elif getattr(state, "exhausted", False):
            end = End.NO_DESCRIPTORS
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


def start_splice(
    loop: Loop,
    client: socket.socket,
    server: socket.socket,
    *,
    idle_timeout: float,
    timeout_end: End,
    on_done: Callable[[RelayResult], None],
) -> RelayHandle:
    """The splice relay on ``loop`` (see :func:`pacslb.proxy.relay.start_relay`)."""
    handle = RelayHandle(loop, timeout_end, on_done)
    state = _SpliceRelay(loop, client, server)
    state.on_close = handle.finished
    handle.running(state, idle_timeout)
    state.start()
    return handle
