"""File descriptors: the process's limit, what the config needs of it, and running out of them.

What this module owns:

- the soft ``RLIMIT_NOFILE``, raised to the hard limit when ``pacslb run`` or ``pacslb demo`` starts (relay
  and web workers are started later and inherit it): a balancer holds two sockets per connection, and
  the soft limit most systems give (1,024) is far below what the default ``maxconn`` of one service needs;
- the arithmetic of :func:`descriptors_needed` and the start-up warning (:func:`capacity_warning`) when the
  services' ``maxconn`` cannot fit in the limit;
- the reserve: the last :func:`reserve` descriptors below the limit are kept for what keeps the balancer
  manageable (the admin API and /healthz, health checks, the workers' control sockets). A client
  connection or a node socket whose descriptor number falls in the reserve is closed at once
  (:func:`in_reserve`). Linux hands out the lowest free number, so a number in the reserve means every
  number below it is taken: the check costs no system call. It is a heuristic (a hole left lower down by a
  closed connection is handed out first), not a guarantee;
- :data:`EXHAUSTION`, the record of running out (EMFILE, ENFILE, and ENOBUFS/ENOMEM for sockets): every
  place that meets it calls :meth:`Exhaustion.note`, which counts it and logs at most one
  ``descriptors_exhausted`` line per :data:`LOG_INTERVAL` with the count since the last line, then one
  ``descriptors_ok`` line once :data:`RECENT` passes without any. /healthz and the metrics read it.

It must stay light (no asyncio, no socket library beyond the standard one): a relay worker imports it.
"""

from __future__ import annotations

import errno
import logging
import resource
import socket
import time
from collections import Counter
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from pacslb.logs import log_event

if TYPE_CHECKING:
    from pacslb.proxy.pumps import Loop

log = logging.getLogger("pacslb.descriptors")

#: The errors that mean "this process (or this machine) is out of descriptors or socket memory": a local
#: failure, never the peer's. ENOBUFS and ENOMEM come from socket(2) and connect(2) when the kernel cannot
#: allocate a socket's buffers.
LOCAL_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
#: At most one ``descriptors_exhausted`` line per this many seconds (each carries the count since the last).
LOG_INTERVAL = 1.0
#: Exhausted "recently" means within this many seconds: /healthz answers 503 and the gauge says 1 for this
#: long after the last occurrence, so that a keepalived track script checking every 2 s (with fall 2)
#: sees it even when descriptors come and go.
RECENT = 10.0
#: Descriptors a connection holds in the process that relays it: the client's socket and the node's (2),
#: and a pipe (2 more) per direction while bytes wait for a destination slower than its source
#: (pacslb/proxy/pumps.py). Counting 3 allows for half the connections having one lagging direction.
DESCRIPTORS_PER_CONNECTION = 3
#: Descriptors pacslb holds besides connections: the interpreter, the event loop, listening sockets, the
#: admin API and its clients, health checks, log files. (The stock of empty pipes, up to 128 descriptors,
#: is closed as soon as descriptors run out.)
BASE_DESCRIPTORS = 64
#: The reserve: the last descriptors below the limit that client and node sockets may not take, so that the
#: admin API, /healthz, metrics and health checks still work while traffic has taken everything else. A
#: reserve of 32 holds a few admin connections, a check per node of a dozen nodes, and the relay pipes of
#: a few busy connections; with a small limit it is an eighth of it.
RESERVE = 32


_limit: int = resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def limit() -> int:
    """The soft limit on descriptors of this process (read at import, kept current by :func:`raise_limit`)."""
    return _limit


