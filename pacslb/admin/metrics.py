"""Prometheus metrics (GET /metrics), read from the engine's state at scrape time.

What this module owns: a prometheus-client collector that walks the services, servers, monitors and
DICOM per-AE counters when Prometheus scrapes, and the metric names and help texts. It must not keep
counters of its own or be called per connection: the services already count (``active``, ``total``,
bytes, rejections), and a scrape every 15 s reading them costs nothing on the data path.

Names follow Prometheus conventions: ``pacslb_`` prefix, ``_total`` for counters, base units (seconds,
bytes), labels ``service`` and ``server`` (the node's name).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.registry import Collector

from pacslb import __version__
from pacslb.admin.status import effective_health
from pacslb.balance.server import AdminState
from pacslb.cluster.role import ROLES
from pacslb.descriptors import EXHAUSTION, RECENT, reserve

if TYPE_CHECKING:
    from pacslb.admin.balancer import Balancer

ADMIN_STATES: tuple[AdminState, ...] = ("online", "drain", "halt")
#: Calling AE titles exported per DICOM service. The service keeps up to 10,000 (most recently seen);
#: a series per AE for that many would swamp a Prometheus server, so the busiest are exported.
MAX_AE_SERIES = 200

__all__ = ["CONTENT_TYPE_LATEST", "PacslbCollector", "make_registry", "render"]


class PacslbCollector(Collector):
    """Reads the engine at each scrape."""

    def __init__(self, engine: Balancer) -> None:
        self.engine = engine

    def collect(self) -> Iterable[Metric]:
        engine = self.engine
        info = InfoMetricFamily("pacslb", "pacslb version")
        info.add_metric([], {"version": __version__})
        yield info
        yield GaugeMetricFamily(
            "pacslb_start_time_seconds", "When pacslb started (seconds since the epoch)", value=engine.started_at
        )
        reloads = CounterMetricFamily("pacslb_config_reloads", "Config reloads, by result", labels=["result"])
        for result, count in engine.reload_counts.items():
            reloads.add_metric([result], count)
        yield reloads
        role = GaugeMetricFamily(
            "pacslb_cluster_role",
            "The role keepalived last reported for this balancer (1 for the current one; unknown until it reports)",
            labels=["role"],
        )
        for reported in ROLES:
            role.add_metric([reported], 1.0 if engine.role.role == reported else 0.0)
        yield role

        s_labels = ["service"]
        sv_labels = ["service", "server"]
        svc_active = GaugeMetricFamily("pacslb_service_active_connections", "Open client connections", labels=s_labels)
        svc_total = CounterMetricFamily("pacslb_service_connections", "Client connections accepted", labels=s_labels)
        svc_usable = GaugeMetricFamily(
            "pacslb_service_usable_servers",
            "Servers that can take a new client (up, online, weight > 0)",
            labels=s_labels,
        )
        rejections = CounterMetricFamily(
            "pacslb_service_rejections",
            "Clients the balancer turned away, by reason (no_server, refused, rejected_by_balancer, ...)",
            labels=["service", "reason"],
        )
        persistence = GaugeMetricFamily(
            "pacslb_persistence_entries", "Entries in the service's persistence table", labels=s_labels
        )
        up = GaugeMetricFamily(
            "pacslb_server_up", "1 when the server is up (its check passes), else 0", labels=sv_labels
        )
        admin = GaugeMetricFamily(
            "pacslb_server_admin_state",
            "The server's admin state (1 for the current one)",
            labels=[*sv_labels, "state"],
        )
        weight = GaugeMetricFamily("pacslb_server_weight", "Current weight", labels=sv_labels)
        active = GaugeMetricFamily("pacslb_server_active_connections", "Open connections", labels=sv_labels)
        total = CounterMetricFamily("pacslb_server_connections", "Connections given to the server", labels=sv_labels)
        sent = CounterMetricFamily(
            "pacslb_server_bytes",
            "Bytes relayed by ended connections, by direction (to_server: client to node, to_client: node to client)",
            labels=[*sv_labels, "direction"],
        )
        check_ok = GaugeMetricFamily(
            "pacslb_server_check_success", "1 when the last health check passed, 0 when it failed", labels=sv_labels
        )
        check_duration = GaugeMetricFamily(
            "pacslb_server_check_duration_seconds", "How long the last health check took", labels=sv_labels
        )
        check_time = GaugeMetricFamily(
            "pacslb_server_last_check_timestamp_seconds", "When the last health check ran", labels=sv_labels
        )
        ae_assoc = CounterMetricFamily(
            "pacslb_dicom_associations", "Associations requested, by calling AE title", labels=["service", "calling_ae"]
        )
        ae_rejected = CounterMetricFamily(
            "pacslb_dicom_rejected_associations",
            "Associations rejected (by pacslb or a node), by calling AE title",
            labels=["service", "calling_ae"],
        )
        ae_bytes = CounterMetricFamily(
            "pacslb_dicom_bytes",
            "Bytes of associations, by calling AE title",
            labels=["service", "calling_ae", "direction"],
        )
        for name, service in engine.services.items():
            svc_active.add_metric([name], service.active)
            svc_total.add_metric([name], service.total)
            svc_usable.add_metric([name], sum(1 for s in service.servers if s.schedulable))
            for reason, count in service.rejections.items():
                rejections.add_metric([name, reason], count)
            if service.table is not None:
                persistence.add_metric([name], len(service.table))
            for server in service.servers:
                labels = [name, server.name]
                up.add_metric(labels, 1.0 if effective_health(server) == "up" else 0.0)
                for state in ADMIN_STATES:
                    admin.add_metric([*labels, state], 1.0 if server.admin == state else 0.0)
                weight.add_metric(labels, server.weight)
                active.add_metric(labels, server.active)
                total.add_metric(labels, server.total)
                sent.add_metric([*labels, "to_server"], server.bytes_up)
                sent.add_metric([*labels, "to_client"], server.bytes_down)
                monitor = engine.monitors.get((name, server.name))
                if monitor is not None and monitor.last is not None and monitor.last_at is not None:
                    check_ok.add_metric(labels, 1.0 if monitor.last.ok else 0.0)
                    check_duration.add_metric(labels, monitor.last.duration)
                    check_time.add_metric(labels, monitor.last_at)
            stats = getattr(service, "ae_stats", None)
            if stats:
                busiest = sorted(stats.items(), key=lambda item: item[1].associations, reverse=True)[:MAX_AE_SERIES]
                for ae, counts in busiest:
                    ae_assoc.add_metric([name, ae], counts.associations)
                    ae_rejected.add_metric([name, ae], counts.rejected)
                    ae_bytes.add_metric([name, ae, "to_server"], counts.bytes_up)
                    ae_bytes.add_metric([name, ae, "to_client"], counts.bytes_down)
        yield from (svc_active, svc_total, svc_usable, rejections, persistence)
        yield from (up, admin, weight, active, total, sent, check_ok, check_duration, check_time)
        yield from (ae_assoc, ae_rejected, ae_bytes)
        yield from _descriptor_metrics()
        yield from _store_metrics(engine)


def _descriptor_metrics() -> Iterable[Metric]:
    """Running out of file descriptors (pacslb/descriptors.py), in the main process and reported by the
    relay workers. The process's own use and limit are ``process_open_fds`` and ``process_max_fds``."""
    exhausted = CounterMetricFamily(
        "pacslb_descriptors_exhausted",
        "Times pacslb ran out of file descriptors (or socket memory), or reached its reserve, by where",
        labels=["where"],
    )
    for place, count in sorted(EXHAUSTION.by_place.items()):
        exhausted.add_metric([place], count)
    yield exhausted
    yield GaugeMetricFamily(
        "pacslb_descriptors_exhausted_recently",
        f"1 while pacslb ran out of file descriptors in the last {RECENT:g} s (/healthz answers 503), else 0",
        value=1.0 if EXHAUSTION.exhausted() else 0.0,
    )
    yield GaugeMetricFamily(
        "pacslb_descriptors_reserve",
        "Descriptors below the limit kept for the admin API and health checks (not for client or node sockets)",
        value=reserve(),
    )


