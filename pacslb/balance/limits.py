"""Per-client limits: whether one more connection, or association, of a client may come in.

Theory of operation. A *client* is a source network (its address masked by ``limits.netmask`` or
``limits.netmask6``, the key :func:`client_key` gives). :class:`ClientLimits` keeps, per client, the
connections it holds open and a token bucket of new connections: the bucket holds at most
``client_burst`` tokens, refills at ``client_rate`` per second, and each admitted connection takes one.
A connection is admitted when the client holds fewer than ``client_maxconn`` and has a token left;
otherwise it is refused with the :class:`Limit` it hit (a refused connection takes no token, so a client
that floods is served again at ``client_rate`` as soon as it slows down). What was admitted is released
once, by the connection's end.

mode dicom adds two limits decided on the A-ASSOCIATE-RQ: associations open at once with one calling AE
title (``calling_ae_maxconn``), and distinct calling AE titles one client may have in the persistence
table (``client_ae_titles``): an AE title counts from its first association until ``window`` seconds
(the persistence timeout) after its last one ended, as its persistence entry does.

A refused client may be told why (an A-ASSOCIATE-RJ, an HTTP 429), which means holding its socket for a
moment. :meth:`ClientLimits.answering` bounds how many are held at once, per client and in all; past
that the connection is closed unanswered.

:class:`RefusalLog` decides which refusals are logged when: the first of a client for a limit at once,
the rest counted and reported once per interval, so a flood is a line every few seconds, not one per
connection.

Everything here is pure: no clock (times are the caller's monotonic seconds), no socket, no asyncio.
"""

from __future__ import annotations

import math
from collections import Counter, OrderedDict
from dataclasses import dataclass
from enum import StrEnum

from pacslb.balance.persistence import source_ip_key
from pacslb.config.model import LimitsSpec

#: Refused connections held at once, per client, to be told why (an A-ASSOCIATE-RJ needs the client's
#: A-ASSOCIATE-RQ first, a 429 needs the client to read it): a few, so a well-behaved client that went
#: over hears the answer, and a flood costs no more than these sockets for a second.
ANSWER_SLOTS_PER_CLIENT = 4
#: ... and in all, per service (the same bound as the clients dicom mode answers beyond maxconn).
ANSWER_SLOTS = 64
#: Clients tracked before idle ones are looked for and dropped (a client with no connection open and a
#: full bucket is the same as one never seen): the sweep happens when the count doubles, so it costs
#: nothing per connection, and memory stays within twice what active clients need.
SWEEP_FROM = 1024
#: How often the count of refusals of one client for one limit is logged while they go on.
LOG_INTERVAL = 5.0
#: Clients named one by one in a round of refusal lines; the rest are summed in one line (a flood from
#: many addresses must not become many lines either).
LOG_CLIENTS = 20
#: Rounding of the bucket's arithmetic: a client exactly at the rate gets its token.
_EPSILON = 1e-9


class Limit(StrEnum):
    """Which limit refused a client (the ``limit`` field of the log line; ``limit_`` + it is the reason
    in the rejection counters)."""

    CLIENT_MAXCONN = "client_maxconn"
    CLIENT_RATE = "client_rate"
    CALLING_AE_MAXCONN = "calling_ae_maxconn"
    CLIENT_AE_TITLES = "client_ae_titles"


def client_key(address: str, spec: LimitsSpec) -> str:
    """The client a source address belongs to, under ``spec``'s netmasks (IPv4-mapped counts as IPv4)."""
    return source_ip_key(address, spec.netmask, spec.netmask6)


class _Client:
    """What one client holds: open connections, its bucket (as of ``stamp``), sockets held to answer."""

    __slots__ = ("active", "answering", "stamp", "tokens")

    def __init__(self, tokens: float, now: float) -> None:
        self.active = 0
        self.answering = 0
        self.tokens = tokens
        self.stamp = now


@dataclass(slots=True)
class _Title:
    """One calling AE title of one client: associations open with it, when its last one ended."""

    active: int = 0
    released_at: float | None = None