def reserve(soft: int | None = None) -> int:
    """How many descriptors under the limit are kept for managing the balancer (:data:`RESERVE`, at most an
    eighth of a small limit)."""
    soft = _limit if soft is None else soft
    return max(1, min(RESERVE, soft // 8))


def in_reserve(fd: int) -> bool:
    """Whether descriptor number ``fd`` is in the reserve (every number below it is in use)."""
    if fd < _reserve_from:
        return False
    _refresh()  # rarely here: make sure the limit was not raised since by other means than raise_limit()
    return fd >= _reserve_from


def _refresh() -> None:
    global _limit, _reserve_from
    _limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    _reserve_from = _limit - reserve(_limit)


_reserve_from: int = _limit - reserve()


def raise_limit() -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard one (capped by what the kernel allows a process).

    Returns:
        The soft limit before and after (equal when it could not be raised).
    """
    global _limit, _reserve_from
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard
    if wanted == resource.RLIM_INFINITY or wanted > _nr_open():
        wanted = _nr_open()
    new = soft
    if wanted > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            new = wanted
        except (ValueError, OSError):
            new = soft
    _limit = new
    _reserve_from = new - reserve(new)
    return soft, new


def _nr_open() -> int:
    """The most descriptors the kernel lets one process have (fs.nr_open)."""
    try:
        with open("/proc/sys/fs/nr_open") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 1 << 20


def descriptors_needed(maxconns: Iterable[int], workers: int = 1) -> int:
    """Descriptors one process may need when every service holds its ``maxconn`` connections.

    The main process accepts every connection and holds it until it is handed to a relay worker; with
    workers it relays a share of them, but a client that connects faster than workers take its connections
    can have them all in the main process at once, so the sum of ``maxconn`` is counted whole: the
    estimate is for the process that needs the most. ``workers`` adds their control sockets.
    """
    return sum(maxconns) * DESCRIPTORS_PER_CONNECTION + BASE_DESCRIPTORS + 2 * max(0, workers - 1)


def capacity_warning(maxconns: dict[str, int], soft: int, workers: int = 1) -> dict[str, Any] | None:
    """The fields of the ``descriptors_low`` warning when the services' ``maxconn`` cannot fit in ``soft``
    descriptors, else None.

    Args:
        maxconns: each service's ``maxconn``, by name.
        soft: the descriptor limit of the process.
        workers: processes in all (the main one included).
    """
    needed = descriptors_needed(maxconns.values(), workers)
    if needed <= soft:
        return None
    usable = max(0, soft - BASE_DESCRIPTORS - reserve(soft))
    return {
        "limit": soft,
        "needed": needed,
        "maxconn": sum(maxconns.values()),
        "connections_that_fit": usable // DESCRIPTORS_PER_CONNECTION,
        "per_connection": DESCRIPTORS_PER_CONNECTION,
        "hint": "raise LimitNOFILE (systemd) or ulimit -Hn, or lower maxconn",
    }


def is_local(exc: BaseException) -> bool:
    """Whether the first OSError in an exception chain is a local shortage (:data:`LOCAL_ERRNOS`)."""
    seen: BaseException | None = exc
    depth = 0
    while seen is not None and depth < 16:
        if isinstance(seen, OSError) and seen.errno:
            return seen.errno in LOCAL_ERRNOS
        seen = seen.__cause__ or seen.__context__
        depth += 1
    return False


class Exhaustion:
    """Counts the times this process ran out of descriptors and says so in the log, rate-limited.

    :meth:`note` is cheap and never raises: it may be called thousands of times a second. The first
    occurrence is logged at once; later ones are counted and logged at most once per ``interval`` (a
    timer on the caller's loop flushes the last count); ``recent`` seconds after the last occurrence one
    ``descriptors_ok`` line closes the episode.
    """

    def __init__(
        self,
        interval: float = LOG_INTERVAL,
        recent: float = RECENT,
        clock: Callable[[], float] = time.monotonic,
        emit: Callable[[str, int, dict[str, Any]], None] | None = None,
    ) -> None:
        self.interval = interval
        self.recent = recent
        self.clock = clock
        self.emit = emit if emit is not None else _emit
        self.total = 0  # occurrences since start
        self.by_place: Counter[str] = Counter()  # occurrences since start, by where they happened
        self.last: float | None = None  # when the last occurrence was (clock time)
        self.quiet = False  # count only: a relay worker reports to the main process, which logs
        self._pending: Counter[str] = Counter()  # occurrences not logged yet, by place
        self._reasons: set[str] = set()
        self._logged_at: float | None = None  # when the last line was written
        self._episode = False  # a descriptors_exhausted line was written and no descriptors_ok since
        self._timer: Any = None
        self._timer_loop: Loop | None = None
        self._listeners: list[Callable[[], None]] = []

    def on_exhausted(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` at each occurrence (a listener pauses accepting, the relay drops its kept pipes)."""
        self._listeners.append(callback)

    def off(self, callback: Callable[[], None]) -> None:
        """No longer call ``callback`` (a listener that closed)."""
        if callback in self._listeners:
            self._listeners.remove(callback)

    def note(self, place: str, reason: str = "", loop: Loop | None = None, count: int = 1) -> None:
        """Count ``count`` occurrences at ``place`` ("accept", "connect", "pipe", "check", "worker", ...).

        Args:
            place: where it happened (a label of the metric and a field of the log line).
            reason: the error's text ("too many open files").
            loop: the caller's event loop, for the timer that flushes the count (without one the count is
                logged with the next occurrence after ``interval``).
            count: how many occurrences (a worker reports several at once).
        """
        now = self.clock()
        self.total += count
        self.by_place[place] += count
        self.last = now
        self._pending[place] += count
        if reason:
            self._reasons.add(reason)
        for callback in self._listeners:
            try:
                callback()
            except Exception:  # a listener's bug must not turn running out into a crash
                log.exception("descriptor exhaustion listener failed")
        if self._logged_at is None or now - self._logged_at >= self.interval:
            self._flush(now)
        if loop is not None and (self._timer is None or self._timer_loop is not loop):
            # (A timer on another loop, one that has stopped since, would never fire: tests run several.)
            self._timer_loop = loop
            self._timer = loop.call_later(self.interval, lambda: self._tick(loop))

    def exhausted(self, now: float | None = None) -> bool:
        """Whether the last occurrence is less than ``recent`` seconds ago."""
        if self.last is None:
            return False
        now = self.clock() if now is None else now
        return now - self.last < self.recent

    def seconds_since(self, now: float | None = None) -> float | None:
        """Seconds since the last occurrence (None: never)."""
        if self.last is None:
            return None
        return (self.clock() if now is None else now) - self.last

    def _flush(self, now: float) -> None:
        if not self._pending:
            return
        count = sum(self._pending.values())
        fields: dict[str, Any] = {
            "count": count,
            "where": ",".join(sorted(self._pending)),
            "total": self.total,
            "limit": _limit,
        }
        if self._reasons:
            fields["reason"] = ",".join(sorted(self._reasons))
        self._pending.clear()
        self._reasons.clear()
        self._logged_at = now
        self._episode = True
        if not self.quiet:
            self.emit("descriptors_exhausted", logging.ERROR, fields)

    def _tick(self, loop: Loop) -> None:
        """The timer: log what was counted since the last line; close the episode once it is over."""
        if loop is not self._timer_loop:
            return
        self._timer = None
        now = self.clock()
        if self._pending and (self._logged_at is None or now - self._logged_at >= self.interval):
            self._flush(now)
        if self.last is not None and now - self.last >= self.recent:
            self._flush(now)
            if self._episode:
                self._episode = False
                if not self.quiet:
                    self.emit("descriptors_ok", logging.INFO, {"total": self.total, "quiet_for": now - self.last})
            return
        # Once per interval while the episode lasts (what is counted meanwhile is written within a second).
        delay = self.interval
        if self._pending and self._logged_at is not None:
            delay = max(0.01, self._logged_at + self.interval - now)
        self._timer = loop.call_later(delay, lambda: self._tick(loop))


def health(exhaustion: Exhaustion | None = None) -> dict[str, Any]:
    """What /healthz answers: ``{"ok": true}``, or while descriptors ran out recently ``{"ok": false,
    "reason": "descriptors_exhausted", "seconds_ago": ..., "count": ...}``."""
    exhaustion = EXHAUSTION if exhaustion is None else exhaustion
    now = exhaustion.clock()
    if not exhaustion.exhausted(now):
        return {"ok": True}
    since = exhaustion.seconds_since(now) or 0.0
    return {
        "ok": False,
        "reason": "descriptors_exhausted",
        "detail": f"out of file descriptors {since:.1f}s ago (limit {_limit})",
        "seconds_ago": round(since, 3),
        "count": exhaustion.total,
    }


def _emit(event: str, level: int, fields: dict[str, Any]) -> None:
    log_event(log, event, level, **fields)


#: This process's record of running out of descriptors.
EXHAUSTION = Exhaustion()


def stream_socket(fd: int) -> socket.socket:
    """A socket object for ``fd``, a connection's descriptor that is already non-blocking (a copy of one this
    process or the main process set so: the flag belongs to the open file, which the copies share). Its
    type and protocol are given and its mode comes from the type, so no system call asks for them or sets
    the mode again (Python still makes one, to check that ``fd`` is a socket)."""
    return socket.socket(-1, socket.SOCK_STREAM | socket.SOCK_NONBLOCK, 0, fd)
