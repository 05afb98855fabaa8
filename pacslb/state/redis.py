"""The Redis state store: persistence tables shared by every balancer of a cluster.

Theory of operation. The hot path never waits on Redis. Each service's :class:`PersistenceTable` stays
local; the store listens to it (:class:`~pacslb.balance.persistence.TableListener`) and notes each change
in a coalescing buffer. A background task writes what was noted every :data:`FLUSH_INTERVAL` in one
pipeline, and applies what the other balancers publish. So a connection costs a dictionary insert or
two here, whatever Redis is doing.

In Redis, a binding is one key, ``pacslb:pin:<service>:<client key>``, whose value is
``node <US> stamp <US> origin`` (US: the unit separator, 0x1f): the node, when the binding was made (wall
clock, milliseconds) and by which balancer.

Expiry, without a write per connection. Locally an entry expires ``timeout`` after the end of the client's
last connection. What the other balancers and Redis believe is the *announced* expiry: the time of the last
write of the binding plus ``timeout``. A new, moved or forgotten binding is written and published at once;
for the same binding, a write (a *touch*: Redis's expiry renewed, the peers' idle time restarted) is made
only when the local expiry has moved past the announced one by more than :data:`TOUCH_SLACK` of the
timeout, or, for a client with a connection open, before the announced expiry comes within that slack
(checked every :data:`ACTIVE_SWEEP`). A client that comes back every few seconds thus costs a write every
quarter of the timeout, not two per connection; a twelve-hour association keeps its pin alive everywhere;
and what the others believe is never more than the slack too early.

Writes go through a script (:data:`_WRITE`) that applies a binding only when it is at least as recent as
the one in Redis, and then publishes it on :data:`CHANNEL`. Conflicts thus resolve the same way
everywhere: the later stamp wins, and between equal stamps the greater balancer name. A change of
expiry only (same binding) is written but not published. A balancer applies what a peer publishes when
it is newer than what it knows of that client (its own changes come back to it and are skipped).

A pin whose node one balancer saw fail: that balancer moves the client (a new binding, published), and
the others follow it, even if they still see the old node up; a client is thus on one node everywhere.

Starting or reconnecting, a balancer first writes what it changed while it was alone (through the same
script: a newer binding in Redis wins), then reads every binding (SCAN), and only then counts as
*synced*. Pub/sub messages are lost while disconnected; that full read makes up for them. When the server
is another process than last time (its ``run_id``: Redis restarted, or a replica promoted), it writes
every entry it knows instead: the new one may lack what the last one had (restarted empty; replication is
asynchronous). Any lost link ends the session this way (redis-py's own retries are off: a subscription it
renewed quietly would lose what was published meanwhile).

Behind Sentinels (``redis+sentinel://``), the master is the one they name at connection, and they are
asked again every :data:`MASTER_CHECK`: after a failover the old master, if it lives, keeps taking writes
until Sentinel turns it into a replica (and empties it), so the store leaves it as soon as they name
another.

Redis down, slow, or refusing the password: connections go on with the local tables (the store is
soft state), ``store_down`` is logged once with the reason, the status and the metric say so, and the
store reconnects with a growing pause (:data:`RECONNECT_MAX`); on return, ``store_up``, then the
resynchronisation above.

What it must not do: block the event loop, raise into the hot path, or hold an unbounded buffer (past
:data:`MAX_PENDING` changes it keeps only a flag and writes every local entry on the next flush).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
from collections.abc import Callable
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff
from redis.exceptions import RedisError, ResponseError

from pacslb.balance.persistence import PersistenceTable
from pacslb.config.values import StoreLocation
from pacslb.logs import log_event
from pacslb.state.store import AdminListener

log = logging.getLogger("pacslb.store")

#: Every binding's key starts with this, then the service name and ":".
PREFIX = "pacslb:pin:"
#: Where bindings are published.
CHANNEL = "pacslb:pins"
#: The admin settings (drain, halt, run-time weights): one hash, a field per setting, and their channel.
ADMIN_KEY = "pacslb:admin"
ADMIN_CHANNEL = "pacslb:admin"
SEP = "\x1f"
#: How long changes are gathered before one pipeline writes them: peers see a change within about this
#: plus a round trip (the goal is 200 ms); shorter costs more writes under a high connection rate.
FLUSH_INTERVAL = 0.02
#: Changes held while Redis is away, at most; beyond, only "write everything" is remembered.
MAX_PENDING = 100_000
#: How far (a share of the persistence timeout) what Redis and the peers believe of a binding's expiry may
#: lag behind the local one before a touch renews it. Smaller: more writes; larger: a client idle for most of
#: its timeout may find a peer (after a failover) that has just forgotten it.
TOUCH_SLACK = 0.25
#: How often the bindings of clients with a connection open are checked for a touch (their expiry moves on
#: while no connection starts or ends, during a long association).
ACTIVE_SWEEP = 10.0
#: Connecting and each command: a Redis that does not answer within this is down for the store.
SOCKET_TIMEOUT = 2.0
#: Pause before reconnecting: doubles from RECONNECT_MIN up to RECONNECT_MAX.
RECONNECT_MIN = 0.2
RECONNECT_MAX = 5.0
#: A balancer that has just started answers /healthz 503 ("store_not_synced") until it has read the shared
#: table, for at most this long: a freshly started backup should not take the virtual IP without its
#: clients' pins; but the store is soft state, and a Redis that stays away must not keep a pair from serving.
SYNC_GRACE = 10.0
#: redis+sentinel://: how often the Sentinels are asked which master is the master (see _check_master).
MASTER_CHECK = 1.0
#: How often what is known of clients gone from their table is forgotten (bounds that memory).
TRIM_INTERVAL = 30.0
#: Keys read per SCAN step when loading.
SCAN_COUNT = 1000

# KEYS[1]: the binding's key. ARGV: value, stamp, origin, ttl in ms, whether to publish, the message.
# Applies the binding unless the one in Redis is newer (stamp, then origin); deletes when the value is empty.
_WRITE = """
local current = redis.call('GET', KEYS[1])
if current then
  local _, _, stamp, origin = string.find(current, '^[^\\31]*\\31([0-9]+)\\31(.*)$')
  if stamp then
    local theirs, ours = tonumber(stamp), tonumber(ARGV[2])
    if theirs > ours or (theirs == ours and origin > ARGV[3]) then return 0 end
  end
