"""Relay workers: other processes that move the bytes of established connections, to use every core.

Theory of operation. One process (the main one) accepts every connection and makes every decision:
persistence, health, admin state, DICOM negotiation, logging. Only when a connection is established and
its bytes are to be relayed untouched does it hand the two sockets to a relay worker, over a Unix
socket (SCM_RIGHTS), and wait for the worker to report how the connection ended. So persistence tables,
counters and limits stay exact (one table, one process), while the work that grows with traffic, moving
bytes, is spread over the cores. ``workers: N`` means N processes in all: the main process relays too,
and each connection goes to whichever process relays the fewest connections, the main process's own
counting :data:`pacslb.proxy.workers.relaypool.MAIN_RELAY_WEIGHT` times (it does all the accepting and deciding
besides). The main process's side is pacslb/proxy/workers/relaypool.py; this module is the workers' side, and is
what a worker process imports.

Messages on each worker's control socket (SOCK_SEQPACKET, so each is one packet):
    main -> worker  b"R" + id, idle timeout, timeout end  (+ the client and server sockets)   relay
    main -> worker  b"A" + id                                                                 abort one
    worker -> main  b"D" + id, bytes up, bytes down, end                                      finished
The reports of the connections that end in one turn of a worker's loop go in one message, one after the
other (at most :data:`MAX_REPORTS`); a report the main process cannot take yet (its socket buffer is full)
waits, in order, until it can.
A worker exits when its control socket closes (the main process stopped or died). It ignores SIGINT and
SIGTERM: the main process decides when connections end, within its shutdown grace.
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import socket
import struct
import sys
from typing import TYPE_CHECKING

from pacslb.descriptors import EXHAUSTION, in_reserve, stream_socket
from pacslb.proxy.outcome import End
from pacslb.proxy.pumps import DEFAULT_METHOD, RelayResult

if TYPE_CHECKING:
    from collections.abc import Callable

    from pacslb.proxy.pumps import Abortable, Loop

    OnDone = Callable[[RelayResult], None]
    StartRelay = Callable[[socket.socket, socket.socket, float, End, OnDone], Abortable]

log = logging.getLogger("pacslb.workers")

#: The messages on a control socket (see above), shared with the main process's side (relaypool.py).
RELAY_MSG = struct.Struct(">cQdB")
ABORT_MSG = struct.Struct(">cQ")
DONE_MSG = struct.Struct(">cQQQB")
#: How an end travels: its index in this list.
ENDS = list(End)
END_CODE = {end: i for i, end in enumerate(ENDS)}
#: How long a stopping worker may take to exit before it is killed.
WORKER_STOP_TIMEOUT = 5.0
#: Reports sent in one message at most (26 bytes each).
MAX_REPORTS = 1024


# -- the worker process -------------------------------------------------------------------------------------
#
# A worker imports as little as it can: with the splice relay it runs on its own small epoll loop
# (pacslb/proxy/eventloop.py) and never imports asyncio; only the buffered relay (where splice is not
# available, or PACSLB_RELAY=buffered) needs asyncio's transports.


class _Serving:
    """A worker's connections and its control socket, on any loop that :mod:`pacslb.proxy.pumps` accepts."""

    def __init__(self, loop: Loop, control: socket.socket, start: StartRelay, on_idle: Callable[[], None]) -> None:
        self.loop = loop
        self.control = control
        self.start = start
        self.on_idle = on_idle  # called once the control socket closed and every connection ended
        self.handles: dict[int, Abortable] = {}
        self.closed = False
        self.reports: list[bytes] = []  # not sent yet, in order
        self.sending = False  # a send of the reports is due (this turn), or waits for the socket to drain

    def report(self, conn_id: int, result: RelayResult) -> None:
        self.handles.pop(conn_id, None)
        self.reports.append(DONE_MSG.pack(b"D", conn_id, result.bytes_up, result.bytes_down, END_CODE[result.end]))
        if not self.sending:
            self.sending = True
            self.loop.call_later(0, self._send_reports)  # after this turn's callbacks: their reports go too
        if self.closed and not self.handles:
            self.on_idle()

    def _send_reports(self) -> None:
        reports = self.reports
        while reports:
            batch = reports[:MAX_REPORTS]
            try:
                self.control.send(b"".join(batch))
            except BlockingIOError:  # the main process is behind: the reports wait until it reads
                self.loop.add_writer(self.control.fileno(), self._writable)
                return
            except OSError:  # the main process is gone: nobody to tell
                reports.clear()
                break
            del reports[: len(batch)]
        self.sending = False

    def _writable(self) -> None:
        self.loop.remove_writer(self.control.fileno())
        self._send_reports()

    def on_message(self) -> None:
        while True:
            try:
                data, fds, flags, _addr = socket.recv_fds(self.control, 64, 2)
            except BlockingIOError:
                return
            except OSError:
                data, fds, flags = b"", [], 0
            if not data:
                self._control_closed()
                return
            if data[:1] == b"R" and (len(fds) != 2 or flags & socket.MSG_CTRUNC or any(map(in_reserve, fds))):
                # Out of descriptors: the kernel could not give us both sockets (it closed what did not fit),
                # or they took the last ones, which the pipes of busy connections need. The connection is
                # closed; the main process is told, so that it accounts for it and tries other processes.
                _, conn_id, _idle, _end = RELAY_MSG.unpack(data)
                for fd in fds:
                    os.close(fd)
                EXHAUSTION.note("worker_receive")
                self.report(conn_id, RelayResult(0, 0, End.NO_DESCRIPTORS))
            elif data[:1] == b"R":
                _, conn_id, idle, end_code = RELAY_MSG.unpack(data)
                client = stream_socket(fds[0])
                server = stream_socket(fds[1])
                try:
                    self.handles[conn_id] = self.start(
                        client, server, idle, ENDS[end_code], functools.partial(self.report, conn_id)
                    )
                except Exception:
                    log.exception("relay failed in a worker")
                    client.close()
                    server.close()
                    self.report(conn_id, RelayResult(0, 0, End.ERROR))
            elif data[:1] == b"A":
                _, conn_id = ABORT_MSG.unpack(data)
                handle = self.handles.get(conn_id)
                if handle is not None:
                    handle.abort()
            else:
                for fd in fds:
                    os.close(fd)

    def _control_closed(self) -> None:
        """The main process stopped (or died): close every connection, then leave."""
        if self.closed:
            return
        self.closed = True
        for handle in list(self.handles.values()):
            handle.abort()
        if not self.handles:
            self.on_idle()


