"""The status document: every service and server as the API (GET /api/v1/status), the dashboard and
``pacslb status`` show them.

What this module owns: reading the engine's state into plain JSON-able data, at the moment it is asked
for. It must not change anything, and must stay cheap (one pass over services and servers): the dashboard
asks every two seconds.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from pacslb import __version__
from pacslb.balance.server import ServerState

if TYPE_CHECKING:
    from pacslb.admin.balancer import Balancer
    from pacslb.proxy.service import Service


def effective_health(server: ServerState) -> str:
    """``down`` when the server's own check says so, or when fate sharing took its node out."""
    return "down" if server.health == "down" or server.down_elsewhere is not None else "up"


def server_status(engine: Balancer, service: str, server: ServerState, loop_now: float) -> dict[str, Any]:
    monitor = engine.monitors.get((service, server.name))
    check: dict[str, Any] | None = None
    if monitor is not None and monitor.server is server:
        last = monitor.last
        check = {
            "type": monitor.spec.type,
            "ok": last.ok if last is not None else None,
            "reason": last.reason if last is not None else "not checked yet",
            "duration": last.duration if last is not None else None,
            "at": monitor.last_at,
        }
    deadline = engine.nodes.halt_deadline(service, server.name)
    return {
        "name": server.name,
        "address": server.address,
        "health": effective_health(server),
        "admin": server.admin,
        "weight": server.weight,
        "active": server.active,
        "total": server.total,
        "bytes_up": server.bytes_up,
        "bytes_down": server.bytes_down,
        "down_via": server.down_elsewhere,
        "check": check,
        "clock_skew": engine.events.clock_skew.get(server.address),
        "halt_closes_in": max(0.0, deadline - loop_now) if deadline is not None else None,
    }


def service_status(engine: Balancer, name: str, service: Service, loop_now: float) -> dict[str, Any]:
    spec = service.spec
    servers = [server_status(engine, name, s, loop_now) for s in service.servers]
    usable = sum(1 for s in service.servers if s.schedulable)
    return {
        "name": name,
        "mode": spec.mode,
        "listen": str(spec.listen),
        "balance": spec.balance,
        "persistence": spec.persistence.type,
        "persistence_entries": len(service.table) if service.table is not None else 0,
        "check": spec.check.type,
        "state": "up" if usable else "down",
        "usable": usable,
        "active": service.active,
        "total": service.total,
        "rejections": dict(service.rejections),
        "servers": servers,
    }


def node_status(services: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each node across the services it is in: one admin state (or ``mixed``), health up/down/partial."""
    nodes: dict[str, dict[str, Any]] = {}
    for service in services:
        for server in service["servers"]:
            node = nodes.setdefault(
                server["name"], {"name": server["name"], "services": [], "admins": set(), "healths": set()}
            )
            node["services"].append(service["name"])
            node["admins"].add(server["admin"])
            node["healths"].add(server["health"])
            if server["clock_skew"] is not None:
                node["clock_skew"] = server["clock_skew"]
    out = []
    for node in nodes.values():
        admins, healths = node.pop("admins"), node.pop("healths")
        node["admin"] = admins.pop() if len(admins) == 1 else "mixed"
        node["health"] = healths.pop() if len(healths) == 1 else "partial"
        node.setdefault("clock_skew", None)
        out.append(node)
    return sorted(out, key=lambda n: n["name"])


def build_status(engine: Balancer) -> dict[str, Any]:
    """The whole status document."""
    import asyncio

    loop_now = asyncio.get_running_loop().time()
    services = [service_status(engine, name, svc, loop_now) for name, svc in engine.services.items()]
    admin = engine.config.admin
    return {
        "version": __version__,
        "now": time.time(),
        "started_at": engine.started_at,
        "reloaded_at": engine.reloaded_at,
        "config": engine.config_path,
        "fate_sharing": engine.config.fate_sharing,
        "halt_grace": engine.config.halt_grace,
        "token_required": admin is not None and admin.token_file is not None,
        # What keepalived last reported (pacslb/cluster/role.py); vrrp: cluster.vrrp is configured (a role is due).
        "role": engine.role.role,
        "role_since": engine.role.since,
        "vrrp": engine.config.cluster.vrrp is not None,
        "services": services,
        "nodes": node_status(services),
        "cluster": {"node": engine.config.cluster.node, "store": engine.store.status()},
        "last_event": engine.events.events[-1].id if engine.events.events else 0,
    }
