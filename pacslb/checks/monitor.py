"""The monitor: runs one server's health check every interval and applies rise and fall.

Theory of operation. Each checked server of each service has its own task, so a slow or hung check
delays nobody else. A check run is bounded by ``check.timeout`` (a check that hangs counts as failed);
runs start every ``interval`` from the start of the previous one, never overlapping.

States. A server starts ``up`` and its first check runs at once; ``fall`` consecutive failures take an up
server down and ``rise`` consecutive successes bring a down server up, from the first check on. Starting
up rather than down means a restarted or reloaded balancer serves at once instead of refusing every
client for rise x interval. The first check is not trusted more than later ones: on a machine starting
many things at once a first check may be slow, and taking a healthy node down for it would refuse
clients; meanwhile a dead node costs a client only a connect retry on another node. When a connection to
a server fails, the service wakes its monitor so the next check runs at once instead of at the next
interval: under traffic a dead node is out after ``fall`` quick checks.

A check that pacslb could not make (no descriptor or socket memory for its socket: see
pacslb/descriptors.py) is not the node's failure: it changes neither the node's health nor its streaks,
so a balancer out of descriptors does not take every healthy node out.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from pacslb.balance.server import Health, ServerState
from pacslb.checks.base import CheckResult, TlsTarget, get_check, local_result
from pacslb.config.model import CheckSpec
from pacslb.descriptors import EXHAUSTION
from pacslb.logs import log_event
from pacslb.tasks import cancel_and_wait

log = logging.getLogger("pacslb.health")

#: How long stop() waits for a cancelled check to end.
STOP_TIMEOUT = 5.0

#: Shortest time between two checks of one server when traffic keeps waking the monitor.
MIN_CHECK_GAP = 0.1

#: (server, old, new, result) after a server's health changed.
ChangeCallback = Callable[[ServerState, Health, Health, CheckResult], None]


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:  # apply() called outside a loop (unit tests)
        return None


class Monitor:
    """Checks one server of one service."""

    def __init__(
        self,
        service: str,
        spec: CheckSpec,
        server: ServerState,
        on_change: ChangeCallback | None = None,
        tls: TlsTarget | None = None,
        prefix: bytes = b"",
    ) -> None:
        self.service = service
        self.spec = spec
        self.tls = tls  # the node speaks TLS (mode dicom's node_tls)
        self.prefix = prefix  # what a tcp check sends first (the PROXY protocol's LOCAL header)
        self.server = server
        self.on_change = on_change
        self.last: CheckResult | None = None
        self.last_at: float | None = None  # wall-clock time of ``last``, for the dashboard and `pacslb status`
        self.local_failures = 0  # checks not made for a reason of pacslb's own (not counted)
        self._ok_streak = 0
        self._fail_streak = 0
        self._task: asyncio.Task[None] | None = None
        self._check = get_check(spec.type)
        self._wake = asyncio.Event()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(
            self._run(), name=f"check {self.service}/{self.server.name}"
        )

    def wake(self) -> None:
        """Check now instead of at the next interval (traffic just saw the server fail)."""
        self._wake.set()

    async def stop(self) -> None:
        """Stop checking. Bounded: a check kind that ignored its cancellation would be left behind (and
        logged) rather than hold up a shutdown or reload."""
        task, self._task = self._task, None
        if task is None:
            return
        try:
            ended = await cancel_and_wait(task, STOP_TIMEOUT)
        except Exception:
            log.exception("check of %s/%s ended with an error", self.service, self.server.name)
            return
        if not ended:
            log.error("check of %s/%s did not stop within %gs", self.service, self.server.name, STOP_TIMEOUT)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        spec = self.spec
        port = spec.port or self.server.port
        while True:
            started = loop.time()
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for swallows a cancellation that arrives as
            # the awaited check completes, and the monitor would then outlive its stop().
            try:
                async with asyncio.timeout(spec.timeout):
                    result = await self._check(spec, self.server.host, port, self.tls, self.prefix)
            except TimeoutError:
                result = CheckResult(False, f"no answer within {spec.timeout:g}s")
            except OSError as exc:
                local = local_result(exc)
                if local is None:
                    log.exception("check of %s/%s failed unexpectedly", self.service, self.server.name)
                result = local or CheckResult(False, f"check error: {exc}")
            except Exception as exc:  # a bug in a check kind must not stop checking
                log.exception("check of %s/%s failed unexpectedly", self.service, self.server.name)
                result = CheckResult(False, f"check error: {exc}")
            duration = loop.time() - started
            self.apply(CheckResult(result.ok, result.reason, duration))
            # A wake never makes checks closer than MIN_CHECK_GAP, however many connections fail.
            await asyncio.sleep(max(0.0, started + min(MIN_CHECK_GAP, spec.interval) - loop.time()))
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout_at(started + spec.interval):
                    await self._wake.wait()

    def apply(self, result: CheckResult) -> None:
        """Count one check result and change the server's health when rise or fall is reached. A ``local``
        result (pacslb could not make the check: out of descriptors) is not counted: the server keeps its
        health, its streaks and its last result, and the shortage is counted in pacslb/descriptors.py."""
        if result.local:
            self.local_failures += 1
            EXHAUSTION.note("check", result.reason.removeprefix("not checked: "), _running_loop())
            return
        self.last = result
        self.last_at = time.time()
        server = self.server
        old = server.health
        if result.ok:
            self._ok_streak += 1
            self._fail_streak = 0
            new: Health = "up" if old == "up" or self._ok_streak >= self.spec.rise else "down"
        else:
            self._fail_streak += 1
            self._ok_streak = 0
            new = "down" if old == "down" or self._fail_streak >= self.spec.fall else "up"
        if new != old:
            server.health = new
            log_event(
                log, "health", logging.INFO if new == "up" else logging.WARNING,
                service=self.service, server=server.name, address=server.address,
                old=old, new=new, reason=result.reason, check_duration=result.duration,
            )  # fmt: skip
            if self.on_change is not None:
                self.on_change(server, old, new, result)
