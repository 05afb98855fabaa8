"""systemd's notification protocol (sd_notify(3)): READY, RELOADING, STOPPING, STATUS and the watchdog.

What this module owns: writing ``KEY=VALUE`` lines as one datagram to the Unix socket systemd names in
``$NOTIFY_SOCKET`` (a unit with ``Type=notify``), and pinging the watchdog when ``$WATCHDOG_USEC`` asks for
it. Without ``$NOTIFY_SOCKET`` (not under systemd) every call does nothing. It must never fail the caller:
a notification that cannot be sent is reported once in the log and the balancer carries on.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time

from pacslb.logs import log_event

log = logging.getLogger("pacslb.systemd")

_warned = False


def notify(*lines: str) -> bool:
    """Send ``lines`` (e.g. ``"READY=1"``, ``"STATUS=serving"``) to systemd. Returns whether it was sent."""
    global _warned
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return False
    if path.startswith("@"):  # an abstract socket address
        path = "\0" + path[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(path)
            sock.sendall("\n".join(lines).encode())
    except OSError as exc:
        if not _warned:
            _warned = True
            log_event(log, "notify_failed", logging.WARNING, socket=path.lstrip("\0"), reason=str(exc))
        return False
    return True


def ready(status: str) -> bool:
    return notify("READY=1", f"STATUS={status}")


def reloading() -> bool:
    # MONOTONIC_USEC lets systemd (Type=notify-reload) match this RELOADING=1 to the reload it asked for.
    usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    return notify("RELOADING=1", f"MONOTONIC_USEC={usec}", "STATUS=reloading the config")


def stopping() -> bool:
    return notify("STOPPING=1", "STATUS=stopping: letting connections finish")


def watchdog_interval() -> float | None:
    """Seconds between watchdog pings systemd expects of this process (half its timeout), or None."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or not usec.isdigit() or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 1e6 / 2


async def watchdog(interval: float) -> None:
    """Ping the watchdog every ``interval`` seconds for as long as the event loop runs: a loop stuck in
    some call stops the pings, and systemd restarts the service."""
    while True:
        notify("WATCHDOG=1")
        await asyncio.sleep(interval)
