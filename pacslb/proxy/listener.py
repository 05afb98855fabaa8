"""A listening socket that hands each accepted connection, as a plain socket, to a callback.

Accepting is done directly on the non-blocking socket from a reader callback (a batch per wakeup), so
the callback gets real sockets that the relay can later splice, not transports. ``pause()`` stops
accepting (new clients wait in the kernel's accept queue), ``resume()`` starts again: that is how a
service enforces ``maxconn`` without refusing anyone.

Out of descriptors (pacslb/descriptors.py): when accept fails with EMFILE or ENFILE, or an accepted
connection took a descriptor of the reserve (it is closed at once), or anything else in the process ran
out, every listener stops accepting for :data:`EMFILE_PAUSE` (``hold``), so that the loop does not spin
on a listening socket that stays readable, and clients wait in the accept queue meanwhile.

Every connection pacslb holds is :func:`tune`-d. An accepted one is tuned by its listening socket: on
Linux a connection inherits TCP_NODELAY and SO_KEEPALIVE from the socket that accepted it, so the listener
sets them once rather than two system calls for every client.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from collections.abc import Callable

from pacslb.config.values import HostPort
from pacslb.descriptors import EXHAUSTION, LOCAL_ERRNOS, in_reserve

log = logging.getLogger("pacslb.listener")

#: Connections accepted per wakeup before yielding to the rest of the loop (fairness vs. syscalls).
ACCEPT_BATCH = 64
#: Kernel accept queue length; clients beyond maxconn wait here (capped by net.core.somaxconn).
LISTEN_BACKLOG = 1024
#: How long to stop accepting when out of file descriptors, so the loop does not spin on EMFILE. Short:
#: a descriptor freed by a closing connection is taken again within this, and clients wait meanwhile.
EMFILE_PAUSE = 0.1

Handler = Callable[[socket.socket, tuple[str, int]], None]


def tune(sock: socket.socket) -> None:
    """Small DICOM PDUs and HTTP heads must not wait for Nagle; keepalive finds peers that vanished during
    the hours an association may sit idle."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)


def bind_listener(address: HostPort) -> socket.socket:
    """A bound, listening, non-blocking TCP socket.

    Raises:
        OSError: the address cannot be bound (in use, not local, no permission).
    """
    family = socket.AF_INET6 if address.family_v6 else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((address.host, address.port))
        sock.listen(LISTEN_BACKLOG)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


class Listener:
    """Accepts on one socket and calls ``handler(sock, peer)`` for each new connection, non-blocking and
    tuned."""

    def __init__(self, name: str, sock: socket.socket, handler: Handler) -> None:
        self.name = name
        self.sock = sock
        tune(sock)  # what every connection it accepts inherits (see the module's docstring)
        self.handler = handler
        self._loop = asyncio.get_running_loop()
        self._accepting = False  # the reader is registered
        self._wanted = False  # the service wants to accept (resume() more recently than pause())
        self._held: asyncio.TimerHandle | None = None  # out of descriptors: not accepting until it fires
        self._closed = False
        EXHAUSTION.on_exhausted(self.hold)

    def resume(self) -> None:
        self._wanted = True
        if not self._accepting and not self._closed and self._held is None:
            self._loop.add_reader(self.sock.fileno(), self._on_readable)
            self._accepting = True

    def pause(self) -> None:
        self._wanted = False
        self._stop()

    def hold(self, delay: float = EMFILE_PAUSE) -> None:
        """Stop accepting for ``delay`` seconds (descriptors ran out), then go on as the service wants."""
        if self._closed or self._held is not None:
            return
        self._stop()
        self._held = self._loop.call_later(delay, self._release)

    def _release(self) -> None:
        self._held = None
        if self._wanted:
            self.resume()

    def _stop(self) -> None:
        if self._accepting:
            self._loop.remove_reader(self.sock.fileno())
            self._accepting = False

    def _forget(self) -> None:
        self._closed = True
        self._stop()
        if self._held is not None:
            self._held.cancel()
            self._held = None
        EXHAUSTION.off(self.hold)

    def close(self) -> None:
        if not self._closed:
            self._forget()
            self.sock.close()

    def detach(self) -> socket.socket:
        """Stop accepting and hand the socket over (to the listener of a reloaded service) unclosed."""
        self._forget()
        return self.sock

    def _on_readable(self) -> None:
        accept = self.sock.accept
        for _ in range(ACCEPT_BATCH):
            if not self._accepting:
                return
            try:
                conn, peer = accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in LOCAL_ERRNOS:
                    EXHAUSTION.note("accept", (exc.strerror or str(exc)).lower(), self._loop)  # holds us too
                    return
                if exc.errno in (errno.ECONNABORTED, errno.EPROTO, errno.EPERM):
                    continue  # the client gave up before we accepted: nothing to do
                raise
            if in_reserve(conn.fileno()):
                # Every descriptor below this one is taken: this client cannot be served without eating the
                # reserve (the admin API, checks); it is closed, and the others wait in the accept queue.
                conn.close()
                EXHAUSTION.note("reserve", "descriptor reserve reached", self._loop)
                return
            conn.setblocking(False)
            self.handler(conn, peer)