class ClientLimits:
    """The per-client counters of one service, and the decisions on them.

    The spec may change (a reload) without losing the counts: :meth:`configure` takes the new bounds,
    and what was admitted under the old ones is released as usual.
    """

    def __init__(self, spec: LimitsSpec, window: float | None = None, max_titles: int = 100_000) -> None:
        self.spec = spec
        self.window = window
        self.max_titles = max_titles
        self._clients: dict[str, _Client] = {}
        self._sweep_at = SWEEP_FROM
        self.answering_total = 0
        self._by_ae: Counter[str] = Counter()  # open associations by calling AE title
        # The AE titles each client counts now, least recently used first.
        self._titles: dict[str, OrderedDict[str, _Title]] = {}
        self.title_count = 0  # (client, AE title) pairs in _titles
        self._titles_sweep_at = min(SWEEP_FROM, max_titles)

    def configure(self, spec: LimitsSpec, window: float | None = None, max_titles: int = 100_000) -> None:
        """New bounds (on reload). ``window``: how long an AE title counts after its last association
        ended (None: AE titles are not counted); ``max_titles``: bound on the (client, AE title) pairs kept."""
        self.spec = spec
        self.window = window
        self.max_titles = max_titles
        if window is None:
            self._titles.clear()
            self.title_count = 0
        self._titles_sweep_at = min(self._titles_sweep_at, max_titles)
        for client in self._clients.values():
            client.tokens = min(client.tokens, float(spec.client_burst))

    def __len__(self) -> int:
        return len(self._clients)

    # -- connections ----------------------------------------------------------------------------------

    def admit(self, key: str, now: float) -> Limit | None:
        """One more connection of client ``key``: None when it may come in (it is then counted until
        :meth:`release`), else the limit it hit."""
        spec = self.spec
        client = self._clients.get(key)
        if client is None:
            if len(self._clients) >= self._sweep_at:
                self._sweep(now)
            client = self._clients[key] = _Client(float(spec.client_burst), now)
        maxconn = spec.client_maxconn
        if maxconn is not None and client.active >= maxconn:
            return Limit.CLIENT_MAXCONN
        rate = spec.client_rate
        if rate is not None:
            tokens = client.tokens
            if tokens < spec.client_burst:
                tokens = min(float(spec.client_burst), tokens + (now - client.stamp) * rate)
            client.stamp = now
            if tokens < 1.0 - _EPSILON:
                client.tokens = tokens
                return Limit.CLIENT_RATE
            client.tokens = max(0.0, tokens - 1.0)
        client.active += 1
        return None

    def release(self, key: str, now: float) -> None:
        """A connection :meth:`admit` let in has ended."""
        client = self._clients.get(key)
        if client is None:
            return
        client.active -= 1
        if client.active <= 0 and client.answering <= 0 and self._refilled(client, now):
            del self._clients[key]

    def active(self, key: str) -> int:
        """Connections client ``key`` holds open."""
        client = self._clients.get(key)
        return client.active if client is not None else 0

    def _refilled(self, client: _Client, now: float) -> bool:
        rate = self.spec.client_rate
        if rate is None:
            return True
        return client.tokens + (now - client.stamp) * rate >= self.spec.client_burst - _EPSILON

    def _sweep(self, now: float) -> None:
        """Forget the clients that hold nothing and whose bucket is full again."""
        idle = [
            key for key, c in self._clients.items() if c.active <= 0 and c.answering <= 0 and self._refilled(c, now)
        ]
        for key in idle:
            del self._clients[key]
        self._sweep_at = max(SWEEP_FROM, 2 * len(self._clients))

    # -- refused connections that are told why ----------------------------------------------------------

    def answering(self, key: str, now: float) -> bool:
        """Whether a refused connection of client ``key`` may be held to be answered (it is then counted
        until :meth:`answered`), or must be closed at once."""
        if self.answering_total >= ANSWER_SLOTS:
            return False
        client = self._clients.get(key)
        if client is None:
            client = self._clients[key] = _Client(float(self.spec.client_burst), now)
        if client.answering >= ANSWER_SLOTS_PER_CLIENT:
            return False
        client.answering += 1
        self.answering_total += 1
        return True

    def answered(self, key: str, now: float) -> None:
        """A connection :meth:`answering` allowed was answered and closed."""
        client = self._clients.get(key)
        if client is None:
            return
        client.answering -= 1
        self.answering_total -= 1
        if client.active <= 0 and client.answering <= 0 and self._refilled(client, now):
            del self._clients[key]

    # -- associations (mode dicom) ------------------------------------------------------------------------

    def admit_association(self, key: str, calling: str, now: float) -> Limit | None:
        """One more association with calling AE title ``calling`` from client ``key``: None when it may go
        on (counted until :meth:`release_association`), else the limit it hit."""
        spec = self.spec
        maxconn = spec.calling_ae_maxconn
        if maxconn is not None and self._by_ae[calling] >= maxconn:
            return Limit.CALLING_AE_MAXCONN
        if self.window is not None:
            titles = self._titles.get(key)
            if titles is None:
                titles = self._titles[key] = OrderedDict()
            title = titles.get(calling)
            if title is None:
                bound = spec.client_ae_titles
                if bound is not None and len(titles) >= bound:
                    self._expire(key, titles, now)
                    if len(titles) >= bound:
                        return Limit.CLIENT_AE_TITLES
                if self.title_count >= self._titles_sweep_at:
                    self._make_room(now)
                titles = self._titles.setdefault(key, titles)  # (emptied and dropped above, perhaps)
                title = titles[calling] = _Title()
                self.title_count += 1
            else:
                titles.move_to_end(calling)
            title.active += 1
            title.released_at = None
        self._by_ae[calling] += 1
        return None

    def release_association(self, key: str, calling: str, now: float) -> None:
        """An association :meth:`admit_association` let in has ended."""
        left = self._by_ae[calling] - 1
        if left > 0:
            self._by_ae[calling] = left
        else:
            del self._by_ae[calling]
        titles = self._titles.get(key)
        title = titles.get(calling) if titles is not None else None
        if title is not None:
            title.active -= 1
            if title.active <= 0:
                title.released_at = now

    def associations(self, calling: str) -> int:
        """Associations open with calling AE title ``calling``."""
        return self._by_ae.get(calling, 0)

    def titles(self, key: str) -> int:
        """Calling AE titles client ``key`` has counted now."""
        titles = self._titles.get(key)
        return len(titles) if titles is not None else 0

    def _expired(self, title: _Title, now: float) -> bool:
        window = self.window
        return (
            window is not None
            and title.active <= 0
            and title.released_at is not None
            and now - title.released_at >= window
        )

    def _expire(self, key: str, titles: OrderedDict[str, _Title], now: float) -> None:
        """Drop the AE titles of client ``key`` whose time is up."""
        for calling in [c for c, t in titles.items() if self._expired(t, now)]:
            del titles[calling]
            self.title_count -= 1
        if not titles:
            del self._titles[key]

    def _make_room(self, now: float) -> None:
        """The (client, AE title) pairs reached ``max_titles``: drop the expired ones; if that is not enough,
        the least recently used idle title of each client with more than one, until under the bound (as
        the persistence table drops its least recently used entry). Runs when the count has doubled since
        the last time, so it costs nothing per association."""
        for key, titles in list(self._titles.items()):
            self._expire(key, titles, now)
        for _key, titles in sorted(self._titles.items(), key=lambda item: -len(item[1])):
            if self.title_count < self.max_titles:
                break
            for calling in [c for c, t in titles.items() if t.active <= 0][: max(0, len(titles) - 1)]:
                del titles[calling]
                self.title_count -= 1
                if self.title_count < self.max_titles:
                    break
        self._titles_sweep_at = max(min(SWEEP_FROM, self.max_titles), min(self.max_titles, 2 * self.title_count))


