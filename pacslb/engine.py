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
Signals are handled here and nowhere else.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
from collections.abc import Callable

from pacslb.balance.server import Health, ServerState
from pacslb.checks.base import CheckResult
from pacslb.checks.http import close_clients as close_http_clients
from pacslb.checks.monitor import Monitor
from pacslb.config import Config, ServiceSpec, load_config
from pacslb.config.values import HostPort
from pacslb.errors import ConfigError, PacslbError
from pacslb.logs import log_event, setup_logging
from pacslb.proxy.dicom import DicomService
from pacslb.proxy.listener import Listener, bind_listener
from pacslb.proxy.relay import DEFAULT_METHOD
from pacslb.proxy.tcp import TcpService
from pacslb.proxy.workers import RelayPool
from pacslb.state.memory import MemoryStore
from pacslb.state.store import StateStore

log = logging.getLogger("pacslb.engine")

#: The service class of each mode.
SERVICE_KINDS: dict[str, type[TcpService]] = {"tcp": TcpService, "dicom": DicomService}

#: After the shutdown grace, how long cancelled connections get to close before pacslb exits regardless.
CANCEL_WAIT = 5.0

#: How often expired persistence entries are swept out (lookups also drop them as they find them).
SWEEP_INTERVAL = 30.0


class StartError(PacslbError):
    """The listeners could not be bound; nothing was started."""


class Engine:
    """The running balancer for one config at a time."""

    def __init__(self, config: Config, config_path: str | None = None, store: StateStore | None = None) -> None:
        self.config = config
        self.config_path = config_path
        self.store: StateStore = store if store is not None else MemoryStore()
        self.services: dict[str, TcpService] = {}
        self.retired: list[TcpService] = []
        self.monitors: dict[tuple[str, str], Monitor] = {}
        self._sweeper: asyncio.Task[None] | None = None
        self._reloading = asyncio.Lock()
        self.pool: RelayPool | None = None

    # -- start ---------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Bind every listener, then start serving and checking.

        Raises:
            StartError: a listener could not be bound (nothing is left running).
        """
        bound = self._bind(self.config)
        workers = self.config.worker_count
        if workers > 1:
            self.pool = RelayPool(workers)
            self.pool.start()
        self._apply(self.config, bound)
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep())
        log_event(log, "workers", processes=workers, relay=DEFAULT_METHOD)
        for name, service in self.services.items():
            log_event(
                log, "listen", service=name, address=str(service.spec.listen), mode=service.spec.mode,
                servers=",".join(s.name for s in service.servers),
            )  # fmt: skip

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

    # -- apply a config ------------------------------------------------------------------------------

    def _apply(self, config: Config, bound: dict[str, socket.socket]) -> None:
        old_services = self.services
        by_address = {str(s.spec.listen): s for s in old_services.values() if s.listener is not None}
        new_services: dict[str, TcpService] = {}
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
                service = SERVICE_KINDS[spec.mode](name, spec, servers, table)
                service.on_connect_failed = self._connect_failed
                if self.pool is not None:
                    service.relayer = self.pool.relay
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
                service.stop_accepting()
                if name not in new_services:
                    self.store.discard(name)
                self.retired.append(service)
                log_event(log, "service_removed", service=name, active=service.active)
        self.services = new_services
        self.config = config
        self._update_monitors()

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
        wanted: dict[tuple[str, str], tuple[ServiceSpec, ServerState]] = {}
        for name, service in self.services.items():
            if service.spec.check.type == "none":
                continue
            for server in service.servers:
                wanted[(name, server.name)] = (service.spec, server)
        for key, monitor in list(self.monitors.items()):
            spec_server = wanted.get(key)
            if spec_server is None or monitor.spec != spec_server[0].check or monitor.server is not spec_server[1]:
                del self.monitors[key]
                asyncio.get_running_loop().create_task(monitor.stop())
        for key, (spec, server) in wanted.items():
            if key not in self.monitors:
                monitor = Monitor(key[0], spec.check, server, self._health_changed)
                self.monitors[key] = monitor
                monitor.start()

    def _connect_failed(self, service: str, server: ServerState) -> None:
        monitor = self.monitors.get((service, server.name))
        if monitor is not None and monitor.server is server:
            monitor.wake()

    def _health_changed(self, server: ServerState, old: Health, new: Health, result: CheckResult) -> None:
        for name, service in self.services.items():
            if server not in service.servers:
                continue
            usable = sum(1 for s in service.servers if s.schedulable)
            if new == "down" and usable == 0:
                log_event(log, "service_down", logging.ERROR, service=name, reason="no usable server")
            elif new == "up" and usable == 1 and server.schedulable:
                log_event(log, "service_up", service=name, server=server.name)

    # -- reload --------------------------------------------------------------------------------------

    async def reload(self) -> bool:
        """Reload the config file. Returns whether the new config was applied."""
        async with self._reloading:
            if self.config_path is None:
                log_event(log, "reload_refused", logging.WARNING, reason="no config file to reload (demo)")
                return False
            try:
                config = load_config(self.config_path)
                bound = self._bind(config)
            except ConfigError as exc:
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
                log_event(log, "reload_refused", logging.ERROR, reason=str(exc), file=self.config_path)
                return False
            setup_logging(config.log.format, config.log.level)
            if config.worker_count != self.config.worker_count:
                log_event(log, "restart_needed", logging.WARNING, reason="a change of workers applies at restart")
            self._apply(config, bound)
            log_event(log, "reloaded", file=self.config_path, services=len(self.services))
            return True

    # -- stop ----------------------------------------------------------------------------------------

    def connection_tasks(self) -> set[asyncio.Task[None]]:
        tasks: set[asyncio.Task[None]] = set()
        for service in [*self.services.values(), *self.retired]:
            tasks |= service.tasks
        return tasks

    async def shutdown(self, grace: float | None = None) -> None:
        """Stop accepting and checking, wait up to ``grace`` for connections to end, close the rest."""
        grace = self.config.shutdown_grace if grace is None else grace
        for service in self.services.values():
            service.stop_accepting()
        if self._sweeper is not None:
            self._sweeper.cancel()
        await asyncio.gather(*(m.stop() for m in self.monitors.values()), return_exceptions=True)
        self.monitors.clear()
        tasks = self.connection_tasks()
        log_event(log, "stopping", active=len(tasks), grace=grace)
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=grace)
            for task in pending:
                task.cancel()
            if pending:
                # Cancelled connections close at once; a bound keeps a bug in one from hanging the stop.
                _, stuck = await asyncio.wait(pending, timeout=CANCEL_WAIT)
                if stuck:
                    log_event(log, "stop_stuck", logging.ERROR, connections=len(stuck))
        if self.pool is not None:
            await self.pool.stop()
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
            self.retired = [s for s in self.retired if s.tasks]


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
    try:
        log_event(log, "ready", services=len(engine.services), config=config_path or "-")
        if on_ready is not None:
            on_ready()
        await stop.wait()
    finally:
        for sig in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        await engine.shutdown()
