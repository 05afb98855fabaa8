"""Node administration: what an administrator (or another balancer, through the shared store) sets on a
node, and what follows from one node's health for the others.

Owns: drain, halt and run-time weights, in every service a node is in or in one (``set_admin``,
``set_weight``; the records in pacslb/admin/state.py, shared through the store); a halt's grace timer and
what happens when it ends (its connections are closed); and fate sharing (a node whose check fails in one
service takes nothing in any other). The engine keeps the lifecycle (start, reload, stop) and asks this
module after each change of the services or of a node's health; the admin API calls it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from pacslb.admin.state import AdminStates, NotFound
from pacslb.balance.server import AdminState, ServerState
from pacslb.logs import log_event

if TYPE_CHECKING:
    from pacslb.engine import Engine

log = logging.getLogger("pacslb.engine")


class NodeAdmin:
    """The node administration of one engine."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.halt_timers: dict[tuple[str, str], asyncio.TimerHandle] = {}

    def cancel_halts(self) -> None:
        """No halt's grace is waited for any more (the balancer stops)."""
        for timer in self.halt_timers.values():
            timer.cancel()
        self.halt_timers.clear()

    def update_fate(self) -> None:
        """Fate sharing: a node whose own check is down in one service takes nothing in any other."""
        failing: dict[str, list[str]] = {}
        if self.engine.config.fate_sharing:
            for name, service in self.engine.services.items():
                for server in service.servers:
                    if server.health == "down":
                        failing.setdefault(server.name, []).append(name)
        changed: dict[str, list[str]] = {}
        for name, service in self.engine.services.items():
            for server in service.servers:
                elsewhere = next((f for f in failing.get(server.name, ()) if f != name), None)
                if elsewhere != server.down_elsewhere:
                    server.down_elsewhere = elsewhere
                    changed.setdefault(server.name, []).append(name)
                    log_event(
                        log, "fate_shared" if elsewhere else "fate_cleared",
                        logging.WARNING if elsewhere else logging.INFO,
                        service=name, server=server.name, failing_in=elsewhere or "-",
                    )  # fmt: skip
        for node, services in changed.items():
            if node in failing:
                because = ", ".join(failing[node])
                message = f"{node} taken out of {', '.join(services)} (its check fails in {because})"
                self.engine.events.add("fate", "warning", message, server=node, services=services)
            else:
                self.engine.events.add(
                    "fate", "info", f"{node} back in {', '.join(services)}", server=node, services=services
                )

    def targets(self, node: str, service: str | None) -> list[tuple[str, ServerState]]:
        """The servers an admin operation on ``node`` (in ``service``, or every service) acts on.

        Raises:
            NotFound: no such service, or no such node in it (or anywhere).
        """
        if service is not None:
            found = self.engine.services.get(service)
            if found is None:
                raise NotFound(f"no service named {service!r} (services: {', '.join(self.engine.services) or 'none'})")
            for server in found.servers:
                if server.name == node:
                    return [(service, server)]
            names = ", ".join(s.name for s in found.servers)
            raise NotFound(f"service {service!r} has no server named {node!r} (its servers: {names})")
        targets = [(name, s) for name, svc in self.engine.services.items() for s in svc.servers if s.name == node]
        if not targets:
            nodes = sorted({s.name for svc in self.engine.services.values() for s in svc.servers})
            raise NotFound(f"no node named {node!r} (nodes: {', '.join(nodes)})")
        return targets

    def _record(self, change: Callable[[AdminStates], None]) -> None:
        """Make ``change`` to the recorded admin states, and tell the store (the other balancers) what changed."""
        states = self.engine.admin_states
        before = states.fields()
        change(states)
        self.engine.store.admin_changed(states.changes(before, states.fields()))

    def set_admin(self, node: str, state: AdminState, service: str | None = None, by: str = "api") -> list[str]:
        """Put ``node`` online, in drain or in halt, in every service it is in or in ``service`` only.
        Returns the services it acted on.

        Raises:
            NotFound: no such node or service.
        """
        targets = self.targets(node, service)
        self._record(lambda states: states.set_admin(node, state, service))
        changed = [name for name, server in targets if self._set_server_admin(name, server, state, by)]
        if changed:
            level = "info" if state == "online" else "warning"
            self.engine.events.add(
                "admin", level, f"{node} set to {state} in {', '.join(changed)} (by {by})",
                server=node, state=state, services=changed, by=by,
            )  # fmt: skip
        self.engine.check_services()
        return [name for name, _ in targets]

    def set_weight(self, node: str, weight: int | None, service: str | None = None, by: str = "api") -> list[str]:
        """Give ``node`` a run-time weight (None: back to the config's), everywhere or in ``service``.

        Raises:
            NotFound: no such node or service.
        """
        targets = self.targets(node, service)
        self._record(lambda states: states.set_weight(node, weight, service))
        for name, server in targets:
            old = server.weight
            self.apply_weight(name, server)
            if server.weight != old:
                log_event(log, "weight", service=name, server=node, old=old, new=server.weight, by=by)
        self.engine.events.add(
            "admin", "info", f"{node} weight {weight if weight is not None else 'as configured'} in "
            f"{', '.join(n for n, _ in targets)} (by {by})", server=node, weight=weight, by=by,
        )  # fmt: skip
        self.engine.check_services()
        return [name for name, _ in targets]

    def from_peer(self, changes: dict[str, dict[str, Any]], origin: str) -> None:
        """Settings another balancer made (or the shared store held at start): applied as if made here."""
        try:
            self.engine.admin_states.apply_fields(changes)
        except ValueError as exc:
            log_event(log, "store_admin_ignored", logging.WARNING, origin=origin, reason=str(exc))
            return
        by = f"peer:{origin}"
        for name, service in self.engine.services.items():
            for server in service.servers:
                old_weight = server.weight
                self.apply_weight(name, server)
                if server.weight != old_weight:
                    log_event(log, "weight", service=name, server=server.name, old=old_weight, new=server.weight, by=by)
                wanted = self.engine.admin_states.admin(name, server.name)
                if self._set_server_admin(name, server, wanted, by):
                    level = "info" if wanted == "online" else "warning"
                    self.engine.events.add(
                        "admin", level, f"{server.name} set to {wanted} in {name} (by {origin})",
                        server=server.name, state=wanted, services=[name], by=by,
                    )  # fmt: skip
        self.engine.check_services()

    def apply_weight(self, service: str, server: ServerState) -> None:
        wanted = self.engine.admin_states.weight(service, server.name)
        if wanted is None:
            spec = self.engine.services[service].spec.servers.get(server.name)
            wanted = spec.weight if spec is not None else server.weight
        server.weight = wanted

    def apply_recorded(self) -> None:
        """Give every server the admin state and weight recorded for it (after a reload, at start)."""
        for name, service in self.engine.services.items():
            for server in service.servers:
                self.apply_weight(name, server)
                wanted = self.engine.admin_states.admin(name, server.name)
                if self._set_server_admin(name, server, wanted, "state"):
                    self.engine.events.add(
                        "admin", "info", f"{server.name} is {wanted} in {name} (kept from before)",
                        server=server.name, state=wanted, services=[name], by="state",
                    )  # fmt: skip

    def _set_server_admin(self, service: str, server: ServerState, state: AdminState, by: str) -> bool:
        """Change one server's admin state; returns whether it changed."""
        key = (service, server.name)
        timer = self.halt_timers.get(key)
        if timer is not None and state != "halt":
            timer.cancel()
            del self.halt_timers[key]
        old = server.admin
        if old == state:
            return False
        server.admin = state
        if state != "halt":
            log_event(log, "admin", service=service, server=server.name, old=old, new=state, by=by)
            return True
        table = self.engine.services[service].table
        dropped = table.drop_server(server.name) if table is not None else 0
        grace = self.engine.config.halt_grace
        self.halt_timers[key] = asyncio.get_running_loop().call_later(grace, self._halt_expired, service, server)
        log_event(
            log, "admin", logging.WARNING, service=service, server=server.name, old=old, new=state, by=by,
            persistence_dropped=dropped, active=server.active, closing_in=grace,
        )  # fmt: skip
        return True

    def _halt_expired(self, service: str, server: ServerState) -> None:
        """A halt's grace is over: close the connections still relaying to the server."""
        self.halt_timers.pop((service, server.name), None)
        if server.admin != "halt":
            return
        closed = self.engine.close_server_connections(server)
        if closed:
            log_event(log, "halt_closed", logging.WARNING, service=service, server=server.name, connections=closed)
            self.engine.events.add(
                "halt", "warning", f"{server.name} halted in {service}: {closed} connection(s) closed",
                service=service, server=server.name, connections=closed,
            )  # fmt: skip

    def halt_deadline(self, service: str, node: str) -> float | None:
        """When a halted server's connections will be closed (event-loop time), or None."""
        timer = self.halt_timers.get((service, node))
        return timer.when() if timer is not None else None