def _store_metrics(engine: Balancer) -> Iterable[Metric]:
    """The state store (pacslb/state/): connected and synced (always 1 for the memory store), and what a
    shared store has moved."""
    status = engine.store.status()
    kind = str(status.get("kind", "memory"))
    connected = GaugeMetricFamily(
        "pacslb_store_connected", "1 while the state store is reachable (memory: always)", labels=["kind"]
    )
    connected.add_metric([kind], 1.0 if status.get("connected") else 0.0)
    synced = GaugeMetricFamily(
        "pacslb_store_synced", "1 once the shared table was read since the last (re)connection", labels=["kind"]
    )
    synced.add_metric([kind], 1.0 if status.get("synced") else 0.0)
    yield from (connected, synced)
    moved = CounterMetricFamily(
        "pacslb_store_operations", "Bindings written, applied from peers, published, lost to newer ones; reconnects",
        labels=["operation"],
    )  # fmt: skip
    for operation in ("written", "applied", "published", "conflicts_lost", "reconnects"):
        if operation in status:
            moved.add_metric([operation], float(status[operation]))
    yield moved


def make_registry(engine: Balancer) -> CollectorRegistry:
    """A registry of pacslb's metrics plus the process's own (CPU, memory, open files)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(PacslbCollector(engine))
    ProcessCollector(registry=registry)
    return registry


def render(registry: CollectorRegistry) -> bytes:
    """The text exposition format of every metric in ``registry``."""
    return generate_latest(registry)
