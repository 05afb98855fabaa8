"""A listening socket that hands each accepted connection, as a plain socket, to a callback.

Accepting is done directly on the non-blocking socket from a reader callback (a batch per wakeup), so
the callback gets real sockets that the relay can later splice, not transports. ``pause()`` stops
accepting (new clients wait in the kernel's accept queue), ``resume()`` starts again: that is how a
service enforces ``maxconn`` without refusing anyone.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from collections.abc import Callable

from pacslb.config.values import HostPort
from pacslb.logs import log_event

log = logging.getLogger("pacslb.listener")

#: Connections accepted per wakeup before yielding to the rest of the loop (fairness vs. syscalls).
ACCEPT_BATCH = 64
#: Kernel accept queue length; clients beyond maxconn wait here (capped by net.core.somaxconn).
LISTEN_BACKLOG = 1024
#: How long to stop accepting when out of file descriptors, so the loop does not spin on EMFILE.
EMFILE_PAUSE = 0.1

Handler = Callable[[socket.socket, tuple[str, int]], None]


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
    """Accepts on one socket and calls ``handler(sock, peer)`` for each new connection."""

    def __init__(self, name: str, sock: socket.socket, handler: Handler) -> None:
        self.name = name
        self.sock = sock
        self.handler = handler
        self._loop = asyncio.get_running_loop()
        self._accepting = False
        self._closed = False

    def resume(self) -> None:
        if not self._accepting and not self._closed:
            self._loop.add_reader(self.sock.fileno(), self._on_readable)
            self._accepting = True

    def pause(self) -> None:
        if self._accepting:
            self._loop.remove_reader(self.sock.fileno())
            self._accepting = False

    def close(self) -> None:
        self.pause()
        if not self._closed:
            self._closed = True
            self.sock.close()

    def detach(self) -> socket.socket:
        """Stop accepting and hand the socket over (to the listener of a reloaded service) unclosed."""
        self.pause()
        self._closed = True
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
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    log_event(log, "accept_error", logging.ERROR, service=self.name, reason=exc.strerror)
                    self.pause()
                    self._loop.call_later(EMFILE_PAUSE, self.resume)
                    return
                if exc.errno in (errno.ECONNABORTED, errno.EPROTO, errno.EPERM):
                    continue  # the client gave up before we accepted: nothing to do
                raise
            conn.setblocking(False)
            self.handler(conn, peer)
