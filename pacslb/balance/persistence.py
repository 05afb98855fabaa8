"""Persistence: which node a client was on, so that its next connection goes there too.

Theory of operation. A *key* identifies a client: its source address masked by the configured netmask
(``source_ip_key``); later modes add calling AE titles and cookies. An entry maps a key to a node and
counts that client's open connections to it. The timeout counts from the end of the client's *last*
connection: while a connection is open the entry never expires, since one study can take longer than any
sensible timeout. Entries whose node is down or halted are dropped by the caller (see decision.py).

The table is bounded. When full, the least recently used entry goes, even one whose client still has
a connection open (that connection is unaffected; only the client's next connection may be re-balanced).
Each new connection of a client makes its entry the most recently used.

Times are plain floats from the caller's monotonic clock: nothing here reads a clock.
"""

from __future__ import annotations

import functools
import ipaddress
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol


# Parsing an address with ipaddress costs microseconds per connection; clients come back, so remember the
# keys of recent ones (bounded; a scan from many addresses only churns the cache).
@functools.lru_cache(maxsize=65536)
def source_ip_key(address: str, prefix4: int = 32, prefix6: int = 128) -> str:
    """The persistence key of a client address: the address of its network of the given prefix length.

    IPv4-mapped IPv6 addresses (``::ffff:10.0.0.5``, seen on dual-stack listeners) count as IPv4.
    """
    ip = ipaddress.ip_address(address.partition("%")[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if isinstance(ip, ipaddress.IPv4Address):
        if prefix4 == 32:
            return str(ip)
        return str(ipaddress.IPv4Network((ip, prefix4), strict=False).network_address)
    if prefix6 == 128:
        return str(ip)
    return str(ipaddress.IPv6Network((ip, prefix6), strict=False).network_address)


@dataclass(slots=True)
class Entry:
    """One client's binding to a node."""

    server: str
    active: int = 0
    released_at: float | None = None  # when its last connection ended; None while one is open

    def expired(self, now: float, timeout: float) -> bool:
        return self.active == 0 and self.released_at is not None and now - self.released_at >= timeout


class TableListener(Protocol):
    """Told of this balancer's own changes to a table (a shared store writes them out in the background).

    ``changed(key, server, active)``: ``key`` is bound to ``server`` (a new or moved binding, or a first
    connection on an idle one: ``active``), or its last connection ended (not ``active``: its expiry
    starts), or, with ``server`` None, it was forgotten. It must only note the change: it runs on the
    hot path, once or twice per connection at most.
    """

    def changed(self, key: str, server: str | None, active: bool) -> None: ...


class PersistenceTable:
    """A bounded map from client key to node, with expiry counted from the last connection's end."""

    def __init__(self, timeout: float, max_entries: int) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self.timeout = timeout
        self.max_entries = max_entries
        self._entries: OrderedDict[str, Entry] = OrderedDict()
        # A lease (below) the scheduler made for a new client: the decision it gives is the scheduler's.
        self.fresh = False
        #: Told of every change made here (not of those :meth:`adopt` applies); None for a table alone.
        self.listener: TableListener | None = None

    def __len__(self) -> int:
        return len(self._entries)

    def resize(self, max_entries: int) -> None:
        """Apply a new bound at once, dropping the least recently used entries beyond it."""
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self.max_entries = max_entries
        while len(self._entries) > max_entries:
            self._entries.popitem(last=False)

    def lookup(self, key: str, now: float) -> str | None:
        """The node ``key`` is bound to, or None (unknown or expired; an expired entry is removed)."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry.expired(now, self.timeout):
            del self._entries[key]
            return None
        return entry.server

    def acquire(self, key: str, server: str, now: float) -> None:
        """A connection of ``key`` to ``server`` opened: bind (or rebind) and count it."""
        entry = self._entries.get(key)
        if entry is None or entry.server != server or entry.expired(now, self.timeout):
            entry = Entry(server)
            self._entries[key] = entry
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
        self._entries.move_to_end(key)
        entry.active += 1
        entry.released_at = None
        if entry.active == 1 and self.listener is not None:
            self.listener.changed(key, server, True)

    def release(self, key: str, server: str, now: float) -> None:
        """A connection of ``key`` to ``server`` ended. Connections to a node the key was since moved
        away from no longer count; the timeout starts when the last one ends."""
        entry = self._entries.get(key)
        if entry is None or entry.server != server:
            return
        entry.active = max(0, entry.active - 1)
        if entry.active == 0:
            entry.released_at = now
            if self.listener is not None:
                self.listener.changed(key, server, False)

    def peek(self, key: str) -> Entry | None:
        """The entry of ``key`` as it is (expired or not), without making it the most recently used."""
        return self._entries.get(key)

    def forget(self, key: str) -> None:
        """Drop one entry (its node can no longer serve the client)."""
        if self._entries.pop(key, None) is not None and self.listener is not None:
            self.listener.changed(key, None, False)

    def adopt(self, key: str, server: str | None, released_at: float) -> None:
        """Apply a binding another balancer made (``server``; None: it forgot the client). An entry moved
        to another node starts idle, released at ``released_at``: connections still open to its old node
        no longer count (as after a move made here); an idle entry of the same node takes the later
        ``released_at`` (the client was seen since, elsewhere). The listener is not told (not our change)."""
        entry = self._entries.get(key)
        if server is None:
            if entry is not None:
                del self._entries[key]
            return
        if entry is None:
            self._entries[key] = Entry(server, 0, released_at)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
        elif entry.server != server:
            entry.server = server
            entry.active = 0
            entry.released_at = released_at
        elif entry.active == 0 and entry.released_at is not None and released_at > entry.released_at:
            entry.released_at = released_at  # the client was seen since, elsewhere: its expiry moves on

    def drop_server(self, server: str) -> int:
        """Drop every entry bound to ``server``; returns how many."""
        doomed = [key for key, entry in self._entries.items() if entry.server == server]
        for key in doomed:
            del self._entries[key]
        return len(doomed)

    def expire(self, now: float) -> int:
        """Remove every expired entry; returns how many. Called periodically to bound memory."""
        doomed = [key for key, entry in self._entries.items() if entry.expired(now, self.timeout)]
        for key in doomed:
            del self._entries[key]
        return len(doomed)

    def items(self) -> Iterator[tuple[str, Entry]]:
        """Entries from least to most recently used."""
        return iter(list(self._entries.items()))


class Lease(PersistenceTable):
    """One client connection's view of the persistence table, in an HTTP worker process.

    The main process owns the table. When it hands a connection to a worker it looks the client up (or
    lets the scheduler choose for a new one, ``fresh``), holds that entry for as long as the connection is
    open, and passes the node along: this lease. The connection's requests decide with it as with the
    table; a request that moves the client to another node (the leased one went down or was halted) tells
    the main process through ``rebind``, which moves the entry, so the table stays one and exact.
    """

    def __init__(self, node: str | None, fresh: bool, rebind: Callable[[str | None], None]) -> None:
        super().__init__(1.0, 1)
        self.node = node
        self.fresh = fresh and node is not None
        self.rebind = rebind

    def __len__(self) -> int:
        return 0 if self.node is None else 1

    def lookup(self, key: str, now: float) -> str | None:
        return self.node

    def acquire(self, key: str, server: str, now: float) -> None:
        self.fresh = False
        if server != self.node:
            self.node = server
            self.rebind(server)

    def release(self, key: str, server: str, now: float) -> None:
        pass  # the main process releases the entry when the connection ends

    def forget(self, key: str) -> None:
        if self.node is not None:
            self.node = None
            self.fresh = False
            self.rebind(None)