end
if ARGV[1] == '' then
  redis.call('DEL', KEYS[1])
else
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[4])
end
if ARGV[5] == '1' then redis.call('PUBLISH', KEYS[2], ARGV[6]) end
return 1
"""

# KEYS: the admin hash, its channel. ARGV: field, value (stamp US origin US json), stamp, origin, message.
# Sets the field unless the hash holds a newer one; publishes what it set.
_ADMIN_WRITE = """
local current = redis.call('HGET', KEYS[1], ARGV[1])
if current then
  local _, _, stamp, origin = string.find(current, '^([0-9]+)\31([^\31]*)\31')
  if stamp then
    local theirs, ours = tonumber(stamp), tonumber(ARGV[3])
    if theirs > ours or (theirs == ours and origin > ARGV[4]) then return 0 end
  end
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('PUBLISH', KEYS[2], ARGV[5])
return 1
"""

Stamp = tuple[int, str]  # (milliseconds, origin): the order of bindings


def _now_ms() -> int:
    return int(time.time() * 1000)


class _Known:
    """What the store last knew of one client: node (None: forgotten), stamp, and the announced expiry (the
    tables' clock: when Redis and the peers will let the binding go unless touched)."""

    __slots__ = ("expires", "node", "stamp")

    def __init__(self, node: str | None, stamp: Stamp, expires: float) -> None:
        self.node = node
        self.stamp = stamp
        self.expires = expires


class _ServiceListener:
    """The listener of one service's table: notes changes for the flush."""

    __slots__ = ("service", "store")

    def __init__(self, store: RedisStore, service: str) -> None:
        self.store = store
        self.service = service

    def changed(self, key: str, server: str | None, active: bool) -> None:
        self.store._note(self.service, key, server, active)


class RedisStore:
    """Persistence tables kept here and shared through Redis (see the module's docstring)."""

    def __init__(
        self,
        location: StoreLocation,
        node: str,
        password: str | None = None,
        clock: Callable[[], float] | None = None,
        sentinel_password: str | None = None,
        ca_file: str | None = None,
    ) -> None:
        self.location = location
        self.node = node
        self.password = password
        self.sentinel_password = sentinel_password  # redis+sentinel://: the Sentinels' own password
        self.ca_file = ca_file  # rediss://: the CAs to trust (None: the system's)
        # The tables' clock: the event loop's (taken at start() unless given), as the services use.
        self.clock: Callable[[], float] = clock if clock is not None else time.monotonic
        self._clock_from_loop = clock is None
        self._tables: dict[str, PersistenceTable] = {}
        self._known: dict[str, dict[str, _Known]] = {}
        # (service, key) -> the node noted (None: forgotten): changed here, not yet written.
        self._pending: dict[tuple[str, str], str | None] = {}
        self._push_all = False  # the buffer overflowed (or Redis was never reached): write every entry
        # Admin settings: what was changed here and not yet written, and the stamp of each setting known.
        self.on_admin: AdminListener | None = None
        self._admin_pending: dict[str, tuple[str, Stamp]] = {}
        self._admin_known: dict[str, Stamp] = {}
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()
        self._trimmed = 0.0
        self._swept = 0.0
        self._forced: set[tuple[str, str]] = set()  # pending items to write even if nothing changed
        self._task: asyncio.Task[None] | None = None
        self._server: str | None = None  # the run_id of the Redis server of the last session
        self._closing = False
        # What the status and metrics show.
        self.connected = False
        self.synced = False
        self.ever_synced = False
        self.started_at: float | None = None  # (the tables' clock)
        self.down_since: float | None = None
        self.last_error = ""
        self.counts = {"written": 0, "applied": 0, "published": 0, "conflicts_lost": 0, "reconnects": 0}

    # -- the StateStore interface -------------------------------------------------------------------------

    def persistence_table(self, service: str, timeout: float, max_entries: int) -> PersistenceTable:
        table = self._tables.get(service)
        if table is None:
            table = self._tables[service] = PersistenceTable(timeout, max_entries)
            table.listener = _ServiceListener(self, service)
            self._known.setdefault(service, {})
            if self.synced:
                self.synced = False  # a new service's bindings are read on the next pass
                self._push_all = True
                self._wake.set()
        else:
            table.timeout = timeout
            table.resize(max_entries)
        return table

    def discard(self, service: str) -> None:
        table = self._tables.pop(service, None)
        if table is not None:
            table.listener = None
        self._known.pop(service, None)
        for pending in [p for p in self._pending if p[0] == service]:
            del self._pending[pending]

    def admin_changed(self, changes: dict[str, dict[str, Any]]) -> None:
        now = _now_ms()
        for name, value in changes.items():
            previous = self._admin_known.get(name)
            stamp = (max(now, previous[0] + 1) if previous is not None else now, self.node)
            self._admin_known[name] = stamp
            self._admin_pending[name] = (json.dumps(value, sort_keys=True), stamp)
        if changes:
            self._wake.set()

    async def start(self) -> None:
        """Start the background task (it connects, synchronises, then writes and listens)."""
        if self._task is None:
            if self._clock_from_loop:
                self.clock = asyncio.get_running_loop().time
            self.started_at = self.clock()
            self._task = asyncio.get_running_loop().create_task(self._run(), name="pacslb-store")

    async def close(self) -> None:
        """Write what is pending (briefly, if Redis is there), then stop."""
        self._closing = True
        self._stop.set()
        self._wake.set()
        if self._task is not None:
            try:
                async with asyncio.timeout(SOCKET_TIMEOUT):
                    await asyncio.shield(self._task)
            except (TimeoutError, asyncio.CancelledError):
                pass
            finally:
                self._task.cancel()
                with contextlib.suppress(BaseException):
                    await self._task
            self._task = None
        for table in self._tables.values():
            table.listener = None
        self._tables.clear()

    def starting(self) -> bool:
        """Just started and not synced yet (within :data:`SYNC_GRACE`): /healthz says so."""
        if self.ever_synced or self.started_at is None:
            return False
        return self.clock() - self.started_at < SYNC_GRACE

    def status(self) -> dict[str, Any]:
        """What ``pacslb status`` and the dashboard show of the store."""
        return {
            "kind": self.location.kind,
            "url": str(self.location),
            "node": self.node,
            "connected": self.connected,
            "synced": self.synced,
            "starting": self.starting(),
            "down_since": self.down_since,
            "last_error": self.last_error,
            "pending": len(self._pending),
            **self.counts,
        }

    # -- the hot path's side ---------------------------------------------------------------------------------

    def _note(self, service: str, key: str, server: str | None, active: bool) -> None:
        pending = self._pending
        if len(pending) >= MAX_PENDING and (service, key) not in pending:
            self._push_all = True
        else:
            pending[(service, key)] = server
        if not self._wake.is_set():
            self._wake.set()

    # -- the background task ----------------------------------------------------------------------------------

    async def _run(self) -> None:
        pause = RECONNECT_MIN
        first = True
        while not self._closing:
            client: aioredis.Redis | None = None
            sentinel: Sentinel | None = None
            try:
                client, sentinel = await self._connect()
                await self._session(client, first, sentinel)
                return  # closing
            except Exception as exc:
                if not isinstance(exc, RedisError | OSError | TimeoutError):
                    # A bug, not Redis: said with its traceback; the store carries on as if Redis were down.
                    log.error("store task failed unexpectedly", exc_info=exc)
                reason = _reason(exc)
                if self.connected or first or reason != self.last_error:
                    log_event(log, "store_down", logging.WARNING, store=str(self.location), reason=reason)
                self.last_error = reason
                if self.connected:
                    pause = RECONNECT_MIN  # a new outage: try again soon (a Sentinel failover takes seconds)
                if self.connected or first:
                    self.down_since = time.time()
                self.connected = self.synced = False
                self._push_all = self._push_all or first
                first = False
            finally:
                if client is not None:
                    with contextlib.suppress(Exception):
                        await client.aclose()
                if sentinel is not None:  # its links to the Sentinels (master_for's client does not own them)
                    with contextlib.suppress(Exception):
                        await sentinel.aclose()
            if self._closing:
                return
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(pause):
                    await self._stop.wait()
            pause = min(RECONNECT_MAX, pause * 2)
            self.counts["reconnects"] += 1

    async def _connect(self) -> tuple[aioredis.Redis, Sentinel | None]:
        """A client of the Redis server, or of the master the Sentinels name (and those Sentinels' client).

        redis-py's own retries are off: it would reconnect the subscription quietly, and what is published
        in between would be lost with no resynchronisation; a lost link must end the session instead.
        """
        location = self.location
        options: dict[str, Any] = {
            "db": location.db,
            "password": self.password,
            "username": location.username,
            "socket_timeout": SOCKET_TIMEOUT,
            "socket_connect_timeout": SOCKET_TIMEOUT,
            "decode_responses": True,
            "health_check_interval": 1,
            "retry": Retry(NoBackoff(), 0),
        }
        sentinel = None
        if location.kind == "sentinel":
            assert location.master is not None
            sentinel = Sentinel(
                list(location.hosts),
                sentinel_kwargs={
                    "socket_timeout": SOCKET_TIMEOUT,
                    "socket_connect_timeout": SOCKET_TIMEOUT,
                    "password": self.sentinel_password,  # the Sentinels' own (requirepass), if they have one
                    "retry": Retry(NoBackoff(), 0),  # (discovery moves on to the next Sentinel)
                },
                **options,
            )
            client: aioredis.Redis = sentinel.master_for(location.master)
        else:
            host, port = location.hosts[0]
            tls: dict[str, Any] = {"ssl": True, "ssl_ca_certs": self.ca_file} if location.kind == "rediss" else {}
            client = aioredis.Redis(host=host, port=port, **tls, **options)
        try:
            await client.ping()
        except BaseException:
            with contextlib.suppress(Exception):
                await client.aclose()
            if sentinel is not None:
                with contextlib.suppress(Exception):
                    await sentinel.aclose()
            raise
        return client, sentinel

    async def _session(self, client: aioredis.Redis, first: bool, sentinel: Sentinel | None = None) -> None:
        """One connected period: resynchronise, then write and listen until Redis goes or the store closes."""
        write = client.register_script(_WRITE)
        pubsub = client.pubsub(ignore_subscribe_messages=True)
        await pubsub.subscribe(CHANNEL, ADMIN_CHANNEL)
        admin_write = client.register_script(_ADMIN_WRITE)
        try:
            server = await self._server_id(client)
            if server is None or server != self._server:
                # Another server (a replica promoted) or the same one restarted: it may lack what was written
                # to the last one (replication is asynchronous; an old master may have taken writes after the
                # switch), so write every entry known here (a newer binding there still wins).
                self._push_all = True
            self._server = server
            if not first or self.down_since is not None:
                log_event(log, "store_up", store=str(self.location))
            self.connected = True
            self.down_since = None
            self.last_error = ""
            await self._flush(client, write)  # what changed here while alone (all of it, at first)
            await self._load_admin(client, admin_write)
            loaded = await self._load(client)
            self.synced = self.ever_synced = True
            log_event(log, "store_synced", store=str(self.location), entries=loaded)
            listener = asyncio.get_running_loop().create_task(self._listen(pubsub))
            checked = self.clock()
            try:
                while not self._closing:
                    if sentinel is not None and self.clock() - checked >= MASTER_CHECK:
                        checked = self.clock()
                        await self._check_master(client, sentinel)
                    if listener.done():
                        listener.result()  # raises what ended it
                        raise ConnectionError("the subscription ended")
                    if not self.synced:  # a service was added: read its bindings
                        await self._flush(client, write)
                        await self._load(client)
                        self.synced = True
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(min(1.0, self._sweep_interval())):
                            await self._wake.wait()
                    self._wake.clear()
                    if self.clock() - self._trimmed > TRIM_INTERVAL:
                        self._trimmed = self.clock()
                        self.trim()
                    if self.clock() - self._swept > self._sweep_interval():
                        self._swept = self.clock()
                        self._sweep_active()
                    if self._admin_pending:
                        await self._flush_admin(client, admin_write)
                    if self._pending or self._push_all:
                        await asyncio.sleep(FLUSH_INTERVAL)  # gather what comes with it
                        await self._flush(client, write)
                await self._flush_admin(client, admin_write)
                await self._flush(client, write)
            finally:
                listener.cancel()
                with contextlib.suppress(BaseException):
                    await listener
        finally:
            with contextlib.suppress(Exception):
                await pubsub.aclose()

    @staticmethod
    async def _server_id(client: aioredis.Redis) -> str | None:
        """The Redis server's run_id (another process, another id), or None when INFO is refused."""
        try:
            info = await client.info("server")
        except ResponseError:
            return None
        run_id = info.get("run_id")
        return str(run_id) if run_id else None

    async def _check_master(self, client: aioredis.Redis, sentinel: Sentinel) -> None:
        """End the session when the Sentinels name another master than the one connected to.

        After a failover the old master, if it lives, is still a writable master until Sentinel turns it
        into a replica (seconds later), and that throws away what it took meanwhile. A Sentinel that does
        not answer is no reason to leave a master that does.
        """
        assert self.location.master is not None
        connected = getattr(client.connection_pool, "master_address", None)
        try:
            named = await sentinel.discover_master(self.location.master)
        except RedisError:
            return
        if connected is not None and tuple(named) != tuple(connected):
            raise ConnectionError(f"the Sentinels name another master, {named[0]}:{named[1]}")

    async def _flush(self, client: aioredis.Redis, write: Any) -> None:
        """Write every pending change that needs it (every entry, after an overflow or before a sync)."""
        if self._push_all:
            self._push_all = False
            for service, table in self._tables.items():
                for key, held in table.items():
                    # Written even when Redis should have it (a new Redis, or one that lost what it had),
                    # with the stamp it was made with: a newer decision elsewhere still wins.
                    self._pending[(service, key)] = held.server
                    self._forced.add((service, key))
        if not self._pending:
            return
        pending = list(self._pending.items())
        self._pending.clear()
        now_ms = _now_ms()
        now = self.clock()
        pipe = client.pipeline(transaction=False)
        published = 0
        learned: list[tuple[dict[str, _Known], str, _Known]] = []  # known once written
        for (service, key), noted in pending:
            owner = self._tables.get(service)
            if owner is None:
                continue
            known = self._known[service]
            entry = owner.peek(key)
            if noted is not None and entry is None:
                continue  # bound, then dropped here for room or expired: nothing to share
            node = entry.server if entry is not None else None
            timeout = owner.timeout
            previous = known.get(key)
            if node is None:
                if previous is None or previous.node is None:
                    continue  # never shared, or forgotten already
                stamp = (max(now_ms, previous.stamp[0] + 1), self.node)
                kind, value, ttl_ms, expires = "b", "", 1, now
            elif previous is not None and previous.node == node:
                # The same binding: a touch, when what the others believe would end too early.
                assert entry is not None
                wanted = now + timeout if entry.active or entry.released_at is None else entry.released_at + timeout
                if wanted - previous.expires <= TOUCH_SLACK * timeout and (service, key) not in self._forced:
                    continue
                wanted = max(wanted, now + 0.001)
                stamp, kind, expires = previous.stamp, "t", wanted
                value = f"{node}{SEP}{stamp[0]}{SEP}{stamp[1]}"
                ttl_ms = max(1, int((wanted - now) * 1000))
            else:
                assert entry is not None
                stamp = (max(now_ms, previous.stamp[0] + 1) if previous is not None else now_ms, self.node)
                kind, expires = "b", now + timeout
                value = f"{node}{SEP}{stamp[0]}{SEP}{stamp[1]}"
                ttl_ms = max(1, int(timeout * 1000))
            learned.append((known, key, _Known(node, stamp, expires)))
            message = SEP.join((self.node, service, key, node or "", str(stamp[0]), stamp[1], kind))
            keys = [f"{PREFIX}{service}:{key}", CHANNEL]
            await write(keys=keys, args=[value, stamp[0], stamp[1], ttl_ms, "1", message], client=pipe)
            published += 1
        self._forced.clear()
        if not learned:
            return
        try:
            results = await pipe.execute()
        except BaseException:
            # Not written: noted again, to be written once Redis is back.
            for item, noted in pending:
                self._pending.setdefault(item, noted)
            raise
        for known, key, now_known in learned:
            known[key] = now_known
        self.counts["written"] += sum(1 for r in results if r == 1)
        self.counts["conflicts_lost"] += sum(1 for r in results if r == 0)
        self.counts["published"] += published

    def _sweep_interval(self) -> float:
        """:data:`ACTIVE_SWEEP`, or less when a timeout is so short that its slack would pass in between."""
        shortest = min((table.timeout for table in self._tables.values()), default=ACTIVE_SWEEP)
        return max(0.05, min(ACTIVE_SWEEP, TOUCH_SLACK * shortest / 2))

    def _sweep_active(self) -> None:
        """Note the bindings of clients with a connection open whose announced expiry comes near."""
        now = self.clock()
        for service, table in self._tables.items():
            known = self._known[service]
            horizon = now + TOUCH_SLACK * table.timeout
            for key, entry in table.items():
                if entry.active:
                    previous = known.get(key)
                    if previous is not None and previous.node == entry.server and previous.expires < horizon:
                        self._pending.setdefault((service, key), entry.server)

    async def _load(self, client: aioredis.Redis) -> int:
        """Read every binding of this balancer's services and apply those newer than what is known here."""
        loaded = 0
        for service in list(self._tables):
            cursor = 0
            pattern = f"{PREFIX}{_glob_escape(service)}:*"
            while True:
                cursor, keys = await client.scan(cursor, match=pattern, count=SCAN_COUNT)
                if keys:
                    pipe = client.pipeline(transaction=False)
                    for name in keys:
                        pipe.get(name)
                        pipe.pttl(name)
                    answers = await pipe.execute()
                    for i, name in enumerate(keys):
                        value, ttl_ms = answers[2 * i], answers[2 * i + 1]
                        if value is None or ttl_ms is None or ttl_ms == -2:
                            continue
                        key = name[len(PREFIX) + len(service) + 1 :]
                        ttl = ttl_ms / 1000.0 if ttl_ms > 0 else None  # (no expiry: written by hand)
                        if self._apply(service, str(key), str(value), ttl):
                            loaded += 1
                if cursor == 0:
                    break
        return loaded

    def _apply(self, service: str, key: str, value: str, ttl: float | None) -> bool:
        """Apply one binding read from Redis (``ttl``: its remaining life there) when it is newer."""
        node, _, rest = value.partition(SEP)
        stamp_text, _, origin = rest.partition(SEP)
        if not node or not stamp_text.isdigit():
            return False
        return self._adopt(service, key, node, (int(stamp_text), origin), ttl)

    def _adopt(
        self, service: str, key: str, node: str | None, stamp: Stamp, ttl: float | None, touch: bool = False
    ) -> bool:
        """Apply a binding another balancer made (from its message, ``ttl`` None, or read from Redis with the
        life it has left there). A *touch* of the binding known here restarts its idle time."""
        table = self._tables.get(service)
        if table is None:
            return False
        known = self._known[service]
        previous = known.get(key)
        now = self.clock()
        timeout = table.timeout
        # Idle for as long as Redis's expiry says; a binding just written or touched elsewhere starts idle now.
        remaining = timeout if ttl is None else min(ttl, timeout)
        released_at = now - (timeout - remaining)
        if previous is not None and previous.stamp == stamp and touch and node is not None:
            table.adopt(key, node, released_at)  # (an idle entry's expiry moves on; a missing one comes back)
            previous.expires = max(previous.expires, now + remaining)
            return True
        if previous is not None and previous.stamp >= stamp:
            return False
        if (service, key) in self._pending:
            return False  # changed here since, not yet written: ours is newer (the write settles it)
        table.adopt(key, node, released_at)
        known[key] = _Known(node, stamp, now + remaining)
        self.counts["applied"] += 1
        return True

    # -- admin settings -----------------------------------------------------------------------------------

    async def _flush_admin(self, client: aioredis.Redis, write: Any) -> None:
        """Write the admin settings changed here (a newer one in Redis wins, and comes back to us)."""
        if not self._admin_pending:
            return
        pending = list(self._admin_pending.items())
        self._admin_pending.clear()
        pipe = client.pipeline(transaction=False)
        for name, (value, stamp) in pending:
            stored = f"{stamp[0]}{SEP}{stamp[1]}{SEP}{value}"
            message = SEP.join((self.node, name, str(stamp[0]), stamp[1], value))
            await write(keys=[ADMIN_KEY, ADMIN_CHANNEL], args=[name, stored, stamp[0], stamp[1], message], client=pipe)
        try:
            await pipe.execute()
        except BaseException:
            for name, item in pending:
                self._admin_pending.setdefault(name, item)
            raise

    async def _load_admin(self, client: aioredis.Redis, write: Any) -> None:
        """At (re)connection: take every setting newer in Redis than here; write those Redis lacks."""
        stored = {str(k): str(v) for k, v in (await client.hgetall(ADMIN_KEY)).items()}
        changes: dict[str, dict[str, Any]] = {}
        origin = "store"
        for name, text in stored.items():
            stamp_text, _, rest = text.partition(SEP)
            maker, _, value = rest.partition(SEP)
            if not stamp_text.isdigit() or name in self._admin_pending:
                continue
            stamp = (int(stamp_text), maker)
            known = self._admin_known.get(name)
            if known is None or known < stamp:
                try:
                    changes[name] = dict(json.loads(value))
                except (ValueError, TypeError):
                    continue
                self._admin_known[name] = stamp
                origin = maker
        if changes and self.on_admin is not None:
            self.on_admin(changes, origin)
        await self._flush_admin(client, write)

    def _admin_message(self, data: str) -> None:
        fields = data.split(SEP, 4)
        if len(fields) != 5 or fields[0] == self.node or not fields[2].isdigit():
            return
        _, name, stamp_text, maker, value = fields
        stamp = (int(stamp_text), maker)
        known = self._admin_known.get(name)
        if (known is not None and known >= stamp) or name in self._admin_pending:
            return
        try:
            change = dict(json.loads(value))
        except (ValueError, TypeError):
            return
        self._admin_known[name] = stamp
        if self.on_admin is not None:
            self.on_admin({name: change}, maker)

    async def _listen(self, pubsub: Any) -> None:
        """Apply what the other balancers publish."""
        while True:
            message = await pubsub.get_message(timeout=1.0)
            if message is None or message.get("type") != "message":
                continue
            if message.get("channel") == ADMIN_CHANNEL:
                self._admin_message(str(message["data"]))
                continue
            fields = str(message["data"]).split(SEP)
            if len(fields) != 7 or fields[0] == self.node or not fields[4].isdigit():
                continue
            _, service, key, node, stamp, origin, kind = fields
            self._adopt(service, key, node or None, (int(stamp), origin), None, touch=kind == "t")

    def trim(self) -> None:
        """Forget what is known of clients no longer in their table (called with the periodic expiry)."""
        for service, table in self._tables.items():
            known = self._known[service]
            if len(known) > len(table):
                for key in [k for k in known if table.peek(k) is None]:
                    del known[key]


#: A client's repr (redis-py puts one per Sentinel in MasterNotFoundError's text, each a line long).
_CLIENT_REPR = re.compile(r"<redis\.asyncio\.client\.Redis\(.*?,host=([^,]*),port=([0-9]+),.*?\)>\)>\)>")
#: A store_down line's reason is cut past this many characters.
MAX_REASON = 500


def _reason(exc: BaseException) -> str:
    """What ``store_down`` says of ``exc``: its class and text, a Sentinel named by its address only."""
    text = _CLIENT_REPR.sub(r"Sentinel \1:\2", str(exc))
    reason = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return reason if len(reason) <= MAX_REASON else reason[: MAX_REASON - 3] + "..."


def _glob_escape(text: str) -> str:
    """``text`` with the characters SCAN's MATCH treats as a pattern escaped."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)
