"""The main process's side of one worker process: the process and its control socket.

Both kinds of worker (relay workers, relaypool.py beside this module; web workers, webpool.py) are
started the same way and spoken to the same way: a SOCK_SEQPACKET socket pair, one message per packet,
descriptors passed with SCM_RIGHTS. A message that cannot be sent at once (the worker is busy and its
socket buffer full) waits in order with copies of its descriptors, and goes when the socket is writable.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
from collections import deque
from collections.abc import Callable, Sequence

_PEEK = bytearray(1)


def next_size(sock: socket.socket) -> int | None:
    """The size of the next message waiting on a SOCK_SEQPACKET socket: None when none waits, 0 when the
    other side closed. (Receiving into a buffer of the largest size a message may have would allocate it
    for every message: 4 MiB costs about 20 µs each time.)"""
    try:
        return sock.recv_into(_PEEK, 1, socket.MSG_PEEK | socket.MSG_TRUNC)
    except BlockingIOError:
        return None
    except OSError:
        return 0


class Channel:
    """One worker process and the control socket to it."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        index: int,
        module: str,
        on_readable: Callable[[], None],
        on_broken: Callable[[], None],
    ) -> None:
        """Start ``python -m module FD INDEX``; ``on_readable`` is called when messages wait, ``on_broken``
        when a send finds the worker gone."""
        self.loop = loop
        self.index = index
        self.on_broken = on_broken
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", module, str(theirs.fileno()), str(index)],
            pass_fds=(theirs.fileno(),),
            stdin=subprocess.DEVNULL,
        )
        theirs.close()
        ours.setblocking(False)
        self.control = ours
        self.outbox: deque[tuple[bytes, list[int]]] = deque()
        self.writing = False
        self.closed = False
        loop.add_reader(ours.fileno(), on_readable)

    def send(self, message: bytes, fds: Sequence[int] = ()) -> None:
        """Send ``message`` with copies of ``fds`` (the caller keeps and closes its own).

        Raises:
            OSError: the message must wait and no descriptor is left to copy ``fds`` (EMFILE).
        """
        if self.closed:
            return
        if self.outbox or not self._try_send(message, fds):
            copies: list[int] = []
            try:
                for fd in fds:
                    copies.append(os.dup(fd))
            except OSError:  # out of descriptors: the caller is told, and no copy is left open
                for fd in copies:
                    os.close(fd)
                raise
            self.outbox.append((message, copies))
            if not self.writing and not self.closed:
                self.loop.add_writer(self.control.fileno(), self._flush)
                self.writing = True

    def receive(self) -> bytes | None:
        """The next message from the worker: None when none waits, b"" when the worker is gone."""
        size = next_size(self.control)
        if not size:
            return None if size is None else b""
        try:
            return self.control.recv(size)
        except OSError:
            return b""

    def _try_send(self, message: bytes, fds: Sequence[int]) -> bool:
        try:
            socket.send_fds(self.control, [message], fds) if fds else self.control.send(message)
        except BlockingIOError:
            return False
        except OSError:
            self.on_broken()
        return True

    def _flush(self) -> None:
        while self.outbox:
            message, fds = self.outbox[0]
            if not self._try_send(message, fds):
                return
            if self.closed:
                return  # the worker is gone: close() dropped what waited, these copies with it
            self.outbox.popleft()
            for fd in fds:
                os.close(fd)
        if self.writing:
            self.loop.remove_writer(self.control.fileno())
            self.writing = False

    def close(self) -> None:
        """Stop listening and close the control socket (the worker then ends); what waited is dropped."""
        if self.closed:
            return
        self.loop.remove_reader(self.control.fileno())
        if self.writing:
            self.loop.remove_writer(self.control.fileno())
            self.writing = False
        for _, fds in self.outbox:
            for fd in fds:
                os.close(fd)
        self.outbox.clear()
        self.control.close()
        self.closed = True

    def reap(self, timeout: float) -> None:
        """Wait (blocking, up to ``timeout``) for the process to exit, then kill it."""
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
