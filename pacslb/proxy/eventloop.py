"""A small epoll event loop for the relays: readers, writers and timers, nothing else.

A relay worker only moves bytes with splice(2) (pacslb/proxy/pumps.py) and talks to the main process over
one Unix socket. asyncio would cost it a third of its memory (it imports the ssl module, and uvloop needs
it too): with 10,000 idle connections that is the difference between a worker of 15 MB and one of 25 MB
before any connection. This loop offers what the pumps use (:class:`pacslb.proxy.pumps.Loop`) with the
semantics of asyncio's: level-triggered readers and writers, one of each per descriptor, and timers that
can be cancelled.

Each descriptor is registered with epoll once, with the events its reader and writer want, and modified
when they change: one ``epoll_ctl`` per change, no more. A callback may add or remove any reader, writer
or timer, including its own: what each event calls is looked up when it is called.

The main process's relays use one too, inside its asyncio loop (:class:`HostedEpoll`, :func:`hosted`): the
asyncio loop watches the epoll set's own descriptor, and the set holds the relays' sockets (and tcp mode's
sockets while they connect). uvloop's
readers cost a handle object, a look-up in its table of transports that raises KeyError in Python, and
a few ``epoll_ctl`` calls (some failing) for every descriptor that comes and goes: at thousands of short
connections a second, more than the relaying itself.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import select
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import asyncio

from pacslb.descriptors import EXHAUSTION, LOCAL_ERRNOS

log = logging.getLogger("pacslb.workers")

_IN = select.EPOLLIN
_OUT = select.EPOLLOUT
#: Errors and hang-ups wake both the reader and the writer: each finds out by its next system call.
_ANY = select.EPOLLERR | select.EPOLLHUP
#: Most events taken from the kernel per wait.
MAX_EVENTS = 1024
#: Cancelled timers are purged from the heap once they are more than half of it and more than this many.
MIN_PURGE = 256


class Timer:
    """A call scheduled by :meth:`EpollLoop.call_later`."""

    __slots__ = ("callback", "cancelled", "loop", "when")

    def __init__(self, loop: EpollLoop, when: float, callback: Callable[[], object]) -> None:
        self.loop = loop
        self.when = when
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        if not self.cancelled:
            self.cancelled = True
            self.loop._timer_cancelled()


class EpollLoop:
    """Readers, writers and timers on one epoll set, run by :meth:`run` until :meth:`stop`."""

    #: Where it runs, as a failed callback's log line says, and as a ``descriptors_exhausted`` line's place.
    WHERE = "a relay worker"
    PLACE = "worker_loop"

    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._readers: dict[int, Callable[[], object]] = {}
        self._writers: dict[int, Callable[[], object]] = {}
        self._registered: dict[int, int] = {}  # fd -> the events epoll has for it
        self._timers: list[tuple[float, int, Timer]] = []
        self._order = itertools.count()  # ties between timers go in the order they were made
        self._cancelled = 0  # cancelled timers still in the heap
        self._running = False

    # -- what the pumps use ------------------------------------------------------------------------------

    def time(self) -> float:
        return time.monotonic()

    def add_reader(self, fd: int, callback: Callable[[], object]) -> None:
        self._readers[fd] = callback
        self._update(fd)

    def remove_reader(self, fd: int) -> bool:
        if self._readers.pop(fd, None) is None:
            return False
        self._update(fd)
        return True

    def add_writer(self, fd: int, callback: Callable[[], object]) -> None:
        self._writers[fd] = callback
        self._update(fd)

    def remove_writer(self, fd: int) -> bool:
        if self._writers.pop(fd, None) is None:
            return False
        self._update(fd)
        return True

    def call_later(self, delay: float, callback: Callable[[], object]) -> Timer:
        timer = Timer(self, time.monotonic() + delay, callback)
        heapq.heappush(self._timers, (timer.when, next(self._order), timer))
        return timer

    # -- running -----------------------------------------------------------------------------------------

    def stop(self) -> None:
        """:meth:`run` returns once the callbacks of this turn are done."""
        self._running = False

    def run(self) -> None:
        """Wait for events and timers and call their callbacks, until :meth:`stop`."""
        self._running = True
        while self._running:
            timeout = -1.0
            if self._timers:
                timeout = max(0.0, self._timers[0][0] - time.monotonic())
            try:
                events = self._epoll.poll(timeout, MAX_EVENTS)
            except InterruptedError:
                events = []
            self._dispatch(events)
            now = time.monotonic()
            timers = self._timers
            while timers and timers[0][0] <= now:
                timer = heapq.heappop(timers)[2]
                if timer.cancelled:
                    self._cancelled -= 1
                else:
                    timer.cancelled = True  # it ran: a cancel() from now on changes nothing
                    self._call(timer.callback)  # (a timer that raised is not called again anyway)

    def close(self) -> None:
        self._epoll.close()

    # -- inside ------------------------------------------------------------------------------------------

    def _dispatch(self, events: list[tuple[int, int]]) -> None:
        for fd, mask in events:
            if mask & (_IN | _ANY):
                reader = self._readers.get(fd)
                if reader is not None and not self._call(reader):
                    self._broken(fd, self._readers, reader)
            if mask & (_OUT | _ANY):
                writer = self._writers.get(fd)
                if writer is not None and not self._call(writer):
                    self._broken(fd, self._writers, writer)

    def _timer_cancelled(self) -> None:
        """A connection's timer is cancelled when it closes, long before the timer is due (an idle timeout
        ticks every few hours): once they are most of the heap, they go, so the heap stays the size of the
        live timers however many connections come and go."""
        self._cancelled += 1
        if self._cancelled > MIN_PURGE and self._cancelled * 2 > len(self._timers):
            self._timers = [entry for entry in self._timers if not entry[2].cancelled]
            heapq.heapify(self._timers)
            self._cancelled = 0

    def _update(self, fd: int) -> None:
        """Tell epoll what ``fd``'s reader and writer want now."""
        wanted = (_IN if fd in self._readers else 0) | (_OUT if fd in self._writers else 0)
        current = self._registered.get(fd)
        try:
            if not wanted:
                if current is not None:
                    del self._registered[fd]
                    self._epoll.unregister(fd)
            elif current is None:
                self._epoll.register(fd, wanted)
                self._registered[fd] = wanted
            elif current != wanted:
                self._epoll.modify(fd, wanted)
                self._registered[fd] = wanted
        except OSError:
            # The descriptor was closed (epoll forgot it by itself), perhaps its number reused since: start
            # over with what is open under that number now, if anything.
            self._registered.pop(fd, None)
            if wanted:
                try:
                    self._epoll.register(fd, wanted)
                except OSError:
                    return
                self._registered[fd] = wanted

    def _broken(self, fd: int, table: dict[int, Callable[[], object]], callback: Callable[[], object]) -> None:
        """A reader or writer raised: it is dropped. Level-triggered, it would be called again at once for as
        long as its descriptor stays ready, and raise again: a loop spinning on one connection, and a log
        line per turn. Its connection stays open until its idle timeout closes it."""
        if table.get(fd) is callback:
            del table[fd]
            self._update(fd)

    def _call(self, callback: Callable[[], object]) -> bool:
        """Call one callback; whether it returned (rather than raised)."""
        try:
            callback()
        except OSError as exc:
            if exc.errno in LOCAL_ERRNOS:  # out of descriptors where nobody expected it: counted, no traceback
                EXHAUSTION.note(self.PLACE, (exc.strerror or str(exc)).lower())
            else:
                log.exception("callback failed in %s", self.WHERE)
            return False
        except Exception:  # a bug in one connection's callback must not stop the others
            log.exception("callback failed in %s", self.WHERE)
            return False
        return True