def _serve_splice(control: socket.socket) -> None:
    from pacslb.proxy.eventloop import EpollLoop
    from pacslb.proxy.pumps import start_splice

    loop = EpollLoop()

    def start(client: socket.socket, server: socket.socket, idle: float, end: End, on_done: OnDone) -> Abortable:
        return start_splice(loop, client, server, idle_timeout=idle, timeout_end=end, on_done=on_done)

    serving = _Serving(loop, control, start, loop.stop)
    control.setblocking(False)
    loop.add_reader(control.fileno(), serving.on_message)
    try:
        loop.run()
    finally:
        loop.close()


def _serve_buffered(control: socket.socket) -> None:
    import asyncio

    from pacslb.proxy.relay import start_relay

    async def main() -> None:
        loop = asyncio.get_running_loop()
        done = loop.create_future()

        def start(client: socket.socket, server: socket.socket, idle: float, end: End, on_done: OnDone) -> Abortable:
            return start_relay(client, server, idle_timeout=idle, timeout_end=end, on_done=on_done)

        def idle() -> None:
            if not done.done():
                done.set_result(None)

        serving = _Serving(loop, control, start, idle)
        control.setblocking(False)
        loop.add_reader(control.fileno(), serving.on_message)
        await done
        loop.remove_reader(control.fileno())

    try:
        import uvloop

        uvloop.run(main())
    except ImportError:  # pragma: no cover - uvloop is a dependency where pacslb runs
        asyncio.run(main())


def worker_main(fd: int) -> None:
    """Entry point of a relay worker process."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # The main process logs running out of descriptors: it is told of each connection it cost here (the
    # end no_descriptors), and a worker has no log of its own.
    EXHAUSTION.quiet = True
    control = socket.socket(fileno=fd)
    if DEFAULT_METHOD == "splice":
        _serve_splice(control)
    else:
        _serve_buffered(control)


if __name__ == "__main__":
    worker_main(int(sys.argv[1]))
