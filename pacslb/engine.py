"""The engine: builds the running services from a config, and owns start, reload and stop.

Theory of operation.
- start: bind every listener first (any failure: nothing starts, the error names the service), then
  start accepting and checking.
- reload (SIGHUP): load and validate the new file; if invalid, log every problem and keep running as
  before. Otherwise bind the listeners that are new or moved (again all-or-nothing), then apply: services
  keep their listener when the address is unchanged, servers keep their state (health, counters) when
  name and address are unchanged, weights and checks change in place. Established connections are never
  touched. A removed service stops accepting; its connections run to their end.
- stop (SIGTERM/SIGINT): stop accepting and checking, let connections finish for ``shutdown_grace``,
  then close the rest.
- node administration (pacslb/nodeadmin.py, ``engine.nodes``): admin states (online | drain | halt) and
  run-time weights, by node in every service or in one, recorded in the admin state file and applied
  again to the servers of every reload and at start; halts and their grace; fate sharing. The engine asks
  it after each reload and each change of a node's health.
Signals are handled here and nowhere else.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import signal
import socket
import time
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, cast

from pacslb import descriptors
from pacslb.admin import sdnotify
from pacslb.admin.alerts import Alerter
from pacslb.admin.events import EventLog
from pacslb.admin.state import AdminStates
from pacslb.balance.server import Health, ServerState
from pacslb.checks.base import CheckResult, TlsTarget
from pacslb.checks.http import close_clients as close_http_clients
from pacslb.checks.monitor import Monitor
from pacslb.cluster.role import ClusterRole
from pacslb.config import Config, ServiceSpec, load_config
from pacslb.config.values import HostPort
from pacslb.errors import ConfigError, PacslbError
from pacslb.logs import log_event, setup_logging
from pacslb.nodeadmin import NodeAdmin
from pacslb.protocols.proxy import LOCAL_HEADER
from pacslb.proxy.eventloop import close_hosted
from pacslb.proxy.listener import Listener, bind_listener
from pacslb.proxy.relay import DEFAULT_METHOD
from pacslb.proxy.service import Service
from pacslb.proxy.tcp import TcpService
from pacslb.proxy.workers.relaypool import RelayPool
from pacslb.proxy.workers.webpool import WebPool
from pacslb.state.store import StateStore, open_store, snapshot_path
from pacslb.tasks import cancel_and_wait

if TYPE_CHECKING:
    from pacslb.admin.api import AdminServer
    from pacslb.proxy.http import HttpService

log = logging.getLogger("pacslb.engine")

#: After the shutdown grace, how long cancelled connections get to close before pacslb exits regardless.
CANCEL_WAIT = 5.0

#: How often expired persistence entries are swept out (lookups also drop them as they find them).
SWEEP_INTERVAL = 30.0
#: On stop, how long background work (an old admin listener closing, alerts flushing) may still take.
BACKGROUND_STOP_TIMEOUT = 5.0


def service_class(mode: str) -> type[Service]:
    """The service class of a config ``mode``. The dicom and http modules are imported when a service of
    their mode is first made: the HTTP proxy and its parser cost megabytes that a balancer of plain TCP
    services would carry for nothing."""
    if mode == "tcp":
        return TcpService
    if mode == "dicom":
        from pacslb.proxy.dicom import DicomService

        return DicomService
    if mode == "http":
        from pacslb.proxy.http import HttpService

        return HttpService
    raise ValueError(f"no service of mode {mode!r}")


def _server_condition(server: ServerState) -> str:
    """Why a server takes no new client, in a word or two ("down", "drain", "weight 0", ...)."""
    if server.health == "down":
        return "down"
    if server.down_elsewhere is not None:
        return f"down in {server.down_elsewhere}"
    if server.admin != "online":
        return server.admin
    if server.weight == 0:
        return "weight 0"
    return "up"


class StartError(PacslbError):
    """The listeners could not be bound; nothing was started."""


class Engine:
    """The running balancer for one config at a time."""

    def __init__(self, config: Config, config_path: str | None = None, store: StateStore | None = None) -> None:
        self.config = config
        self.config_path = config_path
        # The persistence tables: this process's own (memory), or shared with the other balancers (redis).
        # (The memory store keeps a snapshot beside the admin state file, so a restart keeps the pins.)
        snapshot = snapshot_path(config.admin.state_file if config.admin is not None else None)
        self.store: StateStore = store if store is not None else open_store(config.cluster, snapshot)
        self.services: dict[str, Service] = {}
        self.retired: list[Service] = []
        self.monitors: dict[tuple[str, str], Monitor] = {}
        self._sweeper: asyncio.Task[None] | None = None
        self._reloading = asyncio.Lock()
        self.pool: RelayPool | None = None
        self.web_pool: WebPool | None = None  # http served in worker processes too (started with one)
        # Operations (pacslb/admin).
        self.events = EventLog()
        self.role = ClusterRole(self.events)  # what keepalived last reported (pacslb/cluster/role.py)
        self.admin_states = AdminStates.load(config.admin.state_file if config.admin is not None else None)
        self.admin_server: AdminServer | None = None
        self.alerter: Alerter | None = None
        self.started_at = time.time()
        self.reloaded_at: float | None = None
        self.reload_errors: list[str] = []  # why the last reload was refused (empty when it was applied)
        self.reload_counts = {"applied": 0, "refused": 0}
        self.nodes = NodeAdmin(self)  # drain, halt, weights, fate sharing (pacslb/nodeadmin.py)
        self._usable: dict[str, bool] = {}
        self._background: set[asyncio.Task[Any]] = set()

    # -- start ---------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Bind every listener, then start serving and checking.

        Raises:
            StartError: a listener could not be bound (nothing is left running).
        """
        bound = self._bind(self.config)
        admin_sock = self._bind_admin(self.config, bound)
        workers = self.config.worker_count
        if workers > 1:
            self.pool = RelayPool(workers)
            self.pool.start()
        self.events.watch_clock_skew()
        self._apply(self.config, bound)
        self.store.on_admin = self.nodes.from_peer
        await self.store.start()  # connects and synchronises in the background; connections never wait
        await self._configure_operations(self.config, admin_sock)
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep())
        log_event(log, "workers", processes=workers, relay=DEFAULT_METHOD, descriptors=descriptors.limit())
        self._check_descriptors(self.config)
        for name, service in self.services.items():
            log_event(
                log, "listen", service=name, address=str(service.spec.listen), mode=service.spec.mode,
                servers=",".join(s.name for s in service.servers),
            )  # fmt: skip

    @staticmethod
    def _check_descriptors(config: Config) -> None:
        """Warn (``descriptors_low``) when the services' maxconn cannot fit in the descriptor limit."""
        maxconns = {name: spec.maxconn for name, spec in config.services.items()}
        warning = descriptors.capacity_warning(maxconns, descriptors.limit(), config.worker_count)
        if warning is not None:
            log_event(log, "descriptors_low", logging.WARNING, **warning)

    def _bind(self, config: Config) -> dict[str, socket.socket]:
        """New listening sockets for services whose address is new; all or nothing."""
        current = {str(s.spec.listen): s for s in self.services.values() if s.listener is not None}
        bound: dict[str, socket.socket] = {}
        errors: list[str] = []
        for name, spec in config.services.items():
            if str(spec.listen) in current:
                continue
            try:
                bound[name] = bind_listener(spec.listen)
            except OSError as exc:
                errors.append(f"services.{name}.listen: cannot listen on {spec.listen}: {exc.strerror or exc}")
        if errors:
            for sock in bound.values():
                sock.close()
            raise StartError("; ".join(errors))
        return bound

    def _bind_admin(self, config: Config, bound: dict[str, socket.socket]) -> socket.socket | None:
        """The admin API's new listening socket, when it is new or moved (else None). On failure the
        services' new sockets in ``bound`` are closed too: all or nothing."""
        spec = config.admin
        running = self.admin_server
        if spec is None or (running is not None and str(running.spec.listen) == str(spec.listen)):
            return None
        try:
            return bind_listener(spec.listen)
        except OSError as exc:
            for sock in bound.values():
                sock.close()
            raise StartError(f"admin.listen: cannot listen on {spec.listen}: {exc.strerror or exc}") from exc

    async def _configure_operations(self, config: Config, admin_sock: socket.socket | None) -> None:
        """Start, change or stop the alerts and the admin API for ``config`` (at start and on reload)."""
        if config.alerts is None:
            if self.alerter is not None:
                self._spawn(self.alerter.close())
                self.alerter = None
        elif self.alerter is None:
            self.alerter = Alerter(config.alerts, self.events)
        else:
            self.alerter.configure(config.alerts)
        self.admin_states.path = config.admin.state_file if config.admin is not None else None
        old = self.admin_server
        if config.admin is None:
            self.admin_server = None
        elif admin_sock is not None:
            from pacslb.admin.api import AdminServer  # FastAPI is loaded only where an admin API is configured

            self.admin_server = AdminServer(self, config.admin, admin_sock, old.history if old is not None else None)
            await self.admin_server.start()
            log_event(log, "listen", service="admin", address=str(config.admin.listen), mode="admin")
        elif old is not None:
            old.configure(config.admin)
        if old is not None and old is not self.admin_server:
            # Not awaited: this may run inside a request to that very server (POST /api/v1/reload).
            self._spawn(old.stop(keep_history=self.admin_server is not None))

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- apply a config ------------------------------------------------------------------------------

    def _apply(self, config: Config, bound: dict[str, socket.socket]) -> None:
        old_services = self.services
        by_address = {str(s.spec.listen): s for s in old_services.values() if s.listener is not None}
        new_services: dict[str, Service] = {}
        for name, spec in config.services.items():
            previous = old_services.get(name)
            if previous is not None and previous.spec.mode != spec.mode:
                previous = None  # a new kind of service: the old one is retired below, its listener moves
            servers = self._servers(spec, old_services[name].servers if name in old_services else [])
            table = None
            if spec.persistence.type != "none":
                table = self.store.persistence_table(name, spec.persistence.timeout, spec.persistence.max_entries)
            else:
                self.store.discard(name)
            if previous is not None:
                previous.apply(spec, servers, table)
                service = previous
            else:
                service = service_class(spec.mode)(name, spec, servers, table)
                service.on_connect_failed = self._connect_failed
                if self.pool is not None:
                    service.relayer = self.pool.relay
                    service.starter = self.pool.start_relay
            new_services[name] = service
            if name in bound:
                service.attach(Listener(name, bound[name], service.accept))
            else:
                owner = by_address[str(spec.listen)]
                if owner is not service:  # the address moved here from another service
                    assert owner.listener is not None
                    sock = owner.listener.detach()
                    owner.listener = None
                    service.attach(Listener(name, sock, service.accept))
        for name, service in old_services.items():
            if new_services.get(name) is not service:
                self._stop_accepting(service)
                if name not in new_services:
                    self.store.discard(name)
                self.retired.append(service)
                log_event(log, "service_removed", service=name, active=service.active)
        self.services = new_services
        self.config = config
        self._update_web_pool(config)
        self._update_monitors()
        self.nodes.apply_recorded()
        self.nodes.update_fate()
        self.check_services()

    def _update_web_pool(self, config: Config) -> None:
        """Start the web workers with the first http service (when there are workers), or send them the
        new config; every http service hands connections to them."""
        if self.web_pool is None:
            # As many as the relay workers, started with them: a change of workers applies at restart.
            if self.pool is None or not any(s.mode == "http" for s in config.services.values()):
                return
            self.web_pool = WebPool(self.pool.processes, lambda: self.services, self._worker_cut, self._connect_failed)
            self.web_pool.start(config)
        else:
            self.web_pool.configure(config)
        for service in self.services.values():
            if service.spec.mode == "http":
                service.hand_over = functools.partial(self.web_pool.take, cast("HttpService", service))

    def _stop_accepting(self, service: Service) -> None:
        """No new connection for ``service``, here nor in the web workers (they close what idles)."""
        service.stop_accepting()
        if self.web_pool is not None and service.spec.mode == "http":
            self.web_pool.stop_service(cast("HttpService", service))

    def close_server_connections(self, server: ServerState) -> int:
        """A halt's grace is over: close the connections still relaying to ``server`` in every service
        holding it (here; the web workers cut their own and report how many). Returns how many here."""
        closed = 0
        for service in [*self.services.values(), *self.retired]:
            closed += service.close_server_connections(server)
            if self.web_pool is not None and service.spec.mode == "http" and server in service.servers:
                self.web_pool.cut(cast("HttpService", service), server)
        return closed

    def _worker_cut(self, service: str, node: str, cut: int) -> None:
        """A web worker cut ``cut`` exchanges with a halted node (its part of
        :meth:`~pacslb.nodeadmin.NodeAdmin._halt_expired`)."""
        log_event(log, "halt_closed", logging.WARNING, service=service, server=node, connections=cut, by="worker")
        self.events.add(
            "halt", "warning", f"{node} halted in {service}: {cut} connection(s) closed in a worker",
            service=service, server=node, connections=cut,
        )  # fmt: skip

    @staticmethod
    def _servers(spec: ServiceSpec, old: list[ServerState]) -> list[ServerState]:
        """The server objects for ``spec``, keeping the state of servers whose name and address stay."""
        kept = {s.name: s for s in old}
        servers: list[ServerState] = []
        for name, server_spec in spec.servers.items():
            address: HostPort = server_spec.address
            server = kept.get(name)
            if server is None or (server.host, server.port) != (address.host, address.port):
                server = ServerState(name, address.host, address.port, server_spec.weight)
            server.weight = server_spec.weight
            if spec.check.type == "none":
                server.health = "up"
            servers.append(server)
        return servers

    def _update_monitors(self) -> None:
        wanted: dict[tuple[str, str], tuple[ServiceSpec, ServerState, TlsTarget | None]] = {}
        local = {"v2": LOCAL_HEADER, "none": b""}
        for name, service in self.services.items():
            if service.spec.check.type == "none":
                continue
            tls: TlsTarget | None = getattr(service, "node_tls", None)  # a dicom service with node_tls
            for server in service.servers:
                wanted[(name, server.name)] = (service.spec, server, tls)
        for key, monitor in list(self.monitors.items()):
            want = wanted.get(key)
            if (
                want is None
                or monitor.spec != want[0].check
                or monitor.server is not want[1]
                or monitor.tls is not want[2]
                or monitor.prefix != local[want[0].proxy_protocol]
            ):
                del self.monitors[key]
                self._spawn(monitor.stop())  # held until done: a bare task could be collected mid-stop
        for key, (spec, server, tls) in wanted.items():
            if key not in self.monitors:
                monitor = Monitor(key[0], spec.check, server, self._health_changed, tls, local[spec.proxy_protocol])
                self.monitors[key] = monitor
                monitor.start()

    def _connect_failed(self, service: str, server: ServerState) -> None:
        monitor = self.monitors.get((service, server.name))
        if monitor is not None and monitor.server is server:
            monitor.wake()

    def _health_changed(self, server: ServerState, old: Health, new: Health, result: CheckResult) -> None:
        name = next((n for n, s in self.services.items() if server in s.servers), "-")
        self.events.add(
            "health", "info" if new == "up" else "warning", f"{server.name} is {new} in {name} ({result.reason})",
            service=name, server=server.name, old=old, new=new, reason=result.reason,
        )  # fmt: skip
        self.nodes.update_fate()
        self.check_services()

    def check_services(self) -> None:
        """Log (and tell the event log) each service that is left with no usable server, or has one again.
        (Called after every change of a node's state: the web workers are told of it here too.)"""
        if self.web_pool is not None:
            self.web_pool.sync()
        for name, service in self.services.items():
            usable = [s.name for s in service.servers if s.schedulable]
            was = self._usable.get(name)
            self._usable[name] = bool(usable)
            if not usable and was in (True, None):
                why = ", ".join(f"{s.name} {_server_condition(s)}" for s in service.servers)
                log_event(log, "service_down", logging.ERROR, service=name, reason="no usable server", servers=why)
                self.events.add("service", "error", f"service {name} has no usable server ({why})", service=name)
            elif usable and was is False:
                log_event(log, "service_up", service=name, servers=",".join(usable))
                self.events.add(
                    "service", "info", f"service {name} is usable again ({', '.join(usable)})", service=name
                )
        for name in [n for n in self._usable if n not in self.services]:
            del self._usable[name]

    # -- reload --------------------------------------------------------------------------------------

    async def reload(self) -> bool:
        """Reload the config file. Returns whether the new config was applied."""
        async with self._reloading:
            sdnotify.reloading()
            try:
                applied = await self._reload()
            finally:
                sdnotify.ready(self.status_line())
            self.reload_counts["applied" if applied else "refused"] += 1
            if applied:
                self.reloaded_at = time.time()
                self.events.add("reload", "info", f"config reloaded from {self.config_path}")
            else:
                self.events.add(
                    "reload", "error", f"reload refused: {'; '.join(self.reload_errors)}", errors=self.reload_errors
                )
            return applied

    async def _reload(self) -> bool:
        self.reload_errors = []
        if self.config_path is None:
            self.reload_errors = ["no config file to reload (demo)"]
            log_event(log, "reload_refused", logging.WARNING, reason="no config file to reload (demo)")
            return False
        try:
            config = load_config(self.config_path)
            bound = self._bind(config)
            admin_sock = self._bind_admin(config, bound)
        except ConfigError as exc:
            self.reload_errors = [str(issue) for issue in exc.issues]
            for issue in exc.issues:
                log_event(log, "config_error", logging.ERROR, error=str(issue))
            log_event(
                log,
                "reload_refused",
                logging.ERROR,
                reason=f"{len(exc.issues)} config error(s)",
                file=self.config_path,
            )
            return False
        except StartError as exc:
            self.reload_errors = [str(exc)]
            log_event(log, "reload_refused", logging.ERROR, reason=str(exc), file=self.config_path)
            return False
        setup_logging(config.log.format, config.log.level)
        if config.worker_count != self.config.worker_count:
            log_event(log, "restart_needed", logging.WARNING, reason="a change of workers applies at restart")
        if config.cluster != self.config.cluster:
            log_event(log, "restart_needed", logging.WARNING, reason="a change of cluster applies at restart")
        self._apply(config, bound)
        await self._configure_operations(config, admin_sock)
        log_event(log, "reloaded", file=self.config_path, services=len(self.services))
        self._check_descriptors(config)
        return True

    def status_line(self) -> str:
        """One line for systemd's STATUS= (shown by ``systemctl status``)."""
        servers = [s for svc in self.services.values() for s in svc.servers]
        usable = sum(1 for s in servers if s.schedulable)
        active = sum(svc.active for svc in self.services.values())
        return f"{len(self.services)} services, {usable}/{len(servers)} servers usable, {active} connections"

    # -- stop ----------------------------------------------------------------------------------------

    def connection_count(self) -> int:
        """Connections open now, in every service (retired ones included)."""
        return sum(service.connections for service in [*self.services.values(), *self.retired])

    async def shutdown(self, grace: float | None = None) -> None:
        """Stop accepting and checking, wait up to ``grace`` for connections to end, close the rest."""
        grace = self.config.shutdown_grace if grace is None else grace
        sdnotify.stopping()
        self.nodes.cancel_halts()
        for service in self.services.values():
            self._stop_accepting(service)
        if self._sweeper is not None:
            self._sweeper.cancel()
        await asyncio.gather(*(m.stop() for m in self.monitors.values()), return_exceptions=True)
        self.monitors.clear()
        services = [*self.services.values(), *self.retired]
        log_event(log, "stopping", active=self.connection_count(), grace=grace)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        for service in services:
            await service.wait_drained(max(0.0, deadline - loop.time()))
        if self.connection_count():
            for service in services:
                service.abort_all()
            # Closed connections end at once; a bound keeps a bug in one from hanging the stop.
            deadline = loop.time() + CANCEL_WAIT
            for service in services:
                await service.wait_drained(max(0.0, deadline - loop.time()))
            if stuck := self.connection_count():
                log_event(log, "stop_stuck", logging.ERROR, connections=stuck)
        if self.pool is not None:
            await self.pool.stop()
        close_hosted()  # the main process's relays are over: their epoll set goes too
        if self.web_pool is not None:
            await self.web_pool.stop()
        if self.admin_server is not None:
            await self.admin_server.stop()
            self.admin_server = None
        if self.alerter is not None:
            await self.alerter.close()
            self.alerter = None
        if self._background:
            await asyncio.wait(set(self._background), timeout=BACKGROUND_STOP_TIMEOUT)
        self.events.close()
        await self.store.close()
        await close_http_clients()
        log_event(log, "stopped")

    async def _sweep(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(SWEEP_INTERVAL)
            for service in self.services.values():
                if service.table is not None:
                    service.table.expire(loop.time())
            self.retired = [s for s in self.retired if s.connections]


async def serve(config: Config, config_path: str | None = None, *, on_ready: Callable[[], None] | None = None) -> None:
    """Run the balancer until SIGTERM or SIGINT, reloading on SIGHUP; then stop gracefully.

    Raises:
        StartError: a listener could not be bound.
    """
    loop = asyncio.get_running_loop()
    engine = Engine(config, config_path)
    await engine.start()
    stop = asyncio.Event()
    reloads: set[asyncio.Task[bool]] = set()

    def on_hup() -> None:
        task = loop.create_task(engine.reload())
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    def on_stop(signame: str) -> None:
        log_event(log, "signal", signal=signame)
        stop.set()

    loop.add_signal_handler(signal.SIGHUP, on_hup)
    loop.add_signal_handler(signal.SIGTERM, on_stop, "SIGTERM")
    loop.add_signal_handler(signal.SIGINT, on_stop, "SIGINT")
    interval = sdnotify.watchdog_interval()
    watchdog = loop.create_task(sdnotify.watchdog(interval)) if interval is not None else None
    try:
        log_event(log, "ready", services=len(engine.services), config=config_path or "-")
        engine.events.add("lifecycle", "info", f"pacslb started with {len(engine.services)} services")
        sdnotify.ready(engine.status_line())
        if on_ready is not None:
            on_ready()
        await stop.wait()
    finally:
        for sig in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        if watchdog is not None:
            await cancel_and_wait(watchdog)
        await engine.shutdown()
