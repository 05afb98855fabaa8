"""What the admin API, the status document and the metrics see of the running balancer: a protocol, so that
admin/ depends on these few things and not on the engine (which satisfies it).

Reads: the config and where it came from, the services with their servers and monitors, the event log,
the cluster role, the shared store, when it started and last reloaded. Acts: node administration
(``nodes``: drain, halt, weights) and ``reload``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from pacslb.admin.events import EventLog
    from pacslb.checks.monitor import Monitor
    from pacslb.cluster.role import ClusterRole
    from pacslb.config import Config
    from pacslb.nodeadmin import NodeAdmin
    from pacslb.proxy.service import Service
    from pacslb.state.store import StateStore


class Balancer(Protocol):
    config: Config
    config_path: str | None
    services: dict[str, Service]
    monitors: dict[tuple[str, str], Monitor]
    events: EventLog
    role: ClusterRole
    store: StateStore
    nodes: NodeAdmin
    started_at: float
    reloaded_at: float | None
    reload_errors: list[str]
    reload_counts: dict[str, int]

    async def reload(self) -> bool: ...
