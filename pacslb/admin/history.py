"""Throughput history for the dashboard's small graphs: per server, bytes each way over the last hour.

What this module owns: a ring buffer per (service, node) of the server's byte counters, sampled every
:data:`SAMPLE_INTERVAL` seconds by one task, and the rates computed from them on request. It reads the
counters the services keep (``ServerState.bytes_up`` / ``bytes_down``) and never touches a connection:
the cost is one pass over the servers every few seconds, whatever the traffic.

The counters grow when a connection (tcp, dicom) ends, by the bytes it moved, so a long association
shows as one step when it ends, not spread over its life. A server replaced by a reload (new address)
starts its counters again from zero: a counter that went down is read as a restart, not as negative
traffic.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

from pacslb.balance.server import ServerState
from pacslb.tasks import cancel_and_wait

#: Seconds between two samples: fine enough for a graph of an hour, coarse enough to cost nothing.
SAMPLE_INTERVAL = 5.0
#: How far back the graphs go.
HISTORY_SECONDS = 3600.0
#: Samples kept per server: an hour of them.
MAX_SAMPLES = int(HISTORY_SECONDS / SAMPLE_INTERVAL)
#: A server not seen for this long (removed by a reload) loses its history, so the buffers stay bounded.
FORGET_AFTER = HISTORY_SECONDS

Sample = tuple[float, int, int, int]  # wall-clock time, bytes up, bytes down, active connections
Servers = Callable[[], Iterable[tuple[str, ServerState]]]


class History:
    """Ring buffers of byte counters, one per (service, node)."""

    def __init__(self, servers: Servers, interval: float = SAMPLE_INTERVAL, limit: int = MAX_SAMPLES) -> None:
        self.servers = servers
        self.interval = interval
        self.limit = limit
        self.samples: dict[tuple[str, str], deque[Sample]] = {}
        self._task: asyncio.Task[None] | None = None

    def sample(self, now: float | None = None) -> None:
        """Take one sample of every server's counters."""
        now = time.time() if now is None else now
        seen = set()
        for service, server in self.servers():
            key = (service, server.name)
            seen.add(key)
            ring = self.samples.get(key)
            if ring is None:
                ring = self.samples[key] = deque(maxlen=self.limit)
            ring.append((now, server.bytes_up, server.bytes_down, server.active))
        for key in [k for k in self.samples if k not in seen]:
            ring = self.samples[key]
            if not ring or now - ring[-1][0] > FORGET_AFTER:
                del self.samples[key]

    def rates(self) -> dict[str, Any]:
        """Per server ("service/node"): sample times and bytes per second each way between samples."""
        series: dict[str, Any] = {}
        for (service, node), ring in self.samples.items():
            times: list[float] = []
            up: list[float] = []
            down: list[float] = []
            active: list[int] = []
            previous: Sample | None = None
            for sample in ring:
                if previous is not None:
                    span = max(sample[0] - previous[0], 1e-6)
                    # A counter that went down belongs to a new server object (reload): count from zero.
                    d_up = sample[1] - previous[1] if sample[1] >= previous[1] else sample[1]
                    d_down = sample[2] - previous[2] if sample[2] >= previous[2] else sample[2]
                    times.append(round(sample[0], 3))
                    up.append(round(d_up / span, 1))
                    down.append(round(d_down / span, 1))
                    active.append(sample[3])
                previous = sample
            series[f"{service}/{node}"] = {
                "service": service,
                "server": node,
                "t": times,
                "up": up,
                "down": down,
                "active": active,
            }
        return {"interval": self.interval, "window": self.interval * self.limit, "series": series}

    def start(self) -> None:
        if self._task is None:
            self.sample()
            self._task = asyncio.get_running_loop().create_task(self._run(), name="throughput history")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            await cancel_and_wait(task)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            self.sample()
