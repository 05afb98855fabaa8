"""How many connections the admin listener keeps, and for how long one may sit idle.

What this module owns: uvicorn's HTTP protocol (httptools) for the admin listener, with two bounds that
keep idle connections from taking the room of requests. It must not look at what a request asks for
(that is api.py and guard.py).

Theory of operation. uvicorn answers 503 to a request once ADMIN_MAX_CONNECTIONS connections are open,
whether they do anything or not, and it times out only connections that have been answered once: without
more, 64 connections that never send a byte would make /healthz answer 503 (keepalived and systemd would
then take a working balancer for a dead one) for as long as they are held. So:

- *Idle* means no request in progress: nothing received yet, only part of a request head, or the last
  answer sent. A connection may be idle for ADMIN_IDLE_TIMEOUT at most, counted from its opening or its
  last answer; bytes that trickle in without completing a head do not extend it.
- A request's body must be received within ADMIN_IDLE_TIMEOUT of its head, or the connection is closed:
  a body sent slowly would otherwise keep a request in progress, which nothing below closes.
- Past ADMIN_IDLE_MARK open connections, each new one closes the connections idle the longest until
  ADMIN_IDLE_MARK are open again (never one with a request in progress). Idle connections therefore
  cannot keep a new request from being served; only ADMIN_MAX_CONNECTIONS - ADMIN_IDLE_MARK requests in
  progress at once could, and the admin API answers each within milliseconds.

A client whose idle keep-alive connection was closed opens another one (browsers, httpx and curl do so
by themselves for a request that finds it closed).
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

#: Open admin connections at which uvicorn answers 503 (a few dashboards, a scraper, scripts): a runaway
#: script cannot hold sockets and memory in the balancer's process beyond this.
ADMIN_MAX_CONNECTIONS = 64
#: Past this many open connections, idle ones are closed (the longest idle first) to make room: the rest,
#: up to ADMIN_MAX_CONNECTIONS, is kept for requests in progress, /healthz's among them.
ADMIN_IDLE_MARK = 48
#: Seconds a connection may wait between opening (or its last answer) and a complete request head. The
#: dashboard polls every 2 s over the connection it keeps; nothing legitimate is slower to send a head.
ADMIN_IDLE_TIMEOUT = 5.0


class AdminProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the admin listener's idle bounds (see the module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.idle_since = 0.0
        self._idle_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None

    @property
    def idle(self) -> bool:
        """No request in progress (none yet, an incomplete head, or the last one answered)."""
        return self.cycle is None or self.cycle.response_complete

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._start_idle()
        self._make_room()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_idle()
        self._stop_body()
        super().connection_lost(exc)

    def on_headers_complete(self) -> None:
        self._stop_idle()
        # The body (often none: then on_message_complete comes at once and stops this) has the same bound.
        self._stop_body()
        self._body_timer = self.loop.call_later(ADMIN_IDLE_TIMEOUT, self._body_expired)
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._stop_body()
        super().on_message_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and self.idle:
            self._start_idle()

    def _start_idle(self) -> None:
        self._stop_idle()
        self.idle_since = self.loop.time()
        self._idle_timer = self.loop.call_later(ADMIN_IDLE_TIMEOUT, self._idle_expired)

    def _stop_idle(self) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None

    def _idle_expired(self) -> None:
        self._idle_timer = None
        if self.idle and not self.transport.is_closing():
            self.transport.close()

    def _stop_body(self) -> None:
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None

    def _body_expired(self) -> None:
        self._body_timer = None
        if not self.transport.is_closing():
            self.transport.close()

    def _make_room(self) -> None:
        """Close the connections idle the longest while more than ADMIN_IDLE_MARK are open."""
        excess = len(self.connections) - ADMIN_IDLE_MARK
        if excess <= 0:
            return
        idle = [c for c in self.connections if c is not self and isinstance(c, AdminProtocol) and c.idle]
        idle.sort(key=lambda c: c.idle_since)
        for connection in idle[:excess]:
            connection.close_idle()

    def close_idle(self) -> None:
        """Close this idle connection now, and stop counting it (its connection_lost comes later)."""
        self._stop_idle()
        self._stop_body()
        self.connections.discard(self)
        if not self.transport.is_closing():
            self.transport.close()