class HostedEpoll(EpollLoop):
    """Readers and writers on an epoll set of their own inside an asyncio loop, which calls :meth:`ready`
    when the set has events; the clock and the timers are the asyncio loop's (see the module's docstring)."""

    WHERE = "the main process's relay loop"
    PLACE = "relay_loop"

    def __init__(self, host: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self.host = host
        host.add_reader(self._epoll.fileno(), self.ready)

    def time(self) -> float:
        return self.host.time()

    def call_later(self, delay: float, callback: Callable[[], object]) -> Any:
        return self.host.call_later(delay, callback)

    def ready(self) -> None:
        """The set has events: call their callbacks (what is left, past :data:`MAX_EVENTS`, wakes the
        asyncio loop again: it watches the set level-triggered)."""
        try:
            events = self._epoll.poll(0, MAX_EVENTS)
        except InterruptedError:
            return
        self._dispatch(events)

    def close(self) -> None:
        try:
            self.host.remove_reader(self._epoll.fileno())
        except Exception:  # the asyncio loop is closed already: nothing watches the set any more
            pass
        super().close()


#: The hosted set of the asyncio loop last asked for (pacslb runs one asyncio loop at a time).
_hosted: HostedEpoll | None = None


def hosted(loop: asyncio.AbstractEventLoop) -> HostedEpoll:
    """The :class:`HostedEpoll` of ``loop``, made on first use; a new loop gets a new one, and the one before
    is closed."""
    global _hosted
    current = _hosted
    if current is not None and current.host is loop and not loop.is_closed():
        return current
    if current is not None:
        current.close()
    _hosted = HostedEpoll(loop)
    return _hosted


def close_hosted() -> None:
    """Close the hosted set, if any (the engine stopped: nothing is left on it); the next :func:`hosted`
    makes a new one."""
    global _hosted
    if _hosted is not None:
        _hosted.close()
        _hosted = None