class RefusalLog:
    """Which refusals to write a line for, and when.

    The first refusal of a client for a limit is reported at once (:meth:`note` returns True); later
    ones within :data:`LOG_INTERVAL` of the last report are counted and come out of :meth:`due` (at most
    :data:`LOG_CLIENTS` clients by name, the rest as one summed entry under the client ``"others"``).
    The caller calls :meth:`due` once the interval is up (a timer) while :attr:`pending` is true.
    """

    def __init__(self, interval: float = LOG_INTERVAL, clients: int = LOG_CLIENTS) -> None:
        self.interval = interval
        self.clients = clients
        self._last: dict[tuple[str, Limit], float] = {}  # when each was last reported
        self._counts: dict[tuple[str, Limit], int] = {}  # refusals since then, not reported yet
        self._forget_at = SWEEP_FROM

    @property
    def pending(self) -> bool:
        return bool(self._counts)

    def note(self, client: str, limit: Limit, now: float) -> bool:
        """One refusal; True when it is to be logged now (with a count of 1)."""
        item = (client, limit)
        last = self._last.get(item)
        if last is None or (now - last >= self.interval and item not in self._counts):
            if last is None and len(self._last) >= self._forget_at:
                self._forget(now)
            self._last[item] = now
            return True
        self._counts[item] = self._counts.get(item, 0) + 1
        return False

    def due(self, now: float) -> list[tuple[str, Limit, int]]:
        """The counts to log now: (client, limit, refusals since its last line), those named first."""
        ready = [(item, count) for item, count in self._counts.items() if now - self._last[item] >= self.interval]
        ready.sort(key=lambda entry: -entry[1])
        lines: list[tuple[str, Limit, int]] = []
        others: Counter[Limit] = Counter()
        for (client, limit), count in ready:
            del self._counts[(client, limit)]
            self._last[(client, limit)] = now
            if len(lines) < self.clients:
                lines.append((client, limit, count))
            else:
                others[limit] += count
        lines.extend(("others", limit, count) for limit, count in sorted(others.items()))
        self._forget(now)
        return lines

    def _forget(self, now: float) -> None:
        """Forget the clients that went quiet (one refused again is reported at once, as a new one is)."""
        for item in [i for i, t in self._last.items() if now - t >= self.interval and i not in self._counts]:
            del self._last[item]
        self._forget_at = max(SWEEP_FROM, 2 * len(self._last))

    def next_due(self, now: float) -> float | None:
        """Seconds until :meth:`due` has something (None: nothing is pending)."""
        if not self._counts:
            return None
        earliest = min(self._last[item] for item in self._counts)
        return max(0.0, earliest + self.interval - now)


def retry_after(spec: LimitsSpec) -> int:
    """Seconds a refused HTTP client is told to wait (Retry-After): the time one token takes to come back,
    at least 1 s (the field has whole seconds)."""
    rate = spec.client_rate
    return 1 if rate is None else max(1, math.ceil(1.0 / rate))
